"""Which image-encoder layers to finetune: OpenTrans's heavy-tailed self-regularisation criterion.

OpenTrans (Xu, Chen, Zhao & Wei, "Transferable and Principled Efficiency for Open-Vocabulary
Segmentation", CVPR 2024, arXiv:2404.07448) finetunes only the layers whose pretrained weights are not yet
well trained by the heavy-tailed self-regularisation (HT-SR) measure of Martin & Mahoney: a layer whose
ESD has a small power-law alpha (a heavy tail, see :mod:`opentrans.finetune.spectral`) is well trained and
stays frozen; the others are updated. The split is at the median alpha, so about half of the analysed
layers are trained.

What trains under a plan (:func:`apply_freeze_plan`):

* the ``weight`` and ``bias`` of each Linear/Conv2d named in :attr:`FreezePlan.trainable`;
* the segmentor's ``head`` (:class:`~opentrans.models.segmentor.LinearHead`);
* nothing else: the text tower, ``logit_scale``, LayerNorms/BatchNorms, embeddings, ``proj``, the fused
  MultiheadAttention ``in_proj_weight`` and the excluded patch/stem conv stay frozen.

Without ``--freeze-heavy-tail`` the plan is :func:`head_only_plan`: the whole CLIP model is frozen and only
the head trains.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from opentrans.errors import OpenTransError
from opentrans.finetune.spectral import LayerAlpha
from opentrans.models.segmentor import OpenVocabSegmentor

#: Policies of :func:`freeze_plan`.
POLICIES = ("median",)
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
    """

    policy: str
    median_alpha: float | None
    frozen: tuple[str, ...]
    trainable: tuple[str, ...]
    alphas: dict[str, float]

    def to_json(self) -> dict:
        """A JSON-ready dict of the plan (what ``freeze_plan.json`` holds)."""
        return {"policy": self.policy, "median_alpha": self.median_alpha, "frozen": list(self.frozen),
                "trainable": list(self.trainable), "alphas": dict(self.alphas)}


def freeze_plan(layers: Iterable[LayerAlpha], policy: str = "median") -> FreezePlan:
    """Split analysed layers at the median alpha (OpenTrans's heavy-tailed self-regularisation criterion).

    Args:
        layers: per-layer alphas from :func:`~opentrans.finetune.spectral.analyze_spectrum`.
        policy: ``median``: layers with ``alpha < median`` are frozen, the rest (including a layer exactly
            at the median of an odd count) are trainable.

    Raises:
        OpenTransError: an unknown policy, no layers, duplicate names or a non-finite alpha.
    """
    if policy not in POLICIES:
        raise OpenTransError(f"unknown freeze policy '{policy}'; choose one of {', '.join(POLICIES)}")
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
    frozen = tuple(sorted(n for n, a in alphas.items() if a < median))
    trainable = tuple(sorted(n for n, a in alphas.items() if a >= median))
    return FreezePlan(policy=policy, median_alpha=median, frozen=frozen, trainable=trainable, alphas=alphas)


def head_only_plan() -> FreezePlan:
    """The plan without ``--freeze-heavy-tail``: every CLIP layer frozen, only the segmentor head trains."""
    return FreezePlan(policy=HEAD_ONLY, median_alpha=None, frozen=(), trainable=(), alphas={})


def _plan_module(seg: OpenVocabSegmentor, name: str) -> nn.Module:
    visual_prefix = "clip.visual."
    module = None
    if name.startswith(visual_prefix):
        try:
            module = seg.get_submodule(name)
        except AttributeError:
            module = None
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        raise OpenTransError(f"freeze plan names '{name}', which is not a Linear/Conv2d of this segmentor's image "
                             "encoder (clip.visual.*); was the plan made for another model?")
    return module


def apply_freeze_plan(seg: OpenVocabSegmentor, plan: FreezePlan) -> dict:
    """Set ``requires_grad`` on every parameter of ``seg`` as ``plan`` says.

    The whole ``seg.clip`` is frozen, then the ``weight`` and ``bias`` of each layer in
    ``plan.trainable`` and every parameter of ``seg.head`` are unfrozen. Names are checked first, so a
    plan for another model changes nothing.

    Returns:
        ``{"trainable_params", "total_params", "head_params", "image_encoder_params", "trainable_layers",
        "frozen_layers"}``: parameter counts (elements) of the whole segmentor (text tower included), of
        the head and of the image encoder, and the number of planned trainable and frozen layers.

    Raises:
        OpenTransError: the plan names a module that is not a Linear/Conv2d under ``clip.visual``.
    """
    trainable_modules = [_plan_module(seg, n) for n in plan.trainable]
    for n in plan.frozen:
        _plan_module(seg, n)
    for p in seg.parameters():
        p.requires_grad_(False)
    for module in trainable_modules:
        for p in (module.weight, module.bias):
            if p is not None:
                p.requires_grad_(True)
    for p in seg.head.parameters():
        p.requires_grad_(True)
    count = lambda params: sum(p.numel() for p in params)  # noqa: E731
    return {
        "trainable_params": count(p for p in seg.parameters() if p.requires_grad),
        "total_params": count(seg.parameters()),
        "head_params": count(seg.head.parameters()),
        "image_encoder_params": count(seg.visual.parameters()),
        "trainable_layers": len(plan.trainable),
        "frozen_layers": len(plan.frozen),
    }


def gradient_free_parameters(seg: OpenVocabSegmentor) -> list[str]:
    """Names of parameters with ``requires_grad`` that get no gradient from the segmentor's logits.

    The dense (MaskCLIP) forward path skips parts of the image encoder: for a ViT the last block's MLP and
    the query/key rows of its attention, for a ModifiedResNet the attention pool's ``q_proj``/``k_proj``.
    A plan may mark such layers trainable; they stay unchanged by training. Found with one forward and
    backward pass on a zero image ``(1, 3, H, W)`` and two random class embeddings ``(2, D)``: gradient
    connectivity does not depend on the values. Gradients are cleared afterwards.
    """
    named = [(n, p) for n, p in seg.named_parameters() if p.requires_grad]
    if not named:
        return []
    for _, p in named:
        p.grad = None
    was_training = seg.training
    seg.eval()
    images = torch.zeros(1, 3, *seg.image_size)
    text = torch.randn(2, seg.embed_dim, generator=torch.Generator().manual_seed(0))
    with torch.enable_grad():
        seg(images, text).sum().backward()
    missing = [n for n, p in named if p.grad is None]
    for _, p in named:
        p.grad = None
    seg.train(was_training)
    return missing
