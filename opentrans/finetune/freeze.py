"""Which image-encoder layers to finetune: OpenTrans's heavy-tailed self-regularisation criterion.

OpenTrans (Xu, Chen, Zhao & Wei, "Transferable and Principled Efficiency for Open-Vocabulary
Segmentation", CVPR 2024, arXiv:2404.07448) finetunes only the layers whose pretrained weights are not yet
well trained by the heavy-tailed self-regularisation (HT-SR) measure of Martin & Mahoney: a layer whose
ESD has a small power-law alpha (a heavy tail, see :mod:`opentrans.analyze.spectral`) is well trained and
stays frozen; the others are updated. The split is at the median alpha, so about half of the analysed
layers are trained.

What trains under a plan (:func:`apply_freeze_plan`):

* the ``weight`` and ``bias`` of each Linear/Conv2d named in :attr:`FreezePlan.trainable`;
* the rows of a Q, K or V slice ``<mha>.in_proj_weight[q|k|v]`` named in :attr:`FreezePlan.trainable`
  (and the same rows of ``in_proj_bias``). A slice is part of one fused ``(3E, E)`` parameter, so the
  parameter gets ``requires_grad`` when any of its slices trains, and a gradient hook zeroes the rows of its
  frozen slices (:func:`row_masked_parameters`); the trainer also writes those rows back after every
  optimizer step, because AdamW's decoupled weight decay would shrink them even with a zero gradient;
* the segmentor's ``head`` (:class:`~opentrans.models.heads.LinearHead` or a registered decoder);
* nothing else: the text tower, ``logit_scale``, LayerNorms/BatchNorms, embeddings, ``proj`` and every layer
  the estimator did not analyse stay frozen (with ``--estimator opentrans``, the authors' layer set, that is
  the attention projections; the patch/stem conv is analysed and may train; with ``opentrans-qkv`` the
  patch/stem conv is the one left out).

This is narrower than the authors' code (github.com/Xujxyang/OpenTrans at aea33ff3, ``plain_train_net.py``
l. 413-435), which freezes the analysed layers with ``alpha < median`` and sets ``requires_grad=True`` on every
other parameter of its CLIP backbone (text tower, norms, attention projections and embeddings included); the
frozen/trainable split of the analysed layers is the same.

Policies (:data:`POLICIES`), over the analysed layers' alphas:

* ``median`` (OpenTrans default): freeze ``alpha < median``; the rest trains;
* ``fraction``: freeze the ``round(fraction * n)`` layers with the smallest alpha (ties by name);
* ``inverse`` (the OpenTrans ablation): freeze ``alpha > median``, train the heavy-tailed ones;
* ``random``: freeze as many layers as ``median`` would, drawn uniformly with ``seed`` (a control).

Without ``--freeze-heavy-tail`` the plan is :func:`head_only_plan`: the whole CLIP model is frozen and only
the head trains.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from opentrans.errors import OpenTransError
from opentrans.models.attention import QKV_SLICE, has_fused_qkv
from opentrans.models.modes import preserved_modes
from opentrans.analyze.spectral import LayerAlpha
from opentrans.models.segmentor import OpenVocabSegmentor
from opentrans.finetune.options import POLICIES

#: Policies of :func:`freeze_plan`.
HEAD_ONLY = "head-only"


@dataclass(frozen=True)
class FreezePlan:
    """Which analysed layers stay frozen and which are finetuned.

    Attributes:
        policy: ``median`` (from :func:`freeze_plan`) or ``head-only`` (:func:`head_only_plan`).
        median_alpha: the split point (dimensionless); ``None`` for ``head-only``.
        frozen: sorted module names with alpha < median (heavy-tailed, well trained).
        trainable: sorted module names with alpha >= median.
        alphas: ``{module name: alpha}`` of every analysed layer.
        fraction: the ``fraction`` policy's frozen share, else None.
        seed: the ``random`` policy's seed, else None.
    """

    policy: str
    median_alpha: float | None
    frozen: tuple[str, ...]
    trainable: tuple[str, ...]
    alphas: dict[str, float]
    fraction: float | None = None
    seed: int | None = None

    def to_json(self) -> dict:
        """A JSON-ready dict of the plan (what ``freeze_plan.json`` holds)."""
        return {"policy": self.policy, "median_alpha": self.median_alpha, "fraction": self.fraction,
                "seed": self.seed, "frozen": list(self.frozen), "trainable": list(self.trainable),
                "alphas": dict(self.alphas)}


def freeze_plan(layers: Iterable[LayerAlpha], policy: str = "median", fraction: float = 0.5,
                seed: int = 0) -> FreezePlan:
    """Choose the frozen layers from their alphas (OpenTrans's heavy-tailed self-regularisation criterion).

    Args:
        layers: per-layer alphas from :func:`~opentrans.analyze.spectral.analyze_model` (or
            :func:`~opentrans.analyze.spectral.analyze_spectrum`).
        policy: ``median``: layers with ``alpha < median`` are frozen, the rest (including a layer exactly
            at the median of an odd count) are trainable; ``fraction``: the ``round(fraction * n)``
            smallest alphas are frozen; ``inverse``: ``alpha > median`` frozen; ``random``: as many layers as
            ``median`` freezes, drawn with ``random.Random(seed)``.
        fraction: share of layers to freeze in ``[0, 1]`` (``fraction`` policy only; e.g. 0.25, 0.5, 0.75).
        seed: ``random`` policy only.

    Raises:
        OpenTransError: an unknown policy, a fraction outside [0, 1], no layers, duplicate names or a
            non-finite alpha.
    """
    if policy not in POLICIES:
        raise OpenTransError(f"unknown freeze policy '{policy}'; choose one of {', '.join(POLICIES)}")
    if policy == "fraction" and not (0.0 <= fraction <= 1.0):
        raise OpenTransError(f"--freeze-fraction {fraction}: must be between 0 and 1")
    layers = list(layers)
    if not layers:
        raise OpenTransError("no analysed layers to plan freezing for")
    alphas = {la.name: float(la.alpha) for la in layers}
    if len(alphas) != len(layers):
        raise OpenTransError("the analysed layers contain duplicate names")
    bad = [n for n, a in alphas.items() if not math.isfinite(a)]
    if bad:
        raise OpenTransError(f"layer {bad[0]} has a non-finite alpha; exclude it before planning")
    median = float(statistics.median(alphas.values()))
    below = {n for n, a in alphas.items() if a < median}
    if policy == "median":
        frozen = below
    elif policy == "inverse":
        frozen = {n for n, a in alphas.items() if a > median}
    elif policy == "fraction":
        order = sorted(alphas, key=lambda n: (alphas[n], n))
        frozen = set(order[:round(fraction * len(order))])
    else:  # random
        frozen = set(random.Random(seed).sample(sorted(alphas), len(below)))
    return FreezePlan(policy=policy, median_alpha=median, frozen=tuple(sorted(frozen)),
                      trainable=tuple(sorted(set(alphas) - frozen)), alphas=alphas,
                      fraction=fraction if policy == "fraction" else None, seed=seed if policy == "random" else None)


def head_only_plan() -> FreezePlan:
    """The plan without ``--freeze-heavy-tail``: every CLIP layer frozen, only the segmentor head trains."""
    return FreezePlan(policy=HEAD_ONLY, median_alpha=None, frozen=(), trainable=(), alphas={})


_MASK_ATTR = "_opentrans_row_mask"
_HOOK_ATTR = "_opentrans_row_hook"


def _plan_target(seg: OpenVocabSegmentor, name: str) -> tuple[nn.Module, str | None]:
    """``(module, None)`` for a Linear/Conv2d name, ``(MultiheadAttention, 'q'|'k'|'v')`` for a slice name."""
    visual_prefix = "clip.visual."
    m = QKV_SLICE.match(name)
    target, tag = (m["mha"], m["tag"]) if m else (name, None)
    module = None
    if target.startswith(visual_prefix):
        try:
            module = seg.get_submodule(target)
        except AttributeError:
            module = None
    ok = has_fused_qkv(module) if tag \
        else isinstance(module, (nn.Linear, nn.Conv2d))
    if not ok:
        raise OpenTransError(f"freeze plan names '{name}', which is not a Linear/Conv2d or Q/K/V slice of this "
                             "segmentor's image encoder (clip.visual.*); was the plan made for another model?")
    return module, tag


def row_masked_parameters(seg: nn.Module) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """``(parameter, row mask)`` of every fused in-projection that trains only some of its Q/K/V slices.

    The mask is bool ``(3E,)``: True for rows that train. A gradient hook registered by
    :func:`apply_freeze_plan` already zeroes the other rows' gradient; optimizers with decoupled weight
    decay must also keep those rows' values (:func:`~opentrans.finetune.trainer.train_segmentor` does).
    """
    return [(p, getattr(p, _MASK_ATTR)) for p in seg.parameters() if getattr(p, _MASK_ATTR, None) is not None]


def _clear_row_masks(seg: nn.Module) -> None:
    for p in seg.parameters():
        hook = getattr(p, _HOOK_ATTR, None)
        if hook is not None:
            hook.remove()
            delattr(p, _HOOK_ATTR)
        if getattr(p, _MASK_ATTR, None) is not None:
            delattr(p, _MASK_ATTR)


def _set_row_mask(p: nn.Parameter, mask: torch.Tensor) -> None:
    shape = (-1,) + (1,) * (p.dim() - 1)
    m = mask.reshape(shape).to(p.dtype)
    p.requires_grad_(True)
    setattr(p, _MASK_ATTR, mask)
    setattr(p, _HOOK_ATTR, p.register_hook(lambda g: g * m))


def apply_freeze_plan(seg: OpenVocabSegmentor, plan: FreezePlan) -> dict:
    """Set ``requires_grad`` on every parameter of ``seg`` as ``plan`` says.

    The whole ``seg.clip`` is frozen (and row masks of an earlier call removed), then the ``weight`` and
    ``bias`` of each layer in ``plan.trainable`` and every parameter of ``seg.head`` and of attached prompts
    (``seg.prompts``) are unfrozen; a
    trainable Q/K/V slice unfreezes its fused ``in_proj_weight``/``in_proj_bias`` with a row mask (see the
    module notes; all three slices trainable = no mask). Names are checked first, so a plan for another
    model changes nothing.

    Returns:
        ``{"trainable_params", "total_params", "head_params", "image_encoder_params", "trainable_layers",
        "frozen_layers"}``: parameter counts (elements) of the whole segmentor (text tower included), of
        the head and of the image encoder, and the number of planned trainable and frozen layers.
        ``trainable_params`` counts only the unmasked rows of a partly trainable in-projection.

    Raises:
        OpenTransError: the plan names something that is not a Linear/Conv2d or Q/K/V slice under
            ``clip.visual``.
    """
    targets = [_plan_target(seg, n) for n in plan.trainable]
    for n in plan.frozen:
        _plan_target(seg, n)
    _clear_row_masks(seg)
    for p in seg.parameters():
        p.requires_grad_(False)
    slices: dict[nn.MultiheadAttention, set[str]] = {}
    for module, tag in targets:
        if tag is not None:
            slices.setdefault(module, set()).add(tag)
            continue
        for p in (module.weight, module.bias):
            if p is not None:
                p.requires_grad_(True)
    for mha, tags in slices.items():
        e = mha.in_proj_weight.shape[0] // 3
        mask = torch.cat([torch.full((e,), t in tags) for t in ("q", "k", "v")])
        for p in (mha.in_proj_weight, mha.in_proj_bias):
            if p is None:
                continue
            if bool(mask.all()):
                p.requires_grad_(True)
            else:
                _set_row_mask(p, mask)
    for p in seg.head.parameters():
        p.requires_grad_(True)
    if seg.prompts is not None:
        for p in seg.prompts.parameters():
            p.requires_grad_(True)
    count = lambda params: sum(p.numel() for p in params)  # noqa: E731
    return {
        "trainable_params": trainable_param_count(seg),
        "total_params": count(seg.parameters()),
        "head_params": count(seg.head.parameters()),
        "image_encoder_params": count(seg.visual.parameters()),
        "trainable_layers": len(plan.trainable),
        "frozen_layers": len(plan.frozen),
    }


def trainable_param_count(seg: nn.Module) -> int:
    """Elements training can change: parameters with ``requires_grad``, masked rows not counted."""
    total = 0
    for p in seg.parameters():
        if p.requires_grad:
            mask = getattr(p, _MASK_ATTR, None)
            total += p.numel() if mask is None else int(mask.sum()) * (p.numel() // mask.numel())
    return total


def gradient_free_parameters(seg: OpenVocabSegmentor) -> list[str]:
    """Names of parameters with ``requires_grad`` that get no gradient from the segmentor's logits.

    The dense forward path skips parts of the image encoder: in the ``maskclip`` mode, for a ViT the query/key
    rows of the last block's attention (and its MLP too in ``maskclip-noresidual``), for a ModifiedResNet the
    attention pool's ``q_proj``/``k_proj``.
    A plan may mark such layers trainable; they stay unchanged by training. Found with one forward and
    backward pass on a zero image ``(1, 3, H, W)`` and two random class embeddings ``(2, D)``: gradient
    connectivity does not depend on the values. Gradients are cleared afterwards.
    """
    named = [(n, p) for n, p in seg.named_parameters() if p.requires_grad]
    if not named:
        return []
    for _, p in named:
        p.grad = None
    images = torch.zeros(1, 3, *seg.image_size)
    text = torch.randn(2, seg.embed_dim, generator=torch.Generator().manual_seed(0))
    with preserved_modes(seg, train=False), torch.enable_grad():
        seg(images, text).sum().backward()
    # a row-masked in-projection whose trainable rows get a zero gradient is as unreachable as no gradient
    missing = [n for n, p in named if p.grad is None or (getattr(p, _MASK_ATTR, None) is not None
                                                         and not bool(p.grad[getattr(p, _MASK_ATTR)].any()))]
    for _, p in named:
        p.grad = None
    return missing
