"""The ``bench`` stage: latency, memory, roofline fraction and mIoU of every model and build of a run.

Every figure comes from the artifact itself through its runner (:func:`opentrans.deploy.targets.load_runner`),
each artifact measured in its own fresh process (:mod:`opentrans.bench.worker`), all in one run, so the rows
are comparable with each other and only with each other.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from opentrans.artifacts import StageRecord, load_manifest, machine_description
from opentrans.bench.options import BenchOptions
from opentrans.bench.report import pareto_front, write_bench_report
from opentrans.bench.roofline import measure_roofline
from opentrans.bench.worker import Job, measure_isolated
from opentrans.data import open_dataset
from opentrans.deploy.targets import BUILD_FILE
from opentrans.errors import OpenTransError
from opentrans.inference.evaluate import label_agreement
from opentrans.models.artifact import SPEC_FILE, WEIGHTS_FILE, open_model_dir
from opentrans.options import as_record


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


def _parity_agreement(path: Path) -> float | None:
    """A deploy build's pixel agreement (%) with the model it was exported from, as its parity check measured
    it; None for a PyTorch model directory."""
    if (path / SPEC_FILE).exists():
        return None
    return float(load_manifest(path)["figures"]["pixel_agreement"])


def _auto_decision(path: Path) -> dict | None:
    """The ``decision.json`` of a ``deploy --precision auto`` build (None for other artifacts)."""
    from opentrans.artifacts import read_json
    from opentrans.deploy.auto import DECISION_FILE

    return read_json(path / DECISION_FILE) if (path / DECISION_FILE).exists() else None


def _display_name(path: Path) -> str:
    return str(path.relative_to(path.parents[1])) if len(path.parents) > 1 else path.name


def _reference(paths: list[str | os.PathLike], reference: str | os.PathLike | None) -> tuple[list[Path], Path]:
    """``(artifacts to measure, the reference model directory)``, the reference first if it is not under
    ``paths``.

    Raises:
        OpenTransError: no artifacts, or no PyTorch model directory to use as reference.
    """
    artifacts = discover_artifacts(paths)
    model_dirs = [a for a in artifacts if (a / SPEC_FILE).exists()]
    ref_dir = Path(reference) if reference else (model_dirs[0] if model_dirs else None)
    if ref_dir is None or not (ref_dir / SPEC_FILE).exists():
        raise OpenTransError("bench needs a PyTorch model directory (model.json) as reference; pass --reference DIR")
    if ref_dir not in artifacts:
        artifacts.insert(0, ref_dir)
    return artifacts, ref_dir


def _row(art: Path, res: dict, ref: dict, batch: int, peaks: dict, num_classes: int) -> dict:
    """One table row: ``art``'s measurement ``res`` against the reference's ``ref`` (see :func:`bench_stage`)."""
    lat1 = res["latency"][batch]
    peak_key = res["precision"] if res["precision"] in ("int8", "bf16") else "fp32"
    achieved = res["gmacs"] / (lat1["median_ms"] / 1e3 / lat1["batch"])
    agree = label_agreement(ref["argmax"], res["argmax"], num_classes)
    return {
        "name": f"{_display_name(art)} [{res['backend']}]", "path": str(art), "backend": res["backend"],
        "precision": res["precision"], **lat1, "speedup": ref["latency"][batch]["median_ms"] / lat1["median_ms"],
        "latency_by_batch": {str(b): v for b, v in res["latency"].items()},
        "miou": res["miou"], "pixel_acc": res["pixel_acc"], "agreement": agree["pixel_agreement"],
        "parity_agreement": _parity_agreement(art),
        "teacher_miou": agree["teacher_miou"], "size_mb": _artifact_size_mb(art),
        "peak_rss_mb": res["peak_rss_mb"], "params_m": res["params_m"], "gmacs": res["gmacs"],
        "achieved_gmac_per_s": achieved, "roofline_precision": peak_key,
        "roofline_fraction": achieved / peaks[peak_key] if peaks else None,
        "weights": res["spec"].weights, "lineage": res["spec"].lineage, "decision": _auto_decision(art),
    }


def _header(paths, options: BenchOptions, ref_dir: Path, ref_spec, dataset, peaks: dict) -> dict:
    """The report's header: the run, the machine, the input and the measurement protocol."""
    return {"run": ", ".join(map(str, paths)), "weights": ref_spec.weights, "machine": machine_description(),
            "load_average": list(os.getloadavg()), "roofline_gmac_per_s": peaks,
            "image_size": list(ref_spec.image_size), "batch": options.batch_sizes[0],
            "batch_sizes": list(options.batch_sizes), "warmup": options.warmup, "repeats": options.repeats,
            "dataset": dataset.name, "split": options.split, "images": len(dataset),
            "num_classes": len(dataset.class_names), "reference": f"{ref_dir} [torch-fp32]"}


