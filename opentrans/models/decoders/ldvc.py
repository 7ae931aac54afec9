"""LDVC's local-consensus decoder (``@register_head("ldvc")``): routed window self-attention + class cross-attention.

LDVC ("Open-vocabulary segmentation with Learnable Deep Vision-language prompts and a local Consensus decoder")
refines CLIP's dense features with a transformer decoder whose visual self-attention is *route attention*: the
patch grid is split into windows, window-level relatedness is computed, and each window attends only to the tokens
of its top-k most related windows ("local consensus"), in the spirit of BiFormer's bi-level routing attention
(Zhu et al., "BiFormer: Vision Transformer with Bi-Level Routing Attention", CVPR 2023, arXiv:2303.08810, Sec. 3.2
and Algorithm 1; official code rayleizhu/BiFormer ``ops/bra_legacy.py``, read for this implementation). The LDVC
paper and code could not be retrieved offline (nothing under that title in the stored paper, code or issue
corpora), so the block structure below is this implementation's reading of the brief, and the routing equations are
BiFormer's (numbered as in BiFormer's Sec. 3.2 as recalled, not re-checked offline; its Algorithm 1 pseudo-code and
official code were checked)::

    # one decoder block, x: (B, N, E) image tokens (queries), t: (C, E) class text tokens (keys/values)
    x = x + BRA(LN(x))                     # routed window self-attention, below
    x = x + CrossAttn(LN(x), LN(t), LN(t)) # every patch attends to the class embeddings
    x = x + MLP(LN(x))                     # 4x GELU MLP

    # BRA (BiFormer Sec. 3.2):
    Q, K, V = X W_q, X W_k, X W_v                             # (1) region partition + input projection
    Q^r, K^r = mean over each window of Q, K                  #     region-level queries/keys
    A^r = Q^r (K^r)^T                                         # (2) region-to-region affinity (R x R)
    I^r = topkIndex(A^r)                                      # (3) k most related windows per window
    K^g, V^g = gather(K, I^r), gather(V, I^r)                 # (4) keys/values of the routed windows
    O = W_o (Attention(Q, K^g, V^g) + LCE(V))                 # (5) token-to-token attention + local context
                                                              #     enhancement (5x5 depth-wise conv on V)

Routing is hard and non-differentiable as in BiFormer's default (``diff_routing=False``: the window means are only
used for the indices), the routing logits are unscaled (a positive scale does not change top-k), and every head
shares one routing, as there.

The head (``feats (B, N, D), grid (h, w), text (C, D) -> (B, N, D)``, :mod:`opentrans.models.heads`) is residual
with a zero-initialised output projection, ``out = feats + W_out LN(decoder(W_in feats, W_txt text))``, so at
initialisation it is the identity and an untrained segmentor is unchanged (the other parameters start at PyTorch's
defaults; they receive gradients once ``W_out`` has moved off zero, i.e. after the first optimiser step).

Windows on any grid: ``windows`` is the number of windows per side asked for. For a side of ``n`` patches the
window size is ``ceil(n / min(windows, n))`` and the side holds ``ceil(n / size)`` windows, so no window is empty;
the grid is zero-padded to whole windows and padded tokens are excluded from the window means and masked out of
every key set. (BiFormer's ``auto_pad`` keeps ``n_win`` windows per side and pads the grid to a multiple of
``n_win``, which can leave windows made only of padding, and it neither masks the padded keys nor excludes them from
the window means; its LCE convolves the padded V, this one the unpadded V with zero 'same' padding, the
``side_dwconv=5`` kernel of the BiFormer models.) ``topk`` must not exceed the number of
windows, checked when built (``windows**2``) and on every grid (:class:`~opentrans.errors.OpenTransError`). The
routing (window means, ``topk``, ``gather``) is plain tensor code with no data-dependent Python control flow, so
``torch.onnx.export`` traces it at opset 17 (``TopK``, ``GatherElements``); the window layout is a trace-time
constant of the exported input size, so an export with dynamic height/width is refused.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from opentrans.errors import OpenTransError
from opentrans.models import dense as _dense
from opentrans.models.heads import register_head

#: Additive attention bias of padded key tokens (finite, so a fully padded row gives no NaN).
MASKED = -1e9
#: BiFormer's local-context-enhancement kernel (``side_dwconv=5``).
LCE_KERNEL = 5


def _side(n: int, windows: int) -> tuple[int, int]:
    """``(window size, window count)`` along a side of ``n`` patches asked to hold ``windows`` windows."""
    size = math.ceil(n / min(windows, n))
    return size, math.ceil(n / size)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``(..., L, E) -> (..., heads, L, E / heads)``."""
    return x.unflatten(-1, (heads, -1)).transpose(-3, -2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``(..., heads, L, d) -> (..., L, heads * d)``."""
    return x.transpose(-3, -2).flatten(-2)


class RouteAttention(nn.Module):
    """BiFormer's bi-level routing attention on a patch grid (equations (1)-(5) in the module notes).

    Args:
        dim: token width ``E``.
        heads: attention heads (``dim % heads == 0``).
        windows: windows per side asked for (see the module notes for grids it does not divide).
        topk: routed windows per window (``1 <= topk <= windows**2``).

    Shapes: ``x (B, h*w, E)`` (row-major grid) and ``grid (h, w)`` -> ``(B, h*w, E)``.

    Raises:
        OpenTransError: ``topk`` larger than the windows a grid holds.
    """

    def __init__(self, dim: int, heads: int, windows: int, topk: int):
        super().__init__()
        self.heads, self.windows, self.topk = heads, windows, topk
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.lce = nn.Conv2d(dim, dim, LCE_KERNEL, padding=LCE_KERNEL // 2, groups=dim)
        self.proj = nn.Linear(dim, dim)

    def layout(self, grid: tuple[int, int]) -> tuple[int, int, int, int]:
        """``(window height, windows down, window width, windows across)`` for a patch grid ``(h, w)``.

        Raises:
            OpenTransError: ``topk`` exceeds the number of windows of this grid.
        """
        sh, nh = _side(int(grid[0]), self.windows)
        sw, nw = _side(int(grid[1]), self.windows)
        if self.topk > nh * nw:
            raise OpenTransError(f"ldvc decoder: topk={self.topk} but the {grid[0]}x{grid[1]} patch grid holds only "
                                 f"{nh}x{nw}={nh * nw} windows; lower topk or use more windows")
        return sh, nh, sw, nw

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        b, _, e = x.shape
        h, w = int(grid[0]), int(grid[1])
        sh, nh, sw, nw = self.layout((h, w))
        r, t = nh * nw, sh * sw  # windows, tokens per window
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # (B, N, E) each; eq. (1)
        lce = self.lce(v.transpose(1, 2).reshape(b, e, h, w)).flatten(2).transpose(1, 2)  # LCE(V), (B, N, E)

        def windowed(z: torch.Tensor) -> torch.Tensor:  # (B, h*w, E) -> (B, R, T, E), zero-padded to whole windows
            z = F.pad(z.reshape(b, h, w, e), (0, 0, 0, nw * sw - w, 0, nh * sh - h))
            return z.reshape(b, nh, sh, nw, sw, e).permute(0, 1, 3, 2, 4, 5).reshape(b, r, t, e)

        q, k, v = windowed(q), windowed(k), windowed(v)
        # which window slots hold real tokens (a trace-time constant of the grid): (R, T)
        rows = torch.arange(nh * sh).reshape(nh, 1, sh, 1) < h
        cols = torch.arange(nw * sw).reshape(1, nw, 1, sw) < w
        valid = (rows & cols).reshape(r, t).to(x.dtype)
        counts = valid.sum(-1, keepdim=True)  # (R, 1), >= 1 by construction of the layout
        q_r = (q * valid[..., None]).sum(2) / counts  # (B, R, E) window means of Q and K
        k_r = (k * valid[..., None]).sum(2) / counts
        affinity = q_r @ k_r.transpose(1, 2)  # (B, R, R); eq. (2)
        idx = torch.topk(affinity, self.topk, dim=-1).indices  # (B, R, k); eq. (3)
        # eq. (4): keys/values of the routed windows, (B, R, k*T, E)
        gather_idx = idx[..., None, None].expand(b, r, self.topk, t, e)
        k_g = torch.gather(k.unsqueeze(1).expand(b, r, r, t, e), 2, gather_idx).reshape(b, r, self.topk * t, e)
        v_g = torch.gather(v.unsqueeze(1).expand(b, r, r, t, e), 2, gather_idx).reshape(b, r, self.topk * t, e)
        bias = ((1.0 - valid) * MASKED).unsqueeze(0).unsqueeze(0).expand(b, r, r, t)
        bias = torch.gather(bias, 2, idx[..., None].expand(b, r, self.topk, t)).reshape(b, r, 1, 1, self.topk * t)
        # eq. (5): token-to-token attention inside the routed windows
        qh, kh, vh = _split_heads(q, self.heads), _split_heads(k_g, self.heads), _split_heads(v_g, self.heads)
        attn = torch.softmax((qh * self.scale) @ kh.transpose(-2, -1) + bias, dim=-1)  # (B, R, heads, T, k*T)
        out = _merge_heads(attn @ vh)  # (B, R, T, E)
        out = out.reshape(b, nh, nw, sh, sw, e).permute(0, 1, 3, 2, 4, 5).reshape(b, nh * sh, nw * sw, e)
        out = out[:, :h, :w].reshape(b, h * w, e)
        return self.proj(out + lce)


class CrossAttention(nn.Module):
    """Multi-head attention of image tokens (queries) to class text tokens (keys/values).

    Shapes: ``x (B, N, E)``, ``text (C, E)`` -> ``(B, N, E)``; the softmax runs over the C classes.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        q = _split_heads(self.q(x), self.heads)  # (B, heads, N, d)
        k, v = (_split_heads(z, self.heads) for z in self.kv(text).chunk(2, dim=-1))  # (heads, C, d)
        attn = torch.softmax((q * self.scale) @ k.transpose(-2, -1), dim=-1)  # (B, heads, N, C)
        return self.proj(_merge_heads(attn @ v))


class LocalConsensusBlock(nn.Module):
    """One decoder block: routed window self-attention, class cross-attention, MLP, each pre-norm and residual.

    Shapes: ``x (B, N, E)``, ``grid (h, w)``, ``text (C, E)`` -> ``(B, N, E)``.
    """

    def __init__(self, dim: int, heads: int, windows: int, topk: int, mlp_ratio: int = 4):
        super().__init__()
        self.norm_route = nn.LayerNorm(dim)
        self.route = RouteAttention(dim, heads, windows, topk)
        self.norm_cross = nn.LayerNorm(dim)
        self.norm_text = nn.LayerNorm(dim)
        self.cross = CrossAttention(dim, heads)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor, grid: tuple[int, int], text: torch.Tensor) -> torch.Tensor:
        x = x + self.route(self.norm_route(x), grid)
        x = x + self.cross(self.norm_cross(x), self.norm_text(text))
        return x + self.mlp(self.norm_mlp(x))


