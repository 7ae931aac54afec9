"""The ``finetune`` pipeline stage.

OpenTrans's layer-wise finetuning (Xu et al., "Transferable and Principled Efficiency for Open-Vocabulary
Segmentation", CVPR 2024): with ``freeze_heavy_tail`` the alphas of the *current* image encoder (possibly
pruned; :mod:`opentrans.analyze.spectral`) are measured and a freeze policy picks the frozen layers (default
``median``: alpha below the median stays frozen); the others are trained together with the head; without it
only the head trains. With ``checkpoint_every`` the training state goes to ``out_dir/checkpoints`` and a rerun
after a kill resumes from it. Weight adapters (LoRA, OFT, H-CLIP; merged before saving), learnable prompts (VPT,
SPT-SEG, LDVC) and decoders (linear, SPT-SEG, LDVC) are wired in by registry name; the zero-shot protocol
(``unseen_classes``) trains on the seen classes only and reports mIoU(S), mIoU(U) and hIoU; under torchrun
training runs with DistributedDataParallel and only rank 0 writes (docs/finetune.md). Writes the finetuned model
(``model.safetensors`` + ``model.json``), ``freeze_plan.json``, ``finetune_report.json``,
``finetune_report.md`` and ``manifest.json`` (:class:`~opentrans.artifacts.StageRecord`).

:func:`finetune_stage` runs four steps: check (:meth:`FinetuneOptions.check`, then :func:`prepare_finetune`
validates the data and builds the model and its plan; nothing is written on a user error, which raises
:class:`~opentrans.errors.OpenTransError`), compute (:func:`train_and_evaluate` -> :class:`FinetuneResult`),
render (:mod:`opentrans.finetune.report`) and record (:func:`record_finetune`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from opentrans.analyze.spectral import analyze_model
from opentrans.analyze.stage import check_out_dir
from opentrans.artifacts import StageRecord, write_json, write_text
from opentrans.data import open_dataset
from opentrans.errors import OpenTransError
from opentrans.inference.evaluate import TorchRunner, evaluate
from opentrans.finetune.adapters import ADAPTERS, AdapterReport, merge_adapters
from opentrans.finetune.freeze import (
    FreezePlan,
    apply_freeze_plan,
    freeze_plan,
    gradient_free_parameters,
    head_only_plan,
    trainable_param_count,
)
from opentrans.finetune.options import FinetuneOptions
from opentrans.finetune.report import finetune_figures, finetune_report, report_markdown
from opentrans.finetune.trainer import (
    SeenClassesDataset,
    barrier,
    distributed_world,
    init_distributed,
    resolve_amp,
    train_segmentor,
)
from opentrans.models.artifact import SPEC_FILE, WEIGHTS_FILE, save_segmentor
from opentrans.models.source import ModelSource
from opentrans.options import as_record

#: Zero-shot split of CamVid used by the recipe example and docs/finetune.md: the last three classes in
#: label order are unseen, as ZS3Net / ZegCLIP / SPT-SEG hold out the last five of PASCAL VOC's twenty.
CAMVID_UNSEEN = ("car", "pedestrian", "bicyclist")


@dataclass
class PreparedFinetune:
    """The model, data and plan of a finetune run, after every check passed (nothing written yet).

    Attributes:
        seg, spec, inputs: the segmentor (head, prompts, plan and adapter applied), its spec and the input files.
        imp_masks: the pruning masks of an IMP artifact (kept at zero while training and after merging), or None.
        train_ds, val_ds: the ``train`` and ``val`` splits at the model's input size.
        unseen, seen_names: zero-shot split (unseen class names, empty without one) and the seen class names.
        plan, excluded, analysis_seconds: the freeze plan, the layers left out of the analysis (name, reason)
            and the analysis wall time (s).
        counts: :func:`~opentrans.finetune.freeze.apply_freeze_plan`'s counts (``trainable_params`` = planned).
        adapter_report: what the adapter added, or None.
        gradient_free, gradient_free_params: planned-trainable parameters outside the dense forward path (kept
            frozen) and their element count.
        trainable_params, by_component: elements training updates, in total and per component.
        frozen_layer_params, trainable_layer_params: ``{layer: elements}`` of the plan's layers.
        text_trains, encode_with_grad: whether a gradient reaches the class embeddings, and the callable that
            computes them with gradient (seen classes).
    """

    seg: Any
    spec: Any
    inputs: list[Path]
    imp_masks: Any
    train_ds: Any
    val_ds: Any
    unseen: list[str]
    seen_names: list[str]
    plan: FreezePlan
    excluded: list[dict]
    analysis_seconds: float
    counts: dict
    adapter_report: AdapterReport | None
    gradient_free: list[str]
    gradient_free_params: int
    trainable_params: int
    by_component: dict[str, int]
    frozen_layer_params: dict[str, int]
    trainable_layer_params: dict[str, int]
    text_trains: bool
    encode_with_grad: Callable[[], torch.Tensor]


@dataclass
class FinetuneResult:
    """What training and evaluation produced (rank 0).

    Attributes:
        before, after: :func:`~opentrans.inference.evaluate.evaluate` results on val (``miou``, ``pixel_acc`` in %,
            ``per_class_iou``) before and after training.
        losses: the training loss of every step (nats; NaN for a step without labelled pixels).
        train_seconds: training wall time (s).
        merged: adapters folded into plain weights.
        bf16: whether training autocast to bf16.
        world: torchrun processes.
    """

    before: dict
    after: dict
    losses: list[float]
    train_seconds: float
    merged: int
    bf16: bool
    world: int


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
    with torch.enable_grad():
        text = encode()
        if not text.requires_grad:
            return False
        text.sum().backward()
    reached = any(p.grad is not None for p in named)
    for p in named:
        p.grad = None
    return reached


def _check_unseen(unseen: list[str] | None, class_names: list[str]) -> list[str]:
    """The zero-shot split checked against the data's classes (``[]`` without one).

    Raises:
        OpenTransError: a name that is not a class of the data, or every class unseen.
    """
    names = list(unseen or [])
    unknown = [n for n in names if n not in class_names]
    if unknown:
        raise OpenTransError(f"--unseen-classes: '{unknown[0]}' is not a class of the data; choose from "
                             f"{', '.join(class_names)}")
    if len(names) >= len(class_names):
        raise OpenTransError("--unseen-classes: every class is unseen; at least one class must be seen")
    return names


def _open_model(source: ModelSource):
    """``(segmentor, spec, input files, IMP masks or None)``; an IMP artifact's pruned weights stay zero."""
    seg, spec, inputs = source.resolve()
    # IMP masks: area prune moves these helpers to opentrans.models.masks (the integrator repoints this import)
    from opentrans.models.masks import artifact_masks, keep_masked_zeros

    imp_masks = artifact_masks(source.from_dir)  # an IMP artifact: its pruned weights stay zero (gradient hooks)
    if imp_masks is not None:
        keep_masked_zeros(seg, imp_masks)
    return seg, spec, inputs, imp_masks


