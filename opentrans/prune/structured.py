"""Structured pruning of the CLIP image encoder, and its cost (GMACs, M params).

Three *structures* can be pruned (``structures=``, CLI ``--structures``), each measured against the original
architecture so pruning composes:

* ``channels`` (default): ViT MLP hidden channels (``mlp.c_fc`` outputs + ``mlp.c_proj`` inputs of every block);
  ModifiedResNet Bottleneck-internal channels (``conv1``/``bn1``/``conv2`` in and ``conv2``/``bn2``/``conv3`` in of
  every block of ``layer1..layer4``). Done with torch-pruning (:class:`torch_pruning.DependencyGraph`; each group
  is scored with a torch-pruning importance and removed with ``Group.prune()``).
* ``heads``: whole attention heads. ViT: the heads of every block's attention (a head = its ``head_dim`` rows of
  Q, K and V in ``in_proj_weight``/``in_proj_bias`` and its ``head_dim`` columns of ``out_proj``); ModifiedResNet:
  the heads of the attention pool (rows of ``q/k/v_proj``, columns of ``c_proj``), i.e. the pool's inner width
  pruned in whole heads. At least one head per layer is kept; ``head_dim`` never changes.
* ``width``: the residual width. ViT: ``conv1`` outputs, ``class_embedding``, ``positional_embedding``,
  ``ln_pre``, every ``ln_1``/``ln_2``/``ls_*``, attention ``in_proj`` inputs and ``out_proj`` outputs, ``mlp.c_fc``
  inputs and ``mlp.c_proj`` outputs, ``ln_post`` and the rows of ``proj``, all with one index set.
  ModifiedResNet: the residual-stream (output) channels of every stage ``layer1..layer4``, one unit set per
  stage shared by all its blocks (``conv3``/``bn3`` and ``downsample`` conv/BN outputs, ``conv1`` inputs of the
  later blocks), together with the stage's consumers: the next stage's first block (``conv1`` and ``downsample``
  conv inputs), and for ``layer4`` the attention pool (``positional_embedding`` columns, ``q/k/v_proj`` inputs).
  Kept indices are recorded per stage (``{"layer1": [...], ..., "layer4": [...]}``); older files that name only
  ``layer4`` still apply (the other stages stay whole).

Heads and width are pruned by a consistent ``index_select`` of every tensor listed above (torch-pruning cannot
head-prune open_clip's fused ``nn.MultiheadAttention``, see docs/pitfalls.md). Because the attention's inner
width then differs from the residual width, every attention module is first swapped for
:class:`~opentrans.models.attention.PrunedMultiheadAttention` / :class:`~opentrans.models.attention.
PrunedAttentionPool2d` (same parameter names, same function up to float rounding); ``model.json`` records them
(``modules``) so :func:`~opentrans.models.artifact.load_segmentor` rebuilds them.

How many units each layer keeps is decided here rather than by ``BasePruner.step``, because (a) ``BasePruner``'s
``round_to`` rounds the kept width *down* (a width-8 layer at ratio 0.5 with ``round_to=8`` would keep 0
channels) and (b) its ratio is relative to the widths at construction, whereas here sparsity is relative to the
original architecture so pruning composes.

Importance (``importance=``): ``magnitude`` (L1), ``lamp`` (Lee et al., "Layer-adaptive Sparsity for the
Magnitude-based Pruning", ICLR 2021, arXiv:2010.07611; squared L2 normalised by the larger scores of its layer)
and ``taylor`` (:func:`taylor_scores`: a first-order Taylor / Gauss-Newton estimate of the distillation loss
increase, Molchanov et al., "Importance Estimation for Neural Network Pruning", CVPR 2019, arXiv:1906.10771).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch_pruning as tp
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import VisionTransformer
from torch import nn

from opentrans.errors import OpenTransError
from opentrans.models.attention import PrunedMultiheadAttention, convert_attention
from opentrans.models.clip import create_architecture
from opentrans.models.cost import count_encoder_cost, mha_fastpath  # noqa: F401 (count_encoder_cost re-exported)
from opentrans.models.segmentor import OpenVocabSegmentor
from opentrans.prune.importances import IMPORTANCES
from opentrans.prune.options import RANKINGS, STRUCTURES, check_structured, parse_structures  # noqa: F401
from opentrans.models.modes import preserved_modes

#: The structured options' check, under its earlier name.
validate_prune_options = check_structured
_EPS = 1e-9


@dataclass(frozen=True)
class _Layer:
    """One prunable layer: its output channels are removed together with their dependants."""

    name: str  # module name inside the image tower, e.g. transformer.resblocks.3.mlp.c_fc
    block: str  # name prefix of the block that must contain every pruned module, e.g. transformer.resblocks.3.
    module: nn.Module
    pruning_fn: Callable
    consumer: tuple[nn.Module, str, int]  # (module, parameter, dim): zeroing this slice removes a channel exactly


def _width(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def _prunable_layers(visual: nn.Module) -> list[_Layer]:
    """The prunable layers of an image tower, in forward order."""
    layers = []
    if isinstance(visual, VisionTransformer):
        for i, block in enumerate(visual.transformer.resblocks):
            prefix = f"transformer.resblocks.{i}."
            layers.append(_Layer(prefix + "mlp.c_fc", prefix, block.mlp.c_fc, tp.prune_linear_out_channels,
                                 (block.mlp.c_proj, "weight", 1)))
    elif isinstance(visual, ModifiedResNet):
        for stage in ("layer1", "layer2", "layer3", "layer4"):
            for j, block in enumerate(getattr(visual, stage)):
                prefix = f"{stage}.{j}."
                for conv, nxt in (("conv1", "conv2"), ("conv2", "conv3")):
                    layers.append(_Layer(prefix + conv, prefix, getattr(block, conv), tp.prune_conv_out_channels,
                                         (getattr(block, nxt), "weight", 1)))
    else:
        raise OpenTransError(f"cannot prune image tower {type(visual).__name__}; supported: ViT, ModifiedResNet")
    return layers


def prunable_widths(seg: OpenVocabSegmentor) -> dict[str, int]:
    """Current width (channels) of every prunable layer of ``seg.visual``, keyed by module name, in order.

    Raises:
        OpenTransError: an image tower other than ViT or ModifiedResNet.
    """
    return {layer.name: _width(layer.module) for layer in _prunable_layers(seg.visual)}


def _native_size(visual: nn.Module) -> tuple[int, int]:
    size = visual.image_size
    return (int(size[0]), int(size[1])) if isinstance(size, (tuple, list)) else (int(size), int(size))


def _unwrapped_parameters(visual: nn.Module) -> list[tuple[nn.Parameter, int]]:
    """Bare ``nn.Parameter``s used in forward, with their channel dimension (see docs/pitfalls.md)."""
    if isinstance(visual, VisionTransformer):
        pairs = [(visual.proj, 0), (visual.class_embedding, 0), (visual.positional_embedding, 1)]
        for block in visual.transformer.resblocks:  # PrunedMultiheadAttention's bare Q/K/V parameters
            if isinstance(block.attn, PrunedMultiheadAttention):
                pairs += [(block.attn.in_proj_weight, 0), (block.attn.in_proj_bias, 0)]
    else:
        pairs = [(visual.attnpool.positional_embedding, 1)]
    return [(p, dim) for p, dim in pairs if isinstance(p, nn.Parameter)]


def _dependency_graph(visual: nn.Module) -> tp.DependencyGraph:
    """Trace ``visual`` at its native input size (eval mode, gradients on, so nothing is updated)."""
    with preserved_modes(visual, train=False, requires_grad=True), torch.enable_grad():
        return tp.DependencyGraph().build_dependency(
            visual,
            example_inputs=torch.zeros(1, 3, *_native_size(visual)),
            unwrapped_parameters=_unwrapped_parameters(visual),
        )


def group_norm_scores(visual: nn.Module, structures: tuple[str, ...], channel_importance, p: int
                      ) -> dict[str, dict[str, torch.Tensor]]:
    """Group-norm importance of every unit of ``structures`` of the image tower ``visual`` (nothing changed):
    channels scored by the torch-pruning ``channel_importance`` over each layer's dependency group, heads and
    width by :func:`_magnitude_units` with norm ``p`` (1: L1, 2: squared L2).

    Returns:
        ``{structure: {layer name: scores (units,)}}`` (float32, >= 0).

    Raises:
        OpenTransError: a channel group that reaches outside its block (unsupported tower).
    """
    scores: dict[str, dict[str, torch.Tensor]] = {}
    if "channels" in structures:
        graph = _dependency_graph(visual)
        names = {module: name for name, module in visual.named_modules()}
        scores["channels"] = {}
        for layer in _prunable_layers(visual):
            group = graph.get_pruning_group(layer.module, layer.pruning_fn, list(range(_width(layer.module))))
            _check_scope(group, layer, names)
            scores["channels"][layer.name] = channel_importance(group).detach().cpu().float()  # (width,)
    for structure in ("heads", "width"):
        if structure in structures:
            scores[structure] = {us.name: _magnitude_units(us, p) for us in _unit_sets(visual, structure)}
    return scores


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




# ----------------------------------------------------------------------------------------------------------------
# Heads and residual width: unit sets pruned by a consistent index_select.


@dataclass(frozen=True)
class _Slice:
    """The part of ``owner.<attr>`` (a parameter or buffer) that belongs to each unit along ``dim``.

    Along ``dim`` the tensor holds ``groups`` consecutive segments (3 for fused Q/K/V rows), each made of
    ``units`` equal blocks (``head_dim`` rows per head, 1 per channel); unit ``u`` owns block ``u`` of every
    segment. ``consumer``: zeroing just this slice removes the unit's contribution exactly.
    """

    owner: nn.Module
    attr: str
    dim: int
    groups: int = 1
    consumer: bool = False

    def tensor(self) -> torch.Tensor:
        return getattr(self.owner, self.attr)

    def per_unit(self, values: torch.Tensor, units: int) -> torch.Tensor:
        """Sum of ``values`` (shaped like the tensor) over each unit's entries -> ``(units,)``."""
        return values.movedim(self.dim, 0).reshape(self.groups, units, -1).sum(dim=(0, 2))

    def element_index(self, keep: torch.Tensor, units: int) -> torch.Tensor:
        """Indices along ``dim`` of the entries of the kept units (in order)."""
        size = self.tensor().shape[self.dim]
        block = size // (self.groups * units)
        within = torch.arange(block)
        return torch.cat([g * units * block + u * block + within for g in range(self.groups) for u in keep.tolist()])


