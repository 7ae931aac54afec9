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
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from opentrans.artifacts import StageRecord, atomic_path, read_json, sha256, write_json, write_text
from opentrans.errors import OpenTransError
from opentrans.models.artifact import SPEC_FILE, WEIGHTS_FILE, save_segmentor
from opentrans.models.source import ModelSource
from opentrans.options import as_record
from opentrans.prune.distill import _world, evaluate_distill_loss, fidelity, open_images, recover  # noqa: F401 (fidelity re-exported)
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
from opentrans.models.cost import count_encoder_cost
from opentrans.prune.options import ImpOptions
from opentrans.prune.stage import check_source

STATE_FILE = "imp_state.json"
STATE_FORMAT = "opentrans.imp-state/1"
MASKS_FILE = "masks.safetensors"
CHECKPOINT = Path("checkpoint") / "visual.safetensors"
REPORT_JSON = "prune_report.json"
REPORT_MD = "prune_report.md"
#: How the report describes each IMP target set (a report without ``targets`` predates them: ``extended``).
TARGETS_TEXT = {
    "authors": "Conv2d weights except the first conv (the OpenTrans authors' targets; no Linear layer)",
    "extended": "Linear/Conv2d weights and fused Q/K/V (patch/stem conv excluded; our extended targets)",
}
LATENCY_NOTE = ("Unstructured sparsity shrinks the compressed size of the weights but not dense-kernel latency: "
                "the pruned model keeps every shape, so its GMACs and its dense CPU/GPU latency are unchanged. "
                "Use `--method structured` to make the model faster.")


def compressed_mb(state: dict[str, torch.Tensor]) -> float:
    """zlib (level 6) size in MB (10^6 bytes) of the raw bytes of every tensor of ``state``."""
    comp = zlib.compressobj(6)
    size = 0
    for t in state.values():
        size += len(comp.compress(t.detach().contiguous().numpy().tobytes()))
    return (size + len(comp.flush())) / 1e6


