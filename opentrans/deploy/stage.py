"""The ``deploy`` stage: export, convert/quantise for a target, check parity with PyTorch, then publish.

Nothing reaches ``out_dir`` unless the artifact reproduces the PyTorch model on real validation images within
:data:`~opentrans.deploy.parity.PARITY_THRESHOLDS`. The build happens in a temporary directory beside ``out_dir``
(same file system); after the parity check and the manifest it is renamed into place. An earlier complete build in
``out_dir`` is replaced only then: it is renamed aside, the new build renamed in, and the old one removed.

A build directory holds ``build.json`` (what :func:`opentrans.deploy.targets.load_runner` reads), ``parity.json``,
``manifest.json``, ``text_embeds.npy`` (float32 (C, D)), ``classes.json`` and the target's model files; INT8 builds
add ``quant_report.json`` (quantised layers, layers kept in floating point and why: text path, ``--ignore-ops``,
accuracy control) and, with ``sensitivity``, ``sensitivity.json``/``sensitivity.md``.

:func:`deploy_stage` runs four steps, each its own function: :func:`check_deploy` (options and inputs, nothing
written), :func:`load_inputs` and :func:`build_artifact` (compute: a :class:`DeployResult`), the ``*_document``
functions (render: the JSON documents from the result) and :func:`_record` (write them and the manifest).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from opentrans.artifacts import StageRecord, atomic_path, check_replaceable, make_staging_dir, write_json
from opentrans.deploy.auto import AUTO_ROUNDS, AUTO_WARMUP, DECISION_FILE, Candidate, auto_candidates, choose
from opentrans.deploy.export import export_onnx
from opentrans.deploy.graph import graph_io
from opentrans.deploy.options import AUTO, DeployOptions
from opentrans.deploy.parity import PARITY_THRESHOLDS, TEXT_PARITY, check_parity, decided_margin
from opentrans.deploy.targets import (
    BUILD_FILE,
    BUILD_FORMAT,
    CLASSES_FILE,
    PARITY_FILE,
    TARGETS,
    TEXT_EMBEDS_FILE,
    BuildContext,
    BuildOutput,
    check_target,
)
from opentrans.deploy.text_graph import TEXT_ONNX, build_text_graph
from opentrans.errors import OpenTransError
from opentrans.options import as_record

#: INT8 builds: what was quantised and what was kept in floating point (and why).
QUANT_REPORT_FILE = "quant_report.json"
#: The parity figures recorded in ``parity.json`` and quoted in a failed check's message.
#: The parity figures parity.json and decision.json record (decided_*: see opentrans.deploy.parity).
FIGURE_KEYS = ("max_abs_diff", "mean_abs_diff", "cosine", "pixel_agreement", "teacher_miou", "decided_pixels_pct",
               "decided_agreement")

__all__ = ["PARITY_THRESHOLDS", "QUANT_REPORT_FILE", "DeployResult", "check_parity", "deploy_stage",
           "recorded_data"]


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


def _cpu_isa_record(options: DeployOptions) -> dict[str, Any]:
    """``build.json["cpu_isa"]``: the ``cpu_isa`` mode (None for GPU targets), NNCF's overflow-fix policy for
    INT8 weights and the ISA of the CPU the build was made and checked on."""
    from opentrans.hardware import cpu_isa, int8_overflow_fix

    isa = cpu_isa()
    if not TARGETS.get_target(options.target).cpu:
        return {"mode": None, "overflow_fix": "first_layer_only", "built_on": isa.to_json()}
    mode = options.cpu_isa or "native"
    return {"mode": mode, "overflow_fix": int8_overflow_fix(mode, isa), "built_on": isa.to_json()}


def check_deploy(options: DeployOptions, out_dir: Path) -> list[Candidate]:
    """Validate ``options`` and everything a build needs that can be checked before loading the model: the
    target's back end, a calibration source, the output directory. Writes nothing.

    Returns:
        the ``auto`` candidates (empty for one precision).

    Raises:
        OpenTransError: see :func:`deploy_stage`.
    """
    from opentrans.hardware import cpu_isa

    options.check()
    auto = options.precision == AUTO
    candidates = auto_candidates(options.target, cpu_isa().native_bf16) if auto else []
    check_target(options.target, "fp32" if auto else options.precision)
    if options.calib_data is not None:
        from opentrans.deploy.calibration import calibration_source

        calibration_source(options.calib_data)
    _check_out_dir(out_dir)
    return candidates


@dataclass
class DeployInputs:
    """The model and data a build works on (from :func:`load_inputs`).

    Attributes:
        segmentor, spec: the PyTorch model (fp32, eval) and its spec.
        inputs: the files it was read from (the manifest's inputs).
        val: the parity images (``val`` split, ``parity_limit`` of them).
        calib: INT8 calibration images, float32 (1, 3, H, W) each (empty unless the build quantises).
        names: the class names, in label order.
        text: float32 (C, D) L2-normalised class embeddings of ``names``.
        isa: ``build.json["cpu_isa"]`` (:func:`_cpu_isa_record`).
    """

    segmentor: Any
    spec: Any
    inputs: list[Path]
    val: Any
    calib: list[np.ndarray]
    names: list[str]
    text: np.ndarray
    isa: dict[str, Any]


def load_inputs(source, options: DeployOptions) -> DeployInputs:
    """Load the model of ``source`` and the data of ``options``.

    Raises:
        OpenTransError: model errors (:meth:`opentrans.models.source.ModelSource.resolve`), an ``image_size`` for
            a ``from_dir`` model that differs from its own, data errors, ``max_classes`` below the dataset's classes.
    """
    from opentrans.data import open_dataset

    seg, spec, inputs = source.resolve()
    if source.from_dir is not None and source.image_size is not None and \
            tuple(source.image_size) != tuple(spec.image_size):
        raise OpenTransError(f"--image-size {source.image_size}: a --from model keeps its input size "
                             f"{spec.image_size[0]}x{spec.image_size[1]}; re-run prune/finetune to change it")
    val = open_dataset(options.data, "val", spec.image_size, spec.mean, spec.std, limit=options.parity_limit)
    calib: list[np.ndarray] = []
    if options.quantises:
        from opentrans.deploy.calibration import calibration_images

        calib = calibration_images(options.calib_data or options.data, spec.image_size, spec.mean, spec.std,
                                   options.calib_size)
    names = list(val.class_names)
    if options.max_classes is not None and options.max_classes < len(names):
        raise OpenTransError(f"--max-classes {options.max_classes}: below the dataset's {len(names)} classes")
    text = np.ascontiguousarray(seg.encode_classes(names, model_name=spec.model).numpy(), dtype=np.float32)
    return DeployInputs(seg, spec, list(inputs), val, calib, names, text, _cpu_isa_record(options))


def _target_options(options: DeployOptions, data: DeployInputs) -> dict[str, Any]:
    """:attr:`BuildContext.options` of a build."""
    target_options = {"smooth_quant_alpha": options.smooth_quant_alpha, "max_batch": options.max_batch,
                      "ignore_ops": options.ignore_ops, "max_drop": options.max_drop,
                      "drop_metric": options.drop_metric, "calib_data": options.calib_data,
                      "ignore_index": data.val.ignore_index, "dynamic_hw": options.dynamic_hw,
                      "overflow_fix": data.isa["overflow_fix"]}
    if options.max_classes is not None:
        target_options["max_classes"] = options.max_classes
    return target_options


def _context(data: DeployInputs, options: DeployOptions) -> dict[str, Any]:
    """The :class:`BuildContext` fields every candidate of a build shares."""
    val, calib = data.val, data.calib
    return dict(segmentor=data.segmentor, spec=data.spec, opset=options.opset, class_names=data.names,
                text_embeds=data.text, calibration=lambda: list(calib), sample_images=val[0][0][None].numpy(),
                options=_target_options(options, data),
                validation=lambda: [(val[i][0][None].numpy(), val[i][1].numpy()) for i in range(len(val))])


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
    built = TARGETS.get(target).build(ctx)
    if candidate.precision != candidate.build_precision:  # bf16: same IR, other inference precision
        from opentrans.deploy.targets.openvino import OpenVINORunner

        built.runner = OpenVINORunner(build_dir / built.file, name=f"openvino-{candidate.precision}",
                                      inference_precision=candidate.inference_precision)
        built.checked_precision = candidate.precision
        built.info["inference_precision"] = candidate.inference_precision
        built.info["parity_inference_precision"] = built.runner.inference_precision
    figures = agreement(TorchRunner(seg), built.runner, val, text, decided_margin=decided_margin(seg))
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
             "figures": {k: figures[k] for k in FIGURE_KEYS if k != "mean_abs_diff"},
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


@dataclass
class DeployResult:
    """What a build made (in the staging directory) and measured (from :func:`build_artifact`).

    Attributes:
        built: the target's :class:`BuildOutput` (model files, runner, info, timings).
        figures: the parity figures of the kept build (:func:`opentrans.inference.evaluate.agreement`).
        precision: the precision built (for ``auto``: the one kept).
        decision: ``decision.json`` of an ``auto`` build, else None.
        text_info: ``build.json["text_encoder"]`` (:func:`opentrans.deploy.text_graph.build_text_graph`).
        sensitivity: the per-layer report (:func:`opentrans.deploy.sensitivity.layer_sensitivity`) or None.
        export_s: seconds of the ONNX export.
        size_mb: size of the model files (10^6 bytes).
    """

    built: BuildOutput
    figures: dict[str, Any]
    precision: str
    decision: dict[str, Any] | None
    text_info: dict[str, Any]
    sensitivity: dict[str, Any] | None
    export_s: float
    size_mb: float

    @property
    def quantized(self) -> bool:
        """Whether the kept build is INT8."""
        return self.precision == "int8"


def _sensitivity(onnx_path: Path, data: DeployInputs, options: DeployOptions) -> dict[str, Any]:
    """Each quantisable image-encoder layer quantised alone (:func:`opentrans.deploy.sensitivity.layer_sensitivity`)."""
    from opentrans.deploy.sensitivity import layer_sensitivity

    n = min(options.sensitivity_images, len(data.val))
    return layer_sensitivity(onnx_path, data.calib, np.stack([data.val[i][0].numpy() for i in range(n)]), data.text,
                             model_type_transformer=data.segmentor.is_vit,
                             smooth_quant_alpha=options.smooth_quant_alpha, ignore_patterns=options.ignore_ops,
                             overflow_fix=data.isa["overflow_fix"])


def _parity_failure(options: DeployOptions, data: DeployInputs, figures: dict, failures: list[str],
                    out_dir: Path) -> OpenTransError:
    """The one-line error of a build that missed its parity gate."""
    summary = ", ".join(f"{k} {figures[k]:.6g}" for k in FIGURE_KEYS
                        if k != "mean_abs_diff" and figures.get(k) is not None)
    return OpenTransError(
        f"deploy {options.target}-{options.precision}: parity check against PyTorch failed on {len(data.val)} "
        f"{data.val.name} val images ({data.spec.weights}): {'; '.join(failures)} (measured {summary}); nothing "
        f"written to {out_dir}")


def build_artifact(tmp: Path, data: DeployInputs, options: DeployOptions, candidates: list[Candidate],
                   out_dir: Path) -> DeployResult:
    """Export, build and check the artifact in the staging directory ``tmp`` (model files only: the documents
    are rendered from the result).

    Raises:
        OpenTransError: the build misses its parity gate (the message names ``out_dir``: nothing written there),
            the text graph misses :data:`~opentrans.deploy.parity.TEXT_PARITY`, errors of the target.
    """
    start = time.perf_counter()
    onnx_path = export_onnx(data.segmentor, tmp / "model.onnx", opset=options.opset, dynamic_hw=options.dynamic_hw)
    export_s = time.perf_counter() - start
    sensitivity = _sensitivity(onnx_path, data, options) if options.sensitivity else None
    context = _context(data, options)
    decision = None
    if candidates:
        built, figures, decision = _build_auto(options.target, candidates, tmp, onnx_path, context, data.segmentor,
                                               data.val, data.text)
        precision = decision["kept"]
    else:
        precision = options.precision
        built, figures, failures = _build_and_check(options.target, Candidate(precision, precision, None), tmp,
                                                    onnx_path, context, data.segmentor, data.val, data.text)
        if failures:
            raise _parity_failure(options, data, figures, failures, out_dir)
    text_onnx = tmp / TEXT_ONNX
    text_info = build_text_graph(tmp, options.target, data.segmentor, data.spec, data.names,
                                 onnx_path=text_onnx if text_onnx.exists() else None, opset=options.opset)
    size_mb = sum((tmp / f).stat().st_size for f in built.model_files) / 1e6
    return DeployResult(built, figures, precision, decision, text_info, sensitivity, export_s, size_mb)


# --- render: the build's documents from the result (pure) -----------------------------------------------------

_QUANT_INFO = ("quantized_layers", "quant_report")


def stage_figures(result: DeployResult, data: DeployInputs, options: DeployOptions) -> dict[str, Any]:
    """What :func:`deploy_stage` returns (see there)."""
    return {**result.figures, "size_mb": result.size_mb, "export_s": result.export_s, **result.built.timings,
            "target": options.target, "precision": result.precision,
            "checked_precision": result.built.checked_precision, "parity_images": len(data.val)}


def quant_report_document(result: DeployResult, data: DeployInputs, options: DeployOptions) -> dict[str, Any]:
    """``quant_report.json`` of an INT8 build: what was quantised and what was kept in floating point (and why)."""
    info = result.built.info
    accuracy = info.get("quant_report")
    return {
        "target": options.target, "precision": result.precision, "quantizer": info.get("quantizer"),
        "calibration": {"data": options.calib_data or f"{options.data} (train split)", "images": len(data.calib)},
        "smooth_quant_alpha": info.get("smooth_quant_alpha"),
        "quantized_layers": info.get("quantized_layers"), "ignore_ops": options.ignore_ops,
        "kept_fp32": {"text_path": "every op fed by text_embeds (similarity MatMul, upsampling)",
                      "ignore_ops": info.get("ignore_ops", []),
                      "accuracy_control": [] if accuracy is None else accuracy["reverted_ops"]},
        "accuracy_control": accuracy,
    }


def parity_document(result: DeployResult, data: DeployInputs) -> dict[str, Any]:
    """``parity.json``: the image and text graphs' figures against PyTorch and the gates they passed."""
    built = result.built
    return {
        "reference": "torch-fp32", "candidate": built.runner.name, "checked_precision": built.checked_precision,
        "data": data.val.name, "split": "val", "images": len(data.val), "weights": data.spec.weights,
        "thresholds": PARITY_THRESHOLDS[built.checked_precision],
        "figures": {k: result.figures[k] for k in FIGURE_KEYS},
        "passed": True,
        "text_encoder": {"reference": "torch encode_classes", "candidate": result.text_info["file"],
                         "thresholds": TEXT_PARITY, "figures": result.text_info["parity"]},
    }


def _source_document(source, spec, out_dir: Path) -> dict[str, Any]:
    """``build.json["source"]``: the model directory (absolute and relative to the build) or architecture."""
    from_dir = None if source.from_dir is None else Path(source.from_dir).resolve()
    return {"from_dir": None if from_dir is None else str(from_dir),
            "from_dir_relative": None if from_dir is None else os.path.relpath(from_dir, out_dir.resolve()),
            "model": spec.model, "pretrained": spec.pretrained}


def build_document(result: DeployResult, data: DeployInputs, options: DeployOptions, source,
                   out_dir: Path) -> dict[str, Any]:
    """``build.json``: what :func:`opentrans.deploy.targets.load_runner` reads (validated by
    :func:`opentrans.deploy.targets.validate_build`)."""
    spec, built, decision = data.spec, result.built, result.decision
    info = dict(built.info)
    if result.quantized:
        for key in _QUANT_INFO:
            info.pop(key, None)
        if built.info.get("quant_report") is not None:
            info["reverted_layers"] = built.info["quant_report"]["reverted_layers"]
    return {
        "format": BUILD_FORMAT, "target": options.target, "backend": TARGETS.get(options.target).backend,
        "precision": result.precision, "file": built.file, "model_files": built.model_files,
        **graph_io(tuple(spec.image_size), int(data.text.shape[1]), options.dynamic_hw),
        "image_size": list(spec.image_size), "embed_dim": int(data.text.shape[1]), "mean": list(spec.mean),
        "std": list(spec.std), "class_names": data.names, "text_embeds": TEXT_EMBEDS_FILE,
        "model": spec.model, "pretrained": spec.pretrained, "weights": spec.weights, "opset": options.opset,
        "spec": dataclasses.asdict(spec), "source": _source_document(source, spec, out_dir),
        "dynamic_hw": options.dynamic_hw, "text_encoder": result.text_info, "cpu_isa": data.isa,
        "auto": None if decision is None else {
            "file": DECISION_FILE, "kept": decision["kept"],
            "candidates": {r["precision"]: r["median_ms"] for r in decision["candidates"]}},
        **info,
    }


def options_record(source, options: DeployOptions, data: DeployInputs, out_dir: Path) -> dict[str, Any]:
    """The manifest's ``options``: the model source, the output and every deploy option (``image_size`` the
    model's, ``cpu_isa`` the mode used)."""
    return {**source.record(), "out": str(out_dir), **as_record(options), "image_size": list(data.spec.image_size),
            "cpu_isa": data.isa["mode"]}


def manifest_figures(result: DeployResult, figures: dict[str, Any]) -> dict[str, Any]:
    """The manifest's ``figures``: the stage's figures and, for ``auto``, each candidate's median and verdict."""
    out = dict(figures)
    if result.decision is not None:
        out["auto"] = {r["precision"]: {"median_ms": r["median_ms"], "kept": r["kept"], "why": r["why"]}
                       for r in result.decision["candidates"]}
    return out


# --- record: write the documents and the manifest, publish -------------------------------------------------------


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array)


