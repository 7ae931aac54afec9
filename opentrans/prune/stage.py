"""The ``prune`` stage: load a model, prune its image encoder, write the model, reports and manifest.

Output directory::

    model.safetensors, model.json   the pruned segmentor (lineage gains "prune")
    kept_indices.json               which units (channels, heads, width) survive, relative to the original
                                    architecture: re-apply to other weights with ``--transfer-from``
    prune_report.json               the full report of :func:`~opentrans.prune.structured.prune_structured`
                                    plus measured latency and file sizes
    prune_report.md                 the same for people: cost before/after and the per-layer sizes
    manifest.json                   written last, status "complete"

Optionally the pruned model recovers by label-free distillation from the frozen unpruned one
(:func:`opentrans.prune.distill.recover`, as for IMP) and its fidelity to the unpruned model is measured on a
val dataset (teacher-agreement mIoU, dense feature cosine; :func:`opentrans.prune.imp_stage.fidelity`).
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from opentrans.artifacts import StageRecord, check_replaceable, read_json, staged_dir, write_json, write_text
from opentrans.errors import OpenTransError
from opentrans.models.artifact import SPEC_FILE, WEIGHTS_FILE, save_segmentor
from opentrans.models.cost import count_encoder_cost
from opentrans.models.source import ModelSource
from opentrans.options import as_record
from opentrans.prune.distill import evaluate_distill_loss, fidelity, open_images, recover
from opentrans.prune.latency import LATENCY_BACKENDS, check_openvino, measure_latency  # noqa: F401 (re-exported)
from opentrans.prune.options import STRUCTURES, StructuredOptions
from opentrans.prune.report import REPORT_JSON, REPORT_MD, render_markdown
from opentrans.prune.structured import (
    apply_kept_indices,
    check_kept_indices,
    check_targets,
    compose_kept,
    original_sizes,
    prune_structured,
    structure_sizes,
)

KEPT_FILE = "kept_indices.json"
KEPT_FORMAT = "opentrans.kept-indices/1"
#: Calibration images used by ``--importance taylor`` (the first ones of ``--distill-data``).
CALIBRATION_IMAGES = 8


def _state_mb(seg: torch.nn.Module) -> float:
    return sum(t.numel() * t.element_size() for t in seg.state_dict().values()) / 1e6


def read_kept_indices(path: str | os.PathLike) -> dict:
    """The contents of a ``kept_indices.json`` (``{"format", "model", "base", "structures"}``).

    Raises:
        OpenTransError: a missing file or one of another format.
    """
    path = Path(path)
    if path.is_dir():
        path = path / KEPT_FILE
    if not path.is_file():
        raise OpenTransError(f"--transfer-from {path}: no {KEPT_FILE}; point it at the output of a structured prune")
    raw = read_json(path)
    if raw.get("format") != KEPT_FORMAT:
        raise OpenTransError(f"{path}: not an {KEPT_FORMAT} file")
    return raw


def transfer_structure(seg, model_name: str, kept: dict) -> dict:
    """Re-apply the pruned shapes of a ``kept_indices.json`` (indices relative to the original architecture) to
    ``seg``, an unpruned segmentor of that architecture with other weights (e.g. pretrained ones); in place.

    Args:
        seg: the segmentor to prune; kept: the file contents (see :func:`read_kept_indices`).

    Returns:
        ``{structure: {layer: kept count}}``.

    Raises:
        OpenTransError: indices for another architecture, indices relative to an already pruned input
            (``base`` other than ``original``), or a ``seg`` that is already pruned in one of the structures.
    """
    check_transfer(seg, model_name, kept)
    apply_kept_indices(seg, kept["structures"])
    return {s: {k: len(v) for k, v in layers.items()} for s, layers in kept["structures"].items()}


def check_transfer(seg, model_name: str, kept: dict) -> None:
    """The checks of :func:`transfer_structure`, without changing anything.

    Raises:
        OpenTransError: see :func:`transfer_structure`.
    """
    if kept.get("model") != model_name:
        raise OpenTransError(f"kept indices are for {kept.get('model')}, not {model_name}")
    if kept.get("base") != "original":
        raise OpenTransError("these kept indices are relative to an already pruned model, not to the original "
                             "architecture; they cannot be transferred")
    structures = kept["structures"]
    for structure in structures:
        if structure not in STRUCTURES:
            raise OpenTransError(f"unknown structure '{structure}' in kept indices")
        if structure_sizes(seg, structure) != original_sizes(seg, model_name, structure):
            raise OpenTransError(f"--transfer-from needs an unpruned model; this one has pruned {structure}")
    check_kept_indices(seg, structures)


def check_source(source: ModelSource, out_dir: Path) -> None:
    """The checks every prune method makes on its model source and output directory, before any work.

    Raises:
        OpenTransError: ``image_size`` with ``from_dir``, or ``out_dir`` equal to ``from_dir``.
    """
    if source.from_dir is not None and source.image_size is not None:
        raise OpenTransError("--image-size applies to a fresh --model only; a --from model keeps its input size")
    if source.from_dir is not None and Path(source.from_dir).resolve() == out_dir.resolve():
        raise OpenTransError(f"--out {out_dir} is the --from directory; write the pruned model somewhere else")


@dataclass
class _Start:
    """What the stage starts from once every input is checked: the model, its frozen copy and the data."""

    seg: Any
    spec: Any
    inputs: list[Path]
    teacher: Any
    distill: Any
    evalset: Any
    kept_src: dict | None
    previous_kept: dict | None
    base: str


@dataclass
class PruneResult:
    """The outcome of structured pruning, before anything is written.

    Attributes:
        seg, spec: the pruned segmentor (lineage gains "prune") and its spec.
        report: the ``prune_report.json`` contents but the file sizes (see :func:`prune_structured`).
        kept: the ``kept_indices.json`` contents (relative to the original architecture).
        weights_mb_before: the unpruned segmentor's weights in MB (fp32).
    """

    seg: Any
    spec: Any
    report: dict
    kept: dict
    weights_mb_before: float


def check_prune(source: ModelSource, options: StructuredOptions, out_dir: Path) -> dict | None:
    """Every check that needs no model: options, back ends, model source, output directory.

    Returns:
        The ``transfer_from`` kept indices (None without it).

    Raises:
        OpenTransError: see :func:`prune_stage`.
    """
    kept_src = read_kept_indices(options.transfer_from) if options.transfer_from is not None else None
    options.check()
    if options.latency_repeats and "openvino" in options.backends:
        check_openvino()
    check_source(source, out_dir)
    check_replaceable(out_dir)
    return kept_src


def open_start(source: ModelSource, options: StructuredOptions, kept_src: dict | None) -> _Start:
    """Load the model, check the targets (or the transfer) against it and open the images.

    Raises:
        OpenTransError: a target below the model's current sparsity, an unusable transfer, missing images.
    """
    seg, spec, inputs = source.resolve()
    if kept_src is not None:
        check_transfer(seg, spec.model, kept_src)
    else:
        check_targets(seg, spec.model, options.targets)
    previous_kept, base = None, "original"
    if source.from_dir is not None:
        if (Path(source.from_dir) / KEPT_FILE).is_file():
            previous = read_kept_indices(Path(source.from_dir) / KEPT_FILE)
            base, previous_kept = previous.get("base", "input"), previous["structures"]
        elif any(structure_sizes(seg, s) != original_sizes(seg, spec.model, s) for s in STRUCTURES):
            base = "input"  # pruned by something that left no kept indices: they can only be relative to it
    distill = evalset = None
    if options.recovery_steps > 0 or options.uses_taylor:
        distill = open_images(options.distill_data, spec.image_size, spec.mean, spec.std, limit=options.distill_limit)
    if options.eval_data is not None:
        from opentrans.data import open_dataset

        evalset = open_dataset(options.eval_data, "val", spec.image_size, spec.mean, spec.std,
                               limit=options.eval_limit)
    needs_teacher = options.recovery_steps or evalset is not None or options.latency_repeats
    teacher = copy.deepcopy(seg).eval().requires_grad_(False) if needs_teacher else None
    return _Start(seg, spec, inputs, teacher, distill, evalset, kept_src, previous_kept, base)


def _transfer_report(start: _Start, transfer_from) -> tuple[dict, dict]:
    """(report, kept indices) of re-applying ``start.kept_src`` to ``start.seg`` in place."""
    seg, model = start.seg, start.spec.model
    parsed = tuple(s for s in STRUCTURES if s in start.kept_src["structures"])
    before = {s: structure_sizes(seg, s) for s in parsed}
    originals = {s: original_sizes(seg, model, s) for s in parsed}
    cost_before = count_encoder_cost(seg)
    transfer_structure(seg, model, start.kept_src)
    cost_after = count_encoder_cost(seg)
    after = {s: structure_sizes(seg, s) for s in parsed}
    structures = {s: {"target": None, "before": 0.0, "achieved": 1 - sum(after[s].values()) / sum(originals[s].values()),
                      "original": sum(originals[s].values()), "kept": sum(after[s].values())} for s in parsed}
    report = {
        "transfer_from": str(transfer_from), "importance": None, "ranking": None, "round_to": None,
        "structures": structures, "image_size": list(seg.image_size),
        "params_m_before": cost_before["params_m"], "params_m_after": cost_after["params_m"],
        "gmacs_before": cost_before["gmacs"], "gmacs_after": cost_after["gmacs"],
        "macs_reduction": 1 - cost_after["gmacs"] / cost_before["gmacs"],
        "layers": [{"structure": s, "layer": k, "original": originals[s][k], "before": before[s][k],
                    "after": after[s][k]} for s in parsed for k in before[s]],
        "sparsity_target": None, "sparsity_before": 0.0, "sparsity": structures[parsed[0]]["achieved"],
    }
    kept = {"format": KEPT_FORMAT, "model": model, "base": "original", "structures": start.kept_src["structures"]}
    return report, kept


def _scored_report(start: _Start, options: StructuredOptions) -> tuple[dict, dict]:
    """(report, kept indices) of scoring and pruning ``start.seg`` in place (:func:`prune_structured`)."""
    seg, model = start.seg, start.spec.model
    calibration = None
    if options.uses_taylor:
        calibration = torch.stack([start.distill[i] for i in range(min(len(start.distill), CALIBRATION_IMAGES))])
    report = prune_structured(seg, options.sparsity, options.importance, options.round_to, model_name=model,
                              structures=options.parsed_structures, head_sparsity=options.head_sparsity,
                              width_sparsity=options.width_sparsity, ranking=options.ranking,
                              calibration=calibration, seed=options.seed)
    originals = {s: original_sizes(seg, model, s) for s in STRUCTURES}
    kept = {"format": KEPT_FORMAT, "model": model, "base": start.base,
            "structures": compose_kept(start.previous_kept, report.pop("kept_indices"), originals)}
    return report, kept


def _latency(start: _Start, options: StructuredOptions, report: dict) -> dict:
    """``{"latency": ..., "latency_openvino": ...}`` rows: before/after median ms, speed-up, MAC ratio."""
    probe = torch.randn(1, 3, *start.spec.image_size, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory(prefix="opentrans-latency-") as work:
        per_backend = measure_latency({"before": start.teacher, "after": start.seg}, probe, options.latency_repeats,
                                      backends=options.backends, work_dir=work)
    return {("latency" if backend == "torch" else f"latency_{backend}"): {
        "backend": backend, "ms_before": ms["before"], "ms_after": ms["after"], "speedup": ms["before"] / ms["after"],
        "mac_ratio": report["gmacs_before"] / report["gmacs_after"], "repeats": options.latency_repeats,
        "threads": torch.get_num_threads(), "batch": 1} for backend, ms in per_backend.items()}


def _recovery(start: _Start, options: StructuredOptions) -> dict:
    """Distil the pruned model from the unpruned one in place; the report's ``recovery`` entry."""
    probe = torch.stack([start.distill[i] for i in range(min(len(start.distill), options.batch_size))])
    loss_pruned = evaluate_distill_loss(start.seg, start.teacher, probe)
    losses = recover(start.seg, start.teacher, start.distill, options.recovery_steps, [], options.batch_size,
                     options.lr, options.seed)
    return {"steps": options.recovery_steps, "distill_data": options.distill_data, "loss_pruned": loss_pruned,
            "loss_recovered": evaluate_distill_loss(start.seg, start.teacher, probe), "train_losses": losses}


