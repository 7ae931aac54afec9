"""OpenTrans iterative magnitude pruning (IMP): global unstructured L1 pruning of the CLIP image encoder.

As in the OpenTrans paper, IMP is *semantic-agnostic*: it ranks the weights of the target layers of the image
encoder together by their absolute value (global L1 magnitude), removes ``rate`` (default 10 %) of the weights
that are still there in each round, and recovers after each round by label-free distillation from the frozen
unpruned model (:mod:`opentrans.prune.distill`). After ``k`` rounds the sparsity is ``1 - (1 - rate)^k``
(``1 - 0.9^k``) up to the rounding of one weight per round; the last round removes only what is needed to land
exactly on the target.

The library does the masking: :func:`torch.nn.utils.prune.global_unstructured` with
:class:`~torch.nn.utils.prune.L1Unstructured` computes the new global mask (combined with the existing one
through a ``PruningContainer``, so ``amount`` counts *remaining* weights) and reparametrises each weight as
``weight_orig * weight_mask``; :func:`torch.nn.utils.prune.remove` bakes the zeros in at the end of a round. This
mechanism is exactly the authors' (github.com/Xujxyang/OpenTrans at commit
aea33ff3682403aec6d55a670030d6cb4b0623cd, ``pruning.py`` ``pruning_model`` l. 95-112, called as
``pruning_model(model.module.backbone, 0.1, exclude_first=True)`` from ``plain_train_net_imp.py`` l. 518).

What is pruned (the *IMP targets*, :func:`imp_targets`; ``targets`` / ``--imp-targets``):

* ``authors`` (the default): what the authors' code prunes: every ``nn.Conv2d`` of the image encoder except the
  first in module order (``exclude_first=True`` drops the RGB ``conv1``), and no Linear layer. For a
  ModifiedResNet that is the stem's ``conv2`` and ``conv3``, every conv of ``layer1..layer4`` and the
  ``downsample`` convs; the attention pool stays dense. A ViT has no Conv2d besides its patch embedding, so the
  authors' targets leave nothing to prune there (their code cannot prune a ViT): choose ``extended``.
* ``extended`` (**ours**): ViT: every ``nn.Linear`` of the blocks (``mlp.c_fc``, ``mlp.c_proj``,
  ``attn.out_proj``) **and** the fused Q/K/V projection ``attn.in_proj_weight`` of each
  ``nn.MultiheadAttention`` (a bare ``Parameter`` of the MHA module, pruned through ``prune`` on
  ``(mha, "in_proj_weight")``); not pruned: the patch embedding ``conv1``, ``proj``, embeddings, norms and all
  biases. ModifiedResNet: every Conv2d of ``layer1..layer4`` (including ``downsample``) and the attention pool's
  ``q_proj``, ``k_proj``, ``v_proj``, ``c_proj`` (14.7 M weights for RN50); not pruned: the whole stem
  (``conv1``, ``conv2``, ``conv3``), BatchNorms and biases.

Some of these weights are read without calling their module (the segmentor's MaskCLIP path reads the last
block's ``in_proj_weight``; the attention pool passes ``q_proj.weight`` etc. to a functional MHA), so the
reparametrised weights are refreshed explicitly before every forward (:func:`refresh_masked`), not only by
``prune``'s forward-pre-hooks.

Masks files are safetensors of ``bool`` tensors keyed by ``<module>.<parameter>`` inside the image tower (e.g.
``transformer.resblocks.0.attn.in_proj_weight``), ``True`` = kept, with metadata ``format``
(:data:`MASKS_FORMAT`), ``model`` and (since the target sets became an option) ``targets``. Which target set a
masks dict belongs to is read from its keys (:func:`masks_targets`), so masks written before the option existed
(all ``extended``) still load. :func:`apply_masks` re-applies one to a fresh model of the same architecture
(e.g. after reloading pretrained weights).
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

    The masked weights stay exactly zero while the rest trains; undo with :func:`bake_masks`. The target set is
    the one ``masks`` belongs to (:func:`masks_targets`).
    """
    targets = imp_targets(visual, masks_targets(visual, masks))
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
