"""IMP masks: a model artifact's record of which weights unstructured pruning removed, and how to keep them.

An IMP artifact (``opentrans prune --method imp``) holds ``masks.safetensors`` beside ``model.json``: one bool
tensor per pruned weight of the image tower (True = kept), with metadata ``format`` (:data:`MASKS_FORMAT`),
``model`` and (since the target sets became an option) ``targets``. Which target set a masks dict belongs to is
read from its keys (:func:`masks_targets`), so masks written before the option existed (all ``extended``) still
load. Downstream stages use :func:`artifact_masks` to find them, :func:`keep_masked_zeros` to keep the zeros
while training and :func:`apply_masks` to re-apply them (e.g. after merging adapters, or on a fresh model of the
same architecture with reloaded pretrained weights).

The target sets (:func:`imp_targets`): ``authors`` = every Conv2d of the image tower but the first (the OpenTrans
authors' code); ``extended`` = ours (ViT Linears + fused Q/K/V; ResNet ``layer1..4`` convs + attention pool).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import VisionTransformer
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from opentrans.artifacts import save_safetensors
from opentrans.errors import OpenTransError
from opentrans.models.attention import PrunedMultiheadAttention
from opentrans.models.segmentor import OpenVocabSegmentor

MASKS_FORMAT = "opentrans.masks/1"
#: IMP target sets (:func:`imp_targets`): the authors' (default) and ours.
IMP_TARGETS = ("authors", "extended")

Masks = dict[str, torch.Tensor]  # name -> bool tensor shaped like the weight, True = kept


@dataclass(frozen=True)
class Target:
    """One pruned weight: ``getattr(module, param)`` inside the image tower, named ``name``."""

    name: str  # e.g. transformer.resblocks.0.mlp.c_fc.weight
    module: nn.Module
    param: str  # "weight" or "in_proj_weight"


def imp_targets(visual: nn.Module, targets: str = "authors") -> list[Target]:
    """The weights IMP prunes in ``visual`` (see the module docs), in ``named_modules`` order.

    Args:
        visual: the image tower (``seg.visual``).
        targets: ``authors`` (every Conv2d but the first, as the authors' ``pruning_model(..., exclude_first=
            True)``) or ``extended`` (ours: ViT Linears + fused Q/K/V; ResNet ``layer1..4`` convs + attention pool).

    Raises:
        OpenTransError: an unknown target set, an image tower other than ViT or ModifiedResNet, or the authors'
            set on a ViT (nothing to prune: its only Conv2d is the excluded patch embedding).
    """
    if targets not in IMP_TARGETS:
        raise OpenTransError(f"unknown IMP targets '{targets}'; choose one of {', '.join(IMP_TARGETS)}")
    if not isinstance(visual, (VisionTransformer, ModifiedResNet)):
        raise OpenTransError(f"cannot prune image tower {type(visual).__name__}; supported: ViT, ModifiedResNet")
    if targets == "authors":
        # pruning.py l. 95-105: every nn.Conv2d in module order, parameters_to_prune[1:] (exclude_first)
        convs = [Target(f"{name}.weight", module, "weight") for name, module in visual.named_modules()
                 if isinstance(module, nn.Conv2d)][1:]
        if not convs:
            raise OpenTransError(f"the authors' IMP targets (every Conv2d but the first) leave nothing to prune in "
                                 f"{type(visual).__name__}; use --imp-targets extended (ours: Linear layers and "
                                 "fused Q/K/V)")
        return convs
    excluded = {"conv1"} if isinstance(visual, VisionTransformer) else {"conv1", "conv2", "conv3"}  # patch / stem
    out = []
    for name, module in visual.named_modules():
        if name in excluded:
            continue
        if isinstance(module, (nn.MultiheadAttention, PrunedMultiheadAttention)):
            if not module._qkv_same_embed_dim:
                raise OpenTransError(f"{name}: MultiheadAttention with separate q/k/v weights is not supported")
            out.append(Target(f"{name}.in_proj_weight", module, "in_proj_weight"))
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            out.append(Target(f"{name}.weight", module, "weight"))
    return out


def masks_targets(visual: nn.Module, masks: Masks, source: str = "masks") -> str:
    """The target set (``authors`` or ``extended``) whose weight names are exactly the keys of ``masks``.

    Raises:
        OpenTransError: an unsupported image tower, or masks matching neither set (the message names a missing or
            extra weight of the closer set: masks for another architecture).
    """
    names = set(masks)
    candidates = {}
    for kind in IMP_TARGETS:
        if kind == "authors" and isinstance(visual, VisionTransformer):
            continue  # the authors' set is empty for a ViT (imp_targets refuses it)
        candidates[kind] = {t.name for t in imp_targets(visual, kind)}
        if candidates[kind] == names:
            return kind
    closest = max(candidates, key=lambda k: len(candidates[k] & names))
    missing = sorted(candidates[closest] - names)
    extra = sorted(names - candidates[closest])
    what = f"lacks {missing[0]}" if missing else f"has {extra[0]}, which this model does not have"
    raise OpenTransError(f"{source} is for another architecture: it {what}")


def _weight(t: Target) -> torch.Tensor:
    return getattr(t.module, t.param)


def current_masks(visual: nn.Module, targets: str = "authors") -> Masks:
    """``weight != 0`` of every IMP target of the set ``targets`` (see :func:`imp_targets`): what an already
    (unstructured-)pruned model has removed."""
    return {t.name: (_weight(t) != 0).detach().clone() for t in imp_targets(visual, targets)}


def mask_sparsity(masks: Masks) -> float:
    """Fraction in [0, 1] of the masked weights that are removed."""
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    return 1.0 - kept / total if total else 0.0


def save_masks(masks: Masks, path: str | os.PathLike, model_name: str, targets: str | None = None) -> Path:
    """Write ``masks`` (bool tensors) as safetensors atomically, with ``format``, ``model`` and (if given) the
    ``targets`` set as metadata (provenance only: readers take the set from the keys)."""
    meta = {"format": MASKS_FORMAT, "model": model_name, "sparsity": f"{mask_sparsity(masks):.6f}"}
    if targets is not None:
        meta["targets"] = targets
    return save_safetensors({k: v.bool().contiguous() for k, v in masks.items()}, path, metadata=meta)


def read_masks(path: str | os.PathLike) -> tuple[Masks, dict]:
    """``(masks, metadata)`` of a masks file.

    Raises:
        OpenTransError: a missing file, a file that is not safetensors, or one without the masks format.
    """
    path = Path(path)
    if not path.is_file():
        raise OpenTransError(f"--masks {path}: file not found")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        masks = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise OpenTransError(f"--masks {path}: not a safetensors masks file ({str(exc).splitlines()[0]})") from None
    if meta.get("format") != MASKS_FORMAT:
        raise OpenTransError(f"--masks {path}: not an {MASKS_FORMAT} file (written by `opentrans prune --method imp`)")
    return {k: v.bool() for k, v in masks.items()}, meta


def check_masks(visual: nn.Module, masks: Masks, source: str = "masks") -> str:
    """Check that ``masks`` fits ``visual``: the same target names (of either set) and the same shapes.

    Returns:
        The target set of ``masks`` (:func:`masks_targets`).

    Raises:
        OpenTransError: a masks file for another architecture (or another pruned shape).
    """
    kind = masks_targets(visual, masks, source)
    for t in imp_targets(visual, kind):
        shape, got = tuple(_weight(t).shape), tuple(masks[t.name].shape)
        if got != shape:
            raise OpenTransError(f"{source} is for another architecture: {t.name} is {list(got)} there, "
                                 f"{list(shape)} in this model")
    return kind


@torch.no_grad()
def apply_masks(seg: OpenVocabSegmentor, masks: Masks | str | os.PathLike) -> dict:
    """Zero the masked weights of ``seg.visual`` in place (transfer of IMP masks to a fresh model).

    Args:
        seg: a segmentor of the same architecture (and pruned shapes) the masks were made for, e.g. a fresh
            model with reloaded pretrained weights.
        masks: a masks dict or the path of a masks safetensors file.

    Returns:
        ``{"sparsity": fraction of the target weights now zero, "model": the masks file's model or None}``
        (the target set is the masks' own, :func:`masks_targets`).

    Raises:
        OpenTransError: an unreadable masks file, or one for another architecture (checked before any
            weight is changed).
    """
    meta = {}
    source = "masks"
    if not isinstance(masks, dict):
        source = f"--masks {masks}"
        masks, meta = read_masks(masks)
    kind = check_masks(seg.visual, masks, source)
    for t in imp_targets(seg.visual, kind):
        _weight(t).mul_(masks[t.name].to(_weight(t).dtype))
    return {"sparsity": mask_sparsity(current_masks(seg.visual, kind)), "model": meta.get("model")}


def artifact_masks(model_dir: str | os.PathLike | None) -> Masks | None:
    """The IMP masks of a model directory (``masks.safetensors`` beside ``model.json``, written by ``opentrans
    prune --method imp``), or None when there are none (or ``model_dir`` is None).

    Raises:
        OpenTransError: a masks file that is unreadable.
    """
    if model_dir is None:
        return None
    path = Path(model_dir) / "masks.safetensors"
    return read_masks(path)[0] if path.is_file() else None


def keep_masked_zeros(seg: OpenVocabSegmentor, masks: Masks) -> list:
    """Keep the pruned weights of an IMP model at zero while it trains (``finetune --from`` an IMP artifact).

    Every IMP target gets a gradient hook that multiplies its gradient by the mask, so pruned weights get a zero
    gradient. With a zero weight and zero gradient, SGD (with momentum), Adam and AdamW all leave the weight at
    exactly zero (Adam's moments stay 0, decoupled or L2 weight decay of 0 is 0). Whatever is *added* to the
    weights later (merged LoRA/OFT adapters) is not covered: re-apply the masks with :func:`apply_masks` after
    merging.

    Args:
        seg: the segmentor loaded from the IMP artifact; masks: its masks (see :func:`artifact_masks`).

    Returns:
        The hook handles (``handle.remove()`` to undo).

    Raises:
        OpenTransError: masks for another architecture.
    """
    kind = check_masks(seg.visual, masks, "the artifact's masks")
    handles = []
    for t in imp_targets(seg.visual, kind):
        mask = masks[t.name].to(_weight(t).dtype)
        with torch.no_grad():
            _weight(t).mul_(mask)
        handles.append(_weight(t).register_hook(lambda g, m=mask: g * m))
    return handles