def _set_head_and_prompts(seg, options: FinetuneOptions) -> None:
    """Replace the head and the prompts when the options name them (None: keep the model's)."""
    if options.head is not None:
        seg.set_head(options.head, options.head_options or {})
    if options.prompts is not None:
        from opentrans.models.prompts import build_prompts

        seg.set_prompts(None if options.prompts == "none" else build_prompts(options.prompts, seg.clip,
                                                                              options.prompt_options or {}))


def make_freeze_plan(seg, options: FinetuneOptions) -> tuple[FreezePlan, list[dict], float]:
    """``(plan, excluded layers, analysis seconds)``: the heavy-tail plan of ``seg``'s image encoder by
    ``options`` (estimator, policy, fraction, seed), or the head-only plan without ``freeze_heavy_tail``."""
    if not options.freeze_heavy_tail:
        return head_only_plan(), [], 0.0
    spectrum = analyze_model(seg, ("image",), options.estimator)[options.estimator]
    plan = freeze_plan(spectrum.layers, options.freeze_policy, fraction=options.freeze_fraction, seed=options.seed)
    return plan, [{"name": n, "reason": r} for n, r in spectrum.excluded], spectrum.seconds


def _add_adapter(seg, plan: FreezePlan, options: FinetuneOptions) -> AdapterReport | None:
    """Freeze all of CLIP and add the ``--adapter`` (:data:`~opentrans.finetune.adapters.ADAPTERS`) on the plan's
    trainable Linear / Q/K/V layers; None for ``none``.

    Raises:
        OpenTransError: an adapter that needs plan layers and the plan has none, or the adapter's refusals.
    """
    kind = ADAPTERS.get(options.adapter)
    if kind.add is None:
        return None
    targets = [n for n in plan.trainable if n.endswith("]") or isinstance(seg.get_submodule(n), nn.Linear)]
    if not targets and kind.needs_plan:
        raise OpenTransError(f"--adapter {options.adapter}: the plan marks no Linear or Q/K/V layer trainable")
    apply_freeze_plan(seg, head_only_plan())  # CLIP frozen, head + prompts trainable; the adapters add the rest
    return kind.add(seg, targets, options)


