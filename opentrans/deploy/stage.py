"""The ``deploy`` stage: export, convert/quantise for a target, check parity with PyTorch, then publish.

Nothing reaches ``out_dir`` unless the artifact reproduces the PyTorch model on real validation images within
:data:`PARITY_THRESHOLDS`. The build happens in a temporary directory beside ``out_dir`` (same file system);
after the parity check and the manifest it is renamed into place. An earlier complete build in ``out_dir`` is
replaced only then: it is renamed aside, the new build renamed in, and the old one removed.

A build directory holds ``build.json`` (what :func:`opentrans.deploy.targets.load_runner` reads), ``parity.json``,
``manifest.json``, ``text_embeds.npy`` (float32 (C, D)), ``classes.json`` and the target's model files; INT8 builds
add ``quant_report.json`` (quantised layers, layers kept in floating point and why: text path, ``--ignore-ops``,
accuracy control) and, with ``--sensitivity``, ``sensitivity.json``/``sensitivity.md``.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from opentrans.artifacts import StageRecord, atomic_path, check_replaceable, make_staging_dir, write_json
from opentrans.deploy.auto import AUTO, AUTO_ROUNDS, AUTO_WARMUP, DECISION_FILE, Candidate, auto_candidates, choose
from opentrans.deploy.export import DEFAULT_OPSET, INPUT_NAMES, check_opset, export_onnx
from opentrans.deploy.quantize import (
    DEFAULT_SMOOTH_QUANT_ALPHA,
    DROP_METRICS,
    check_ignore_patterns,
    check_smooth_quant_alpha,
)
from opentrans.deploy.targets import (
    BUILD_FILE,
    BUILD_FORMAT,
    CLASSES_FILE,
    PARITY_FILE,
    TARGETS,
    TEXT_EMBEDS_FILE,
    CPU_TARGETS,
    BuildContext,
    check_target,
    target_module,
)
from opentrans.deploy.text_graph import TEXT_ONNX, TEXT_PARITY, build_text_graph
from opentrans.errors import OpenTransError

#: INT8 builds: what was quantised and what was kept in floating point (and why).
QUANT_REPORT_FILE = "quant_report.json"

#: Parity thresholds per precision that the parity check exercises, against PyTorch fp32 on real validation
#: images (figures from :func:`opentrans.inference.evaluate.agreement`). ``max_abs_diff`` is an upper bound, the others lower
#: bounds; ``teacher_miou`` is reported, not gated. The measurements behind each bound are in docs/quantization.md
#: ("Parity thresholds").
PARITY_THRESHOLDS: dict[str, dict[str, tuple[str, float]]] = {
    "fp32": {"max_abs_diff": ("<=", 1e-3), "cosine": (">=", 0.99999), "pixel_agreement": (">=", 99.5)},
    "fp16": {"max_abs_diff": ("<=", 0.5), "cosine": (">=", 0.999), "pixel_agreement": (">=", 97.0)},
    "int8": {"cosine": (">=", 0.99), "pixel_agreement": (">=", 90.0)},
    # bf16 (``--precision auto`` on CPUs with native bf16: the fp32 IR run with OpenVINO's bf16 hint): 8 significant
    # bits, fewer than fp16's 11 (measured max |diff| 3e-2 on ViT-B-32); the fp16 gate applies.
    "bf16": {"max_abs_diff": ("<=", 0.5), "cosine": (">=", 0.999), "pixel_agreement": (">=", 97.0)},
}


def check_parity(figures: dict[str, float], precision: str) -> list[str]:
    """The thresholds of ``precision`` that ``figures`` (from :func:`opentrans.inference.evaluate.agreement`) miss, as
    ``"cosine 0.95 < 0.99"`` strings; empty when all pass."""
    failures = []
    for key, (op, bound) in PARITY_THRESHOLDS[precision].items():
        value = figures[key]
        ok = value <= bound if op == "<=" else value >= bound
        if not ok:
            failures.append(f"{key} {value:.6g} {'>' if op == '<=' else '<'} {bound:g}")
    return failures


def recorded_data(from_dir: str | os.PathLike | None) -> str:
    """The dataset (``FORMAT:PATH``) a model directory's manifest records (finetune's ``data`` option), the default
    of ``deploy --data``.

    Raises:
        OpenTransError: no ``from_dir`` (a fresh ``--model``), or a manifest that records no dataset.
    """
    from opentrans.artifacts import load_manifest

    if from_dir is None:
        raise OpenTransError("--data: required with --model (only a --from artifact records the data it was made with)")
    data = load_manifest(from_dir).get("options", {}).get("data")
    if not data:
        raise OpenTransError(f"--data: required; {from_dir}/manifest.json records no dataset (e.g. a prune artifact)")
    return str(data)


def _cpu_isa_record(target: str, mode: str | None) -> dict[str, Any]:
    """``build.json["cpu_isa"]``: the ``--cpu-isa`` mode (None for GPU targets), NNCF's overflow-fix policy for
    INT8 weights and the ISA of the CPU the build was made and checked on.

    Raises:
        OpenTransError: ``mode`` given for a GPU target, or unknown.
    """
    from opentrans.hardware import check_cpu_isa_mode, cpu_isa, int8_overflow_fix

    isa = cpu_isa()
    if target not in CPU_TARGETS:
        if mode is not None:
            raise OpenTransError(f"--cpu-isa: applies to the CPU targets {', '.join(CPU_TARGETS)} (asked: {target}, "
                                 f"whose INT8 accumulates in int32 on the GPU)")
        return {"mode": None, "overflow_fix": "first_layer_only", "built_on": isa.to_json()}
    mode = check_cpu_isa_mode(mode or "native")
    return {"mode": mode, "overflow_fix": int8_overflow_fix(mode, isa), "built_on": isa.to_json()}


def _check_out_dir(out_dir: Path) -> None:
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise OpenTransError(f"--out {out_dir}: exists and is not a directory")
    if any(out_dir.iterdir()) and not (out_dir / BUILD_FILE).exists():
        raise OpenTransError(f"--out {out_dir}: exists, is not empty and is not a deploy build; choose another directory")
    check_replaceable(out_dir)  # a new build replaces the whole directory: refuse one holding files it did not write


def _publish(tmp: Path, out_dir: Path) -> None:
    """Rename the finished build ``tmp`` onto ``out_dir``, replacing an earlier build only now."""
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    old = tmp.with_name(tmp.name + ".old")
    os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old)


def _build_and_check(target: str, candidate: Candidate, build_dir: Path, onnx_path: Path, context: dict[str, Any],
                     seg, val, text: np.ndarray) -> tuple[Any, dict[str, Any], list[str]]:
    """Build ``candidate`` for ``target`` in ``build_dir`` from the fp32 export ``onnx_path`` (consumed: converted,
    replaced or removed by the target) and check it against PyTorch on ``val``.

    Returns:
        ``(BuildOutput, parity figures, failed thresholds)``; the runner of a bf16 candidate is the fp32 IR compiled
        with the bf16 inference hint, checked against the ``bf16`` gate.
    """
    from opentrans.inference.evaluate import TorchRunner, agreement

    ctx = BuildContext(precision=candidate.build_precision, build_dir=build_dir, onnx_path=onnx_path, **context)
    built = target_module(target).build(ctx)
    if candidate.precision != candidate.build_precision:  # bf16: same IR, other inference precision
        from opentrans.deploy.targets.openvino import OpenVINORunner

        built.runner = OpenVINORunner(build_dir / built.file, name=f"openvino-{candidate.precision}",
                                      inference_precision=candidate.inference_precision)
        built.checked_precision = candidate.precision
        built.info["inference_precision"] = candidate.inference_precision
        built.info["parity_inference_precision"] = built.runner.inference_precision
    figures = agreement(TorchRunner(seg), built.runner, val, text)
    return built, figures, check_parity(figures, built.checked_precision)


def _build_auto(target: str, candidates: list[Candidate], tmp: Path, onnx_path: Path, context: dict[str, Any],
                seg, val, text: np.ndarray) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """``--precision auto`` (see :mod:`opentrans.deploy.auto`): build and check every candidate in its own folder
    under ``tmp``, time the passing ones interleaved on one val image, move the kept build's files into ``tmp``.

    Returns:
        ``(BuildOutput of the kept build, its parity figures, decision)``; the decision (``decision.json``) has
        ``kept``, ``cpu``, ``rounds`` and one row per candidate (precision, median_ms, figures, passed, failures,
        kept, why).

    Raises:
        OpenTransError: the fp32 candidate fails its parity gate; errors of the targets.
    """
    from opentrans.hardware import cpu_isa
    from opentrans.timing import interleaved_ms

    results = {}
    for cand in candidates:
        folder = tmp / ".auto" / cand.precision
        folder.mkdir(parents=True)
        shutil.copyfile(onnx_path, folder / onnx_path.name)
        results[cand.precision] = _build_and_check(target, cand, folder, folder / onnx_path.name, context, seg, val,
                                                   text)
    image = np.ascontiguousarray(val[0][0][None].numpy(), dtype=np.float32)
    timed = {p: (lambda r=built.runner: r(image, text)) for p, (built, _, failures) in results.items() if not failures}
    medians = interleaved_ms(timed, repeats=AUTO_ROUNDS, warmup=AUTO_WARMUP)
    rows = [{"precision": p, "median_ms": medians.get(p),
             "figures": {k: figures[k] for k in ("max_abs_diff", "cosine", "pixel_agreement", "teacher_miou")},
             "passed": not failures, "failures": failures} for p, (_, figures, failures) in results.items()]
    kept = choose(rows)
    built, figures, _ = results[kept]
    folder = tmp / ".auto" / kept
    for name in built.model_files:
        os.replace(folder / name, tmp / name)
    if onnx_path.exists() and onnx_path.name not in built.model_files:
        onnx_path.unlink()  # e.g. openvino: the IR replaces the export
    shutil.rmtree(tmp / ".auto")
    decision = {"kept": kept, "cpu": cpu_isa().summary(), "rounds": AUTO_ROUNDS, "batch": 1,
                "images": f"{val.name} val image 0", "candidates": rows}
    return built, figures, decision


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array)


def deploy_stage(from_dir: str | os.PathLike | None, model: str | None, pretrained: str, out_dir: str | os.PathLike,
                 target: str, precision: str, data: str, parity_limit: int = 8, calib_size: int = 32,
                 opset: int = DEFAULT_OPSET, image_size: tuple[int, int] | None = None, *,
                 smooth_quant_alpha: float = DEFAULT_SMOOTH_QUANT_ALPHA, max_batch: int = 4,
                 max_classes: int | None = None, calib_data: str | None = None, ignore_ops: list[str] | None = None,
                 max_drop: float | None = None, drop_metric: str = "agreement", sensitivity: bool = False,
                 sensitivity_images: int = 4, sensitivity_top: int | None = None,
                 dynamic_hw: bool = False, cpu_isa: str | None = None) -> dict[str, Any]:
    """Build a ``target`` artifact at ``precision`` for a model, check it against PyTorch, write it to ``out_dir``.

    Args:
        from_dir: a prune/finetune output directory (``model.json``), or None with ``model``.
        model, pretrained: an open_clip architecture and weights (``none``, tag or path) when ``from_dir`` is None.
        out_dir: the build directory to write (absent, empty, or an earlier deploy build, which is replaced
            only once the new build has passed).
        target: one of :data:`opentrans.deploy.targets.TARGETS` (``onnx``, ``openvino``, ``jetson``, ``nvidia``).
        precision: one of ``PRECISIONS[target]`` (``fp32``, ``fp16``, ``int8``), or ``auto`` for the CPU targets:
            build fp32, bf16 (openvino, CPUs with native bf16 only) and int8, check each, time them side by side and
            keep the fastest that passes its gate (:mod:`opentrans.deploy.auto`; ``decision.json`` records it).
        data: ``FORMAT:PATH`` dataset; its class names become the text embeddings, its ``val`` split is used for
            the parity check and its ``train`` split for INT8 calibration.
        parity_limit: number of validation images in the parity check.
        calib_size: number of training images NNCF calibrates on (int8 only).
        opset: ONNX opset of the export (14..20; 17 for JetPack 5/6).
        image_size: network input (H, W) in pixels for a fresh ``model`` (default: the model's native short side
            on CamVid-shaped images); a ``from_dir`` model keeps its own.
        smooth_quant_alpha: NNCF SmoothQuant alpha for ViT MatMuls (int8 only; -1 disables).
        max_batch, max_classes: upper bounds of the TensorRT optimisation profile (jetson, nvidia); classes
            default to max(64, number of classes).
        calib_data: INT8 calibration images instead of ``data``'s train split: any ``FORMAT:PATH`` dataset (its
            train split), or a plain folder of images (``images:PATH``, a bare path, or ``folder:PATH`` without
            ``images/``), see :mod:`opentrans.deploy.calibration`; ``calib_size`` of them are used.
        ignore_ops: regular expressions of image-graph operation names kept in floating point (int8 only).
        max_drop: accuracy-controlled INT8 (openvino only): the largest acceptable drop of ``drop_metric``, in
            percentage points, measured on the artifact on the ``parity_limit`` val images; NNCF reverts layers to
            floating point until it holds. ``quant_report.json`` lists the reverted layers.
        drop_metric: ``agreement`` (argmax agreement with the fp32 PyTorch model, %) or ``miou`` (on the val
            labels, %).
        sensitivity: also write ``sensitivity.json``/``sensitivity.md`` (int8 only): each quantisable image-encoder
            layer quantised alone, its agreement/cosine drop against fp32 on ``sensitivity_images`` val images
            (at most ``parity_limit``), most costly first; ``sensitivity_top`` rows in the Markdown table.
        dynamic_hw: export the image graph with dynamic height/width (ViT position embeddings resized in the
            graph; see :mod:`opentrans.deploy.export`); the parity check runs at the model's input size.
        cpu_isa: CPU targets (onnx, openvino): the CPU the build is for, one of
            :data:`opentrans.hardware.CPU_ISA_MODES` (default ``native``: this machine's). It decides NNCF's INT8
            overflow fix (:func:`opentrans.hardware.int8_overflow_fix`: every layer's weights within 7 bits for
            CPUs without VNNI, ``portable`` always); ``build.json["cpu_isa"]`` records mode, fix and this CPU's
            ISA. GPU targets (jetson, nvidia) accumulate INT8 in int32 and take no ``cpu_isa``.

    Every build also carries the text tower as its own graph (``text_encoder.onnx``, ``text_encoder.xml`` for
    openvino), the CLIP tokenizer files, and ``build.json["text_encoder"]`` with its parity against PyTorch
    (:mod:`opentrans.deploy.text_graph`); a text graph that misses :data:`~opentrans.deploy.text_graph.TEXT_PARITY`
    fails the build like the image graph.

    Returns:
        Figures: the parity figures (``max_abs_diff``, ``mean_abs_diff``, ``cosine``, ``pixel_agreement``,
        ``teacher_miou`` in %), ``size_mb`` (model files, 10^6 bytes), ``export_s`` and the target's timings
        (seconds), ``target``, ``precision``, ``checked_precision``, ``parity_images``.

    Raises:
        OpenTransError: (one line, nothing written) an unknown target or precision (the message lists the
            target's precisions), a bad calibration source (e.g. a folder without images), an INT8-only option
            with another precision, ``cpu_isa`` for a GPU target or an unknown mode, an unavailable back end
            (``nvidia`` without TensorRT), a bad opset, data spec, limit or output directory, model errors from
            :func:`~opentrans.models.artifact.resolve_model`; and an artifact that fails its parity thresholds
            (figures in the message; nothing written either).
    """
    started = time.perf_counter()
    from opentrans.data import open_dataset, parse_data_spec
    from opentrans.hardware import cpu_isa as read_cpu_isa
    from opentrans.models.artifact import resolve_model

    auto = precision == AUTO
    candidates = auto_candidates(target, read_cpu_isa().native_bf16) if auto else []
    check_target(target, "fp32" if auto else precision)
    opset = check_opset(opset)
    parse_data_spec(data)
    if parity_limit < 1:
        raise OpenTransError(f"--parity-limit {parity_limit}: must be at least 1")
    quantises = precision in ("int8", AUTO)
    if quantises and calib_size < 1:
        raise OpenTransError(f"--calib-size {calib_size}: must be at least 1")
    check_smooth_quant_alpha(smooth_quant_alpha)
    ignore_ops = check_ignore_patterns(ignore_ops)
    int8_only = {"--calib-data": calib_data is not None, "--ignore-ops": bool(ignore_ops),
                 "--max-drop": max_drop is not None, "--sensitivity": sensitivity}
    for flag, given in int8_only.items():
        if given and not quantises:
            raise OpenTransError(f"{flag}: applies to --precision int8 (or auto) only (asked: {precision})")
    if max_drop is not None and target != "openvino":
        raise OpenTransError(f"--max-drop: accuracy-controlled quantisation is built for --target openvino only "
                             f"(asked: {target})")
    if max_drop is not None and max_drop < 0:
        raise OpenTransError(f"--max-drop {max_drop}: must be >= 0 (percentage points)")
    if drop_metric not in DROP_METRICS:
        raise OpenTransError(f"--drop-metric {drop_metric}: choose {', '.join(DROP_METRICS)}")
    if sensitivity_images < 1 or (sensitivity_top is not None and sensitivity_top < 1):
        raise OpenTransError("--sensitivity-images and --sensitivity-top: must be at least 1")
    isa_record = _cpu_isa_record(target, cpu_isa)
    if calib_data is not None:
        from opentrans.deploy.calibration import calibration_source

        calibration_source(calib_data)
    if max_batch < 1:
        raise OpenTransError(f"--max-batch {max_batch}: must be at least 1")
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)

    seg, spec, inputs = resolve_model(from_dir, model, pretrained, image_size=image_size)
    if from_dir is not None and image_size is not None and tuple(image_size) != tuple(spec.image_size):
        raise OpenTransError(f"--image-size {image_size}: a --from model keeps its input size "
                             f"{spec.image_size[0]}x{spec.image_size[1]}; re-run prune/finetune to change it")
    val = open_dataset(data, "val", spec.image_size, spec.mean, spec.std, limit=parity_limit)
    calib: list[np.ndarray] = []
    if quantises:
        from opentrans.deploy.calibration import calibration_images

        calib = calibration_images(calib_data or data, spec.image_size, spec.mean, spec.std, calib_size)
    names = list(val.class_names)
    if max_classes is not None and max_classes < len(names):
        raise OpenTransError(f"--max-classes {max_classes}: below the dataset's {len(names)} classes")
    text = np.ascontiguousarray(seg.encode_classes(names, model_name=spec.model).numpy(), dtype=np.float32)

    options = {"from": from_dir, "model": model, "pretrained": pretrained, "out": out_dir, "target": target,
               "precision": precision, "data": data, "parity_limit": parity_limit, "calib_size": calib_size,
               "opset": opset, "image_size": list(spec.image_size), "smooth_quant_alpha": smooth_quant_alpha,
               "max_batch": max_batch, "max_classes": max_classes, "calib_data": calib_data, "ignore_ops": ignore_ops,
               "max_drop": max_drop, "drop_metric": drop_metric, "sensitivity": sensitivity,
               "sensitivity_images": sensitivity_images, "sensitivity_top": sensitivity_top, "dynamic_hw": dynamic_hw,
               "cpu_isa": isa_record["mode"]}
    target_options = {"smooth_quant_alpha": smooth_quant_alpha, "max_batch": max_batch, "ignore_ops": ignore_ops,
                      "max_drop": max_drop, "drop_metric": drop_metric, "calib_data": calib_data,
                      "ignore_index": val.ignore_index, "dynamic_hw": dynamic_hw,
                      "overflow_fix": isa_record["overflow_fix"]}
    if max_classes is not None:
        target_options["max_classes"] = max_classes

    source = {"from_dir": None if from_dir is None else str(Path(from_dir).resolve()),
              "from_dir_relative": None if from_dir is None else os.path.relpath(Path(from_dir).resolve(),
                                                                                 out_dir.resolve()),
              "model": spec.model, "pretrained": spec.pretrained}
    created_parent = not out_dir.parent.exists()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_staging_dir(out_dir, ".deploy-tmp")  # also removes ones of killed runs
    try:
        with StageRecord("deploy", tmp, options, started=started) as rec:
            rec.weights = spec.weights
            for path in inputs:
                rec.add_input(path)
            start = time.perf_counter()
            onnx_path = export_onnx(seg, tmp / "model.onnx", opset=opset, dynamic_hw=dynamic_hw)
            export_s = time.perf_counter() - start
            _save_npy(tmp / TEXT_EMBEDS_FILE, text)
            write_json(tmp / CLASSES_FILE, names)
            context = dict(
                segmentor=seg, spec=spec, opset=opset, class_names=names, text_embeds=text,
                calibration=lambda: list(calib),
                sample_images=val[0][0][None].numpy(), options=target_options,
                validation=lambda: [(val[i][0][None].numpy(), val[i][1].numpy()) for i in range(len(val))])
            if sensitivity:
                from opentrans.deploy.sensitivity import layer_sensitivity, write_sensitivity_report

                n = min(sensitivity_images, len(val))
                report = layer_sensitivity(onnx_path, calib, np.stack([val[i][0].numpy() for i in range(n)]), text,
                                           model_type_transformer=seg.is_vit, smooth_quant_alpha=smooth_quant_alpha,
                                           ignore_patterns=ignore_ops, overflow_fix=isa_record["overflow_fix"])
                write_sensitivity_report(report, tmp, top_n=sensitivity_top)
            decision = None
            if auto:
                built, figures, decision = _build_auto(target, candidates, tmp, onnx_path, context, seg, val, text)
                precision = decision["kept"]
                write_json(tmp / DECISION_FILE, decision)
            else:
                built, figures, failures = _build_and_check(target, Candidate(precision, precision, None), tmp,
                                                            onnx_path, context, seg, val, text)
                if failures:
                    summary = ", ".join(f"{k} {figures[k]:.6g}"
                                        for k in ("max_abs_diff", "cosine", "pixel_agreement", "teacher_miou"))
                    raise OpenTransError(
                        f"deploy {target}-{precision}: parity check against PyTorch failed on {len(val)} {val.name} val "
                        f"images ({spec.weights}): {'; '.join(failures)} (measured {summary}); nothing written to "
                        f"{out_dir}")
            if precision == "int8":
                quantized = built.info.pop("quantized_layers", None)
                accuracy = built.info.pop("quant_report", None)
                write_json(tmp / QUANT_REPORT_FILE, {
                    "target": target, "precision": precision, "quantizer": built.info.get("quantizer"),
                    "calibration": {"data": calib_data or f"{data} (train split)", "images": len(calib)},
                    "smooth_quant_alpha": built.info.get("smooth_quant_alpha"),
                    "quantized_layers": quantized, "ignore_ops": ignore_ops,
                    "kept_fp32": {"text_path": "every op fed by text_embeds (similarity MatMul, upsampling)",
                                  "ignore_ops": built.info.get("ignore_ops", []),
                                  "accuracy_control": [] if accuracy is None else accuracy["reverted_ops"]},
                    "accuracy_control": accuracy,
                })
                if accuracy is not None:
                    built.info["reverted_layers"] = accuracy["reverted_layers"]

            text_onnx = tmp / TEXT_ONNX
            text_info = build_text_graph(tmp, target, seg, spec, names, onnx_path=text_onnx if text_onnx.exists() else None,
                                         opset=opset)
            size_mb = sum((tmp / f).stat().st_size for f in built.model_files) / 1e6
            figures.update(size_mb=size_mb, export_s=export_s, **built.timings, target=target, precision=precision,
                           checked_precision=built.checked_precision, parity_images=len(val))
            write_json(tmp / PARITY_FILE, {
                "reference": "torch-fp32", "candidate": built.runner.name,
                "checked_precision": built.checked_precision, "data": val.name, "split": "val", "images": len(val),
                "weights": spec.weights, "thresholds": PARITY_THRESHOLDS[built.checked_precision],
                "figures": {k: figures[k] for k in ("max_abs_diff", "mean_abs_diff", "cosine", "pixel_agreement",
                                                    "teacher_miou")},
                "passed": True,
                "text_encoder": {"reference": "torch encode_classes", "candidate": text_info["file"],
                                 "thresholds": TEXT_PARITY, "figures": text_info["parity"]},
            })
            write_json(tmp / BUILD_FILE, {
                "format": BUILD_FORMAT, "target": target, "backend": TARGETS[target][1], "precision": precision,
                "file": built.file, "model_files": built.model_files,
                "inputs": {INPUT_NAMES[0]: "float32 (B,3,H,W)" if dynamic_hw else
                           f"float32 (B,3,{spec.image_size[0]},{spec.image_size[1]})",
                           INPUT_NAMES[1]: f"float32 (C,{text.shape[1]})"},
                "output": f"logits float32 (B,C,{spec.image_size[0]},{spec.image_size[1]})",
                "image_size": list(spec.image_size), "embed_dim": int(text.shape[1]), "mean": list(spec.mean),
                "std": list(spec.std), "class_names": names, "text_embeds": TEXT_EMBEDS_FILE,
                "model": spec.model, "pretrained": spec.pretrained, "weights": spec.weights, "opset": opset,
                "spec": dataclasses.asdict(spec), "source": source, "dynamic_hw": dynamic_hw, "text_encoder": text_info,
                "cpu_isa": isa_record, "auto": None if decision is None else {
                    "file": DECISION_FILE, "kept": decision["kept"],
                    "candidates": {r["precision"]: r["median_ms"] for r in decision["candidates"]}},
                **built.info,
            })
            for path in sorted(tmp.rglob("*")):
                if path.is_file():
                    rec.add_output(path)
            rec.figures = dict(figures)
            if decision is not None:
                rec.figures["auto"] = {r["precision"]: {"median_ms": r["median_ms"], "kept": r["kept"], "why": r["why"]}
                                       for r in decision["candidates"]}
        _publish(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
        if created_parent and not out_dir.exists() and not any(out_dir.parent.iterdir()):
            out_dir.parent.rmdir()
    return figures
