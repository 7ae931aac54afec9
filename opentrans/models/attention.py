"""Attention modules whose inner width may differ from the residual width (head- and width-pruned towers).

open_clip builds ViT blocks with :class:`torch.nn.MultiheadAttention` (``batch_first=True``) and ModifiedResNet's
pool with :class:`open_clip.modified_resnet.AttentionPool2d`; both require the attention's inner width
(``heads * head_dim``) to equal the model width, so neither can lose whole heads or residual channels. The two
modules here are drop-in replacements with the **same attribute and parameter names** (so state dicts, open_clip's
``ResidualAttentionBlock``, :mod:`opentrans.models.dense` and IMP's targets keep working) but an independent inner
width ``inner = num_heads * head_dim``:

* :class:`PrunedMultiheadAttention`: ``in_proj_weight (3*inner, W)``, ``in_proj_bias (3*inner,)``,
  ``out_proj = Linear(inner, W)``; ``forward(query, key, value, need_weights=False, attn_mask=None) ->
  (out (B, N, W), None)`` computed with :func:`torch.nn.functional.scaled_dot_product_attention`.
* :class:`PrunedAttentionPool2d`: ``positional_embedding (1 + hw, C)``, ``q/k/v_proj = Linear(C, inner)``,
  ``c_proj = Linear(inner, D)``; the pooled output is the attention of the mean token (position 0) only, as in
  open_clip (which computes every position and keeps the first).

Both are plain tensor code (no fast path, no data-dependent control flow), so they export to ONNX with the legacy
exporter. :func:`convert_attention` swaps them in; :func:`attention_structure` / :func:`rebuild_attention` record
and restore them through ``model.json`` (``SegmentorSpec.modules``).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from open_clip.modified_resnet import AttentionPool2d
from torch import nn

#: ``type`` values written to ``SegmentorSpec.modules``.
MHA_TYPE = "PrunedMultiheadAttention"
POOL_TYPE = "PrunedAttentionPool2d"


class PrunedMultiheadAttention(nn.Module):
    """Batch-first multi-head attention with ``num_heads * head_dim`` inner width independent of ``embed_dim``.

    Args:
        embed_dim: W, the width of the tokens in and out.
        num_heads: heads kept (>= 1).
        head_dim: d, the width of one head (scores are scaled by ``d ** -0.5`` as in the unpruned model).
        bias: whether the Q/K/V and output projections have biases.

    Shapes: ``query``/``key``/``value`` ``(B, N, W)`` (``batch_first``); the output ``(B, N, W)``.
    """

    batch_first = True
    _qkv_same_embed_dim = True  # one fused in_proj_weight, like nn.MultiheadAttention (IMP checks this flag)

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, bias: bool = True):
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim = int(embed_dim), int(num_heads), int(head_dim)
        inner = self.num_heads * self.head_dim
        self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, self.embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * inner)) if bias else None
        self.out_proj = nn.Linear(inner, self.embed_dim, bias=bias)
        nn.init.xavier_uniform_(self.in_proj_weight)

    @property
    def inner_dim(self) -> int:
        """``num_heads * head_dim``."""
        return self.num_heads * self.head_dim

    @classmethod
    def from_mha(cls, mha: nn.Module) -> PrunedMultiheadAttention:
        """A copy of ``mha`` (an ``nn.MultiheadAttention`` with fused Q/K/V, or a :class:`PrunedMultiheadAttention`)
        sharing nothing with it; the outputs are equal up to float rounding.

        Raises:
            ValueError: ``mha`` with separate Q/K/V weights, ``bias_k``/``bias_v`` or ``add_zero_attn``.
        """
        if isinstance(mha, PrunedMultiheadAttention):
            head_dim = mha.head_dim
        else:
            if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn or not mha.batch_first:
                raise ValueError("only batch-first MultiheadAttention with fused Q/K/V and no bias_k/bias_v is supported")
            head_dim = mha.embed_dim // mha.num_heads
        new = cls(mha.in_proj_weight.shape[1], mha.num_heads, head_dim, bias=mha.in_proj_bias is not None)
        new.to(mha.in_proj_weight.dtype)
        with torch.no_grad():
            new.in_proj_weight.copy_(mha.in_proj_weight)
            if mha.in_proj_bias is not None:
                new.in_proj_bias.copy_(mha.in_proj_bias)
            new.out_proj.load_state_dict(mha.out_proj.state_dict())
        new.train(mha.training)
        return new

    def forward(self, query: torch.Tensor, key: torch.Tensor | None = None, value: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = False,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, None]:
        """``(out (B, N, W), None)``; ``attn_mask`` ``(N, S)`` or ``(B*heads, N, S)``, float (added to the scores)
        or bool (``True`` = not allowed, as in ``nn.MultiheadAttention``).

        Raises:
            NotImplementedError: ``need_weights=True`` or a ``key_padding_mask`` (open_clip's image tower uses
                neither).
        """
        if need_weights or key_padding_mask is not None:
            raise NotImplementedError("PrunedMultiheadAttention returns no attention weights and takes no key_padding_mask")
        b, n, _ = query.shape
        inner = self.inner_dim
        if (key is None or key is query) and (value is None or value is query):
            q, k, v = F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        else:
            key = query if key is None else key
            value = key if value is None else value
            w_q, w_k, w_v = self.in_proj_weight.split(inner)
            b_q, b_k, b_v = (None,) * 3 if self.in_proj_bias is None else self.in_proj_bias.split(inner)
            q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
        q, k, v = (t.reshape(b, t.shape[1], self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype).masked_fill(attn_mask, float("-inf"))
            if attn_mask.dim() == 3:  # (B*heads, N, S) -> (B, heads, N, S)
                attn_mask = attn_mask.reshape(b, self.num_heads, *attn_mask.shape[-2:])
            attn_mask = attn_mask.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal and attn_mask is None)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, inner)), None


class PrunedAttentionPool2d(nn.Module):
    """ModifiedResNet's attention pool with an inner width ``num_heads * head_dim`` independent of the input
    channels ``C`` (same parameter names as :class:`open_clip.modified_resnet.AttentionPool2d`).

    Input ``(B, C, h, w)`` at the pretraining grid (``positional_embedding`` is ``(1 + h*w, C)``); output
    ``(B, D)``: multi-head attention of the mean token (query) over ``[mean, tokens]`` + positional embedding,
    through ``c_proj``.
    """

    def __init__(self, spacial_tokens: int, in_dim: int, num_heads: int, head_dim: int, output_dim: int):
        super().__init__()
        inner = num_heads * head_dim
        self.num_heads, self.head_dim = int(num_heads), int(head_dim)
        self.positional_embedding = nn.Parameter(torch.randn(spacial_tokens, in_dim) / in_dim ** 0.5)
        self.k_proj = nn.Linear(in_dim, inner)
        self.q_proj = nn.Linear(in_dim, inner)
        self.v_proj = nn.Linear(in_dim, inner)
        self.c_proj = nn.Linear(inner, output_dim)

    @classmethod
    def from_pool(cls, pool: nn.Module) -> PrunedAttentionPool2d:
        """A copy of an open_clip ``AttentionPool2d`` (or of a :class:`PrunedAttentionPool2d`)."""
        inner = pool.q_proj.out_features
        new = cls(pool.positional_embedding.shape[0], pool.positional_embedding.shape[1], pool.num_heads,
                  inner // pool.num_heads, pool.c_proj.out_features)
        new.load_state_dict(pool.state_dict())
        new.to(pool.q_proj.weight.dtype).train(pool.training)
        return new

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        x = x.flatten(2).transpose(1, 2)  # (B, hw, C)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding.to(x.dtype)  # (B, 1+hw, C)
        h, d = self.num_heads, self.head_dim
        q = self.q_proj(x[:, :1]).reshape(b, 1, h, d).transpose(1, 2)  # (B, h, 1, d)
        k = self.k_proj(x).reshape(b, -1, h, d).transpose(1, 2)  # (B, h, 1+hw, d)
        v = self.v_proj(x).reshape(b, -1, h, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, 1, d)
        return self.c_proj(out.transpose(1, 2).reshape(b, h * d))


def convert_attention(visual: nn.Module) -> int:
    """Replace every ``nn.MultiheadAttention`` of a ViT image tower's blocks (or ModifiedResNet's
    ``AttentionPool2d``) by its pruned-capable counterpart, in place; returns how many were replaced.

    The function is unchanged up to float rounding (same weights; SDPA instead of the MHA kernel).
    """
    count = 0
    transformer = getattr(visual, "transformer", None)
    if transformer is not None:
        for block in transformer.resblocks:
            if isinstance(block.attn, nn.MultiheadAttention):
                block.attn = PrunedMultiheadAttention.from_mha(block.attn)
                count += 1
    pool = getattr(visual, "attnpool", None)
    if isinstance(pool, AttentionPool2d):
        visual.attnpool = PrunedAttentionPool2d.from_pool(pool)
        count += 1
    return count


def attention_structure(root: nn.Module) -> dict[str, dict]:
    """``{module name: {"type", "num_heads", "head_dim"}}`` of every pruned-capable attention module under
    ``root`` (what ``model.json`` records as ``modules``)."""
    out = {}
    for name, module in root.named_modules():
        if isinstance(module, PrunedMultiheadAttention):
            out[name] = {"type": MHA_TYPE, "num_heads": module.num_heads, "head_dim": module.head_dim}
        elif isinstance(module, PrunedAttentionPool2d):
            out[name] = {"type": POOL_TYPE, "num_heads": module.num_heads, "head_dim": module.head_dim}
    return out


def rebuild_attention(root: nn.Module, structure: dict[str, dict]) -> None:
    """Swap in the modules of :func:`attention_structure` (by name), with their head counts and head widths.
    The parameters are placeholders of the right *inner* sizes; the residual width comes from the shape spec.

    Raises:
        KeyError: a name ``root`` does not have, or an unknown ``type``.
    """
    for name, info in structure.items():
        parent_name, _, attr = name.rpartition(".")
        parent = root.get_submodule(parent_name)
        old = getattr(parent, attr)
        heads, head_dim = int(info["num_heads"]), int(info["head_dim"])
        if info["type"] == MHA_TYPE:
            new = PrunedMultiheadAttention(old.in_proj_weight.shape[1], heads, head_dim, bias=old.in_proj_bias is not None)
        elif info["type"] == POOL_TYPE:
            new = PrunedAttentionPool2d(old.positional_embedding.shape[0], old.positional_embedding.shape[1], heads,
                                        head_dim, old.c_proj.out_features)
        else:
            raise KeyError(f"unknown attention module type {info['type']!r}")
        setattr(parent, attr, new.to(next(old.parameters()).dtype))


__all__ = ["PrunedMultiheadAttention", "PrunedAttentionPool2d", "convert_attention", "attention_structure",
           "rebuild_attention", "MHA_TYPE", "POOL_TYPE"]


#: A layer name for one Q/K/V row block of a fused attention projection, as the spectral analysis, the freeze
#: plans and the adapters name it: ``<attention module>.in_proj_weight[q|k|v]``.
QKV_SLICE = re.compile(r"^(?P<mha>.+)\.in_proj_weight\[(?P<tag>[qkv])\]$")


def has_fused_qkv(module: nn.Module) -> bool:
    """True for an attention module with one fused ``in_proj_weight`` ``(3*inner, W)`` holding Q, K and V:
    ``nn.MultiheadAttention`` with equal q/k/v widths, or a head/width-pruned :class:`PrunedMultiheadAttention`.
    The slice width is ``in_proj_weight.shape[0] // 3`` for both (not ``embed_dim``, which a pruned one differs from)."""
    if isinstance(module, PrunedMultiheadAttention):
        return True
    return isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None