def compute_prune(start: _Start, options: StructuredOptions) -> PruneResult:
    """Prune (or transfer), measure latency, recover and measure fidelity; writes nothing.

    Raises:
        OpenTransError: as :func:`prune_structured`, :func:`measure_latency`.
    """
    weights_mb_before = _state_mb(start.seg)
    if start.kept_src is not None:
        report, kept = _transfer_report(start, options.transfer_from)
    else:
        report, kept = _scored_report(start, options)
    report = {"model": start.spec.model, "weights": start.spec.weights, **report}
    if options.latency_repeats:
        report |= _latency(start, options, report)
    if start.distill is not None and options.recovery_steps > 0:
        report["recovery"] = _recovery(start, options)
    if start.evalset is not None:
        text = start.teacher.encode_classes(list(start.evalset.class_names), model_name=start.spec.model)
        report["eval_data"] = options.eval_data
        report["fidelity"] = fidelity(start.seg, start.teacher, start.evalset, text)
    start.spec.lineage.append("prune")
    return PruneResult(start.seg, start.spec, report, kept, weights_mb_before)


def prune_figures(report: dict) -> dict:
    """The manifest's figures of a structured prune report."""
    figures = {k: report[k] for k in ("params_m_before", "params_m_after", "gmacs_before", "gmacs_after", "sparsity",
                                      "sparsity_target", "file_mb")}
    for key, suffix in (("latency", ""), ("latency_openvino", "_openvino")):
        if key in report:
            figures |= {f"latency_ms_before{suffix}": report[key]["ms_before"],
                        f"latency_ms_after{suffix}": report[key]["ms_after"], f"speedup{suffix}": report[key]["speedup"]}
    if "fidelity" in report:
        figures["teacher_miou"] = report["fidelity"]["teacher_miou"]
        figures["feature_cosine"] = report["fidelity"]["feature_cosine"]
    return figures


