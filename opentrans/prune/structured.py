"""Structured pruning of the CLIP image encoder with torch-pruning, and its cost (GMACs, M params).

What is pruned (the *prunable channels*):

* ViT (``open_clip.transformer.VisionTransformer``): the MLP hidden channels of every residual block, i.e.
  the outputs of ``transformer.resblocks.{i}.mlp.c_fc`` together with the matching inputs of ``mlp.c_proj``.
  The residual width, the patch embedding, ``ln_*``, ``proj`` and the attention (``nn.MultiheadAttention``)
  are untouched: width/head pruning of open_clip's fused MHA is a trap (see docs/pitfalls.md).
* ModifiedResNet (RN50, ``opentrans-tiny-rn``): the internal channels of every Bottleneck of
  ``layer1..layer4``, i.e. the outputs of ``conv1`` (+ ``bn1``, inputs of ``conv2``) and of ``conv2``
  (+ ``bn2``, inputs of ``conv3``). The stem, the residual (``conv3``/``downsample``) channels and the
  attention pool are untouched.

torch-pruning does the work: :class:`torch_pruning.DependencyGraph` traces the tower, each pruning group
(e.g. ``c_fc`` outputs -> GELU -> ``c_proj`` inputs) is scored with a torch-pruning importance and removed
with ``Group.prune()``. How many channels each layer keeps is decided here rather than by
``BasePruner.step``, because (a) ``BasePruner``'s ``round_to`` rounds the kept width *down* (a width-8
layer at ratio 0.5 with ``round_to=8`` would keep 0 channels) and (b) its ratio is relative to the widths
at construction, whereas here sparsity is relative to the original architecture so pruning composes.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch_pruning as tp
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import VisionTransformer
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from opentrans.errors import OpenTransError
from opentrans.models.clip import create_architecture
from opentrans.models.segmentor import OpenVocabSegmentor

#: Importance criteria accepted by :func:`prune_structured`.
IMPORTANCES = ("magnitude", "lamp")
_EPS = 1e-9


@dataclass(frozen=True)
class _Layer:
    """One prunable layer: its output channels are removed together with their dependants."""

    name: str  # module name inside the image tower, e.g. transformer.resblocks.3.mlp.c_fc
    block: str  # name prefix of the block that must contain every pruned module, e.g. transformer.resblocks.3.
    module: nn.Module
    pruning_fn: Callable


def _width(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def _prunable_layers(visual: nn.Module) -> list[_Layer]:
    """The prunable layers of an image tower, in forward order."""
    layers = []
    if isinstance(visual, VisionTransformer):
        for i, block in enumerate(visual.transformer.resblocks):
            prefix = f"transformer.resblocks.{i}."
            layers.append(_Layer(prefix + "mlp.c_fc", prefix, block.mlp.c_fc, tp.prune_linear_out_channels))
    elif isinstance(visual, ModifiedResNet):
        for stage in ("layer1", "layer2", "layer3", "layer4"):
            for j, block in enumerate(getattr(visual, stage)):
                prefix = f"{stage}.{j}."
                for conv in ("conv1", "conv2"):
                    layers.append(_Layer(prefix + conv, prefix, getattr(block, conv), tp.prune_conv_out_channels))
    else:
        raise OpenTransError(f"cannot prune image tower {type(visual).__name__}; supported: ViT, ModifiedResNet")
    return layers


def prunable_widths(seg: OpenVocabSegmentor) -> dict[str, int]:
    """Current width (channels) of every prunable layer of ``seg.visual``, keyed by module name, in order.

    Raises:
        OpenTransError: an image tower other than ViT or ModifiedResNet.
    """
    return {layer.name: _width(layer.module) for layer in _prunable_layers(seg.visual)}


@functools.lru_cache(maxsize=8)
def _architecture_widths(model_name: str) -> tuple[tuple[str, int], ...]:
    visual = create_architecture(model_name).visual
    return tuple((layer.name, _width(layer.module)) for layer in _prunable_layers(visual))


def original_widths(seg: OpenVocabSegmentor, model_name: str | None) -> dict[str, int]:
    """Widths of the prunable layers in the unpruned architecture ``model_name`` (what sparsity is measured
    against); ``model_name=None`` takes the current widths as the original ones.

    Raises:
        OpenTransError: unknown ``model_name``, or a segmentor that was not built from ``model_name``.
    """
    current = prunable_widths(seg)
    if model_name is None:
        return current
    original = dict(_architecture_widths(model_name))
    if list(original) != list(current) or any(current[k] > original[k] for k in current):
        raise OpenTransError(f"this segmentor's image tower was not built from {model_name}: its layers do not match")
    return original


def current_sparsity(seg: OpenVocabSegmentor, model_name: str | None) -> float:
    """Fraction in [0, 1) of the prunable channels of ``model_name`` already removed from ``seg.visual``
    (0.0 for an unpruned model, or whenever ``model_name`` is None).

    Raises:
        OpenTransError: see :func:`original_widths`.
    """
    original = original_widths(seg, model_name)
    return 1.0 - sum(prunable_widths(seg).values()) / sum(original.values())


def validate_prune_options(sparsity: float, importance: str, round_to: int | None) -> None:
    """Check the user's pruning options without touching any model.

    Raises:
        OpenTransError: ``sparsity`` not a number strictly between 0 and 1, an ``importance`` not in
            :data:`IMPORTANCES`, or a ``round_to`` that is not a positive integer or None.
    """
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 < sparsity < 1.0:
        raise OpenTransError(f"--sparsity {sparsity}: must be a fraction strictly between 0 and 1 (e.g. 0.5)")
    if importance not in IMPORTANCES:
        raise OpenTransError(f"unknown importance '{importance}'; choose one of {', '.join(IMPORTANCES)}")
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise OpenTransError(f"--round-to {round_to}: must be a positive integer (1 = no rounding)")


@contextlib.contextmanager
def _mha_fastpath(enabled: bool) -> Iterator[None]:
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(enabled)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


def _count_macs(fn: Callable[[], object]) -> int:
    # FlopCounterMode counts 2 FLOPs per multiply-accumulate of mm/addmm/bmm/convolution/SDPA.
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops() // 2


@torch.no_grad()
def count_encoder_cost(seg: OpenVocabSegmentor) -> dict:
    """Cost of the image encoder on the dense path the segmentor runs, at ``seg.image_size``, batch 1.

    What is counted: ``gmacs`` are the multiply-accumulates of every matrix product and convolution that
    :meth:`OpenVocabSegmentor.dense_features` executes, minus its trainable head (for a ViT: patch
    embedding, all blocks but the last in full including the attention ``QK^T`` and ``AV`` products, the
    last block's MaskCLIP value path and ``proj``; for ModifiedResNet: stem, layer1-4 and the attention
    pool's ``v_proj``/``c_proj`` at every position). Element-wise work (norms, activations, softmax, bias
    adds, the positional-embedding resize) is not counted. Counted with :class:`torch.utils.flop_counter.
    FlopCounterMode` (MHA fast path disabled so its matmuls are visible) rather than
    ``torch_pruning.utils.count_ops_and_params``: the latter counts ``nn.MultiheadAttention`` through a
    module hook but cannot see the functional ops of the dense path (the last block's value projection and
    ``@ proj``), so it under-counts it (16.13 vs 16.42 GMACs for ViT-B-16 at 224x224).

    ``params_m`` are all parameters of ``seg.visual`` in millions (including ones the dense path skips,
    such as the last ViT block's MLP), i.e. what the artifact stores for the image tower.

    Returns:
        ``{"gmacs": float (10^9 MACs), "params_m": float (10^6 parameters)}``.
    """
    images = torch.zeros(1, 3, *seg.image_size)  # (1, 3, H, W)
    feats = torch.zeros(1, seg.feature_grid[0] * seg.feature_grid[1], seg.embed_dim)  # (1, h*w, D)
    was_training = seg.training
    seg.eval()  # BatchNorm in train mode would update its running statistics
    try:
        with _mha_fastpath(False):
            total = _count_macs(lambda: seg.dense_features(images))
            head = _count_macs(lambda: seg.head(feats))
    finally:
        seg.train(was_training)
    params = sum(p.numel() for p in seg.visual.parameters())
    return {"gmacs": (total - head) / 1e9, "params_m": params / 1e6}


def _native_size(visual: nn.Module) -> tuple[int, int]:
    size = visual.image_size
    return (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (int(size), int(size))


def _unwrapped_parameters(visual: nn.Module) -> list[tuple[nn.Parameter, int]]:
    """Bare ``nn.Parameter``s used in forward, with their channel dimension (see docs/pitfalls.md)."""
    if isinstance(visual, VisionTransformer):
        pairs = [(visual.proj, 0), (visual.class_embedding, 0), (visual.positional_embedding, 1)]
    else:
        pairs = [(visual.attnpool.positional_embedding, 1)]
    return [(p, dim) for p, dim in pairs if isinstance(p, nn.Parameter)]


def _dependency_graph(visual: nn.Module) -> tp.DependencyGraph:
    """Trace ``visual`` at its native input size (eval mode, gradients on, so nothing is updated)."""
    was_training = visual.training
    flags = {name: p.requires_grad for name, p in visual.named_parameters()}
    visual.eval()
    try:
        for p in visual.parameters():
            p.requires_grad_(True)
        with torch.enable_grad():
            return tp.DependencyGraph().build_dependency(
                visual,
                example_inputs=torch.zeros(1, 3, *_native_size(visual)),
                unwrapped_parameters=_unwrapped_parameters(visual),
            )
    finally:
        visual.train(was_training)
        for name, p in visual.named_parameters():
            p.requires_grad_(flags[name])


def _importance(importance: str) -> tp.importance.Importance:
    if importance == "magnitude":
        return tp.importance.MagnitudeImportance(p=1)
    return tp.importance.LAMPImportance(p=2)


def _check_scope(group, layer: _Layer, names: dict[nn.Module, str]) -> None:
    """Every real module a group touches must lie inside the layer's own block (residual stays intact)."""
    for dep, _ in group:
        for module in (dep.source.module, dep.target.module):
            name = names.get(module)
            if name is not None and not name.startswith(layer.block):
                raise OpenTransError(
                    f"pruning {layer.name} would also change {name} (outside its block); this tower is not supported"
                )


def _round_keep(keep: float, round_to: int | None, current: int) -> int:
    """Kept width: ``keep`` rounded half-up to a multiple of ``round_to`` (at least one multiple), at most
    ``current``."""
    step = round_to or 1
    return min(current, max(step, step * math.floor(keep / step + 0.5)))


@torch.no_grad()
def prune_structured(seg: OpenVocabSegmentor, sparsity: float, importance: str = "magnitude",
                     round_to: int | None = 8, *, model_name: str | None = None) -> dict:
    """Remove the lowest-importance prunable channels of ``seg.clip.visual`` in place (see module docs).

    Args:
        seg: the segmentor; its image tower is pruned in place. ``seg(images (B,3,H,W), text (C,D))`` still
            returns logits ``(B,C,H,W)`` afterwards, and ``save_segmentor``/``load_segmentor`` round-trip it.
        sparsity: target fraction in (0, 1) of the prunable channels removed, **relative to the original
            architecture** ``model_name``. Pruning composes: a model pruned to 0.25 and pruned again with 0.5
            ends at 0.5 of the original widths (not 0.625); the second call removes only the difference.
        importance: ``magnitude``: per-layer ranking by group L1 norm (``tp.importance.MagnitudeImportance
            (p=1)``: ``c_fc`` rows + ``c_proj`` columns, or conv filters + BN + next conv's input slices);
            every layer keeps the same fraction of its original width. ``lamp``: ``tp.importance.
            LAMPImportance`` scores ranked globally across all prunable layers, so widths become
            layer-adaptive and ``sparsity`` is met in total (ranked per layer, LAMP would order channels
            exactly like an L2 magnitude).
        round_to: kept widths are rounded half-up to a multiple of this (and kept >= one multiple); None or
            1: no rounding. Rounding makes the achieved sparsity differ slightly from the target.
        model_name: the open_clip architecture the segmentor was built from (``spec.model``). Sparsity is
            measured against its widths. None: the current widths count as the original ones.

    Returns:
        Report dict: ``params_m_before/after`` (M params of ``seg.visual``), ``gmacs_before/after`` (GMACs of
        the dense path at ``image_size``, see :func:`count_encoder_cost`), ``sparsity`` (achieved fraction of
        the original prunable channels removed), ``sparsity_before``, ``sparsity_target``, ``importance``,
        ``ranking``, ``round_to``, ``prunable_channels``, ``kept_channels``, ``image_size`` and ``layers``:
        ``[{"layer": module name, "original": width, "before": width, "after": width}]``.

    Raises:
        OpenTransError: invalid ``sparsity``/``importance``/``round_to`` (see :func:`validate_prune_options`);
            a ``sparsity`` below what the model is already at ("already at X% sparsity"); a segmentor that
            does not match ``model_name``; an unsupported tower.
    """
    validate_prune_options(sparsity, importance, round_to)
    visual = seg.visual
    layers = _prunable_layers(visual)
    original = original_widths(seg, model_name)
    before = prunable_widths(seg)
    already = 1.0 - sum(before.values()) / sum(original.values())
    if sparsity < already - _EPS:
        raise OpenTransError(
            f"model is already at {already:.1%} sparsity; ask for at least that much (got {sparsity:.1%})"
        )
    cost_before = count_encoder_cost(seg)

    graph = _dependency_graph(visual)
    names = {module: name for name, module in visual.named_modules()}
    scorer = _importance(importance)
    scores = {}
    for layer in layers:
        group = graph.get_pruning_group(layer.module, layer.pruning_fn, list(range(before[layer.name])))
        _check_scope(group, layer, names)
        scores[layer.name] = scorer(group).detach().cpu()  # (width,)

    if importance == "magnitude":
        keep = {k: _round_keep(original[k] * (1.0 - sparsity), round_to, before[k]) for k in before}
    else:
        target_total = round(sum(original.values()) * (1.0 - sparsity))
        n_remove = max(0, sum(before.values()) - target_total)
        concat = torch.cat([scores[k] for k in before])
        removed = torch.zeros_like(concat, dtype=torch.bool)
        removed[torch.argsort(concat, stable=True)[:n_remove]] = True
        keep, start = {}, 0
        for k, width in before.items():
            kept_raw = width - int(removed[start:start + width].sum())
            keep[k] = _round_keep(kept_raw, round_to, width)
            start += width

    for layer in layers:
        n_prune = before[layer.name] - keep[layer.name]
        if n_prune > 0:
            idxs = torch.argsort(scores[layer.name], stable=True)[:n_prune].tolist()
            graph.get_pruning_group(layer.module, layer.pruning_fn, idxs).prune()
    after = prunable_widths(seg)
    if after != keep:
        raise RuntimeError(f"torch-pruning left widths {after}, expected {keep}")

    cost_after = count_encoder_cost(seg)
    achieved = 1.0 - sum(after.values()) / sum(original.values())
    return {
        "importance": importance,
        "ranking": "per-layer" if importance == "magnitude" else "global",
        "round_to": round_to,
        "sparsity_target": float(sparsity),
        "sparsity_before": already,
        "sparsity": achieved,
        "prunable_channels": sum(original.values()),
        "kept_channels": sum(after.values()),
        "image_size": list(seg.image_size),
        "params_m_before": cost_before["params_m"],
        "params_m_after": cost_after["params_m"],
        "gmacs_before": cost_before["gmacs"],
        "gmacs_after": cost_after["gmacs"],
        "layers": [{"layer": k, "original": original[k], "before": before[k], "after": after[k]} for k in before],
    }
