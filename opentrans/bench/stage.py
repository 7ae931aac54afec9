"""The ``bench`` stage: latency and mIoU of every model and build of a run, measured in one process."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from opentrans.artifacts import StageRecord, load_manifest, machine_description
from opentrans.bench.latency import measure_latency
from opentrans.bench.report import pareto_front, write_bench_report
from opentrans.data import open_dataset
from opentrans.errors import OpenTransError
from opentrans.evaluate import TorchRunner, agreement, evaluate
from opentrans.deploy.targets import BUILD_FILE, load_runner
from opentrans.models.artifact import SPEC_FILE, WEIGHTS_FILE, load_segmentor


def discover_artifacts(paths: list[str | os.PathLike]) -> list[Path]:
    """Model directories (``model.json``) and deploy builds (``build.json``) under ``paths``, in path order.

    A path may be a run directory (searched recursively) or one artifact directory.

    Raises:
        OpenTransError: a path that does not exist, or no artifact found at all.
    """
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise OpenTransError(f"{p}: no such directory")
        markers = [m.parent for name in (SPEC_FILE, BUILD_FILE) for m in p.rglob(name)]
        found.extend(sorted(set(markers) - set(found), key=lambda d: str(d)))
    if not found:
        raise OpenTransError(f"no model or deploy build under {', '.join(map(str, paths))}")
    return found


def _artifact_size_mb(path: Path) -> float:
    """Size in MB (10^6 bytes) of what ships: the deploy manifest's model files, or a model's safetensors."""
    if (path / WEIGHTS_FILE).exists():
        return (path / WEIGHTS_FILE).stat().st_size / 1e6
    return float(load_manifest(path)["figures"]["size_mb"])


def bench_stage(paths: list[str | os.PathLike], out_dir: str | os.PathLike, data: str, split: str = "val",
                limit: int | None = 24, warmup: int = 3, repeats: int = 20, batch_size: int = 1,
                reference: str | os.PathLike | None = None) -> dict:
    """Benchmark every artifact under ``paths``: latency (ms), images/s, mIoU and agreement with a reference.

    The reference (default: the first PyTorch model directory found) supplies the text embeddings, the
    input size and the argmax that every build's pixel agreement is measured against. Every figure comes
    from the artifact itself through its runner (:func:`opentrans.deploy.targets.load_runner`).

    Writes ``bench.md``, ``bench.json``, ``bench.png`` and ``manifest.json`` into ``out_dir``.

    Raises:
        OpenTransError: no artifacts, no PyTorch model to use as reference, bad data spec, bad counts.
    """
    started = time.perf_counter()
    if repeats < 1 or warmup < 0 or batch_size < 1:
        raise OpenTransError(f"need --repeats >= 1, --warmup >= 0, --batch-size >= 1 (got {repeats}, {warmup}, {batch_size})")
    artifacts = discover_artifacts(paths)
    model_dirs = [a for a in artifacts if (a / SPEC_FILE).exists()]
    ref_dir = Path(reference) if reference else (model_dirs[0] if model_dirs else None)
    if ref_dir is None or not (ref_dir / SPEC_FILE).exists():
        raise OpenTransError("bench needs a PyTorch model directory (model.json) as reference; pass --reference DIR")
    ref_seg, ref_spec = load_segmentor(ref_dir)
    dataset = open_dataset(data, split, ref_spec.image_size, ref_spec.mean, ref_spec.std, limit=limit)
    text = ref_seg.encode_classes(list(dataset.class_names), model_name=ref_spec.model).numpy()
    ref_runner = TorchRunner(ref_seg)
    images = np.stack([dataset[i % len(dataset)][0].numpy() for i in range(batch_size)])
    out_dir = Path(out_dir)
    options = {"paths": [str(p) for p in paths], "data": data, "split": split, "limit": limit, "warmup": warmup,
               "repeats": repeats, "batch_size": batch_size, "reference": str(ref_dir)}
    with StageRecord("bench", out_dir, options, started=started) as rec:
        rows = []
        for art in artifacts:
            runner = ref_runner if art == ref_dir else load_runner(art)
            rec.add_input(art / (SPEC_FILE if (art / SPEC_FILE).exists() else BUILD_FILE))
            name = f"{art.relative_to(art.parents[1]) if len(art.parents) > 1 else art.name} [{runner.name}]"
            lat = measure_latency(runner, images, text, warmup=warmup, repeats=repeats)
            metrics = evaluate(runner, dataset, text, desc=f"mIoU {name}")
            agree = agreement(ref_runner, runner, dataset, text)
            rows.append({"name": name, "path": str(art), "backend": runner.name, **lat,
                         "miou": metrics["miou"], "pixel_acc": metrics["pixel_acc"],
                         "agreement": round(agree["pixel_agreement"], 2), "size_mb": round(_artifact_size_mb(art), 2)})
        base = next(r["median_ms"] for r in rows if r["path"] == str(ref_dir))
        front = pareto_front(rows)
        for r in rows:
            r["speedup"] = round(base / r["median_ms"], 3)
            r["pareto"] = r["name"] in front
        header = {"run": ", ".join(map(str, paths)), "weights": ref_spec.weights, "machine": machine_description(),
                  "image_size": list(ref_spec.image_size), "batch": batch_size, "warmup": warmup, "repeats": repeats,
                  "dataset": dataset.name, "split": split, "images": len(dataset),
                  "num_classes": len(dataset.class_names), "reference": f"{ref_dir} [torch-fp32]"}
        for path in write_bench_report(rows, header, out_dir):
            rec.add_output(path)
        rec.weights = ref_spec.weights
        rec.figures = {r["name"]: {k: r[k] for k in ("median_ms", "p90_ms", "images_per_s", "speedup", "miou", "agreement")}
                       for r in rows}
    return {"rows": rows, "header": header}
