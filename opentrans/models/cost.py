"""The cost of a segmentor's image encoder: multiply-accumulates of the dense path and parameters
(:func:`count_encoder_cost`), counted with :class:`torch.utils.flop_counter.FlopCounterMode`.

A property of a model, used by prune (before/after), bench (each model's GMACs) and the benchmarks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from opentrans.errors import OpenTransError
from opentrans.models.segmentor import OpenVocabSegmentor
from opentrans.models.modes import preserved_modes


@contextlib.contextmanager
def mha_fastpath(enabled: bool) -> Iterator[None]:
    """Within the block, torch's fused ``nn.MultiheadAttention`` fast path is enabled or not (restored after)."""
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(enabled)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


def _attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs (2 per multiply-accumulate) of ``softmax(Q K^T) V`` for Q (B,h,L,E), K (B,h,S,E), V (B,h,S,Ev)."""
    b, h, n_q, e = query_shape
    n_k, e_v = key_shape[-2], value_shape[-1]
    return 2 * b * h * n_q * n_k * (e + e_v)


#: Fused attention kernels that ``scaled_dot_product_attention`` (and ``nn.MultiheadAttention``) may dispatch to
#: and that :class:`FlopCounterMode` has no formula for in some torch releases (torch 2.14 runs CPU attention as
#: ``_scaled_dot_product_flash_attention_for_cpu``, which it does not count); names absent from this torch are
#: skipped.
_FUSED_ATTENTION_OPS = ("_scaled_dot_product_flash_attention_for_cpu",
                        "_scaled_dot_product_fused_attention_overrideable")


class _SeenOps(TorchDispatchMode):
    """Records the ATen operations that run under it (to find attention kernels the counter does not know)."""

    def __init__(self):
        super().__init__()
        self.ops: set = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.overloadpacket)
        return func(*args, **(kwargs or {}))


def _count_macs(fn: Callable[[], object]) -> int:
    """Multiply-accumulates of ``fn()``: matrix products, convolutions and attention, whatever kernel torch picks.

    Raises:
        OpenTransError: an attention kernel ran that no formula counts (a torch release newer than this code):
            the count would silently miss the ``QK^T`` and ``AV`` products.
    """
    aten = torch.ops.aten
    custom = {getattr(aten, n): _attention_flops for n in _FUSED_ATTENTION_OPS if hasattr(aten, n)}
    custom = {op: f for op, f in custom.items() if op not in flop_registry}
    counter = FlopCounterMode(display=False, custom_mapping=custom)  # 2 FLOPs per multiply-accumulate
    seen = _SeenOps()
    with counter, seen:
        fn()
    counted = set(flop_registry) | set(custom)
    missed = sorted(str(op) for op in seen.ops if "attention" in str(op) and op not in counted)
    if missed:
        raise OpenTransError(f"MAC count: torch {torch.__version__} ran attention kernel(s) {', '.join(missed)} that "
                             f"no FLOP formula covers; add them to opentrans.models.cost._FUSED_ATTENTION_OPS")
    return counter.get_total_flops() // 2


@torch.no_grad()
def count_encoder_cost(seg: OpenVocabSegmentor) -> dict:
    """Cost of the image encoder on the dense path the segmentor runs, at ``seg.image_size``, batch 1.

    What is counted: ``gmacs`` are the multiply-accumulates of every matrix product and convolution that
    :meth:`OpenVocabSegmentor.dense_features` executes, minus its trainable head (for a ViT: patch
    embedding, all blocks but the last in full including the attention ``QK^T`` and ``AV`` products, the
    last block's MaskCLIP value path (with its MLP in the ``maskclip`` mode) and ``proj``; for ModifiedResNet: stem, layer1-4 and the attention
    pool's ``v_proj``/``c_proj`` at every position). Element-wise work (norms, activations, softmax, bias
    adds, the positional-embedding resize) is not counted. Counted with :class:`torch.utils.flop_counter.
    FlopCounterMode` (MHA fast path disabled so its matmuls are visible; fused attention kernels that it has no
    formula for are counted analytically, and one that nothing counts raises, see :func:`_count_macs`) rather than
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
    # eval mode: BatchNorm in train mode would update its running statistics
    with preserved_modes(seg, train=False), mha_fastpath(False):
        total = _count_macs(lambda: seg.dense_features(images))
        head = _count_macs(lambda: seg.head(feats))
    params = sum(p.numel() for p in seg.visual.parameters())
    return {"gmacs": (total - head) / 1e9, "params_m": params / 1e6}