def _freeze_gradient_free(seg, text_trains: bool, encode_with_grad) -> list[str]:
    """Freeze the planned-trainable parameters the dense forward path never reaches (they would stay unchanged
    anyway, so ``trainable_params`` counts what training really updates); returns their names."""
    params = dict(seg.named_parameters())
    gradient_free = gradient_free_parameters(seg)
    if text_trains and gradient_free:  # the check above feeds random class embeddings: keep the text side
        with torch.enable_grad():
            seg(torch.zeros(1, 3, *seg.image_size), encode_with_grad()).sum().backward()
        gradient_free = [n for n in gradient_free if params[n].grad is None]
        for p in params.values():
            p.grad = None
    for name in gradient_free:
        params[name].requires_grad_(False)
    return gradient_free


def prepare_finetune(source: ModelSource, options: FinetuneOptions, data: str) -> PreparedFinetune:
    """Open the model and the data, set head and prompts, make the freeze plan, add the adapter and settle what
    trains: every check of the stage's input, before anything is written.

    Raises:
        OpenTransError: bad model arguments, a bad data spec or limit, an unknown unseen class, an adapter
            without plan layers, options the head/prompts/adapter do not accept, or nothing to train.
    """
    seg, spec, inputs, imp_masks = _open_model(source)
    train_ds = open_dataset(data, "train", spec.image_size, spec.mean, spec.std, options.train_limit)
    val_ds = open_dataset(data, "val", spec.image_size, spec.mean, spec.std, options.val_limit)
    unseen = _check_unseen(options.unseen_classes, list(train_ds.class_names))
    _set_head_and_prompts(seg, options)
    plan, excluded, analysis_seconds = make_freeze_plan(seg, options)
    counts = apply_freeze_plan(seg, plan)  # also unfreezes the head and the prompts
    adapter_report = _add_adapter(seg, plan, options)
    if adapter_report is not None:
        counts["trainable_params"] = trainable_param_count(seg)
    seen_names = [n for n in train_ds.class_names if n not in set(unseen)]
    encode_with_grad = _text_encoder(seg, seen_names, spec.model)
    text_trains = _text_side_trains(seg, encode_with_grad)
    gradient_free = _freeze_gradient_free(seg, text_trains, encode_with_grad)
    trainable_params = trainable_param_count(seg)
    if trainable_params == 0:
        raise OpenTransError("nothing to train: no heavy-tail plan (--no-freeze-heavy-tail), a head without "
                             "parameters (head 'none'), no prompts and no adapter")
    params = dict(seg.named_parameters())
    return PreparedFinetune(
        seg=seg, spec=spec, inputs=inputs, imp_masks=imp_masks, train_ds=train_ds, val_ds=val_ds, unseen=unseen,
        seen_names=seen_names, plan=plan, excluded=excluded, analysis_seconds=analysis_seconds, counts=counts,
        adapter_report=adapter_report, gradient_free=gradient_free,
        gradient_free_params=sum(params[n].numel() for n in gradient_free), trainable_params=trainable_params,
        by_component=_component_params(seg), frozen_layer_params=_layer_params(seg, plan.frozen),
        trainable_layer_params=_layer_params(seg, plan.trainable), text_trains=text_trains,
        encode_with_grad=encode_with_grad)