@dataclass(frozen=True)
class _UnitSet:
    """One prunable layer of a head/width structure: ``count`` units sharing the slices ``slices``."""

    structure: str  # "heads" or "width"
    name: str  # e.g. transformer.resblocks.3.attn, attnpool, width, layer4
    count: int
    slices: tuple[_Slice, ...]
    resize: Callable[[int], None]  # updates size attributes (num_heads, embed_dim, ...) after pruning


def _norm_slices(module: nn.Module | None) -> list[_Slice]:
    if module is None:
        return []
    return [_Slice(module, a, 0) for a in ("weight", "bias", "gamma", "running_mean", "running_var")
            if isinstance(getattr(module, a, None), torch.Tensor)]


def _head_sets(visual: nn.Module) -> list[_UnitSet]:
    sets = []
    if isinstance(visual, VisionTransformer):
        for i, block in enumerate(visual.transformer.resblocks):
            attn = block.attn
            slices = [_Slice(attn, "in_proj_weight", 0, 3)]
            if attn.in_proj_bias is not None:
                slices.append(_Slice(attn, "in_proj_bias", 0, 3))
            slices.append(_Slice(attn.out_proj, "weight", 1, consumer=True))

            def resize(n, attn=attn):
                attn.num_heads = n
                attn.out_proj.in_features = attn.out_proj.weight.shape[1]
            sets.append(_UnitSet("heads", f"transformer.resblocks.{i}.attn", attn.num_heads, tuple(slices), resize))
    elif isinstance(visual, ModifiedResNet):
        pool = visual.attnpool
        slices = [_Slice(getattr(pool, f"{x}_proj"), a, 0) for x in "qkv" for a in ("weight", "bias")]
        slices.append(_Slice(pool.c_proj, "weight", 1, consumer=True))

        def resize(n, pool=pool):
            pool.num_heads = n
            for lin in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
                lin.out_features, lin.in_features = lin.weight.shape
        sets.append(_UnitSet("heads", "attnpool", pool.num_heads, tuple(slices), resize))
    return sets


