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

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.utils import prune

from opentrans.models.masks import (  # noqa: F401 (the mask helpers live with the model; re-exported here)
    IMP_TARGETS,
    MASKS_FORMAT,
    Masks,
    Target,
    _weight,
    apply_masks,
    artifact_masks,
    check_masks,
    current_masks,
    imp_targets,
    keep_masked_zeros,
    mask_sparsity,
    masks_targets,
    read_masks,
    save_masks,
)
from opentrans.prune.options import ImpOptions

#: Default fraction of the remaining weights removed per round (the paper's 10 %).
DEFAULT_RATE = ImpOptions.rate

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