def _training_text(prepared: PreparedFinetune, all_text: torch.Tensor):
    """The classifier of training: the seen classes' embeddings, or the callable recomputing them with gradient
    when the text side trains."""
    if prepared.text_trains:
        return prepared.encode_with_grad
    if not prepared.unseen:
        return all_text
    names = list(prepared.train_ds.class_names)
    return all_text[[names.index(n) for n in prepared.seen_names]]


def _finish_model(prepared: PreparedFinetune) -> int:
    """After training: merge the adapters into plain weights, re-zero an IMP artifact's pruned weights, freeze
    every parameter and append ``finetune`` to the lineage; returns the adapters merged."""
    seg = prepared.seg
    merged = merge_adapters(seg) if prepared.adapter_report is not None else 0
    if prepared.imp_masks is not None:  # merged adapters may have filled IMP's zeros: prune them again
        # IMP masks: area prune moves this helper to opentrans.models.masks (the integrator repoints this import)
        from opentrans.models.masks import apply_masks

        apply_masks(seg, prepared.imp_masks)
    for p in seg.parameters():
        p.requires_grad_(False)
    prepared.spec.lineage.append("finetune")
    return merged


def train_and_evaluate(prepared: PreparedFinetune, options: FinetuneOptions, out_dir: Path,
                       progress: bool) -> FinetuneResult | None:
    """val mIoU before (rank 0), training (:func:`~opentrans.finetune.trainer.train_segmentor`; checkpoints in
    ``out_dir/checkpoints`` with ``checkpoint_every``), val mIoU after and :func:`_finish_model` (rank 0).

    Returns:
        The result on rank 0; None on the other torchrun ranks (after waiting at the barrier for rank 0).

    Raises:
        OpenTransError: a batch not divisible by the torchrun processes, or a loss that diverged.
    """
    seg, spec, val_ds = prepared.seg, prepared.spec, prepared.val_ds
    rank, world = distributed_world()
    class_names = list(prepared.train_ds.class_names)
    all_text = seg.encode_classes(class_names, model_name=spec.model)
    train_ds = SeenClassesDataset(prepared.train_ds, prepared.unseen) if prepared.unseen else prepared.train_ds
    before = (evaluate(TorchRunner(seg), val_ds, all_text.numpy(), desc="val" if progress else None)
              if rank == 0 else None)
    start = time.perf_counter()
    losses = train_segmentor(seg, train_ds, _training_text(prepared, all_text), steps=options.steps,
                             batch_size=options.batch_size, lr=options.lr, seed=options.seed, progress=progress,
                             grad_accum=options.grad_accum, amp=options.amp,
                             checkpoint_dir=out_dir / "checkpoints" if options.checkpoint_every else None,
                             checkpoint_every=options.checkpoint_every, loss=options.loss)
    train_seconds = time.perf_counter() - start
    if rank != 0:
        barrier()  # rank 0 evaluates and writes
        return None
    # after training the text side may have changed (text prompts, text adapters): encode again
    text = seg.encode_classes(class_names, model_name=spec.model) if prepared.text_trains else all_text
    after = evaluate(TorchRunner(seg), val_ds, text.numpy(), desc="val" if progress else None)
    return FinetuneResult(before=before, after=after, losses=losses, train_seconds=train_seconds,
                          merged=_finish_model(prepared), bf16=resolve_amp(options.amp), world=world)


