"""OpenTrans iterative magnitude pruning (IMP): global unstructured L1 pruning of the CLIP image encoder.

As in the OpenTrans paper, IMP is *semantic-agnostic*: it ranks the weights of every Conv2d and Linear layer
of the image encoder together by their absolute value (global L1 magnitude), removes ``rate`` (default 10 %)
of the weights that are still there in each round, and recovers after each round by label-free distillation
from the frozen unpruned model (:mod:`opentrans.prune.distill`). After ``k`` rounds the sparsity is
``1 - (1 - rate)^k`` (``1 - 0.9^k``) up to the rounding of one weight per round; the last round removes only
what is needed to land exactly on the target.

The library does the masking: :func:`torch.nn.utils.prune.global_unstructured` with
:class:`~torch.nn.utils.prune.L1Unstructured` computes the new global mask (combined with the existing one
through a ``PruningContainer``, so ``amount`` counts *remaining* weights) and reparametrises each weight as
``weight_orig * weight_mask``; :func:`torch.nn.utils.prune.remove` bakes the zeros in at the end of a round.

What is pruned (the *IMP targets*, :func:`imp_targets`):

* ViT: every ``nn.Linear`` of the blocks (``mlp.c_fc``, ``mlp.c_proj``, ``attn.out_proj``) **and** the fused
  Q/K/V projection ``attn.in_proj_weight`` of each ``nn.MultiheadAttention``. The latter is a bare
  ``Parameter`` of the MHA module, not a Linear, but it is the Q/K/V linear layer of the paper's
  architecture, so it is pruned through ``prune`` on ``(mha, "in_proj_weight")``. Not pruned: the patch
  embedding ``conv1`` (excluded as in the paper), ``proj`` (a bare ``Parameter`` after ``ln_post``),
  embeddings, norms and all biases.
* ModifiedResNet: every Conv2d of ``layer1..layer4`` (including ``downsample``) and the attention pool's
  ``q_proj``, ``k_proj``, ``v_proj``, ``c_proj``. Not pruned: the stem (``conv1``, ``conv2``, ``conv3``, the
  counterpart of the patch embedding), BatchNorms and biases.

Some of these weights are read without calling their module (the segmentor's MaskCLIP path reads the last
block's ``in_proj_weight``; the attention pool passes ``q_proj.weight`` etc. to a functional MHA), so the
reparametrised weights are refreshed explicitly before every forward (:func:`refresh_masked`), not only by
``prune``'s forward-pre-hooks.

Masks files are safetensors of ``bool`` tensors keyed by ``<module>.<parameter>`` inside the image tower (e.g.
``transformer.resblocks.0.attn.in_proj_weight``), ``True`` = kept, with metadata ``format``
(:data:`MASKS_FORMAT`) and ``model``. :func:`apply_masks` re-applies one to a fresh model of the same
architecture (e.g. after reloading pretrained weights).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import VisionTransformer
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from torch.nn.utils import prune

from opentrans.artifacts import save_safetensors
from opentrans.errors import OpenTransError
from opentrans.models.attention import PrunedMultiheadAttention
from opentrans.models.segmentor import OpenVocabSegmentor

MASKS_FORMAT = "opentrans.masks/1"
#: Default fraction of the remaining weights removed per round (the paper's 10 %).
DEFAULT_RATE = 0.1

Masks = dict[str, torch.Tensor]  # name -> bool tensor shaped like the weight, True = kept


@dataclass(frozen=True)
class Target:
    """One pruned weight: ``getattr(module, param)`` inside the image tower, named ``name``."""

    name: str  # e.g. transformer.resblocks.0.mlp.c_fc.weight
    module: nn.Module
    param: str  # "weight" or "in_proj_weight"


def imp_targets(visual: nn.Module) -> list[Target]:
    """The weights IMP prunes in ``visual`` (see the module docs), in ``named_modules`` order.

    Raises:
        OpenTransError: an image tower other than ViT or ModifiedResNet.
    """
    if isinstance(visual, VisionTransformer):
        excluded = {"conv1"}
    elif isinstance(visual, ModifiedResNet):
        excluded = {"conv1", "conv2", "conv3"}  # the stem
    else:
        raise OpenTransError(f"cannot prune image tower {type(visual).__name__}; supported: ViT, ModifiedResNet")
    targets = []
    for name, module in visual.named_modules():
        if name in excluded:
            continue
        if isinstance(module, (nn.MultiheadAttention, PrunedMultiheadAttention)):
            if not module._qkv_same_embed_dim:
                raise OpenTransError(f"{name}: MultiheadAttention with separate q/k/v weights is not supported")
            targets.append(Target(f"{name}.in_proj_weight", module, "in_proj_weight"))
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            targets.append(Target(f"{name}.weight", module, "weight"))
    return targets


def _weight(t: Target) -> torch.Tensor:
    return getattr(t.module, t.param)


def current_masks(visual: nn.Module) -> Masks:
    """``weight != 0`` of every IMP target: what an already (unstructured-)pruned model has removed."""
    return {t.name: (_weight(t) != 0).detach().clone() for t in imp_targets(visual)}


def mask_sparsity(masks: Masks) -> float:
    """Fraction in [0, 1] of the masked weights that are removed."""
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    return 1.0 - kept / total if total else 0.0


def layer_sparsity(masks: Masks) -> list[dict]:
    """Per-layer table rows: ``{"layer", "shape", "params", "zeros", "sparsity"}`` (sparsity in %)."""
    rows = []
    for name, m in masks.items():
        zeros = int(m.numel() - m.sum())
        rows.append({"layer": name, "shape": list(m.shape), "params": m.numel(), "zeros": zeros,
                     "sparsity": 100.0 * zeros / m.numel()})
    return rows


def attach_masks(visual: nn.Module, masks: Masks) -> list[Target]:
    """Reparametrise every IMP target as ``orig * mask`` with :func:`torch.nn.utils.prune.custom_from_mask`.

    The masked weights stay exactly zero while the rest trains; undo with :func:`bake_masks`.
    """
    targets = imp_targets(visual)
    for t in targets:
        prune.custom_from_mask(t.module, t.param, masks[t.name].to(_weight(t).dtype))
    return targets


def refresh_masked(targets: Iterable[Target]) -> None:
    """Recompute ``weight = weight_orig * weight_mask`` for every reparametrised target.

    Needed before a forward because some weights are read without calling their module (see module docs).
    """
    for t in targets:
        if prune.is_pruned(t.module) and hasattr(t.module, t.param + "_mask"):
            setattr(t.module, t.param, getattr(t.module, t.param + "_orig") * getattr(t.module, t.param + "_mask"))


def bake_masks(targets: Iterable[Target]) -> Masks:
    """Make the masks permanent (:func:`torch.nn.utils.prune.remove`) and return them as bool tensors."""
    masks = {}
    for t in targets:
        masks[t.name] = getattr(t.module, t.param + "_mask").detach().bool().clone()
        prune.remove(t.module, t.param)
    return masks


def global_magnitude_round(targets: list[Target], n_remove: int) -> None:
    """Remove the ``n_remove`` smallest-|w| weights still unmasked, ranked globally over ``targets``.

    The targets must be reparametrised already (:func:`attach_masks`); the new mask is combined with the
    existing one by :func:`torch.nn.utils.prune.global_unstructured` (``L1Unstructured``, integer amount).
    """
    if n_remove <= 0:
        return
    with torch.no_grad():
        prune.global_unstructured([(t.module, t.param) for t in targets], pruning_method=prune.L1Unstructured,
                                  amount=int(n_remove))


def sparsity_schedule(start: float, target: float, rate: float, total: int) -> list[int]:
    """Number of weights pruned in total after each round, from sparsity ``start`` to ``target``.

    Each round removes ``round(rate * remaining)`` weights (at least one); the last removes only what is
    left to reach ``round(target * total)``. So after round ``k`` the sparsity is
    ``1 - (1 - start)(1 - rate)^k`` up to rounding, and the final one equals ``target`` to one weight.

    Returns:
        Cumulative pruned counts, one per round (empty when ``start`` already meets ``target``).
    """
    pruned, goal, out = round(start * total), round(target * total), []
    while pruned < goal:
        pruned = min(goal, pruned + max(1, round(rate * (total - pruned))))
        out.append(pruned)
    return out


def save_masks(masks: Masks, path: str | os.PathLike, model_name: str) -> Path:
    """Write ``masks`` (bool tensors) as safetensors atomically, with ``format`` and ``model`` metadata."""
    return save_safetensors({k: v.bool().contiguous() for k, v in masks.items()}, path,
                            metadata={"format": MASKS_FORMAT, "model": model_name,
                                      "sparsity": f"{mask_sparsity(masks):.6f}"})


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


def check_masks(visual: nn.Module, masks: Masks, source: str = "masks") -> None:
    """Check that ``masks`` fits ``visual``: the same target names and the same shapes.

    Raises:
        OpenTransError: a masks file for another architecture (or another pruned shape).
    """
    expected = {t.name: tuple(_weight(t).shape) for t in imp_targets(visual)}
    got = {k: tuple(v.shape) for k, v in masks.items()}
    if set(expected) != set(got):
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        what = f"lacks {missing[0]}" if missing else f"has {extra[0]}, which this model does not have"
        raise OpenTransError(f"{source} is for another architecture: it {what}")
    for k, shape in expected.items():
        if got[k] != shape:
            raise OpenTransError(f"{source} is for another architecture: {k} is {list(got[k])} there, "
                                 f"{list(shape)} in this model")


@torch.no_grad()
def apply_masks(seg: OpenVocabSegmentor, masks: Masks | str | os.PathLike) -> dict:
    """Zero the masked weights of ``seg.visual`` in place (transfer of IMP masks to a fresh model).

    Args:
        seg: a segmentor of the same architecture (and pruned shapes) the masks were made for, e.g. a fresh
            model with reloaded pretrained weights.
        masks: a masks dict or the path of a masks safetensors file.

    Returns:
        ``{"sparsity": fraction of the target weights now zero, "model": the masks file's model or None}``.

    Raises:
        OpenTransError: an unreadable masks file, or one for another architecture (checked before any
            weight is changed).
    """
    meta = {}
    source = "masks"
    if not isinstance(masks, dict):
        source = f"--masks {masks}"
        masks, meta = read_masks(masks)
    check_masks(seg.visual, masks, source)
    for t in imp_targets(seg.visual):
        _weight(t).mul_(masks[t.name].to(_weight(t).dtype))
    return {"sparsity": mask_sparsity(current_masks(seg.visual)), "model": meta.get("model")}


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
    check_masks(seg.visual, masks, "the artifact's masks")
    handles = []
    for t in imp_targets(seg.visual):
        mask = masks[t.name].to(_weight(t).dtype)
        with torch.no_grad():
            _weight(t).mul_(mask)
        handles.append(_weight(t).register_hook(lambda g, m=mask: g * m))
    return handles