@register_head("ldvc")
class LocalConsensusDecoder(nn.Module):
    """LDVC's local-consensus decoder as a segmentor head (structure and equations in the module notes).

    Args:
        dim: D, the joint embedding width of the features and of the class embeddings.
        windows: windows per side of the patch grid (BiFormer's ``S``; default 4).
        topk: routed windows per window (BiFormer's ``k``; default 4), ``1 <= topk <= windows**2``.
        heads: attention heads (default 4); ``hidden % heads == 0``.
        depth: decoder blocks (default 1).
        hidden: decoder width ``E`` (default D).

    Shapes: ``feats (B, N, D)``, ``grid (h, w)`` with ``N = h*w``, ``text (C, D)`` -> ``(B, N, D)``; the identity
    at initialisation (zero ``out_proj``).

    Raises:
        OpenTransError: bad options (non-positive sizes, ``hidden`` not divisible by ``heads``, ``topk`` outside
            ``1..windows**2``); at call time, no class embeddings (``text`` None), embeddings of another width,
            ``N != h*w``, a grid with fewer than ``topk`` windows, or a traced dynamic grid (dynamic-H/W export).
    """

    def __init__(self, dim: int, windows: int = 4, topk: int = 4, heads: int = 4, depth: int = 1,
                 hidden: int | None = None):
        super().__init__()
        hidden = int(dim if hidden is None else hidden)
        for name, value in (("windows", windows), ("topk", topk), ("heads", heads), ("depth", depth),
                            ("hidden", hidden)):
            if int(value) < 1:
                raise OpenTransError(f"ldvc decoder: {name} must be >= 1, got {value}")
        if hidden % heads:
            raise OpenTransError(f"ldvc decoder: hidden={hidden} is not divisible by heads={heads}")
        if topk > windows * windows:
            raise OpenTransError(f"ldvc decoder: topk={topk} exceeds the {windows}x{windows}={windows * windows} "
                                 "windows; lower topk or use more windows")
        self.dim = dim
        self.in_proj = nn.Linear(dim, hidden)
        self.text_proj = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(LocalConsensusBlock(hidden, heads, windows, topk) for _ in range(depth))
        self.norm_out = nn.LayerNorm(hidden)
        self.out_proj = nn.Linear(hidden, dim)
        nn.init.zeros_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, feats: torch.Tensor, grid: tuple[int, int] | None = None,
                text: torch.Tensor | None = None) -> torch.Tensor:
        if text is None:
            raise OpenTransError("the ldvc decoder needs class text embeddings (C, D); none were given")
        if grid is None:
            raise OpenTransError("the ldvc decoder needs the patch grid (h, w) of its features")
        if _dense._SYMBOLIC_GRID:  # inside dense.symbolic_grid(): a dynamic-H/W trace
            raise OpenTransError("the ldvc decoder's window layout is fixed per patch grid; export it without "
                                 "dynamic height/width")
        if text.shape[-1] != self.dim:
            raise OpenTransError(f"ldvc decoder: class embeddings of width {text.shape[-1]}, expected {self.dim}")
        if feats.shape[1] != grid[0] * grid[1]:
            raise OpenTransError(f"ldvc decoder: {feats.shape[1]} tokens for a {grid[0]}x{grid[1]} grid")
        x = self.in_proj(feats)
        t = self.text_proj(text.to(feats.dtype))
        for block in self.blocks:
            x = block(x, grid, t)
        return feats + self.out_proj(self.norm_out(x))