def record_finetune(prepared: PreparedFinetune, report: dict, record: dict, out_dir: Path, started: float) -> dict:
    """Write the finetuned model, ``freeze_plan.json``, ``finetune_report.json``/``.md`` and the manifest (each
    atomically); returns the manifest figures."""
    spec = prepared.spec
    with StageRecord("finetune", out_dir, record, started=started) as rec:
        for path in prepared.inputs:
            rec.add_input(path)
        rec.weights = spec.weights
        save_segmentor(prepared.seg, spec, out_dir)
        rec.add_output(out_dir / WEIGHTS_FILE)
        rec.add_output(out_dir / SPEC_FILE)
        rec.add_output(write_json(out_dir / "freeze_plan.json", {"weights": spec.weights, **prepared.plan.to_json(),
                                                                 "excluded": prepared.excluded}))
        rec.add_output(write_json(out_dir / "finetune_report.json", report))
        rec.add_output(write_text(out_dir / "finetune_report.md", report_markdown(report)))
        rec.figures = finetune_figures(report)
    return rec.figures


def finetune_stage(source: ModelSource, options: FinetuneOptions, out_dir: str | os.PathLike, data: str, *,
                   progress: bool = True) -> dict:
    """Finetune a segmentor on a dataset's train split (``opentrans finetune``).

    Steps: resolve the model; replace its head and prompts when the options name them; open the ``train`` and
    ``val`` splits at the model's input size; with ``freeze_heavy_tail`` measure the alphas of the current image
    encoder and freeze by the policy (:func:`~opentrans.finetune.freeze.freeze_plan`), else freeze all of CLIP
    (head and prompts only); add the weight adapter on the plan's trainable layers; planned-trainable parameters
    that the dense forward path never reaches (:func:`~opentrans.finetune.freeze.gradient_free_parameters`, e.g.
    a ViT's last MLP) are frozen too and listed in the report; val mIoU before; train
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
        source: the starting model (``--from`` or ``--model``/``--pretrained``/``--image-size``).
        options: :class:`~opentrans.finetune.options.FinetuneOptions` (training budget, freeze plan, adapter,
            prompts, head, zero-shot split, limits).
        out_dir: stage output directory.
        data: ``FORMAT:PATH`` dataset spec (e.g. ``camvid:/data/camvid``) with ``train`` and ``val`` splits.
        progress: show progress bars (training: loss and learning rate).

    Returns:
        The manifest figures (:func:`~opentrans.finetune.report.finetune_figures`): ``miou_before``,
        ``miou_after`` (val mIoU, %), ``trainable_params``, ``total_params``, ``frozen_layers``, ``steps``,
        ``final_loss`` (nats); with ``unseen_classes`` also ``miou_seen``, ``miou_unseen``, ``hiou`` (%).
        ``{}`` on a torchrun rank other than 0.

    Raises:
        OpenTransError: options :meth:`FinetuneOptions.check` refuses, a bad data spec or limit, bad model
            arguments, an ``out_dir`` that is a file, an unknown unseen class, nothing to train, a batch not
            divisible by the torchrun processes, or a loss that diverged.
    """
    started = time.perf_counter()
    options.check()
    resolve_amp(options.amp)  # warns before any work when bf16 would be emulated
    out_dir = check_out_dir(out_dir)
    prepared = prepare_finetune(source, options, data)
    owns_group = init_distributed()
    try:
        result = train_and_evaluate(prepared, options, out_dir, progress)
        if result is None:
            return {}
        try:
            report = finetune_report(prepared, result, options, data)
            record = {**source.record(), "data": data, **as_record(options)}
            return record_finetune(prepared, report, record, out_dir, started)
        finally:
            barrier()
    finally:
        if owns_group:
            torch.distributed.destroy_process_group()
