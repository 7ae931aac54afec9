"""The ``prune`` stage: load a model, prune its image encoder, write the model, reports and manifest.

Output directory::

    model.safetensors, model.json   the pruned segmentor (lineage gains "prune")
    prune_report.json               the full report of :func:`~opentrans.prune.structured.prune_structured`
    prune_report.md                 the same for people: cost before/after and the per-layer widths
    manifest.json                   written last, status "complete"

Optionally the pruned model recovers by label-free distillation from the frozen unpruned one
(:func:`opentrans.prune.distill.recover`, as for IMP) and its fidelity to the unpruned model is measured on a
val dataset (teacher-agreement mIoU, dense feature cosine; :func:`opentrans.prune.imp_stage.fidelity`).
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import torch

from opentrans.artifacts import StageRecord, write_json, write_text
from opentrans.errors import OpenTransError
from opentrans.models.artifact import SPEC_FILE, resolve_model, save_segmentor
from opentrans.prune.structured import current_sparsity, prune_structured, validate_prune_options

REPORT_JSON = "prune_report.json"
REPORT_MD = "prune_report.md"


def _change(before: float, after: float) -> str:
    return f"{100.0 * (after - before) / before:+.1f}%" if before else "n/a"


def render_markdown(report: dict, model: str, weights: str) -> str:
    """Markdown summary of a :func:`prune_structured` report for ``model`` with weights ``weights``."""
    h, w = report["image_size"]
    lines = [
        f"# Prune report: {model}",
        "",
        f"Weights: **{weights}**. Importance `{report['importance']}` ({report['ranking']} ranking), "
        f"round_to {report['round_to']}.",
        f"Sparsity: target {report['sparsity_target']:.1%}, achieved {report['sparsity']:.1%} of "
        f"{report['prunable_channels']} prunable channels (was {report['sparsity_before']:.1%}).",
        "",
        f"| Image encoder ({weights}, {h}x{w}, batch 1) | before | after | change |",
        "|---|---:|---:|---:|",
        f"| Params (M) | {report['params_m_before']:.4g} | {report['params_m_after']:.4g} | "
        f"{_change(report['params_m_before'], report['params_m_after'])} |",
        f"| GMACs (dense path) | {report['gmacs_before']:.4g} | {report['gmacs_after']:.4g} | "
        f"{_change(report['gmacs_before'], report['gmacs_after'])} |",
        "",
        "GMACs: matrix products and convolutions of the dense path the segmentor runs (element-wise ops not "
        "counted). Params: every parameter of the image tower.",
        "",
        "| Layer | original | before | after |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| `{row['layer']}` | {row['original']} | {row['before']} | {row['after']} |" for row in report["layers"]]
    rec = report.get("recovery")
    if rec:
        lines += ["", f"Recovery: {rec['steps']} label-free distillation steps on `{rec['distill_data']}`; distillation "
                  f"loss on a fixed batch {rec['loss_pruned']:.5f} after pruning -> {rec['loss_recovered']:.5f} after "
                  f"recovery."]
    fid = report.get("fidelity")
    if fid:
        lines += ["", f"Fidelity to the unpruned model on `{report['eval_data']}` val ({fid['images']} images, "
                  f"{weights}): teacher-agreement mIoU **{fid['teacher_miou']:.2f} %**, pixel agreement "
                  f"{fid['pixel_agreement']:.2f} %, dense feature cosine {fid['feature_cosine']:.4f}."]
    return "\n".join(lines) + "\n"


def prune_stage(from_dir: str | os.PathLike | None, model: str | None, pretrained: str,
                out_dir: str | os.PathLike, sparsity: float, importance: str = "magnitude",
                round_to: int | None = 8, image_size: tuple[int, int] | None = None, recovery_steps: int = 0,
                distill_data: str | None = None, distill_limit: int | None = None, batch_size: int = 4,
                lr: float = 1e-5, seed: int = 0, eval_data: str | None = None, eval_limit: int | None = 8) -> dict:
    """Prune a model's image encoder and write the result into ``out_dir``.

    Args:
        from_dir: the output directory of an earlier stage (``--from``), or None.
        model, pretrained: open_clip architecture and weights (``none``, a tag or a path) when ``from_dir`` is
            None; see :func:`opentrans.models.artifact.resolve_model`.
        out_dir: stage directory; gets ``model.safetensors``, ``model.json``, ``prune_report.json``,
            ``prune_report.md`` and ``manifest.json``.
        sparsity: target fraction in (0, 1) of prunable channels removed, relative to the original
            architecture (so pruning an already pruned model composes; see :func:`prune_structured`).
        importance: ``magnitude`` or ``lamp``.
        round_to: kept widths rounded to a multiple of this; None or 1 for none.
        image_size: network input (H, W) in pixels for a fresh ``--model`` (default: CamVid-shaped).
        recovery_steps, distill_data, distill_limit, batch_size, lr, seed: optional label-free distillation
            recovery after pruning (0 steps: none), as for IMP (see :func:`opentrans.prune.imp_stage.imp_stage`).
        eval_data, eval_limit: val dataset (``FORMAT:PATH``, first ``eval_limit`` images) for fidelity to the
            unpruned model (``teacher_miou`` %, ``feature_cosine``); None skips it.

    Returns:
        The manifest's figures: ``params_m_before/after`` (M params), ``gmacs_before/after`` (GMACs, dense path,
        batch 1), ``sparsity`` (achieved fraction) and ``sparsity_target``.

    Raises:
        OpenTransError: invalid options, both or neither model sources, ``image_size`` with ``from_dir``,
            ``out_dir`` equal to ``from_dir``, a target below the model's current sparsity, bad recovery
            options, recovery steps without ``distill_data``, an empty image folder. All of these are checked
            before anything is written.
    """
    from opentrans.prune.distill import check_recovery_options, evaluate_distill_loss, open_images, recover

    started = time.perf_counter()
    validate_prune_options(sparsity, importance, round_to)
    check_recovery_options(recovery_steps, batch_size, lr)
    if recovery_steps > 0 and distill_data is None:
        raise OpenTransError(f"--recovery-steps {recovery_steps} needs --distill-data (a folder of images); "
                             f"or pass --recovery-steps 0")
    out_dir = Path(out_dir)
    if from_dir is not None and image_size is not None:
        raise OpenTransError("--image-size applies to a fresh --model only; a --from model keeps its input size")
    if from_dir is not None and Path(from_dir).resolve() == out_dir.resolve():
        raise OpenTransError(f"--out {out_dir} is the --from directory; write the pruned model somewhere else")
    seg, spec, inputs = resolve_model(from_dir, model, pretrained, image_size=image_size)
    already = current_sparsity(seg, spec.model)
    if sparsity < already - 1e-9:
        raise OpenTransError(
            f"model is already at {already:.1%} sparsity; ask for at least that much (got {sparsity:.1%})"
        )
    distill = evalset = None
    if recovery_steps > 0:
        distill = open_images(distill_data, spec.image_size, spec.mean, spec.std, limit=distill_limit)
    if eval_data is not None:
        from opentrans.data import open_dataset

        evalset = open_dataset(eval_data, "val", spec.image_size, spec.mean, spec.std, limit=eval_limit)
    teacher = copy.deepcopy(seg).eval().requires_grad_(False) if distill or evalset else None

    options = {
        "from": None if from_dir is None else str(from_dir),
        "model": spec.model,
        "pretrained": spec.pretrained,
        "sparsity": sparsity,
        "importance": importance,
        "round_to": round_to,
        "image_size": list(spec.image_size),
    }
    if recovery_steps:
        options |= {"recovery_steps": recovery_steps, "distill_data": distill_data, "distill_limit": distill_limit,
                    "batch_size": batch_size, "lr": lr, "seed": seed}
    with StageRecord("prune", out_dir, options, started=started) as rec:
        for path in inputs:
            rec.add_input(path)
        report = prune_structured(seg, sparsity, importance, round_to, model_name=spec.model)
        report = {"model": spec.model, "weights": spec.weights, **report}
        if distill is not None:
            probe = torch.stack([distill[i] for i in range(min(len(distill), batch_size))])
            loss_pruned = evaluate_distill_loss(seg, teacher, probe)
            losses = recover(seg, teacher, distill, recovery_steps, [], batch_size, lr, seed)
            report["recovery"] = {"steps": recovery_steps, "distill_data": distill_data, "loss_pruned": loss_pruned,
                                  "loss_recovered": evaluate_distill_loss(seg, teacher, probe), "train_losses": losses}
        if evalset is not None:
            from opentrans.prune.imp_stage import fidelity

            text = teacher.encode_classes(list(evalset.class_names), model_name=spec.model)
            report["eval_data"] = eval_data
            report["fidelity"] = fidelity(seg, teacher, evalset, text)
        spec.lineage.append("prune")
        rec.add_output(save_segmentor(seg, spec, out_dir))
        rec.add_output(out_dir / SPEC_FILE)
        rec.add_output(write_json(out_dir / REPORT_JSON, report))
        rec.add_output(write_text(out_dir / REPORT_MD, render_markdown(report, spec.model, spec.weights)))
        rec.weights = spec.weights
        rec.figures = {
            "params_m_before": report["params_m_before"],
            "params_m_after": report["params_m_after"],
            "gmacs_before": report["gmacs_before"],
            "gmacs_after": report["gmacs_after"],
            "sparsity": report["sparsity"],
            "sparsity_target": report["sparsity_target"],
        }
        if evalset is not None:
            rec.figures["teacher_miou"] = report["fidelity"]["teacher_miou"]
            rec.figures["feature_cosine"] = report["fidelity"]["feature_cosine"]
    return rec.figures

