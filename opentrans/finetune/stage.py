"""The ``analyze`` and ``finetune`` pipeline stages.

``analyze``: per-layer heavy-tail alpha of the chosen towers (:mod:`opentrans.finetune.spectral`; OpenTrans
estimator, weightwatcher or both side by side), written as ``alphas.csv``, ``alphas.json``, ``alphas.png``
(bar chart) and ``esd.png`` (ESD log-log plots with the fit of chosen layers).

``finetune``: OpenTrans's layer-wise finetuning (Xu et al., "Transferable and Principled Efficiency for
Open-Vocabulary Segmentation", CVPR 2024): with ``freeze_heavy_tail`` the alphas of the *current* image
encoder (possibly pruned; Q/K/V analysed separately) are measured and a freeze policy picks the frozen
layers (default ``median``: alpha below the median stays frozen); the others are trained together with
the head; without it only the head trains. With ``checkpoint_every`` the training state goes to
``out_dir/checkpoints`` and a rerun after a kill resumes from it. Writes the finetuned model
(``model.safetensors`` + ``model.json``), ``freeze_plan.json``, ``finetune_report.json`` and
``finetune_report.md``.

Both validate every input before writing anything: on a user error they raise
:class:`~opentrans.errors.OpenTransError` and leave ``out_dir`` untouched. Each finishes by writing
``manifest.json`` through :class:`~opentrans.artifacts.StageRecord`.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from pathlib import Path

from torch import nn

from opentrans.artifacts import StageRecord, write_json, write_text
from opentrans.data import open_dataset
from opentrans.errors import OpenTransError
from opentrans.evaluate import TorchRunner, evaluate
from opentrans.finetune.adapters import add_lora, add_oft, merge_adapters
from opentrans.finetune.freeze import (
    POLICIES,
    apply_freeze_plan,
    freeze_plan,
    gradient_free_parameters,
    head_only_plan,
    trainable_param_count,
)
from opentrans.finetune.spectral import (
    TOWERS,
    analyze_model,
    spectral_layers,
    write_alpha_report,
    write_esd_plot,
)
from opentrans.finetune.losses import LOSSES
from opentrans.finetune.trainer import check_train_options, resolve_amp, train_segmentor
from opentrans.models.artifact import SPEC_FILE, WEIGHTS_FILE, resolve_model, save_segmentor

#: ``--adapter`` choices of :func:`finetune_stage`.
ADAPTERS = ("none", "lora", "oft")
#: Module-name prefix of the image encoder inside :class:`~opentrans.models.segmentor.OpenVocabSegmentor`.
VISUAL_PREFIX = "clip.visual."


def _check_out_dir(out_dir: str | os.PathLike) -> Path:
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OpenTransError(f"--out {out_dir}: exists and is not a folder")
    return out_dir


def analyze_stage(from_dir: str | os.PathLike | None, model: str | None, pretrained: str,
                  out_dir: str | os.PathLike, image_size: tuple[int, int] | None = None,
                  estimator: str = "opentrans", towers: tuple[str, ...] | list[str] = ("image",),
                  esd_layers: list[str] | None = None) -> dict:
    """Heavy-tail spectral analysis of a model's image encoder (``opentrans analyze``).

    Layer names are those of ``seg.named_modules()`` (``clip.visual.…``), so ``alphas.json`` applies
    directly to the segmentor. The analysis runs before anything is written.

    Args:
        from_dir: output directory of an earlier stage (``--from``), or None.
        model, pretrained: open_clip architecture and weights (``--model``/``--pretrained``), if no ``from_dir``.
        out_dir: where ``alphas.csv``, ``alphas.json``, ``alphas.png``, ``esd.png`` and ``manifest.json`` go.
        image_size: network input (H, W) for a fresh model (does not change the alphas).
        estimator: ``opentrans`` (default), ``weightwatcher`` or ``both`` (the table and plan use the
            OpenTrans alphas, weightwatcher's are written beside them).
        towers: ``image`` and/or ``text`` (see :data:`~opentrans.finetune.spectral.TOWERS`).
        esd_layers: layer names for ``esd.png`` (ESD log-log plot with the fit); default: the layers
            with the smallest, the median and the largest alpha.

    Returns:
        The manifest figures: ``layers_analysed``, ``excluded``, ``median_alpha`` (dimensionless),
        ``seconds`` (wall time of the analysis, all estimators) and ``estimator``.

    Raises:
        OpenTransError: bad model arguments (see :func:`~opentrans.models.artifact.resolve_model`), an
            ``out_dir`` that is a file, an unknown estimator/tower/ESD layer, or an encoder without
            analysable layers.
    """
    started = time.perf_counter()
    out_dir = _check_out_dir(out_dir)
    seg, spec, inputs = resolve_model(from_dir, model, pretrained, image_size=image_size)
    reports = analyze_model(seg, towers, estimator)
    report = next(iter(reports.values()))
    compare = reports.get("weightwatcher") if len(reports) == 2 else None
    mats = {lm.name: lm for t in towers for lm in spectral_layers(seg.get_submodule(TOWERS[t].rstrip(".")),
                                                                    TOWERS[t])[0]}
    if esd_layers:
        unknown = [n for n in esd_layers if n not in report.alphas()]
        if unknown:
            raise OpenTransError(f"--esd-layers: '{unknown[0]}' is not an analysed layer (see alphas.csv names)")
        chosen = list(dict.fromkeys(esd_layers))
    else:
        ordered = sorted(report.layers, key=lambda la: la.alpha)
        chosen = list(dict.fromkeys(la.name for la in (ordered[0], ordered[len(ordered) // 2], ordered[-1])))
    options = {"from": None if from_dir is None else str(from_dir), "model": spec.model,
               "pretrained": spec.pretrained, "image_size": list(spec.image_size), "estimator": estimator,
               "towers": list(towers), "esd_layers": chosen}
    with StageRecord("analyze", out_dir, options, started=started) as rec:
        for path in inputs:
            rec.add_input(path)
        for path in write_alpha_report(report, out_dir, weights=spec.weights, compare=compare):
            rec.add_output(path)
        rec.add_output(write_esd_plot(out_dir / "esd.png", [mats[n] for n in chosen], weights=spec.weights))
        rec.weights = spec.weights
        rec.figures = {
            "layers_analysed": len(report.layers),
            "excluded": len(report.excluded),
            "median_alpha": round(report.median_alpha, 4),
            "seconds": round(sum(r.seconds for r in reports.values()), 2),
            "estimator": estimator,
        }
    return rec.figures


def _layer_params(seg, names) -> dict[str, int]:
    """``{layer: parameter elements}`` (weight + bias; a Q/K/V slice counts its rows of in_proj weight + bias)."""
    out = {}
    for name in names:
        if name.endswith("]"):
            mha = seg.get_submodule(name[: name.rindex(".in_proj_weight[")])
            out[name] = (mha.in_proj_weight.numel() + (0 if mha.in_proj_bias is None else mha.in_proj_bias.numel())) // 3
        else:
            mod = seg.get_submodule(name)
            out[name] = sum(p.numel() for p in (mod.weight, mod.bias) if p is not None)
    return out


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
    "head-only": " (every CLIP layer frozen; only the head trains)",
}


def _report_md(r: dict) -> str:
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


def finetune_stage(from_dir: str | os.PathLike | None, model: str | None, pretrained: str,
                   out_dir: str | os.PathLike, data: str, steps: int = 40, batch_size: int = 4, lr: float = 1e-3,
                   freeze_heavy_tail: bool = True, train_limit: int | None = None, val_limit: int | None = None,
                   image_size: tuple[int, int] | None = None, seed: int = 0, progress: bool = True,
                   freeze_policy: str = "median", freeze_fraction: float = 0.5, estimator: str = "opentrans",
                   grad_accum: int = 1, amp: str = "off", checkpoint_every: int = 0, loss: str = "ce",
                   adapter: str = "none", adapter_rank: int = 4, oft_block: int = 16) -> dict:
    """Finetune a segmentor on a dataset's train split (``opentrans finetune``).

    Steps: resolve the model; open the ``train`` and ``val`` splits at the model's input size; encode the
    class names with the model's text tower; with ``freeze_heavy_tail`` measure the alphas of the current
    image encoder and freeze the layers below the median (:func:`~opentrans.finetune.freeze.freeze_plan`),
    else freeze all of CLIP (head only); planned-trainable parameters that the dense forward path never
    reaches (:func:`~opentrans.finetune.freeze.gradient_free_parameters`, e.g. a ViT's last MLP) are frozen
    too and listed in the report; val mIoU before; train
    (:func:`~opentrans.finetune.trainer.train_segmentor`); val mIoU after; save the model with
    ``"finetune"`` appended to its lineage. Everything up to the plan is done before ``out_dir`` is touched.

    Args:
        from_dir, model, pretrained, image_size: the starting model (see
            :func:`~opentrans.models.artifact.resolve_model`).
        out_dir: stage output directory.
        data: ``FORMAT:PATH`` dataset spec (e.g. ``camvid:/data/camvid``) with ``train`` and ``val`` splits.
        steps, batch_size, lr, seed: training settings (AdamW, poly schedule).
        freeze_heavy_tail: use a heavy-tail freeze plan; otherwise train only the head.
        freeze_policy, freeze_fraction: the plan's policy (``median``, ``fraction``, ``inverse``, ``random``;
            see :func:`~opentrans.finetune.freeze.freeze_plan`; ``random`` is seeded with ``seed``).
        estimator: ``opentrans`` or ``weightwatcher`` alphas for the plan (image tower, Q/K/V split).
        grad_accum, amp, loss: see :func:`~opentrans.finetune.trainer.train_segmentor`.
        adapter: ``none`` (train the plan's layers directly), ``lora`` or ``oft``: keep every CLIP weight
            frozen and train an adapter on each Linear / Q/K/V layer the plan marks trainable
            (:mod:`opentrans.finetune.adapters`); adapters are merged into plain weights before saving.
        adapter_rank: LoRA rank. oft_block: OFT block size (must divide the adapted layers' input widths).
        checkpoint_every: save the training state to ``out_dir/checkpoints`` every N steps (0: never); a
            rerun of the same command after a kill resumes from there.
        train_limit, val_limit: use only the first N images of each split.
        progress: show progress bars.

    Returns:
        The manifest figures: ``miou_before``, ``miou_after`` (val mIoU, %), ``trainable_params`` (elements
        training updates), ``total_params`` (whole segmentor, text tower included), ``frozen_layers`` (count
        of heavy-tailed layers frozen by the plan), ``steps``, ``final_loss`` (nats; None if the last batch
        had no labelled pixel).

    Raises:
        OpenTransError: ``steps``/``batch_size`` < 1, non-positive ``lr``, a bad data spec or limit, bad
            model arguments, an ``out_dir`` that is a file, nothing to train (``head`` is ``none`` and no
            heavy-tail plan), or a loss that diverged.
    """
    started = time.perf_counter()
    check_train_options(steps, batch_size, lr, grad_accum, checkpoint_every)
    resolve_amp(amp)
    if loss not in LOSSES:
        raise OpenTransError(f"--loss {loss}: choose one of {', '.join(LOSSES)}")
    if freeze_policy not in POLICIES:
        raise OpenTransError(f"--freeze-policy {freeze_policy}: choose one of {', '.join(POLICIES)}")
    if not 0.0 <= freeze_fraction <= 1.0:
        raise OpenTransError(f"--freeze-fraction {freeze_fraction}: must be between 0 and 1")
    if adapter not in ADAPTERS:
        raise OpenTransError(f"--adapter {adapter}: choose one of {', '.join(ADAPTERS)}")
    if adapter != "none" and not freeze_heavy_tail:
        raise OpenTransError(f"--adapter {adapter} adapts the layers a heavy-tail plan marks trainable; "
                             "drop --no-freeze-heavy-tail")
    if estimator not in ("opentrans", "weightwatcher"):
        raise OpenTransError(f"--estimator {estimator}: finetune plans with 'opentrans' or 'weightwatcher'")
    out_dir = _check_out_dir(out_dir)
    seg, spec, inputs = resolve_model(from_dir, model, pretrained, image_size=image_size)
    train_ds = open_dataset(data, "train", spec.image_size, spec.mean, spec.std, train_limit)
    val_ds = open_dataset(data, "val", spec.image_size, spec.mean, spec.std, val_limit)
    if not freeze_heavy_tail and not any(True for _ in seg.head.parameters()):
        raise OpenTransError("nothing to train: the model has no head (head 'none') and --freeze-heavy-tail is off")

    excluded: list[dict] = []
    analysis_seconds = 0.0
    if freeze_heavy_tail:
        spectrum = analyze_model(seg, ("image",), estimator)[estimator]
        plan = freeze_plan(spectrum.layers, freeze_policy, fraction=freeze_fraction, seed=seed)
        excluded = [{"name": n, "reason": r} for n, r in spectrum.excluded]
        analysis_seconds = spectrum.seconds
    else:
        plan = head_only_plan()
    counts = apply_freeze_plan(seg, plan)
    adapter_report = None
    if adapter != "none":
        targets = [n for n in plan.trainable if n.endswith("]") or isinstance(seg.get_submodule(n), nn.Linear)]
        if not targets:
            raise OpenTransError(f"--adapter {adapter}: the plan marks no Linear or Q/K/V layer trainable")
        apply_freeze_plan(seg, head_only_plan())  # CLIP frozen, head trainable; the adapters add the rest
        adapter_report = (add_lora(seg, targets, rank=adapter_rank, seed=seed) if adapter == "lora"
                          else add_oft(seg, targets, block_size=oft_block))
        counts["trainable_params"] = trainable_param_count(seg)
    # layers the dense forward path never reaches would stay unchanged anyway: freeze them, so that
    # trainable_params counts what training really updates
    params = dict(seg.named_parameters())
    gradient_free = gradient_free_parameters(seg)
    for name in gradient_free:
        params[name].requires_grad_(False)
    trainable_params = trainable_param_count(seg)

    options = {"from": None if from_dir is None else str(from_dir), "model": spec.model, "pretrained": spec.pretrained,
               "data": data, "steps": steps, "batch_size": batch_size, "lr": lr,
               "freeze_heavy_tail": freeze_heavy_tail, "train_limit": train_limit, "val_limit": val_limit,
               "image_size": list(spec.image_size), "seed": seed, "freeze_policy": freeze_policy,
               "freeze_fraction": freeze_fraction, "estimator": estimator, "grad_accum": grad_accum, "amp": amp,
               "checkpoint_every": checkpoint_every, "loss": loss, "adapter": adapter, "adapter_rank": adapter_rank,
               "oft_block": oft_block}
    with StageRecord("finetune", out_dir, options, started=started) as rec:
        for path in inputs:
            rec.add_input(path)
        rec.weights = spec.weights
        text_embeds = seg.encode_classes(list(train_ds.class_names), model_name=spec.model)
        desc = "val" if progress else None
        before = evaluate(TorchRunner(seg), val_ds, text_embeds.numpy(), desc=desc)
        start = time.perf_counter()
        losses = train_segmentor(seg, train_ds, text_embeds, steps=steps, batch_size=batch_size, lr=lr,
                                 seed=seed, progress=progress, grad_accum=grad_accum, amp=amp,
                                 checkpoint_dir=out_dir / "checkpoints" if checkpoint_every else None,
                                 checkpoint_every=checkpoint_every, loss=loss)
        train_seconds = time.perf_counter() - start
        after = evaluate(TorchRunner(seg), val_ds, text_embeds.numpy(), desc=desc)
        merged = merge_adapters(seg) if adapter_report is not None else 0
        for p in seg.parameters():
            p.requires_grad_(False)

        spec.lineage.append("finetune")
        save_segmentor(seg, spec, out_dir)
        rec.add_output(out_dir / WEIGHTS_FILE)
        rec.add_output(out_dir / SPEC_FILE)

        plan_path = write_json(out_dir / "freeze_plan.json", {"weights": spec.weights, **plan.to_json(),
                                                              "excluded": excluded})
        rec.add_output(plan_path)
        loss = _loss_summary(losses)
        report = {
            "weights": spec.weights, "model": spec.model, "lineage": spec.lineage, "data": data,
            "train_images": len(train_ds), "val_images": len(val_ds),
            "policy": plan.policy, "median_alpha": plan.median_alpha,
            "frozen_layers": list(plan.frozen), "trainable_layers": list(plan.trainable),
            "excluded": excluded, "alphas": plan.alphas,
            "gradient_free": gradient_free,
            "gradient_free_params": sum(params[n].numel() for n in gradient_free),
            "trainable_params": trainable_params, "planned_trainable_params": counts["trainable_params"],
            "total_params": counts["total_params"],
            "head_params": counts["head_params"], "image_encoder_params": counts["image_encoder_params"],
            "trainable_pct": 100.0 * trainable_params / counts["total_params"],
            "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "grad_accum": grad_accum,
            "amp": amp, "bf16": resolve_amp(amp), "loss_fn": loss,
            "adapter": None if adapter_report is None else {
                "kind": adapter_report.kind, "targets": list(adapter_report.targets),
                "trainable_params": adapter_report.trainable_params,
                "adapted_params": adapter_report.adapted_params, "merged": merged,
                "rank": adapter_rank if adapter == "lora" else None, "block": oft_block if adapter == "oft" else None}, "estimator": estimator if freeze_heavy_tail else None,
            "freeze_fraction": plan.fraction, "frozen_layer_params": _layer_params(seg, plan.frozen),
            "trainable_layer_params": _layer_params(seg, plan.trainable),
            "loss": {**loss, "curve": losses},
            "miou_before": before["miou"], "miou_after": after["miou"],
            "pixel_acc_before": before["pixel_acc"], "pixel_acc_after": after["pixel_acc"],
            "per_class_iou_before": before["per_class_iou"], "per_class_iou_after": after["per_class_iou"],
            "analysis_seconds": round(analysis_seconds, 2), "train_seconds": round(train_seconds, 2),
        }
        rec.add_output(write_json(out_dir / "finetune_report.json", report))
        rec.add_output(write_text(out_dir / "finetune_report.md", _report_md(report)))
        final = losses[-1] if math.isfinite(losses[-1]) else None
        rec.figures = {
            "miou_before": before["miou"], "miou_after": after["miou"],
            "trainable_params": trainable_params, "total_params": counts["total_params"],
            "frozen_layers": len(plan.frozen), "steps": steps,
            "final_loss": None if final is None else round(final, 4),
        }
    return rec.figures