def write_result(result: PruneResult, staging: Path, rec: StageRecord) -> None:
    """Write the model, kept indices and reports of ``result`` into ``staging``, each recorded as an output."""
    rec.add_output(save_segmentor(result.seg, result.spec, staging))
    rec.add_output(staging / SPEC_FILE)
    rec.add_output(write_json(staging / KEPT_FILE, result.kept))
    report = result.report
    report["weights_mb_before"] = result.weights_mb_before
    report["weights_mb_after"] = _state_mb(result.seg)
    report["file_mb"] = (staging / WEIGHTS_FILE).stat().st_size / 1e6
    rec.add_output(write_json(staging / REPORT_JSON, report))
    rec.add_output(write_text(staging / REPORT_MD, render_markdown(report)))
    rec.weights = result.spec.weights
    rec.figures = prune_figures(report)


def prune_stage(source: ModelSource, options: StructuredOptions, out_dir: str | os.PathLike) -> dict:
    """Prune a model's image encoder (structured) and write the result into ``out_dir``.

    Args:
        source: the model to prune (:class:`~opentrans.models.source.ModelSource`); also the frozen teacher of
            the recovery, the fidelity reference and the "before" of the latency.
        options: :class:`~opentrans.prune.options.StructuredOptions` (what to prune, importance, ranking,
            ``transfer_from``, latency, recovery, fidelity; see there).
        out_dir: stage directory; gets ``model.safetensors``, ``model.json``, ``kept_indices.json``,
            ``prune_report.json``, ``prune_report.md`` and ``manifest.json``.

    Returns:
        The manifest's figures: ``params_m_before/after`` (M params), ``gmacs_before/after`` (GMACs, dense path,
        batch 1), ``sparsity`` (achieved fraction) and ``sparsity_target``, ``file_mb`` and, when measured,
        ``latency_ms_before/after[_openvino]``, ``speedup[_openvino]``, ``teacher_miou`` (%), ``feature_cosine``.

    Raises:
        OpenTransError: invalid options (:meth:`StructuredOptions.check`), both or neither model sources,
            ``image_size`` with ``from_dir``, ``out_dir`` equal to ``from_dir``, a target below the model's
            current sparsity, an empty image folder, an unusable ``transfer_from``, openvino latency without the
            openvino package, an ``out_dir`` that may not be replaced (a file, a non-empty directory that is not
            a finished stage, or one holding files its stage did not write). All of these are checked before
            anything is written. The stage writes beside ``out_dir`` and renames its directory onto it only once
            complete (:func:`opentrans.artifacts.staged_dir`): a failed rerun, e.g. on a full disk, leaves an
            earlier artifact there intact.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    kept_src = check_prune(source, options, out_dir)
    start = open_start(source, options, kept_src)
    record = {**source.record(), **as_record(options)}
    # written beside --out and renamed onto it only once complete: a failed rerun leaves the old artifact
    with staged_dir(out_dir) as staging, StageRecord("prune", staging, record, started=started) as rec:
        for path in start.inputs:
            rec.add_input(path)
        if options.transfer_from is not None:
            src_path = Path(options.transfer_from)
            rec.add_input(src_path / KEPT_FILE if src_path.is_dir() else src_path)
        write_result(compute_prune(start, options), staging, rec)
    return rec.figures