def _linear_resize(*modules: nn.Module) -> None:
    for m in modules:
        if isinstance(m, nn.Linear):
            m.out_features, m.in_features = m.weight.shape
        elif isinstance(m, nn.Conv2d):
            m.out_channels, m.in_channels = m.weight.shape[0], m.weight.shape[1] * m.groups
        elif isinstance(m, nn.LayerNorm) and m.weight is not None:
            m.normalized_shape = tuple(m.weight.shape)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.num_features = m.weight.shape[0]
        elif isinstance(m, PrunedMultiheadAttention):
            m.embed_dim = m.in_proj_weight.shape[1]


def _width_set(visual: nn.Module) -> _UnitSet:
    if isinstance(visual, VisionTransformer):
        touched = [visual.conv1, visual.ln_pre, visual.ln_post]
        slices = [_Slice(visual.conv1, "weight", 0)]
        if visual.conv1.bias is not None:
            slices.append(_Slice(visual.conv1, "bias", 0))
        slices += [_Slice(visual, "class_embedding", 0), _Slice(visual, "positional_embedding", 1)]
        slices += _norm_slices(visual.ln_pre)
        for block in visual.transformer.resblocks:
            attn, mlp = block.attn, block.mlp
            slices += _norm_slices(block.ln_1) + _norm_slices(block.ln_2)
            slices += [_Slice(attn, "in_proj_weight", 1), _Slice(attn.out_proj, "weight", 0),
                       _Slice(mlp.c_fc, "weight", 1), _Slice(mlp.c_proj, "weight", 0)]
            slices += [_Slice(m, "bias", 0) for m in (attn.out_proj, mlp.c_proj) if m.bias is not None]
            for ls in (block.ls_1, block.ls_2):
                if hasattr(ls, "gamma"):
                    slices.append(_Slice(ls, "gamma", 0))
            touched += [block.ln_1, block.ln_2, attn, attn.out_proj, mlp.c_fc, mlp.c_proj]
        slices += _norm_slices(visual.ln_post)
        if isinstance(visual.proj, torch.Tensor):
            slices.append(_Slice(visual, "proj", 0))
        return _UnitSet("width", "width", visual.conv1.out_channels, tuple(slices), lambda n: _linear_resize(*touched))
    raise OpenTransError(f"cannot prune the width of {type(visual).__name__}")


