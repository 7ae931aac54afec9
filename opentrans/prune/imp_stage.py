"""The ``prune --method imp`` stage: OpenTrans iterative magnitude pruning with distillation recovery, resumable.

Output directory::

    model.safetensors, model.json   the pruned segmentor, zeros baked in (lineage gains "prune-imp")
    masks.safetensors               the final masks (bool, True = kept), for :func:`~opentrans.prune.imp.apply_masks`
    masks/round_K.safetensors       the masks after every finished round K (1-based)
    checkpoint/visual.safetensors   the image tower after the last finished round (what a resume starts from)
    imp_state.json                  options, inputs and per-round history; ``rounds_done`` = last finished round
    prune_report.json, .md          per-layer sparsity, params, GMACs, sizes, fidelity to the unpruned model
    manifest.json                   written last, status "complete"

An interrupted run, started again with the same options and ``--out``, resumes after the last finished round
(a round is finished once its masks, checkpoint and state are written, in that order, each atomically) and
ends with the same weights and masks as an uninterrupted run: each round's recovery uses a fresh optimizer
and a data order seeded by ``(seed, round)``.

Under ``torchrun`` (an initialised default process group) every process runs the same rounds (recovery is
data-parallel, see :func:`opentrans.prune.distill.recover`) but only rank 0 writes files; the other ranks wait on
barriers and return the figures of rank 0's manifest.

An IMP artifact keeps its zeros downstream: ``deploy`` exports the weights as they are, and ``finetune --from``
it registers gradient hooks that keep the pruned weights at zero and re-applies the masks after merging
adapters (:func:`opentrans.prune.imp.keep_masked_zeros`).

Unstructured sparsity makes the weights compressible (smaller zlib size, sparse storage) but does **not** make
dense kernels faster: the model keeps its shapes, so its GMACs and dense CPU/GPU latency are unchanged. Use
structured pruning (``--method structured``) for speed.
"""

from __future__ import annotations

import copy
import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from opentrans.artifacts import StageRecord, atomic_path, read_json, sha256, write_json, write_text
from opentrans.errors import OpenTransError
from opentrans.models.artifact import SPEC_FILE, WEIGHTS_FILE, save_segmentor
from opentrans.models.cost import count_encoder_cost
from opentrans.models.source import ModelSource
from opentrans.options import as_record
from opentrans.prune.distill import _world, evaluate_distill_loss, fidelity, open_images, recover
from opentrans.prune.imp import (
    apply_masks,
    artifact_masks,
    attach_masks,
    bake_masks,
    check_masks,
    current_masks,
    global_magnitude_round,
    layer_sparsity,
    mask_sparsity,
    masks_targets,
    read_masks,
    save_masks,
    sparsity_schedule,
)
from opentrans.prune.options import ImpOptions
from opentrans.prune.report import LATENCY_NOTE, REPORT_JSON, REPORT_MD, TARGETS_TEXT, render_markdown  # noqa: F401
from opentrans.prune.stage import check_source

STATE_FILE = "imp_state.json"
STATE_FORMAT = "opentrans.imp-state/1"
MASKS_FILE = "masks.safetensors"
CHECKPOINT = Path("checkpoint") / "visual.safetensors"
def compressed_mb(state: dict[str, torch.Tensor]) -> float:
    """zlib (level 6) size in MB (10^6 bytes) of the raw bytes of every tensor of ``state``."""
    comp = zlib.compressobj(6)
    size = 0
    for t in state.values():
        size += len(comp.compress(t.detach().contiguous().numpy().tobytes()))
    return (size + len(comp.flush())) / 1e6


def _save_state(out_dir: Path, state: dict) -> None:
    write_json(out_dir / STATE_FILE, state)


def _barrier() -> None:
    """Wait for every process of an initialised default process group (torchrun); a no-op otherwise."""
    if _world()[1] > 1:
        torch.distributed.barrier()


