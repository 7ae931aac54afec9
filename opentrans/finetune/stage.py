"""The ``analyze`` and ``finetune`` pipeline stages.

``analyze``: per-layer heavy-tail alpha of the chosen towers (:mod:`opentrans.finetune.spectral`; OpenTrans
estimator, weightwatcher or both side by side), written as ``alphas.csv``, ``alphas.json``, ``alphas.png``
(bar chart) and ``esd.png`` (ESD log-log plots with the fit of chosen layers).

``finetune``: OpenTrans's layer-wise finetuning (Xu et al., "Transferable and Principled Efficiency for
Open-Vocabulary Segmentation", CVPR 2024): with ``freeze_heavy_tail`` the alphas of the *current* image
encoder (possibly pruned; Q/K/V analysed separately) are measured and a freeze policy picks the frozen
layers (default ``median``: alpha below the median stays frozen); the others are trained together with
the head; without it only the head trains. With ``checkpoint_every`` the training state goes to
``out_dir/checkpoints`` and a rerun after a kill resumes from it. Weight adapters (LoRA, OFT, H-CLIP; merged before saving),
learnable prompts (VPT, SPT-SEG, LDVC) and decoders (linear, SPT-SEG, LDVC) are wired in by registry name; the
zero-shot protocol (``unseen_classes``) trains on the seen classes only and reports mIoU(S), mIoU(U) and hIoU;
under torchrun training runs with DistributedDataParallel and only rank 0 writes (docs/finetune.md). Writes the
finetuned model (``model.safetensors`` + ``model.json``), ``freeze_plan.json``, ``finetune_report.json`` and
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
    estimator_layers,
    write_alpha_report,
    write_esd_plot,
)
from opentrans.finetune.losses import LOSSES
from opentrans.finetune.trainer import (
    SeenClassesDataset,
    barrier,
    check_train_options,
    distributed_world,
    init_distributed,
    resolve_amp,
    train_segmentor,
)
from opentrans.metrics import zero_shot_summary
from opentrans.models.artifact import SPEC_FILE, WEIGHTS_FILE, resolve_model, save_segmentor

#: ``--adapter`` choices of :func:`finetune_stage`: weight adapters, merged into plain weights before saving.
ADAPTERS = ("none", "lora", "oft", "hclip")
#: Zero-shot split of CamVid used by the recipe example and docs/finetune.md: the last three classes in
#: label order are unseen, as ZS3Net / ZegCLIP / SPT-SEG hold out the last five of PASCAL VOC's twenty.
CAMVID_UNSEEN = ("car", "pedestrian", "bicyclist")


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
        estimator: ``opentrans`` (default, the authors' estimator and layer set), ``opentrans-qkv`` (ours),
            ``weightwatcher`` or ``both`` (the table and plan use the authors' OpenTrans alphas,
            weightwatcher's, on the Q/K/V-split layer set, are written beside them).
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
    mats = {lm.name: lm for t in towers
            for lm in estimator_layers(seg.get_submodule(TOWERS[t].rstrip(".")), TOWERS[t], estimator)}
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
        rec.add_output(write_esd_plot(out_dir / "esd.png", [mats[n] for n in chosen], weights=spec.weights,
                                      estimator=estimator))
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
    "head-only": " (every CLIP weight frozen; only the head, prompts and adapters train)",
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


def _component_params(seg) -> dict[str, int]:
    """Trainable elements per component: ``head``, ``prompts``, ``adapter`` (parametrization parameters of the
    weight adapters) and ``clip_layers`` (CLIP weights trained directly; masked Q/K/V rows not counted)."""
    from opentrans.finetune.freeze import _MASK_ATTR

    out = {"head": 0, "prompts": 0, "adapter": 0, "clip_layers": 0}
    for name, p in seg.named_parameters():
        if not p.requires_grad:
            continue
        mask = getattr(p, _MASK_ATTR, None)
        n = p.numel() if mask is None else int(mask.sum()) * (p.numel() // mask.numel())
        if name.startswith("head."):
            out["head"] += n
        elif name.startswith("prompts."):
            out["prompts"] += n
        elif ".parametrizations." in name and not name.endswith(".original"):
            out["adapter"] += n
        else:
            out["clip_layers"] += n
    return out


def _text_encoder(seg, class_names: list[str], model_name: str):
    """A callable returning the ``(C, D)`` class embeddings *with* gradient (``encode_classes`` without its
    ``no_grad``), for training text prompts or text-tower adapters."""
    encode = type(seg).encode_classes.__wrapped__
    return lambda: encode(seg, list(class_names), model_name=model_name)


def _text_side_trains(seg, encode) -> bool:
    """Whether any trainable parameter receives a gradient through the class embeddings (one text forward)."""
    named = [p for n, p in seg.named_parameters() if p.requires_grad and not n.startswith("head.")]
    if not any(True for n, p in seg.named_parameters() if p.requires_grad
               and not n.startswith(("head.", "clip.visual."))):
        return False  # only the image encoder and the head train: nothing on the text path
    for p in named:
        p.grad = None
    import torch

    with torch.enable_grad():
        text = encode()
        if not text.requires_grad:
            return False
        text.sum().backward()
    reached = any(p.grad is not None for p in named)
    for p in named:
        p.grad = None
    return reached


def _parse_unseen(unseen_classes, class_names) -> list[str]:
    if unseen_classes is None:
        return []
    names = [n.strip() for n in (unseen_classes.split(",") if isinstance(unseen_classes, str) else unseen_classes)]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in class_names]
    if unknown:
        raise OpenTransError(f"--unseen-classes: '{unknown[0]}' is not a class of the data; choose from "
                             f"{', '.join(class_names)}")
    if len(set(names)) != len(names):
        raise OpenTransError("--unseen-classes: a class is named twice")
    if len(names) >= len(class_names):
        raise OpenTransError("--unseen-classes: every class is unseen; at least one class must be seen")
    return names


def _check_choice(flag: str, value, choices) -> None:
    if value not in choices:
        raise OpenTransError(f"{flag} {value}: choose one of {', '.join(choices)}")


def _check_options(flag: str, options) -> dict:
    if options is None:
        return {}
    if isinstance(options, str):
        import json

        try:
            options = json.loads(options)
        except json.JSONDecodeError as exc:
            raise OpenTransError(f"{flag}: not valid JSON ({exc.msg}); e.g. '{{\"tokens\": 10}}'") from None
    if not isinstance(options, dict):
        raise OpenTransError(f"{flag}: expected a JSON object, got {type(options).__name__}")
    return dict(options)


def finetune_stage(from_dir: str | os.PathLike | None, model: str | None, pretrained: str,
                   out_dir: str | os.PathLike, data: str, steps: int = 40, batch_size: int = 4, lr: float = 1e-3,
                   freeze_heavy_tail: bool = True, train_limit: int | None = None, val_limit: int | None = None,
                   image_size: tuple[int, int] | None = None, seed: int = 0, progress: bool = True,
                   freeze_policy: str = "median", freeze_fraction: float = 0.5, estimator: str = "opentrans",
                   grad_accum: int = 1, amp: str = "off", checkpoint_every: int = 0, loss: str = "ce",
                   adapter: str = "none", adapter_rank: int = 4, oft_block: int = 16,
                   adapter_options: dict | str | None = None, prompts: str | None = None,
                   prompt_options: dict | str | None = None, head: str | None = None,
                   head_options: dict | str | None = None, unseen_classes: list[str] | str | None = None) -> dict:
    """Finetune a segmentor on a dataset's train split (``opentrans finetune``).

    Steps: resolve the model; replace its head (``head``) and prompts (``prompts``) when asked; open the
    ``train`` and ``val`` splits at the model's input size; encode the class names with the model's text tower;
    with ``freeze_heavy_tail`` measure the alphas of the current image encoder and freeze the layers below the
    median (:func:`~opentrans.finetune.freeze.freeze_plan`), else freeze all of CLIP (head and prompts only);
    add a weight adapter (``adapter``) on the plan's trainable layers; planned-trainable parameters that the
    dense forward path never reaches (:func:`~opentrans.finetune.freeze.gradient_free_parameters`, e.g. a ViT's
    last MLP) are frozen too and listed in the report; val mIoU before; train
    (:func:`~opentrans.finetune.trainer.train_segmentor`); val mIoU after; merge the adapters; save the model
    (head and prompts in its spec) with ``"finetune"`` appended to its lineage. Everything up to the plan is
    done before ``out_dir`` is touched.

    **Zero-shot protocol** (``unseen_classes``; ZS3Net, Bucher et al. NeurIPS 2019 Sec. 4; ZegCLIP, SPT-SEG,
    LDVC): training sees the seen classes only (unseen pixels become the ignore index,
    :class:`~opentrans.finetune.trainer.SeenClassesDataset`, and only the seen classes' text embeddings are
    the classifier); validation uses every class, and the report adds mIoU(S), mIoU(U) and
    hIoU = 2 S U / (S + U) (:func:`~opentrans.metrics.zero_shot_summary`), before and after training.

    **torchrun**: with ``WORLD_SIZE > 1`` the stage initialises a gloo process group
    (:func:`~opentrans.finetune.trainer.init_distributed`), every process prepares the same model and plan,
    training runs under DistributedDataParallel (global batch ``batch_size`` split over the processes), and
    only rank 0 evaluates and writes files; the other ranks wait at a barrier and return ``{}``.

    Args:
        from_dir, model, pretrained, image_size: the starting model (see
            :func:`~opentrans.models.artifact.resolve_model`).
        out_dir: stage output directory.
        data: ``FORMAT:PATH`` dataset spec (e.g. ``camvid:/data/camvid``) with ``train`` and ``val`` splits.
        steps, batch_size, lr, seed: training settings (AdamW, poly schedule; seeded data order).
        freeze_heavy_tail: use a heavy-tail freeze plan; otherwise train only the head and prompts.
        freeze_policy, freeze_fraction: the plan's policy (``median``, ``fraction``, ``inverse``, ``random``;
            see :func:`~opentrans.finetune.freeze.freeze_plan`; ``random`` is seeded with ``seed``).
        estimator: alphas for the plan (image tower): ``opentrans`` (the authors' estimator and layer set),
            ``opentrans-qkv`` (ours: Q/K/V split, corrected xmin window) or ``weightwatcher`` (Q/K/V split).
        grad_accum, amp, loss: see :func:`~opentrans.finetune.trainer.train_segmentor`.
        adapter: ``none`` (train the plan's layers directly), ``lora``, ``oft`` or ``hclip``: keep every CLIP
            weight frozen and train an adapter on each Linear / Q/K/V layer the plan marks trainable
            (:mod:`opentrans.finetune.adapters`; ``hclip`` without a plan adapts its own default targets);
            adapters are merged into plain weights before saving.
        adapter_rank: LoRA rank. oft_block: OFT block size (must divide the adapted layers' input widths).
        adapter_options: keyword options of ``add_hclip`` (``block_size``, ``dcrc``, ``text_targets``, ``pop``,
            ``default_targets``; JSON object or dict); only with ``adapter="hclip"``.
        prompts: None (keep the artifact's prompts, if any), ``none`` (remove them) or a registered prompt kind
            (:func:`~opentrans.models.prompts.prompt_kinds`: ``vpt``, ``spt-seg``, ``ldvc``, ...), built fresh
            with ``prompt_options`` (JSON object or dict) and trained.
        head: None (keep the artifact's head) or a registered head (:func:`~opentrans.models.heads.head_names`:
            ``linear``, ``none``, ``spt-seg``, ``ldvc``, ...), built fresh with ``head_options`` and trained.
        unseen_classes: class names (list or comma-separated string) held out of training; None: no split.
        checkpoint_every: save the training state to ``out_dir/checkpoints`` every N steps (0: never); a
            rerun of the same command after a kill resumes from there.
        train_limit, val_limit: use only the first N images of each split.
        progress: show progress bars (training: loss and learning rate).

    Returns:
        The manifest figures: ``miou_before``, ``miou_after`` (val mIoU, %), ``trainable_params`` (elements
        training updates), ``total_params`` (whole segmentor, text tower included), ``frozen_layers`` (count
        of heavy-tailed layers frozen by the plan), ``steps``, ``final_loss`` (nats; None if the last batch
        had no labelled pixel); with ``unseen_classes`` also ``miou_seen``, ``miou_unseen``, ``hiou`` (%,
        after training). ``{}`` on a torchrun rank other than 0.

    Raises:
        OpenTransError: ``steps``/``batch_size`` < 1, non-positive ``lr``, a bad data spec or limit, bad
            model arguments, an ``out_dir`` that is a file, an unknown adapter/prompt kind/head/unseen class
            (the message lists the valid ones), options that are not a JSON object or that the module does not
            accept, nothing to train, a batch not divisible by the torchrun processes, or a loss that diverged.
    """
    started = time.perf_counter()
    check_train_options(steps, batch_size, lr, grad_accum, checkpoint_every)
    resolve_amp(amp)
    _check_choice("--loss", loss, LOSSES)
    _check_choice("--freeze-policy", freeze_policy, POLICIES)
    if not 0.0 <= freeze_fraction <= 1.0:
        raise OpenTransError(f"--freeze-fraction {freeze_fraction}: must be between 0 and 1")
    _check_choice("--adapter", adapter, ADAPTERS)
    if adapter in ("lora", "oft") and not freeze_heavy_tail:
        raise OpenTransError(f"--adapter {adapter} adapts the layers a heavy-tail plan marks trainable; "
                             "drop --no-freeze-heavy-tail")
    adapter_options = _check_options("--adapter-options", adapter_options)
    if adapter_options and adapter != "hclip":
        raise OpenTransError("--adapter-options is for --adapter hclip (LoRA/OFT take --adapter-rank/--oft-block)")
    prompt_options = _check_options("--prompt-options", prompt_options)
    head_options = _check_options("--head-options", head_options)
    if prompts is not None:
        from opentrans.models.prompts import prompt_kinds

        _check_choice("--prompts", prompts, ["none", *prompt_kinds()])
        if prompts == "none" and prompt_options:
            raise OpenTransError("--prompt-options given with --prompts none")
    elif prompt_options:
        raise OpenTransError("--prompt-options needs --prompts KIND")
    if head is not None:
        from opentrans.models.heads import head_names

        _check_choice("--head", head, head_names())
    elif head_options:
        raise OpenTransError("--head-options needs --head NAME")
    if estimator not in ("opentrans", "opentrans-qkv", "weightwatcher"):
        raise OpenTransError(f"--estimator {estimator}: finetune plans with 'opentrans', 'opentrans-qkv' or "
                             "'weightwatcher'")
    out_dir = _check_out_dir(out_dir)
    seg, spec, inputs = resolve_model(from_dir, model, pretrained, image_size=image_size)
    from opentrans.models.masks import artifact_masks, keep_masked_zeros

    imp_masks = artifact_masks(from_dir)  # an IMP artifact: its pruned weights stay zero (gradient hooks)
    if imp_masks is not None:
        keep_masked_zeros(seg, imp_masks)
    train_ds = open_dataset(data, "train", spec.image_size, spec.mean, spec.std, train_limit)
    val_ds = open_dataset(data, "val", spec.image_size, spec.mean, spec.std, val_limit)
    unseen = _parse_unseen(unseen_classes, list(train_ds.class_names))
    if head is not None:
        seg.set_head(head, head_options)
    if prompts is not None:
        from opentrans.models.prompts import build_prompts

        seg.set_prompts(None if prompts == "none" else build_prompts(prompts, seg.clip, prompt_options))

    excluded: list[dict] = []
    analysis_seconds = 0.0
    if freeze_heavy_tail:
        spectrum = analyze_model(seg, ("image",), estimator)[estimator]
        plan = freeze_plan(spectrum.layers, freeze_policy, fraction=freeze_fraction, seed=seed)
        excluded = [{"name": n, "reason": r} for n, r in spectrum.excluded]
        analysis_seconds = spectrum.seconds
    else:
        plan = head_only_plan()
    counts = apply_freeze_plan(seg, plan)  # also unfreezes the head and the prompts
    adapter_report = None
    if adapter != "none":
        targets = [n for n in plan.trainable if n.endswith("]") or isinstance(seg.get_submodule(n), nn.Linear)]
        if not targets and adapter != "hclip":
            raise OpenTransError(f"--adapter {adapter}: the plan marks no Linear or Q/K/V layer trainable")
        apply_freeze_plan(seg, head_only_plan())  # CLIP frozen, head + prompts trainable; the adapters add the rest
        if adapter == "lora":
            adapter_report = add_lora(seg, targets, rank=adapter_rank, seed=seed)
        elif adapter == "oft":
            adapter_report = add_oft(seg, targets, block_size=oft_block)
        else:
            try:
                from opentrans.finetune.adapters.hclip import add_hclip
            except ImportError:
                raise OpenTransError("--adapter hclip: opentrans.finetune.adapters.hclip is not installed") from None
            try:
                adapter_report = add_hclip(seg, image_targets=targets or None, **adapter_options)
            except TypeError as exc:
                raise OpenTransError(f"--adapter-options {adapter_options}: {exc}") from None
        counts["trainable_params"] = trainable_param_count(seg)
    seen_names = [n for n in train_ds.class_names if n not in set(unseen)]
    encode_with_grad = _text_encoder(seg, seen_names, spec.model)
    text_trains = _text_side_trains(seg, encode_with_grad)
    # layers the dense forward path never reaches would stay unchanged anyway: freeze them, so that
    # trainable_params counts what training really updates
    params = dict(seg.named_parameters())
    gradient_free = gradient_free_parameters(seg)
    if text_trains and gradient_free:  # the check above feeds random class embeddings: keep the text side
        import torch

        with torch.enable_grad():
            seg(torch.zeros(1, 3, *seg.image_size), encode_with_grad()).sum().backward()
        gradient_free = [n for n in gradient_free if params[n].grad is None]
        for p in params.values():
            p.grad = None
    for name in gradient_free:
        params[name].requires_grad_(False)
    trainable_params = trainable_param_count(seg)
    if trainable_params == 0:
        raise OpenTransError("nothing to train: no heavy-tail plan (--no-freeze-heavy-tail), a head without "
                             "parameters (head 'none'), no prompts and no adapter")
    by_component = _component_params(seg)

    options = {"from": None if from_dir is None else str(from_dir), "model": spec.model, "pretrained": spec.pretrained,
               "data": data, "steps": steps, "batch_size": batch_size, "lr": lr,
               "freeze_heavy_tail": freeze_heavy_tail, "train_limit": train_limit, "val_limit": val_limit,
               "image_size": list(spec.image_size), "seed": seed, "freeze_policy": freeze_policy,
               "freeze_fraction": freeze_fraction, "estimator": estimator, "grad_accum": grad_accum, "amp": amp,
               "checkpoint_every": checkpoint_every, "loss": loss, "adapter": adapter, "adapter_rank": adapter_rank,
               "oft_block": oft_block, "adapter_options": adapter_options or None, "prompts": prompts,
               "prompt_options": prompt_options or None, "head": head, "head_options": head_options or None,
               "unseen_classes": unseen or None}
    owns_group = init_distributed()
    try:
        rank, world = distributed_world()
        return _run_finetune(**locals())
    finally:
        if owns_group:
            import torch

            torch.distributed.destroy_process_group()


def _run_finetune(*, seg, spec, inputs, train_ds, val_ds, unseen, seen_names, text_trains, encode_with_grad,
                  rank, world, options, started, out_dir, data, plan, counts, excluded, analysis_seconds,
                  adapter, adapter_report, adapter_rank, oft_block, params, gradient_free, trainable_params,
                  by_component, steps, batch_size, lr, seed, grad_accum, amp, loss, checkpoint_every, progress,
                  freeze_heavy_tail, estimator, **_unused) -> dict:
    """Evaluation, training and (rank 0) writing of :func:`finetune_stage`, after every check passed."""
    all_text = seg.encode_classes(list(train_ds.class_names), model_name=spec.model)
    train_ds_used = SeenClassesDataset(train_ds, unseen) if unseen else train_ds
    if text_trains:
        train_text = encode_with_grad
    else:
        train_text = all_text if not unseen else all_text[[train_ds.class_names.index(n) for n in seen_names]]
    desc = "val" if progress and rank == 0 else None
    before = evaluate(TorchRunner(seg), val_ds, all_text.numpy(), desc=desc) if rank == 0 else None
    start = time.perf_counter()
    losses = train_segmentor(seg, train_ds_used, train_text, steps=steps, batch_size=batch_size, lr=lr,
                             seed=seed, progress=progress, grad_accum=grad_accum, amp=amp,
                             checkpoint_dir=out_dir / "checkpoints" if checkpoint_every else None,
                             checkpoint_every=checkpoint_every, loss=loss)
    train_seconds = time.perf_counter() - start
    if rank != 0:
        barrier()  # rank 0 evaluates and writes
        return {}
    try:
        figures = _write_finetune(**{**_unused, **locals()})  # _unused: the stage's other settings (imp_masks, ...)
    finally:
        barrier()
    return figures


def _write_finetune(*, seg, spec, inputs, train_ds, val_ds, unseen, text_trains, options, started, out_dir, data,
                    plan, counts, excluded, analysis_seconds, adapter, adapter_report, adapter_rank, oft_block, params,
                    gradient_free, trainable_params, by_component, steps, batch_size, lr, seed, grad_accum, amp, loss,
                    freeze_heavy_tail, estimator, before, losses, train_seconds, progress, world, all_text,
                    imp_masks=None, **_unused) -> dict:
    """Rank 0: val mIoU after training, merge adapters, save the model, the plan, the reports and the manifest."""
    with StageRecord("finetune", out_dir, options, started=started) as rec:
        for path in inputs:
            rec.add_input(path)
        rec.weights = spec.weights
        # after training the text side may have changed (text prompts, text adapters): encode again
        text_embeds = (seg.encode_classes(list(train_ds.class_names), model_name=spec.model) if text_trains
                       else all_text)
        after = evaluate(TorchRunner(seg), val_ds, text_embeds.numpy(), desc="val" if progress else None)
        merged = merge_adapters(seg) if adapter_report is not None else 0
        if imp_masks is not None:  # merged adapters may have filled IMP's zeros: prune them again
            from opentrans.models.masks import apply_masks

            apply_masks(seg, imp_masks)
        for p in seg.parameters():
            p.requires_grad_(False)

        spec.lineage.append("finetune")
        save_segmentor(seg, spec, out_dir)
        rec.add_output(out_dir / WEIGHTS_FILE)
        rec.add_output(out_dir / SPEC_FILE)

        plan_path = write_json(out_dir / "freeze_plan.json", {"weights": spec.weights, **plan.to_json(),
                                                              "excluded": excluded})
        rec.add_output(plan_path)
        summary = _loss_summary(losses)
        zero_shot = None
        if unseen:
            zero_shot = {"unseen": list(unseen), "seen": [n for n in train_ds.class_names if n not in set(unseen)],
                         "before": zero_shot_summary(before["per_class_iou"], unseen),
                         "after": zero_shot_summary(after["per_class_iou"], unseen)}
            for key in ("before", "after"):
                zero_shot[key] = {k: zero_shot[key][k] for k in ("miou_seen", "miou_unseen", "hiou")}
        report = {
            "weights": spec.weights, "model": spec.model, "lineage": spec.lineage, "data": data,
            "train_images": len(train_ds), "val_images": len(val_ds),
            "policy": plan.policy, "median_alpha": plan.median_alpha,
            "frozen_layers": list(plan.frozen), "trainable_layers": list(plan.trainable),
            "excluded": excluded, "alphas": plan.alphas,
            "gradient_free": gradient_free,
            "gradient_free_params": sum(params[n].numel() for n in gradient_free),
            "trainable_params": trainable_params, "planned_trainable_params": counts["trainable_params"],
            "trainable_by_component": by_component,
            "total_params": counts["total_params"],
            "head_params": counts["head_params"], "image_encoder_params": counts["image_encoder_params"],
            "trainable_pct": 100.0 * trainable_params / counts["total_params"],
            "head": seg.head_type, "head_options": dict(seg.head_options),
            "prompts": None if seg.prompts is None else seg.prompts.kind,
            "prompt_options": None if seg.prompts is None else seg.prompts.options(),
            "text_side_trained": text_trains,
            "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "grad_accum": grad_accum,
            "amp": amp, "bf16": resolve_amp(amp), "loss_fn": loss, "world_size": world,
            "adapter": None if adapter_report is None else {
                "kind": adapter_report.kind, "targets": list(adapter_report.targets),
                "trainable_params": adapter_report.trainable_params,
                "adapted_params": adapter_report.adapted_params, "merged": merged,
                "rank": adapter_rank if adapter == "lora" else None, "block": oft_block if adapter == "oft" else None},
            "estimator": estimator if freeze_heavy_tail else None,
            "freeze_fraction": plan.fraction, "frozen_layer_params": _layer_params(seg, plan.frozen),
            "trainable_layer_params": _layer_params(seg, plan.trainable),
            "loss": {**summary, "curve": losses},
            "miou_before": before["miou"], "miou_after": after["miou"],
            "pixel_acc_before": before["pixel_acc"], "pixel_acc_after": after["pixel_acc"],
            "per_class_iou_before": before["per_class_iou"], "per_class_iou_after": after["per_class_iou"],
            "zero_shot": zero_shot,
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
        if zero_shot is not None:
            rec.figures.update({k: None if v is None else round(v, 2) for k, v in zero_shot["after"].items()})
    return rec.figures