#: The residual stages of a ModifiedResNet, each one ``width`` unit set (its output channels).
RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")


def _resnet_stage_set(visual: ModifiedResNet, k: int) -> _UnitSet:
    """The residual-stream (output) channels of stage ``RESNET_STAGES[k]``: ``conv3``/``bn3`` outputs of every
    block and ``downsample`` conv/BN outputs, ``conv1`` (and any ``downsample``) inputs of its later blocks, and
    the consumers of the stage: the next stage's first block (``conv1`` and ``downsample`` conv inputs), or for
    ``layer4`` the attention pool (``positional_embedding`` columns, ``q/k/v_proj`` inputs)."""
    name = RESNET_STAGES[k]
    blocks = list(getattr(visual, name))
    slices, touched = [], []
    for j, block in enumerate(blocks):
        slices.append(_Slice(block.conv3, "weight", 0))
        slices += _norm_slices(block.bn3)
        touched += [block.conv3, block.bn3]
        if block.downsample is not None:
            slices.append(_Slice(block.downsample[1], "weight", 0))
            slices += _norm_slices(block.downsample[2])
            touched += [block.downsample[1], block.downsample[2]]
        if j > 0:
            slices.append(_Slice(block.conv1, "weight", 1))
            touched.append(block.conv1)
            if block.downsample is not None:
                slices.append(_Slice(block.downsample[1], "weight", 1))
    if k + 1 < len(RESNET_STAGES):
        nxt = getattr(visual, RESNET_STAGES[k + 1])[0]
        slices.append(_Slice(nxt.conv1, "weight", 1))
        touched.append(nxt.conv1)
        if nxt.downsample is not None:
            slices.append(_Slice(nxt.downsample[1], "weight", 1))
            touched.append(nxt.downsample[1])
        else:
            raise OpenTransError(f"{RESNET_STAGES[k + 1]}.0 has no downsample: cannot prune the width of {name}")
    else:
        pool = visual.attnpool
        slices.append(_Slice(pool, "positional_embedding", 1))
        slices += [_Slice(getattr(pool, f"{x}_proj"), "weight", 1) for x in "qkv"]
        touched += [pool.q_proj, pool.k_proj, pool.v_proj]
    return _UnitSet("width", name, blocks[-1].conv3.out_channels, tuple(slices), lambda n: _linear_resize(*touched))


def _width_sets(visual: nn.Module) -> list[_UnitSet]:
    """The ``width`` unit sets: one for a ViT (``width``), one per residual stage for ModifiedResNet
    (``layer1..layer4``)."""
    if isinstance(visual, ModifiedResNet):
        return [_resnet_stage_set(visual, k) for k in range(len(RESNET_STAGES))]
    return [_width_set(visual)]


def _unit_sets(visual: nn.Module, structure: str) -> list[_UnitSet]:
    return _head_sets(visual) if structure == "heads" else _width_sets(visual)


def _select_(s: _Slice, idx: torch.Tensor) -> None:
    old = s.tensor()
    new = old.detach().index_select(s.dim, idx).clone()
    if isinstance(old, nn.Parameter):
        s.owner._parameters[s.attr] = nn.Parameter(new, requires_grad=old.requires_grad)
    else:
        s.owner._buffers[s.attr] = new


def _prune_units(unit_set: _UnitSet, keep: list[int]) -> None:
    """Keep only the units ``keep`` (indices into the current units, any order) of ``unit_set``."""
    idx = torch.tensor(sorted(keep), dtype=torch.long)
    if len(idx) == unit_set.count:
        return
    if len(idx) == 0 or int(idx[0]) < 0 or int(idx[-1]) >= unit_set.count or len(set(keep)) != len(keep):
        raise OpenTransError(f"{unit_set.name}: invalid kept indices for {unit_set.count} {unit_set.structure} units")
    done = set()
    for s in unit_set.slices:
        key = (id(s.owner), s.attr, s.dim)  # a tensor listed twice (e.g. downsample in/out) along different dims
        if key in done:
            continue
        done.add(key)
        _select_(s, s.element_index(idx, unit_set.count))
    unit_set.resize(len(idx))


def _magnitude_units(unit_set: _UnitSet, p: int) -> torch.Tensor:
    """Per-unit group magnitude ``(count,)``: for each parameter slice the unit's L1 norm (``p=1``) or squared
    L2 norm (``p=2``), divided by that tensor's mean over units (so norms, embeddings and weights of different
    scales weigh alike), summed over the slices."""
    total = torch.zeros(unit_set.count)
    for s in unit_set.slices:
        t = s.tensor()
        if not isinstance(t, nn.Parameter):
            continue  # running statistics carry no importance
        vals = s.per_unit(t.detach().abs() if p == 1 else t.detach() ** 2, unit_set.count).float()
        total += vals / vals.mean().clamp_min(_EPS)
    return total


# ----------------------------------------------------------------------------------------------------------------
# Taylor importance.

#: Random output projections per calibration batch for :func:`taylor_scores`.
TAYLOR_PROBES = 8