def _write_documents(tmp: Path, result: DeployResult, data: DeployInputs, options: DeployOptions, source,
                     out_dir: Path) -> None:
    """Write the rendered documents of a build into its staging directory ``tmp``."""
    _save_npy(tmp / TEXT_EMBEDS_FILE, data.text)
    write_json(tmp / CLASSES_FILE, data.names)
    if result.sensitivity is not None:
        from opentrans.deploy.sensitivity import write_sensitivity_report

        write_sensitivity_report(result.sensitivity, tmp, top_n=options.sensitivity_top)
    if result.decision is not None:
        write_json(tmp / DECISION_FILE, result.decision)
    if result.quantized:
        write_json(tmp / QUANT_REPORT_FILE, quant_report_document(result, data, options))
    write_json(tmp / PARITY_FILE, parity_document(result, data))
    write_json(tmp / BUILD_FILE, build_document(result, data, options, source, out_dir))


def _staging(out_dir: Path):
    """``(staging directory beside out_dir, whether out_dir's parent was created)``."""
    created_parent = not out_dir.parent.exists()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return make_staging_dir(out_dir, ".deploy-tmp"), created_parent  # also removes ones of killed runs


def _clean_up(tmp: Path, out_dir: Path, created_parent: bool) -> None:
    """Remove a staging directory left by a failed build, and the parent of ``out_dir`` if it made it."""
    if tmp.exists():
        shutil.rmtree(tmp)
    if created_parent and not out_dir.exists() and not any(out_dir.parent.iterdir()):
        out_dir.parent.rmdir()