class _WorkerRecord(StageRecord):
    """The stage record of a process other than rank 0 under torchrun: it hashes and writes nothing (rank 0
    writes every file; the others wait on barriers)."""

    def __enter__(self) -> _WorkerRecord:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        return None

    def add_input(self, path) -> None:
        return None

    def add_output(self, path) -> None:
        return None


def imp_stage(source: ModelSource, options: ImpOptions, out_dir: str | os.PathLike) -> dict:
    """Run OpenTrans IMP (or re-apply saved masks) on a model's image encoder and write it into ``out_dir``.

    Args:
        source: the model to prune (:class:`~opentrans.models.source.ModelSource`); it is also the frozen
            distillation teacher and the fidelity reference.
        out_dir: stage directory (see module docs); holding a run with the same options and inputs, it resumes.
        options: :class:`~opentrans.prune.options.ImpOptions`, whose fields are:
        sparsity: target fraction in (0, 1) of the IMP target weights that are zero at the end (absolute, so
            an already pruned model composes: rounds continue from its current sparsity). Ignored with ``masks``.
        rate: fraction in (0, 1) of the *remaining* weights removed per round (paper: 0.1, so sparsity follows
            ``1 - 0.9^k``).
        recovery_steps: distillation steps after every round (0: none); needs ``distill_data``.
        distill_data: ``FORMAT:PATH`` (train split, images only), ``images:PATH`` or a folder of images.
        distill_limit, batch_size, lr, seed, pooled_weight: recovery data size, images per step, Adam learning
            rate, data-order seed, weight of the pooled-embedding term (see :mod:`opentrans.prune.distill`).
        eval_data, eval_limit: dataset (``FORMAT:PATH``, val split, first ``eval_limit`` images) for fidelity
            to the unpruned model; None skips it.
        masks: a masks file (``masks.safetensors`` of an earlier IMP run) to transfer instead of running rounds;
            recovery, if asked for, keeps its zeros. Its target set is its own (read from its keys).
        targets: the IMP target set (:func:`~opentrans.prune.imp.imp_targets`): ``authors`` (default: every
            Conv2d but the first, as the authors' code; nothing to prune in a ViT) or ``extended`` (ours: ViT
            Linears + fused Q/K/V, ResNet ``layer1..4`` convs + attention pool). Ignored with ``masks``.

    Returns:
        The manifest's figures: ``sparsity``, ``sparsity_before``, ``sparsity_target``, ``rounds``,
        ``params_m``, ``nonzero_params_m_after``, ``gmacs``, ``compressed_mb_before/after``, ``file_mb`` and,
        with ``eval_data``, ``teacher_miou`` (%) and ``feature_cosine``.

    Raises:
        OpenTransError: a sparsity or rate outside (0, 1); an unknown target set, or the authors' on a ViT; a
            target below the model's current sparsity; bad
            recovery options; recovery steps without distillation data; an empty or missing image folder or
            dataset; a masks file that is unreadable or for another architecture; ``out_dir`` equal to
            ``from_dir``; ``out_dir`` holding an IMP run with other options. All checked before anything is
            written.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    options.check()
    check_source(source, out_dir)
    start = open_imp(source, options, out_dir)
    # Under torchrun only rank 0 writes files; every rank computes the same rounds (recovery runs under DDP).
    main = _world()[0] == 0
    _barrier()  # every rank has read the resume state before rank 0 writes anything
    record_type = StageRecord if main else _WorkerRecord
    with record_type("prune", out_dir, start.key["options"], started=started) as rec:
        for path in start.inputs:
            rec.add_input(path)
        if start.transfer is not None:
            result = transfer_masks(start, options)
        else:
            result = run_rounds(start, options, out_dir, main)
        if not main:  # wait for rank 0 to write the model, reports and manifest; return the same figures
            _barrier()
            return read_json(out_dir / "manifest.json")["figures"]
        write_result(start, options, result, out_dir, rec)
    _barrier()  # the manifest is written: release the other ranks
    return rec.figures


@dataclass
class _ImpStart:
    """What an IMP run starts from once every input is checked.

    Attributes:
        seg, spec, inputs: the model to prune (changed in place), its spec and its input files.
        teacher: the frozen unpruned copy (distillation teacher, fidelity reference).
        transfer: the masks of ``--masks`` (None: run rounds).
        target_set: ``authors`` or ``extended``; sparsity: the target fraction (the masks' with ``transfer``).
        start_masks, already: ``weight != 0`` of the targets at the start, and their sparsity (fraction).
        distill, evalset: recovery images and fidelity dataset (None when not asked for).
        key: the resume key (format, options record, input hashes); resume: the state of an earlier run or None.
    """

    seg: Any
    spec: Any
    inputs: list[Path]
    teacher: Any
    transfer: dict | None
    target_set: str
    sparsity: float
    start_masks: dict
    already: float
    distill: Any
    evalset: Any
    key: dict
    resume: dict | None

    @property
    def total(self) -> int:
        """Number of IMP target weights."""
        return sum(m.numel() for m in self.start_masks.values())

    def probe(self, batch_size: int):
        """The fixed distillation-loss batch ``(B, 3, H, W)``: the first ``batch_size`` recovery images."""
        return torch.stack([self.distill[i] for i in range(min(len(self.distill), batch_size))])


@dataclass
class ImpResult:
    """The rounds' outcome: final masks (bool, True = kept), per-round history rows and the number of rounds
    scheduled (0 for a masks transfer)."""

    masks: dict
    history: list[dict]
    rounds: int


def _target_set(seg, source: ModelSource, options: ImpOptions, transfer: dict | None) -> str:
    """The target set of this run: the ``--masks``' own, or ``imp_targets`` (which must match an IMP ``--from``).

    Raises:
        OpenTransError: masks for another architecture; ``--from`` an IMP artifact of the other target set.
    """
    if transfer is not None:
        return check_masks(seg.visual, transfer, f"--masks {options.masks}")
    earlier = artifact_masks(source.from_dir)  # an IMP artifact: further rounds continue on its target set
    kind = masks_targets(seg.visual, earlier, f"--from {source.from_dir}") if earlier is not None else None
    if kind is not None and kind != options.imp_targets:
        raise OpenTransError(f"--from {source.from_dir} was pruned with --imp-targets {kind}; continue with the same "
                             f"(got {options.imp_targets})")
    return options.imp_targets


def _check_resume(key: dict, out_dir: Path) -> dict | None:
    """The state of an earlier run in ``out_dir`` with the same ``key`` (None when there is none).

    Raises:
        OpenTransError: ``out_dir`` holds an IMP run with other options or inputs, or one that cannot resume.
    """
    if not (out_dir / STATE_FILE).exists():
        return None
    resume = read_json(out_dir / STATE_FILE)
    if {k: resume.get(k) for k in key} != key:
        raise OpenTransError(f"--out {out_dir} holds an IMP run with other options or inputs; "
                             f"use another --out or delete it")
    if resume["rounds_done"] and not (out_dir / CHECKPOINT).is_file():
        raise OpenTransError(f"--out {out_dir}: {CHECKPOINT} is missing, cannot resume; delete {out_dir}")
    return resume


def open_imp(source: ModelSource, options: ImpOptions, out_dir: Path) -> _ImpStart:
    """Load the model and the masks, check them against each other, open the images, read the resume state.

    Raises:
        OpenTransError: see :func:`imp_stage` (everything is checked before anything is written).
    """
    seg, spec, inputs = source.resolve()
    teacher = copy.deepcopy(seg).eval().requires_grad_(False)
    transfer = read_masks(options.masks)[0] if options.masks is not None else None
    target_set = _target_set(seg, source, options, transfer)
    start_masks = current_masks(seg.visual, target_set)
    already = mask_sparsity(start_masks)
    sparsity = mask_sparsity(transfer) if transfer is not None else options.sparsity
    if transfer is None and sparsity < already - 1e-9:
        raise OpenTransError(f"model is already at {already:.1%} sparsity of its IMP weights; ask for at least "
                             f"that much (got {sparsity:.1%})")
    distill = evalset = None
    if options.recovery_steps > 0:
        distill = open_images(options.distill_data, spec.image_size, spec.mean, spec.std, limit=options.distill_limit)
    if options.eval_data is not None:
        from opentrans.data import open_dataset

        evalset = open_dataset(options.eval_data, "val", spec.image_size, spec.mean, spec.std, limit=options.eval_limit)
    files = [*inputs, *([options.masks] if options.masks else [])]
    key = {"format": STATE_FORMAT, "options": {"method": "imp", **source.record(), **as_record(options)},
           "inputs": {str(p): sha256(p) for p in files}}
    return _ImpStart(seg, spec, inputs, teacher, transfer, target_set, sparsity, start_masks, already, distill,
                     evalset, key, _check_resume(key, out_dir))


def _recover_round(start: _ImpStart, options: ImpOptions, targets: list, seed: int) -> dict:
    """Distil under ``targets``' masks; the history row's losses (before/after, per step)."""
    probe, w = start.probe(options.batch_size), options.pooled_weight
    row = {"loss_pruned": evaluate_distill_loss(start.seg, start.teacher, probe, targets, w)}
    row["train_losses"] = recover(start.seg, start.teacher, start.distill, options.recovery_steps, targets,
                                  options.batch_size, options.lr, seed, w)
    row["loss_recovered"] = evaluate_distill_loss(start.seg, start.teacher, probe, targets, w)
    return row


def transfer_masks(start: _ImpStart, options: ImpOptions) -> ImpResult:
    """Apply the ``--masks`` to the model in place, then recover under them if asked (history row 0)."""
    apply_masks(start.seg, start.transfer)
    if options.recovery_steps == 0:
        return ImpResult(start.transfer, [], 0)
    targets = attach_masks(start.seg.visual, start.transfer)
    row = _recover_round(start, options, targets, options.seed)
    current = bake_masks(targets)
    return ImpResult(current, [{"round": 0, "sparsity": mask_sparsity(current), **row}], 0)


def _save_round(start: _ImpStart, out_dir: Path, k: int, current: dict, history: list, rounds: int) -> None:
    """Finish round ``k`` on disk: its masks, the checkpoint and the state, in this order, each atomically."""
    save_masks(current, out_dir / "masks" / f"round_{k}.safetensors", start.spec.model, start.target_set)
    with atomic_path(out_dir / CHECKPOINT) as tmp:
        save_file({n: t.detach().contiguous() for n, t in start.seg.visual.state_dict().items()}, str(tmp))
    _save_state(out_dir, {**start.key, "rounds_done": k, "rounds_total": rounds, "history": history})


def run_rounds(start: _ImpStart, options: ImpOptions, out_dir: Path, main: bool) -> ImpResult:
    """The IMP rounds from the start (or the last finished round of an earlier run) to the target, each followed
    by recovery; after every round rank 0 (``main``) saves what a resume needs (:func:`_save_round`)."""
    schedule = sparsity_schedule(start.already, start.sparsity, options.rate, start.total)
    current, done, history = start.start_masks, 0, []
    if start.resume is not None and start.resume["rounds_done"]:
        done = start.resume["rounds_done"]
        start.seg.visual.load_state_dict(load_file(str(out_dir / CHECKPOINT)), strict=True)
        current, _ = read_masks(out_dir / "masks" / f"round_{done}.safetensors")
        history = start.resume["history"][:done]
    for k in range(done + 1, len(schedule) + 1):
        targets = attach_masks(start.seg.visual, current)
        pruned_now = start.total - sum(int(m.sum()) for m in current.values())
        global_magnitude_round(targets, schedule[k - 1] - pruned_now)
        row = {"round": k}
        if options.recovery_steps > 0:
            row |= _recover_round(start, options, targets, options.seed * 100003 + k)
        current = bake_masks(targets)
        row["sparsity"] = mask_sparsity(current)
        history.append(row)
        if main:
            _save_round(start, out_dir, k, current, history, len(schedule))
        _barrier()
    return ImpResult(current, history, len(schedule))


def imp_report(start: _ImpStart, options: ImpOptions, result: ImpResult) -> dict:
    """The ``prune_report.json`` contents but ``file_mb``: sparsity, params, GMACs, compressed sizes, rounds,
    per-layer sparsity and (with ``eval_data``) fidelity to the unpruned model."""
    seg, spec, total = start.seg, start.spec, start.total
    cost = count_encoder_cost(seg)
    params = cost["params_m"]
    zeros_before = total - sum(int(m.sum()) for m in start.start_masks.values())
    zeros_after = total - sum(int(m.sum()) for m in result.masks.values())
    report = {
        "model": spec.model, "weights": spec.weights, "method": "imp", "targets": start.target_set,
        "rate": options.rate, "recovery_steps": options.recovery_steps, "distill_data": options.distill_data,
        "masks_from": None if options.masks is None else str(options.masks),
        "sparsity_target": float(start.sparsity), "sparsity_before": start.already,
        "sparsity": mask_sparsity(result.masks), "pruned_weights_total": total, "image_size": list(spec.image_size),
        "params_m": params, "nonzero_params_m_before": params - zeros_before / 1e6,
        "nonzero_params_m_after": params - zeros_after / 1e6, "gmacs": cost["gmacs"],
        "compressed_mb_before": compressed_mb(start.teacher.visual.state_dict()),
        "compressed_mb_after": compressed_mb(seg.visual.state_dict()),
        "latency_note": LATENCY_NOTE,
        "rounds": [{k: v for k, v in r.items() if k != "train_losses"} for r in result.history],
        "train_losses": {str(r["round"]): r.get("train_losses", []) for r in result.history},
        "layers": layer_sparsity(result.masks),
    }
    if start.evalset is not None:
        text = start.teacher.encode_classes(list(start.evalset.class_names), model_name=spec.model)
        report["eval_data"] = options.eval_data
        report["fidelity"] = fidelity(seg, start.teacher, start.evalset, text)
    return report


def imp_figures(report: dict) -> dict:
    """The manifest's figures of an IMP report."""
    figures = {k: report[k] for k in ("sparsity", "sparsity_before", "sparsity_target", "params_m",
                                      "nonzero_params_m_after", "gmacs", "compressed_mb_before",
                                      "compressed_mb_after", "file_mb")}
    figures["rounds"] = len(report["rounds"])
    if "fidelity" in report:
        figures["teacher_miou"] = report["fidelity"]["teacher_miou"]
        figures["feature_cosine"] = report["fidelity"]["feature_cosine"]
    return figures


def write_result(start: _ImpStart, options: ImpOptions, result: ImpResult, out_dir: Path, rec: StageRecord) -> None:
    """Write the model (zeros baked in), final masks and reports into ``out_dir``, each recorded as an output."""
    spec = start.spec
    spec.lineage.append("prune-imp")
    rec.add_output(save_segmentor(start.seg, spec, out_dir))
    rec.add_output(out_dir / SPEC_FILE)
    rec.add_output(save_masks(result.masks, out_dir / MASKS_FILE, spec.model, start.target_set))
    for k in range(1, result.rounds + 1):
        rec.add_output(out_dir / "masks" / f"round_{k}.safetensors")
    report = imp_report(start, options, result)
    report["file_mb"] = (out_dir / WEIGHTS_FILE).stat().st_size / 1e6
    rec.add_output(write_json(out_dir / REPORT_JSON, report))
    rec.add_output(write_text(out_dir / REPORT_MD, render_markdown(report)))
    rec.weights = spec.weights
    rec.figures = imp_figures(report)