def bench_stage(paths: list[str | os.PathLike], options: BenchOptions, out_dir: str | os.PathLike, data: str,
                reference: str | os.PathLike | None = None) -> dict:
    """Benchmark every artifact under ``paths`` on ``data`` (``options.split``, ``options.limit`` images).

    Per artifact: latency at each of ``options.batch_sizes`` (median, p90, p99 in ms over ``options.repeats``
    timed runs after ``options.warmup``; images/s), peak resident memory (MB), size (MB), image-encoder params (M)
    and GMACs, achieved GMAC/s and its fraction of this machine's GEMM roofline at the build's precision
    (:mod:`opentrans.bench.roofline`; ``options.roofline``), mIoU and pixel accuracy on ``data``, and agreement
    with the reference (pixel argmax agreement and teacher mIoU, in %).

    The reference (default: the first PyTorch model directory found) supplies the text embeddings and the
    argmax that every build is compared with; speed-ups are relative to its batch-1 median.

    Writes ``bench.md``, ``bench.json``, ``bench.csv``, ``bench.png``, ``cards/*.md`` and ``manifest.json``.

    Returns:
        ``{"rows": [...], "header": {...}}``.

    Raises:
        OpenTransError: no artifacts, no PyTorch model to use as reference, bad data spec, bad counts.
    """
    started = time.perf_counter()
    options.check()
    batch_sizes = tuple(options.batch_sizes)
    artifacts, ref_dir = _reference(paths, reference)
    ref_seg, ref_spec = open_model_dir(ref_dir)
    dataset = open_dataset(data, options.split, ref_spec.image_size, ref_spec.mean, ref_spec.std, limit=options.limit)
    text = ref_seg.encode_classes(list(dataset.class_names), model_name=ref_spec.model).numpy()
    del ref_seg
    out_dir = Path(out_dir)
    record = {"paths": [str(p) for p in paths], "data": data, **as_record(options), "reference": str(ref_dir)}
    with StageRecord("bench", out_dir, record, started=started) as rec:
        peaks = measure_roofline() if options.roofline else {}
        results = {}
        for art in artifacts:
            rec.add_input(art / (SPEC_FILE if (art / SPEC_FILE).exists() else BUILD_FILE))
            job = Job(str(art), data, options.split, options.limit, text, batch_sizes, options.warmup,
                      options.repeats)
            results[art] = measure_isolated(job)
        rows = [_row(art, res, results[ref_dir], batch_sizes[0], peaks, len(dataset.class_names))
                for art, res in results.items()]
        front = pareto_front(rows)
        for r in rows:
            r["pareto"] = r["name"] in front
        header = _header(paths, options, ref_dir, ref_spec, dataset, peaks)
        for path in write_bench_report(rows, header, out_dir):
            rec.add_output(path)
        rec.weights = ref_spec.weights
        rec.figures = {r["name"]: {k: r[k] for k in ("median_ms", "p90_ms", "images_per_s", "speedup", "miou",
                                                    "agreement", "roofline_fraction")} for r in rows}
    return {"rows": rows, "header": header}
