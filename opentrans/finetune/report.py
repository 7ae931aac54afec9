"""Rendering of the ``finetune`` stage's result: the report dict (``finetune_report.json``), its markdown
(``finetune_report.md``) and the manifest figures. Pure functions: nothing here trains, evaluates or writes."""

from __future__ import annotations

import math
import statistics
from typing import TYPE_CHECKING

from opentrans.metrics import zero_shot_summary

if TYPE_CHECKING:
    from opentrans.finetune.options import FinetuneOptions
    from opentrans.finetune.stage import FinetuneResult, PreparedFinetune


def _loss_summary(losses: list[float]) -> dict:
    finite = [v for v in losses if math.isfinite(v)]
    if not finite:
        return {"first": None, "last": None, "min": None, "mean_first_10pct": None, "mean_last_10pct": None,
                "skipped_steps": len(losses)}
    k = max(1, len(finite) // 10)
    return {
        "first": finite[0], "last": finite[-1], "min": min(finite),
        "mean_first_10pct": statistics.fmean(finite[:k]), "mean_last_10pct": statistics.fmean(finite[-k:]),
        "skipped_steps": len(losses) - len(finite),
    }


def _fmt(v, digits: int = 4) -> str:
    return "n/a" if v is None else f"{v:.{digits}g}" if isinstance(v, float) else str(v)


_POLICY_TEXT = {
    "median": " (OpenTrans heavy-tail criterion, {estimator} alphas: layers with alpha < median {median:.3f} "
              "stay frozen)",
    "fraction": " ({estimator} alphas: the {fraction:.0%} of layers with the smallest alpha stay frozen)",
    "inverse": " (OpenTrans ablation, {estimator} alphas: layers with alpha > median {median:.3f} stay frozen)",
    "random": " (control: as many layers as the median policy freezes, drawn at random with seed {seed})",
    "head-only": " (every CLIP weight frozen; only the head, prompts and adapters train)",
}


def report_markdown(r: dict) -> str:
    """``finetune_report.md`` from a :func:`finetune_report` dict: a table of figures (every row names the
    weights), then the frozen, trained, excluded and gradient-free layers."""
    w = r["weights"]
    loss = r["loss"]
    lines = [
        f"# Finetune report: {r['model']}",
        "",
        f"Weights: **{w}**. Lineage: {' -> '.join(r['lineage'])}. Data: `{r['data']}` "
        f"({r['train_images']} train / {r['val_images']} val images).",
        "",
        f"Freeze policy: **{r['policy']}**" + _POLICY_TEXT.get(r["policy"], "").format(
            median=r["median_alpha"] or 0.0, fraction=r.get("freeze_fraction") or 0.0, seed=r["seed"],
            estimator=r.get("estimator")),
        "",
        "| figure | value | weights |",
        "|---|---|---|",
        f"| val mIoU before | {_fmt(r['miou_before'])} % | {w} |",
        f"| val mIoU after | {_fmt(r['miou_after'])} % | {w} |",
        f"| trainable params | {r['trainable_params']:,} ({r['trainable_pct']:.2f} % of {r['total_params']:,}) | {w} |",
        *([f"| adapter | {r['adapter']['kind']} on {len(r['adapter']['targets'])} layers: "
           f"{r['adapter']['trainable_params']:,} trainable params, merged into plain weights | {w} |"]
          if r.get("adapter") else []),
        *(["| trainable params by component | "
           + ", ".join(f"{k} {v:,}" for k, v in r["trainable_by_component"].items()) + f" | {w} |"] if r.get("trainable_by_component") else []),
        *([f"| head / prompts | {r.get('head')} / {r.get('prompts') or 'none'} | {w} |"] if "head" in r else []),
        *([f"| zero-shot val mIoU(S) / mIoU(U) / hIoU before | {_fmt(r['zero_shot']['before']['miou_seen'])} / "
           f"{_fmt(r['zero_shot']['before']['miou_unseen'])} / {_fmt(r['zero_shot']['before']['hiou'])} % | {w} |",
           f"| zero-shot val mIoU(S) / mIoU(U) / hIoU after | {_fmt(r['zero_shot']['after']['miou_seen'])} / "
           f"{_fmt(r['zero_shot']['after']['miou_unseen'])} / {_fmt(r['zero_shot']['after']['hiou'])} % | {w} |",
           f"| unseen classes (never labelled in training) | {', '.join(r['zero_shot']['unseen'])} | {w} |"]
          if r.get("zero_shot") else []),
        f"| planned trainable but outside the dense forward path (kept frozen) | {r['gradient_free_params']:,} params "
        f"| {w} |",
        f"| trainable / frozen / excluded encoder layers | {len(r['trainable_layers'])} / "
        f"{len(r['frozen_layers'])} / {len(r['excluded'])} | {w} |",
        f"| steps x batch, lr | {r['steps']} x {r['batch_size']}, {r['lr']:g} (poly) | {w} |",
        f"| loss first -> last (mean first/last 10 %) | {_fmt(loss['first'])} -> {_fmt(loss['last'])} "
        f"({_fmt(loss['mean_first_10pct'])} / {_fmt(loss['mean_last_10pct'])}) | {w} |",
        f"| training time | {r['train_seconds']:.1f} s | {w} |",
        "",
    ]
    if r["frozen_layers"]:
        lines += [f"## Frozen layers ({r['policy']} policy)", "", "| layer | alpha | params |", "|---|---|---|"]
        lines += [f"| `{n}` | {r['alphas'][n]:.3f} | {r['frozen_layer_params'][n]} |" for n in r["frozen_layers"]] + [""]
    if r["trainable_layers"]:
        lines += [f"## Trained layers ({r['policy']} policy)", "", "| layer | alpha | params |", "|---|---|---|"]
        lines += [f"| `{n}` | {r['alphas'][n]:.3f} | {r['trainable_layer_params'][n]} |"
                  for n in r["trainable_layers"]] + [""]
    if r["excluded"]:
        lines += ["## Excluded from the analysis (stay frozen)", ""]
        lines += [f"- `{e['name']}`: {e['reason']}" for e in r["excluded"]] + [""]
    if r["gradient_free"]:
        lines += ["## Trainable by plan but outside the dense forward path (kept frozen: no gradient reaches them)", ""]
        lines += [f"- `{n}`" for n in r["gradient_free"]] + [""]
    return "\n".join(lines)


def _zero_shot(prepared: "PreparedFinetune", result: "FinetuneResult") -> dict | None:
    """mIoU(S), mIoU(U) and hIoU (%) before and after training, or None without a zero-shot split."""
    unseen = prepared.unseen
    if not unseen:
        return None
    zero_shot = {"unseen": list(unseen), "seen": list(prepared.seen_names),
                 "before": zero_shot_summary(result.before["per_class_iou"], unseen),
                 "after": zero_shot_summary(result.after["per_class_iou"], unseen)}
    for key in ("before", "after"):
        zero_shot[key] = {k: zero_shot[key][k] for k in ("miou_seen", "miou_unseen", "hiou")}
    return zero_shot


def _adapter_record(prepared: "PreparedFinetune", result: "FinetuneResult", options: "FinetuneOptions") -> dict | None:
    """The report's ``adapter`` entry (kind, targets, parameter counts, adapters merged, rank/block), or None."""
    from opentrans.finetune.adapters.common import ADAPTERS

    report = prepared.adapter_report
    if report is None:
        return None
    return {"kind": report.kind, "targets": list(report.targets), "trainable_params": report.trainable_params,
            "adapted_params": report.adapted_params, "merged": result.merged,
            "rank": None, "block": None, **ADAPTERS.get(options.adapter).settings(options)}


def finetune_report(prepared: "PreparedFinetune", result: "FinetuneResult", options: "FinetuneOptions",
                    data: str) -> dict:
    """The ``finetune_report.json`` content: provenance, plan, parameter counts (elements), settings, loss curve
    (nats), val mIoU / pixel accuracy / per-class IoU before and after (%), zero-shot figures, timings (s)."""
    seg, spec, plan, counts = prepared.seg, prepared.spec, prepared.plan, prepared.counts
    before, after, losses = result.before, result.after, result.losses
    return {
        "weights": spec.weights, "model": spec.model, "lineage": spec.lineage, "data": data,
        "train_images": len(prepared.train_ds), "val_images": len(prepared.val_ds),
        "policy": plan.policy, "median_alpha": plan.median_alpha,
        "frozen_layers": list(plan.frozen), "trainable_layers": list(plan.trainable),
        "excluded": prepared.excluded, "alphas": plan.alphas,
        "gradient_free": prepared.gradient_free,
        "gradient_free_params": prepared.gradient_free_params,
        "trainable_params": prepared.trainable_params, "planned_trainable_params": counts["trainable_params"],
        "trainable_by_component": prepared.by_component,
        "total_params": counts["total_params"],
        "head_params": counts["head_params"], "image_encoder_params": counts["image_encoder_params"],
        "trainable_pct": 100.0 * prepared.trainable_params / counts["total_params"],
        "head": seg.head_type, "head_options": dict(seg.head_options),
        "prompts": None if seg.prompts is None else seg.prompts.kind,
        "prompt_options": None if seg.prompts is None else seg.prompts.options(),
        "text_side_trained": prepared.text_trains,
        "steps": options.steps, "batch_size": options.batch_size, "lr": options.lr, "seed": options.seed,
        "grad_accum": options.grad_accum, "amp": options.amp, "bf16": result.bf16, "loss_fn": options.loss,
        "world_size": result.world,
        "adapter": _adapter_record(prepared, result, options),
        "estimator": options.estimator if options.freeze_heavy_tail else None,
        "freeze_fraction": plan.fraction, "frozen_layer_params": prepared.frozen_layer_params,
        "trainable_layer_params": prepared.trainable_layer_params,
        "loss": {**_loss_summary(losses), "curve": losses},
        "miou_before": before["miou"], "miou_after": after["miou"],
        "pixel_acc_before": before["pixel_acc"], "pixel_acc_after": after["pixel_acc"],
        "per_class_iou_before": before["per_class_iou"], "per_class_iou_after": after["per_class_iou"],
        "zero_shot": _zero_shot(prepared, result),
        "analysis_seconds": round(prepared.analysis_seconds, 2), "train_seconds": round(result.train_seconds, 2),
    }


def finetune_figures(report: dict) -> dict:
    """The manifest figures: ``miou_before``, ``miou_after`` (val mIoU, %), ``trainable_params``,
    ``total_params``, ``frozen_layers``, ``steps``, ``final_loss`` (nats, None if the last step had no labelled
    pixel) and, with a zero-shot split, ``miou_seen``, ``miou_unseen``, ``hiou`` (%, after training)."""
    curve = report["loss"]["curve"]
    final = curve[-1] if math.isfinite(curve[-1]) else None
    figures = {
        "miou_before": report["miou_before"], "miou_after": report["miou_after"],
        "trainable_params": report["trainable_params"], "total_params": report["total_params"],
        "frozen_layers": len(report["frozen_layers"]), "steps": report["steps"],
        "final_loss": None if final is None else round(final, 4),
    }
    if report["zero_shot"] is not None:
        figures.update({k: None if v is None else round(v, 2) for k, v in report["zero_shot"]["after"].items()})
    return figures