def render_markdown(report: dict) -> str:
    """Markdown for people: summary, fidelity, latency note, rounds and the per-layer sparsity table."""
    w = report["weights"]
    lines = [
        f"# Prune report (OpenTrans IMP): {report['model']}",
        "",
        f"Weights: **{w}**. Global unstructured L1 magnitude pruning of the image encoder's "
        + TARGETS_TEXT[report.get("targets", "extended")]
        + f", {report['rate']:.0%} of the remaining weights per round, "
        f"{report['recovery_steps']} distillation recovery steps per round"
        + (f" on `{report['distill_data']}`" if report.get("distill_data") else "") + ".",
        f"Sparsity of the pruned weights: {report['sparsity_before']:.2%} -> **{report['sparsity']:.2%}** "
        f"(target {report['sparsity_target']:.2%}) in {len(report['rounds'])} rounds.",
        "",
        f"**{LATENCY_NOTE}**",
        "",
        f"| Image encoder ({w}) | before | after |",
        "|---|---:|---:|",
        f"| Params (M) | {report['params_m']:.4g} | {report['params_m']:.4g} |",
        f"| Non-zero params (M) | {report['nonzero_params_m_before']:.4g} | {report['nonzero_params_m_after']:.4g} |",
        f"| GMACs (dense path, {report['image_size'][0]}x{report['image_size'][1]}) | {report['gmacs']:.4g} | "
        f"{report['gmacs']:.4g} |",
        f"| zlib-compressed weights (MB) | {report['compressed_mb_before']:.4g} | {report['compressed_mb_after']:.4g} |",
        f"| model.safetensors (MB, dense) | {report['file_mb']:.4g} | {report['file_mb']:.4g} |",
        "",
    ]
    fid = report.get("fidelity")
    if fid:
        lines += [
            f"Fidelity to the unpruned model on `{report['eval_data']}` val ({fid['images']} images, {w}): "
            f"teacher-agreement mIoU **{fid['teacher_miou']:.2f} %**, pixel agreement {fid['pixel_agreement']:.2f} %, "
            f"dense feature cosine {fid['feature_cosine']:.4f}, logit cosine (min) {fid['logit_cosine']:.4f}.",
            "",
        ]
    if report["rounds"]:
        lines += ["| Round | sparsity % | distill loss after pruning | after recovery |", "|---:|---:|---:|---:|"]
        for r in report["rounds"]:
            pruned, recovered = r.get("loss_pruned"), r.get("loss_recovered")
            lines.append(f"| {r['round']} | {100 * r['sparsity']:.2f} | "
                         f"{'n/a' if pruned is None else f'{pruned:.5f}'} | "
                         f"{'n/a' if recovered is None else f'{recovered:.5f}'} |")
        lines.append("")
    lines += ["| Layer | shape | params | zeros | sparsity % |", "|---|---|---:|---:|---:|"]
    lines += [f"| `{r['layer']}` | {'x'.join(map(str, r['shape']))} | {r['params']} | {r['zeros']} | {r['sparsity']:.2f} |"
              for r in report["layers"]]
    return "\n".join(lines) + "\n"


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
    from_dir, masks, sparsity, target_set = source.from_dir, options.masks, options.sparsity, options.imp_targets
    rate, recovery_steps, batch_size = options.rate, options.recovery_steps, options.batch_size
    lr, seed, pooled_weight = options.lr, options.seed, options.pooled_weight

    seg, spec, inputs = source.resolve()
    teacher = copy.deepcopy(seg).eval().requires_grad_(False)
    transfer = None
    if masks is not None:
        transfer, _ = read_masks(masks)
        target_set = check_masks(seg.visual, transfer, f"--masks {masks}")
        sparsity = mask_sparsity(transfer)
    else:
        earlier = artifact_masks(from_dir)  # an IMP artifact: further rounds continue on its target set
        if earlier is not None and (kind := masks_targets(seg.visual, earlier, f"--from {from_dir}")) != target_set:
            raise OpenTransError(f"--from {from_dir} was pruned with --imp-targets {kind}; continue with the same "
                                 f"(got {target_set})")
    start_masks = current_masks(seg.visual, target_set)
    already = mask_sparsity(start_masks)
    if masks is None and sparsity < already - 1e-9:
        raise OpenTransError(f"model is already at {already:.1%} sparsity of its IMP weights; ask for at least "
                             f"that much (got {sparsity:.1%})")
    distill = None
    if recovery_steps > 0:
        distill = open_images(options.distill_data, spec.image_size, spec.mean, spec.std, limit=options.distill_limit)
    evalset = None
    if options.eval_data is not None:
        from opentrans.data import open_dataset

        evalset = open_dataset(options.eval_data, "val", spec.image_size, spec.mean, spec.std, limit=options.eval_limit)

    options_record = {"method": "imp", **source.record(), **as_record(options)}
    key = {"format": STATE_FORMAT, "options": options_record,
           "inputs": {str(p): sha256(p) for p in inputs} | ({str(masks): sha256(masks)} if masks else {})}
    state_path = out_dir / STATE_FILE
    resume = None
    if state_path.exists():
        resume = read_json(state_path)
        if {k: resume.get(k) for k in key} != key:
            raise OpenTransError(f"--out {out_dir} holds an IMP run with other options or inputs; "
                                 f"use another --out or delete it")
        if resume["rounds_done"] and not (out_dir / CHECKPOINT).is_file():
            raise OpenTransError(f"--out {out_dir}: {CHECKPOINT} is missing, cannot resume; delete {out_dir}")

    total = sum(m.numel() for m in start_masks.values())
    probe = torch.stack([distill[i] for i in range(min(len(distill), batch_size))]) if distill is not None else None

    # Under torchrun only rank 0 writes files; every rank computes the same rounds (recovery runs under DDP).
    main = _world()[0] == 0
    _barrier()  # every rank has read the resume state before rank 0 writes anything
    record_type = StageRecord if main else _WorkerRecord
    with record_type("prune", out_dir, options_record, started=started) as rec:
        for path in inputs:
            rec.add_input(path)
        history: list[dict] = []
        if transfer is not None:
            apply_masks(seg, transfer)
            current = transfer
            schedule = []
            if recovery_steps > 0:
                targets = attach_masks(seg.visual, current)
                loss_pruned = evaluate_distill_loss(seg, teacher, probe, targets, pooled_weight)
                losses = recover(seg, teacher, distill, recovery_steps, targets, batch_size, lr, seed, pooled_weight)
                loss_recovered = evaluate_distill_loss(seg, teacher, probe, targets, pooled_weight)
                current = bake_masks(targets)
                history.append({"round": 0, "sparsity": mask_sparsity(current), "loss_pruned": loss_pruned,
                                "loss_recovered": loss_recovered, "train_losses": losses})
        else:
            schedule = sparsity_schedule(already, sparsity, rate, total)
            current, done = start_masks, 0
            if resume is not None and resume["rounds_done"]:
                done = resume["rounds_done"]
                seg.visual.load_state_dict(load_file(str(out_dir / CHECKPOINT)), strict=True)
                current, _ = read_masks(out_dir / "masks" / f"round_{done}.safetensors")
                history = resume["history"][:done]
            for k in range(done + 1, len(schedule) + 1):
                targets = attach_masks(seg.visual, current)
                pruned_now = total - sum(int(m.sum()) for m in current.values())
                global_magnitude_round(targets, schedule[k - 1] - pruned_now)
                row = {"round": k}
                if recovery_steps > 0:
                    row["loss_pruned"] = evaluate_distill_loss(seg, teacher, probe, targets, pooled_weight)
                    row["train_losses"] = recover(seg, teacher, distill, recovery_steps, targets, batch_size, lr,
                                                  seed * 100003 + k, pooled_weight)
                    row["loss_recovered"] = evaluate_distill_loss(seg, teacher, probe, targets, pooled_weight)
                current = bake_masks(targets)
                row["sparsity"] = mask_sparsity(current)
                history.append(row)
                # A round is finished when all three are written, in this order.
                if main:
                    save_masks(current, out_dir / "masks" / f"round_{k}.safetensors", spec.model, target_set)
                    with atomic_path(out_dir / CHECKPOINT) as tmp:
                        save_file({n: t.detach().contiguous() for n, t in seg.visual.state_dict().items()}, str(tmp))
                    _save_state(out_dir, {**key, "rounds_done": k, "rounds_total": len(schedule), "history": history})
                _barrier()

        if not main:  # wait for rank 0 to write the model, reports and manifest; return the same figures
            _barrier()
            return read_json(out_dir / "manifest.json")["figures"]

        spec.lineage.append("prune-imp")
        rec.add_output(save_segmentor(seg, spec, out_dir))
        rec.add_output(out_dir / SPEC_FILE)
        rec.add_output(save_masks(current, out_dir / MASKS_FILE, spec.model, target_set))
        for k in range(1, len(schedule) + 1):
            rec.add_output(out_dir / "masks" / f"round_{k}.safetensors")

        cost = count_encoder_cost(seg)
        params = cost["params_m"]
        zeros_before = total - sum(int(m.sum()) for m in start_masks.values())
        zeros_after = total - sum(int(m.sum()) for m in current.values())
        report = {
            "model": spec.model, "weights": spec.weights, "method": "imp", "targets": target_set, "rate": rate,
            "recovery_steps": recovery_steps, "distill_data": options.distill_data,
            "masks_from": None if masks is None else str(masks),
            "sparsity_target": float(sparsity), "sparsity_before": already, "sparsity": mask_sparsity(current),
            "pruned_weights_total": total, "image_size": list(spec.image_size),
            "params_m": params, "nonzero_params_m_before": params - zeros_before / 1e6,
            "nonzero_params_m_after": params - zeros_after / 1e6, "gmacs": cost["gmacs"],
            "compressed_mb_before": compressed_mb(teacher.visual.state_dict()),
            "compressed_mb_after": compressed_mb(seg.visual.state_dict()),
            "file_mb": (out_dir / WEIGHTS_FILE).stat().st_size / 1e6,
            "latency_note": LATENCY_NOTE,
            "rounds": [{k: v for k, v in r.items() if k != "train_losses"} for r in history],
            "train_losses": {str(r["round"]): r.get("train_losses", []) for r in history},
            "layers": layer_sparsity(current),
        }
        if evalset is not None:
            text = teacher.encode_classes(list(evalset.class_names), model_name=spec.model)
            report["eval_data"] = options.eval_data
            report["fidelity"] = fidelity(seg, teacher, evalset, text)
        rec.add_output(write_json(out_dir / REPORT_JSON, report))
        rec.add_output(write_text(out_dir / REPORT_MD, render_markdown(report)))
        rec.weights = spec.weights
        rec.figures = {k: report[k] for k in ("sparsity", "sparsity_before", "sparsity_target", "params_m",
                                              "nonzero_params_m_after", "gmacs", "compressed_mb_before",
                                              "compressed_mb_after", "file_mb")}
        rec.figures["rounds"] = len(history)
        if evalset is not None:
            rec.figures["teacher_miou"] = report["fidelity"]["teacher_miou"]
            rec.figures["feature_cosine"] = report["fidelity"]["feature_cosine"]
    _barrier()  # the manifest is written: release the other ranks
    return rec.figures