def deploy_stage(source, options: DeployOptions, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Build a ``options.target`` artifact at ``options.precision`` for the model of ``source``, check it against
    PyTorch, write it to ``out_dir``.

    Args:
        source: the model (:class:`opentrans.models.source.ModelSource`): a prune/finetune output directory, or an
            open_clip architecture and weights; a ``from_dir`` model keeps its own input size.
        options: the build (:class:`~opentrans.deploy.options.DeployOptions`; each option's meaning is its help):
            ``target`` one of :data:`~opentrans.deploy.targets.base.TARGETS`; ``precision`` one the target builds,
            or ``auto`` for the CPU targets (build fp32, bf16 on CPUs with native bf16 (openvino) and int8, check
            each, time them side by side, keep the fastest that passes: :mod:`opentrans.deploy.auto`,
            ``decision.json``); ``data``'s class names become the text embeddings, its ``val`` split is used for
            the parity check (``parity_limit`` images) and its ``train`` split (or ``calib_data``, also a plain
            image folder: :mod:`opentrans.deploy.calibration`) for INT8 calibration. ``cpu_isa`` (CPU targets)
            decides NNCF's INT8 overflow fix (:func:`opentrans.hardware.int8_overflow_fix`);
            ``build.json["cpu_isa"]`` records mode, fix and this CPU's ISA.
        out_dir: the build directory to write (absent, empty, or an earlier deploy build, which is replaced
            only once the new build has passed).

    Every build also carries the text tower as its own graph (``text_encoder.onnx``, ``text_encoder.xml`` for
    openvino), the CLIP tokenizer files, and ``build.json["text_encoder"]`` with its parity against PyTorch
    (:mod:`opentrans.deploy.text_graph`); a text graph that misses :data:`~opentrans.deploy.parity.TEXT_PARITY`
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
    out_dir = Path(out_dir)
    candidates = check_deploy(options, out_dir)
    data = load_inputs(source, options)
    tmp, created_parent = _staging(out_dir)
    try:
        with StageRecord("deploy", tmp, options_record(source, options, data, out_dir), started=started) as rec:
            rec.weights = data.spec.weights
            for path in data.inputs:
                rec.add_input(path)
            result = build_artifact(tmp, data, options, candidates, out_dir)
            figures = stage_figures(result, data, options)
            _write_documents(tmp, result, data, options, source, out_dir)
            for path in sorted(tmp.rglob("*")):
                if path.is_file():
                    rec.add_output(path)
            rec.figures = manifest_figures(result, figures)
        _publish(tmp, out_dir)
    finally:
        _clean_up(tmp, out_dir, created_parent)
    return figures