def taylor_scores(seg: OpenVocabSegmentor, images: torch.Tensor, structures: tuple[str, ...],
                  probes: int = TAYLOR_PROBES, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """Taylor importance of every prunable unit: the expected increase of the distillation loss against the
    unpruned model (the teacher) when the unit is removed.

    Why not plain first-order Taylor (Molchanov et al., CVPR 2019, arXiv:1906.10771: ``|g . w|``) on the
    distillation loss: at the unpruned point the student *is* the teacher, the loss is at its minimum (0) and its
    gradient is exactly zero, so every score would be 0. The first non-vanishing term is the second-order one.
    For the squared-error form of the distillation objective
    ``L(w + d) = 1/2 ||f(w + d) - f(w)||^2 ~= 1/2 ||J d||^2`` (``J`` the Jacobian of the outputs ``f`` w.r.t. the
    weights; Gauss-Newton = exact Hessian at a zero-residual minimum, as in Optimal Brain Surgeon). Removing a
    unit is the perturbation ``d = -w`` on its parameter slice, so its score is ``||J w_unit||^2``. That norm is
    estimated with Hutchinson-style random output projections: for ``v ~ N(0, I)``, ``E[(v^T J d)^2] =
    ||J d||^2`` and ``v^T J d = grad_w(v^T f) . d``. So each probe is one backward pass of a random projection of
    the outputs, and the score is ``mean_probes (sum_unit g_v * w)^2``: a first-order Taylor term of the
    projected outputs, squared and averaged, exactly Molchanov's squared Taylor criterion applied to ``v^T f``.

    The outputs ``f`` are what :mod:`opentrans.prune.distill` distils: the dense features ``(B, h*w, D)`` and the
    pooled embedding ``(B, D)`` (each scaled by ``1/sqrt(numel)``, as the mean in the loss). For channels and
    heads the sum runs over the *consumer* slice (``c_proj``/next conv input columns, ``out_proj``/``c_proj``
    columns), whose zeroing removes the unit exactly; for the residual width over every slice of the channel
    (an approximation: LayerNorm statistics also change). Scores are in the loss's units, so they are comparable
    across layers (global ranking needs no normalisation).

    Args:
        seg: the segmentor (its image tower is scored; nothing is changed, gradients are cleared afterwards).
        images: calibration images ``(B, 3, H, W)`` at ``seg.image_size`` (any unlabeled images).
        structures: which structures to score (see :data:`STRUCTURES`).
        probes: random projections (backward passes); seed: their RNG seed.

    Returns:
        ``{structure: {layer name: scores (units,)}}`` (float32, >= 0).
    """
    from opentrans.prune.distill import distill_outputs

    visual = seg.visual
    targets: dict[str, dict[str, list[tuple[_Slice, int]]]] = {}
    for structure in structures:
        targets[structure] = {}
        if structure == "channels":
            for layer in _prunable_layers(visual):
                module, attr, dim = layer.consumer
                targets[structure][layer.name] = [(_Slice(module, attr, dim), _width(layer.module))]
        else:
            for us in _unit_sets(visual, structure):
                consumers = [s for s in us.slices if s.consumer]
                chosen = consumers or [s for s in us.slices if isinstance(s.tensor(), nn.Parameter)]
                targets[structure][us.name] = [(s, us.count) for s in chosen]
    gen = torch.Generator().manual_seed(seed)
    scores = {st: {name: torch.zeros(pairs[0][1]) for name, pairs in layers.items()} for st, layers in targets.items()}
    params = {id(s.tensor()): s.tensor() for layers in targets.values() for pairs in layers.values() for s, _ in pairs}
    with preserved_modes(seg, train=False, requires_grad=False):
        for p in visual.parameters():
            p.requires_grad_(True)
        with torch.enable_grad(), mha_fastpath(False):
            dense, pooled = distill_outputs(seg, images)
            for k in range(probes):
                v_d = torch.randn(dense.shape, generator=gen)
                v_p = torch.randn(pooled.shape, generator=gen)
                proj = (v_d * dense).sum() / dense.numel() ** 0.5 + (v_p * pooled).sum() / pooled.numel() ** 0.5
                grads = torch.autograd.grad(proj, list(params.values()), retain_graph=k < probes - 1, allow_unused=True)
                grad_of = {key: g for key, g in zip(params, grads)}
                for st, layers in targets.items():
                    for name, pairs in layers.items():
                        contrib = torch.zeros(pairs[0][1])
                        for s, units in pairs:
                            g = grad_of[id(s.tensor())]
                            if g is not None:
                                contrib += s.per_unit((g * s.tensor()).detach(), units).float()
                        scores[st][name] += contrib ** 2 / probes
    return scores


# ----------------------------------------------------------------------------------------------------------------
# Original sizes, kept counts, and the pruning itself.


def structure_sizes(seg: OpenVocabSegmentor, structure: str) -> dict[str, int]:
    """Current units per layer of ``structure``: channels (see :func:`prunable_widths`), heads per attention,
    or the residual width (``{"width": W}`` for a ViT, ``{"layer1": C1, ..., "layer4": C4}`` for ModifiedResNet)."""
    if structure == "channels":
        return prunable_widths(seg)
    if structure == "heads":
        return {us.name: us.count for us in _head_sets(seg.visual)}
    return {us.name: us.count for us in _width_sets(seg.visual)}


@functools.lru_cache(maxsize=8)
def _architecture_sizes(model_name: str) -> dict[str, tuple[tuple[str, int], ...]]:
    visual = create_architecture(model_name).visual
    return {"channels": tuple((layer.name, _width(layer.module)) for layer in _prunable_layers(visual)),
            "heads": tuple((us.name, us.count) for us in _head_sets(visual)),
            "width": tuple((us.name, us.count) for us in _width_sets(visual))}


def original_sizes(seg: OpenVocabSegmentor, model_name: str | None, structure: str) -> dict[str, int]:
    """Units per layer of ``structure`` in the unpruned architecture ``model_name`` (None: the current sizes).

    Raises:
        OpenTransError: a segmentor that was not built from ``model_name``.
    """
    current = structure_sizes(seg, structure)
    if model_name is None:
        return current
    original = dict(_architecture_sizes(model_name)[structure])
    if list(original) != list(current) or any(current[k] > original[k] for k in current):
        raise OpenTransError(f"this segmentor's image tower was not built from {model_name}: its layers do not match")
    return original


def structure_sparsity(seg: OpenVocabSegmentor, model_name: str | None, structure: str) -> float:
    """Fraction in [0, 1) of the units of ``structure`` already removed relative to ``model_name``."""
    original = original_sizes(seg, model_name, structure)
    return 1.0 - sum(structure_sizes(seg, structure).values()) / sum(original.values())


def check_targets(seg: OpenVocabSegmentor, model_name: str | None, targets: dict[str, float]) -> dict[str, float]:
    """Check that no target is below the model's current sparsity of that structure; returns the current ones.

    Raises:
        OpenTransError: "already at X% ..." for a target below what the model already has.
    """
    already = {}
    for structure, target in targets.items():
        already[structure] = structure_sparsity(seg, model_name, structure)
        if target < already[structure] - _EPS:
            what = "sparsity" if structure == "channels" else f"{structure} sparsity"
            raise OpenTransError(f"model is already at {already[structure]:.1%} {what}; ask for at least that much "
                                 f"(got {target:.1%})")
    return already


def _keep_counts(structure: str, scores: dict[str, torch.Tensor], original: dict[str, int], before: dict[str, int],
                 sparsity: float, ranking: str, importance: str, round_to: int | None) -> dict[str, int]:
    """How many units each layer keeps (see :func:`prune_structured`)."""
    step = None if structure == "heads" else round_to  # heads are whole units: no hardware rounding
    floor = 1
    if ranking == "per-layer" or len(before) == 1:
        return {k: max(floor, _round_keep(original[k] * (1.0 - sparsity), step, before[k])) for k in before}
    normalise = IMPORTANCES.get(importance).normalise
    if structure != "channels" and normalise is not None:  # channels arrive already normalised by torch-pruning
        scores = {k: normalise(v) for k, v in scores.items()}
    target_total = round(sum(original.values()) * (1.0 - sparsity))
    n_remove = max(0, sum(before.values()) - target_total)
    concat = torch.cat([scores[k] for k in before])
    if not step:  # every layer keeps its best unit: rank the others, so the floor does not overshoot the target
        concat = concat.clone()
        start = 0
        for k, width in before.items():
            concat[start + int(torch.argmax(scores[k]))] = float("inf")
            start += width
    removed = torch.zeros_like(concat, dtype=torch.bool)
    removed[torch.argsort(concat, stable=True)[:n_remove]] = True
    keep, start = {}, 0
    for k, width in before.items():
        kept_raw = width - int(removed[start:start + width].sum())
        keep[k] = max(floor, _round_keep(kept_raw, step, width)) if step else max(floor, kept_raw)
        start += width
    return keep


def _needs_conversion(structures) -> bool:
    return any(s in structures for s in ("heads", "width"))


def apply_kept_indices(seg: OpenVocabSegmentor, kept: dict[str, dict[str, list[int]]]) -> None:
    """Prune ``seg.visual`` in place so that each layer keeps exactly the units ``kept[structure][layer]``
    (indices into the layer's *current* units; the survivors keep their order).

    Raises:
        OpenTransError: an unknown structure or layer, or invalid indices.
    """
    check_kept_indices(seg, kept)  # validate everything before changing anything
    visual = seg.visual
    if _needs_conversion(kept):
        convert_attention(visual)
    for structure in STRUCTURES:
        if structure not in kept:
            continue
        layers = kept[structure]
        if structure == "channels":
            by_name = {layer.name: layer for layer in _prunable_layers(visual)}
            graph = None
            for name, idxs in layers.items():
                layer = by_name[name]
                removed = sorted(set(range(_width(layer.module))) - set(idxs))
                if removed:
                    graph = graph or _dependency_graph(visual)
                    graph.get_pruning_group(layer.module, layer.pruning_fn, removed).prune()
        else:
            sets = {us.name: us for us in _unit_sets(visual, structure)}
            for name, idxs in layers.items():
                _prune_units(sets[name], list(idxs))


def check_kept_indices(seg: OpenVocabSegmentor, kept: dict[str, dict[str, list[int]]]) -> None:
    """Check that ``kept`` (``{structure: {layer: kept indices}}``) fits ``seg`` as it is now.

    Raises:
        OpenTransError: an unknown structure or layer, or indices that are empty, repeated or out of range.
    """
    for structure, layers in kept.items():
        if structure not in STRUCTURES:
            raise OpenTransError(f"unknown structure '{structure}' in kept indices")
        sizes = structure_sizes(seg, structure)
        for name, idxs in layers.items():
            if name not in sizes:
                raise OpenTransError(f"kept indices name {structure} layer '{name}', which this model does not have")
            if not idxs or len(set(idxs)) != len(idxs) or min(idxs) < 0 or max(idxs) >= sizes[name]:
                raise OpenTransError(f"{name}: invalid kept indices for {sizes[name]} {structure} units")


def compose_kept(previous: dict[str, dict[str, list[int]]] | None, relative: dict[str, dict[str, list[int]]],
                 original: dict[str, dict[str, int]]) -> dict[str, dict[str, list[int]]]:
    """Kept indices relative to the original architecture after pruning again: ``previous`` (relative to the
    original, or None for an unpruned input) composed with ``relative`` (relative to the pruned input). Layers a
    structure never touched keep ``range(original)``."""
    out = {}
    for structure in STRUCTURES:
        prev = (previous or {}).get(structure)
        rel = relative.get(structure)
        if prev is None and rel is None:
            continue
        out[structure] = {}
        for name, width in original.get(structure, {}).items():
            base = list(prev[name]) if prev and name in prev else list(range(width))
            out[structure][name] = [base[i] for i in rel[name]] if rel and name in rel else base
    return out


@torch.no_grad()
def prune_structured(seg: OpenVocabSegmentor, sparsity: float, importance: str = "magnitude",
                     round_to: int | None = 8, *, model_name: str | None = None,
                     structures: str | tuple[str, ...] = ("channels",), head_sparsity: float | None = None,
                     width_sparsity: float | None = None, ranking: str | None = None,
                     calibration: torch.Tensor | None = None, taylor_probes: int = TAYLOR_PROBES,
                     seed: int = 0) -> dict:
    """Remove the lowest-importance units of the selected structures of ``seg.clip.visual`` in place (see the
    module docs for what each structure is).

    Args:
        seg: the segmentor; its image tower is pruned in place. ``seg(images (B,3,H,W), text (C,D))`` still
            returns logits ``(B,C,H,W)`` afterwards, and ``save_segmentor``/``load_segmentor`` round-trip it.
        sparsity: target fraction in (0, 1) of the prunable channels removed, **relative to the original
            architecture** ``model_name``; also the default target of ``heads`` and ``width``. Pruning composes:
            a model pruned to 0.25 and pruned again with 0.5 ends at 0.5 of the original widths (not 0.625); the
            second call removes only the difference.
        importance: a name registered in :data:`~opentrans.prune.importances.IMPORTANCES` (one file each in
            ``opentrans/prune/importances/``): ``magnitude``: group L1 norm (channels:
            ``tp.importance.MagnitudeImportance(p=1)``, ``c_fc`` rows + ``c_proj`` columns, or conv filters + BN +
            next conv's input slices; heads/width: see :func:`_magnitude_units`). ``lamp``: squared L2 group norms
            with LAMP normalisation (``tp.importance.LAMPImportance`` for channels). ``taylor``:
            :func:`taylor_scores` on ``calibration``.
        round_to: kept channel and width counts are rounded half-up to a multiple of this (and kept >= one
            multiple); None or 1: no rounding. Heads are never rounded (>= 1 head per layer is kept).
        model_name: the open_clip architecture the segmentor was built from (``spec.model``). Sparsity is
            measured against its sizes. None: the current sizes count as the original ones.
        structures: ``"channels,heads,width"`` or a sequence of those names (:data:`STRUCTURES`).
        head_sparsity, width_sparsity: targets for ``heads`` and ``width`` (default: ``sparsity``).
        ranking: ``per-layer`` (every layer keeps the same fraction of its original size) or ``global`` (one
            ranking over all layers of a structure, so sizes become layer-adaptive and the target is met in
            total). Default: ``per-layer`` for ``magnitude``, ``global`` for ``lamp`` and ``taylor``.
        calibration: images ``(B, 3, H, W)`` at ``seg.image_size``; required by ``taylor``.
        taylor_probes, seed: random projections of :func:`taylor_scores` and their seed.

    Returns:
        Report dict: ``params_m_before/after`` (M params of ``seg.visual``), ``gmacs_before/after`` (GMACs of
        the dense path at ``image_size``, see :func:`count_encoder_cost`), ``macs_reduction`` (fraction of MACs
        removed), ``sparsity`` (achieved fraction of the original units of the first selected structure removed;
        for ``channels`` that of the prunable channels), ``sparsity_before``, ``sparsity_target``, ``structures``
        (``{structure: {"target", "before", "achieved", "original", "kept"}}``), ``importance``, ``ranking``,
        ``round_to``, ``prunable_channels``, ``kept_channels``, ``image_size``, ``layers``:
        ``[{"structure", "layer", "original", "before", "after"}]`` and ``kept_indices``:
        ``{structure: {layer: [kept indices into the layer's units before this call]}}``.

    Raises:
        OpenTransError: invalid options (see :func:`validate_prune_options`); ``taylor`` without calibration
            images; a target below what the model is already at ("already at X% sparsity"); a segmentor that
            does not match ``model_name``; an unsupported tower. All checked before the model is changed.
    """
    structures = validate_prune_options(sparsity, importance, round_to, structures, head_sparsity, width_sparsity,
                                        ranking)
    criterion = IMPORTANCES.get(importance)
    ranking = ranking or criterion.default_ranking
    if criterion.needs_calibration and calibration is None:
        raise OpenTransError(f"--importance {importance} needs calibration images (--distill-data)")
    visual = seg.visual
    _prunable_layers(visual)  # raises for an unsupported tower
    targets = {"channels": sparsity, "heads": head_sparsity or sparsity, "width": width_sparsity or sparsity}
    targets = {s: float(targets[s]) for s in structures}
    original = {s: original_sizes(seg, model_name, s) for s in structures}
    before = {s: structure_sizes(seg, s) for s in structures}
    already = check_targets(seg, model_name, targets)
    cost_before = count_encoder_cost(seg)
    if _needs_conversion(structures):
        convert_attention(visual)

    # Score every unit of every structure on the model as it is now (indices stay valid across structures).
    scores = criterion.score(seg, structures, calibration, taylor_probes, seed)

    kept_indices = {s: _lowest_removed(scores[s], before[s], _keep_counts(
        s, scores[s], original[s], before[s], targets[s], ranking, importance, round_to)) for s in structures}
    apply_kept_indices(seg, kept_indices)
    after = {s: structure_sizes(seg, s) for s in structures}
    for s in structures:
        expected = {k: len(v) for k, v in kept_indices[s].items()}
        if after[s] != expected:
            raise RuntimeError(f"{s}: pruning left sizes {after[s]}, expected {expected}")
    report = {"importance": importance, "ranking": ranking, "round_to": round_to}
    report |= _structured_summary(seg, model_name, targets, already, original, before, after)
    layers = [{"structure": s, "layer": k, "original": original[s][k], "before": before[s][k], "after": after[s][k]}
              for s in structures for k in before[s]]
    return {**report, **_cost_change(cost_before, count_encoder_cost(seg)), "layers": layers,
            "kept_indices": kept_indices}


def _lowest_removed(scores: dict[str, torch.Tensor], before: dict[str, int], keep: dict[str, int]
                    ) -> dict[str, list[int]]:
    """Per layer, the indices kept when its ``before - keep`` lowest-scored units go (ties: the first index goes
    first), in order."""
    kept = {}
    for name, width in before.items():
        removed = set(torch.argsort(scores[name], stable=True)[:width - keep[name]].tolist())
        kept[name] = [i for i in range(width) if i not in removed]
    return kept


def _structured_summary(seg: OpenVocabSegmentor, model_name: str | None, targets: dict[str, float],
                        already: dict[str, float], original: dict, before: dict, after: dict) -> dict:
    """The report's sparsity part: per structure target/before/achieved, the first structure's figures, the
    prunable channels and the per-layer rows."""
    structures = tuple(targets)
    summary = {s: {"target": targets[s], "before": already[s],
                   "achieved": 1.0 - sum(after[s].values()) / sum(original[s].values()),
                   "original": sum(original[s].values()), "kept": sum(after[s].values())} for s in structures}
    first = structures[0]
    ch_orig = original_sizes(seg, model_name, "channels") if "channels" not in structures else original["channels"]
    return {
        "structures": summary,
        "sparsity_target": targets[first],
        "sparsity_before": already[first],
        "sparsity": summary[first]["achieved"],
        "prunable_channels": sum(ch_orig.values()),
        "kept_channels": sum(prunable_widths(seg).values()),
        "image_size": list(seg.image_size),
    }


def _cost_change(cost_before: dict, cost_after: dict) -> dict:
    """The report's cost part: params (M) and GMACs before/after and the fraction of MACs removed."""
    return {
        "params_m_before": cost_before["params_m"],
        "params_m_after": cost_after["params_m"],
        "gmacs_before": cost_before["gmacs"],
        "gmacs_after": cost_after["gmacs"],
        "macs_reduction": 1.0 - cost_after["gmacs"] / cost_before["gmacs"] if cost_before["gmacs"] else 0.0,
    }
