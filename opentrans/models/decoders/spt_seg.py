"""SPT-SEG's spectral-guided decoder (SGD) as a residual segmentor head.

Paper: Xu et al., "Spectral Prompt Tuning: Unveiling Unseen Classes for Zero-Shot Semantic Segmentation",
AAAI 2024 (arXiv:2312.12754), section "Spectral Guided Decoder". Official code: github.com/clearxu/SPT,
``models/decode_heads/decode_seg.py`` (``HiLo``, ``TPN_DecoderLayer``, ``ATMSingleHeadSeg``). The high/low
frequency attention is HiLo from LITv2 (Pan, Cai, Zhuang, "Fast Vision Transformers with HiLo Attention",
NeurIPS 2022, arXiv:2205.13213, Sec. 3.2), which the SPT-SEG code imports verbatim.

The formulas below are transcribed from that code; the paper text (and so its equation numbers) could not be read
offline, so no SPT-SEG equation number is quoted: check them against the paper's SGD section. For dense features
``F`` ``(B, N, D)`` on a grid ``(h, w)`` (``N = h * w``)::

    X   = LN(W_in F)                                        # input projection + LayerNorm (code: input_proj, proj_norm)
    Hi  = W_h Attn_window(X)                                # high-frequency heads: self-attention inside
                                                            #   non-overlapping s x s windows (s = pool, code: 3)
    Lo  = W_l Attn(q = X, k, v = AvgPool_s(X))              # low-frequency heads: every token attends to the
                                                            #   s x s average-pooled keys/values
    Y   = [Hi ; Lo]                                         # heads concatenated along channels (Hi first)
    M   = clamp(cos(Y, p), 0, 1)                            # token (spatial) reweighting by a learnt prompt p
    Y'  = (Y * M) T                                         # channel reweighting, T initialised to the identity
    F'  = F + W_out Y'                                      # residual; W_out, b_out initialised to zero

(grids that are not multiples of ``s`` are zero-padded at the bottom/right before both branches and cropped after,
as in the code). ``Attn`` is scaled dot-product multi-head attention with softmax, head width
``hidden // heads``, no q/k/v bias (the code's ``qkv_bias=False``).

Interpretations and departures (stated, not hidden):

* The code's SGD layer then lets the *class* queries cross-attend to ``Y'`` and reads the masks off that attention
  (an ATM/SegViT decoder). A head here returns features that the segmentor compares with the class embeddings by
  cosine, so that class-query branch has no counterpart; ``Y'`` is instead added back to the features through a
  zero-initialised projection, so an untrained head is the identity and leaves the training-free segmentor
  unchanged (exactly: ``F + 0``).
* The code's Hi-Fi branch skips its ``h_proj`` (github.com/clearxu/SPT at cc648df3,
  ``models/decode_heads/decode_seg.py``: ``h_proj`` is built at l. 137, but ``hf`` l. 149-173 returns without
  it); LITv2's HiLo applies it, and so does this head (ours: one ``h_dim x h_dim`` Linear more).
* Caveat of the token mask (as in the code): ``clamp(cos(Y, p), 0, 1)`` is 0 at every token when all of them point
  away from the random prompt ``p``, and then no gradient reaches ``p`` or anything before the mask. On the flat
  features of random-init CLIP weights this happened for 8 of 20 seeds of ``p`` (tiny ViT, 2 CamVid-sized inputs);
  the zero-initialised output keeps the head the identity either way. Check ``finetune_report``'s loss curve, or
  re-seed, if the decoder does not train.
* Head split: ``hi_ratio`` is the share of heads in the high-frequency branch (the code's ``alpha = 0.9`` is the
  low-frequency share, so ``hi_ratio = 0.1``; with 8 heads: 1 high-, 7 low-frequency heads, as
  ``int(8 * 0.9) = 7`` there). Attention dropout (0.1 in the code) is not used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from opentrans.errors import OpenTransError
from opentrans.models import dense as _dense
from opentrans.models.heads import register_head


@register_head("spt-seg")
class SpectralGuidedDecoder(nn.Module):
    """SPT-SEG's spectral-guided decoder layer as a residual head ``(B, N, D) -> (B, N, D)`` (formulas in the
    module docstring).

    Args:
        dim: D, the joint embedding width of the features.
        heads: attention heads in total (code: 8).
        hi_ratio: share of the heads in the high-frequency (windowed) branch; at least one head stays in each
            branch unless ``hi_ratio`` is 0 or 1 (code: 0.1).
        pool: window side of the high-frequency branch and average-pooling kernel/stride of the low-frequency
            branch, in patches (code: 3).
        hidden: inner width (default D); must be divisible by ``heads``.

    Raises:
        OpenTransError: bad options (non-positive sizes, ``hidden`` not divisible by ``heads``, ``hi_ratio``
            outside [0, 1]); at run time, a grid whose ``h * w`` differs from N.
    """

    def __init__(self, dim: int, heads: int = 8, hi_ratio: float = 0.1, pool: int = 3, hidden: int | None = None):
        super().__init__()
        hidden = int(hidden or dim)
        if heads < 1 or pool < 1 or hidden < 1:
            raise OpenTransError(f"head 'spt-seg': heads, pool and hidden must be >= 1 (got {heads}, {pool}, {hidden})")
        if hidden % heads:
            raise OpenTransError(f"head 'spt-seg': hidden width {hidden} is not divisible by {heads} heads")
        if not 0.0 <= hi_ratio <= 1.0:
            raise OpenTransError(f"head 'spt-seg': hi_ratio must be in [0, 1], got {hi_ratio}")
        head_dim = hidden // heads
        self.pool = int(pool)
        self.l_heads = int(heads * (1.0 - hi_ratio) + 1e-9)
        if pool == 1:  # HiLo: a 1x1 window is plain global attention, all heads go to the low-frequency branch
            self.l_heads = heads
        self.h_heads = heads - self.l_heads
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5
        self.in_proj = nn.Linear(dim, hidden)
        self.norm = nn.LayerNorm(hidden)
        l_dim, h_dim = self.l_heads * head_dim, self.h_heads * head_dim
        if self.l_heads:
            self.l_q = nn.Linear(hidden, l_dim, bias=False)
            self.l_kv = nn.Linear(hidden, 2 * l_dim, bias=False)
            self.l_proj = nn.Linear(l_dim, l_dim)
        if self.h_heads:
            self.h_qkv = nn.Linear(hidden, 3 * h_dim, bias=False)
            self.h_proj = nn.Linear(h_dim, h_dim)
        self.prompt = nn.Parameter(torch.randn(hidden))  # token reweighting prompt p (code: torch.randn(dim))
        self.channel = nn.Parameter(torch.eye(hidden))  # channel reweighting T (code: top_down_transform = eye)
        self.out_proj = nn.Linear(hidden, dim)
        nn.init.zeros_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)
        self._options = {"heads": int(heads), "hi_ratio": float(hi_ratio), "pool": int(pool), "hidden": hidden}

    def _hifi(self, x: torch.Tensor) -> torch.Tensor:
        """Windowed self-attention: ``(B, H, W, C)`` (H, W multiples of ``pool``) -> ``(B, H, W, h_dim)``."""
        b, hh, ww, _ = x.shape
        s, nh, d = self.pool, self.h_heads, self.head_dim
        gh, gw = hh // s, ww // s
        x = x.reshape(b, gh, s, gw, s, -1).transpose(2, 3)  # (B, gh, gw, s, s, C)
        qkv = self.h_qkv(x).reshape(b, gh * gw, s * s, 3, nh, d).permute(3, 0, 1, 4, 2, 5)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, windows, heads, s*s, d)
        attn = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)
        out = (attn @ v).transpose(2, 3).reshape(b, gh, gw, s, s, nh * d)
        out = out.transpose(2, 3).reshape(b, hh, ww, nh * d)
        return self.h_proj(out)

    def _lofi(self, x: torch.Tensor) -> torch.Tensor:
        """Attention to ``pool``-averaged keys/values: ``(B, H, W, C)`` -> ``(B, H, W, l_dim)``."""
        b, hh, ww, c = x.shape
        nh, d = self.l_heads, self.head_dim
        q = self.l_q(x).reshape(b, hh * ww, nh, d).transpose(1, 2)  # (B, heads, HW, d)
        kv_src = x
        if self.pool > 1:
            kv_src = F.avg_pool2d(x.permute(0, 3, 1, 2), self.pool, self.pool).flatten(2).transpose(1, 2)
        else:
            kv_src = x.reshape(b, hh * ww, c)
        kv = self.l_kv(kv_src).reshape(b, -1, 2, nh, d).permute(2, 0, 3, 1, 4)
        k, v = kv[0], kv[1]  # (B, heads, M, d)
        attn = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, hh, ww, nh * d)
        return self.l_proj(out)

    def forward(self, feats: torch.Tensor, grid: tuple[int, int] | None = None,
                text: torch.Tensor | None = None) -> torch.Tensor:
        """Refined features ``(B, N, D)`` for features ``(B, N, D)`` on the patch grid ``grid = (h, w)``
        (``text`` is not used)."""
        b, n, _ = feats.shape
        if grid is None:
            raise OpenTransError("head 'spt-seg' needs the patch grid (h, w) of its features")
        s = self.pool
        if torch.jit.is_tracing() and bool(_dense._SYMBOLIC_GRID):
            # dynamic-grid ONNX export: keep the grid (and the padding) as traced sizes, always pad
            h, w = grid[0], grid[1]
            pad_b, pad_r = (s - h % s) % s, (s - w % s) % s
            padded = True
        else:
            h, w = int(grid[0]), int(grid[1])
            if h * w != n:
                raise OpenTransError(f"head 'spt-seg': grid {h}x{w} does not match {n} tokens")
            pad_b, pad_r = (s - h % s) % s, (s - w % s) % s
            padded = bool(pad_b or pad_r)
        x = self.norm(self.in_proj(feats)).reshape(b, h, w, -1)
        if padded:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        parts = []
        if self.h_heads:
            parts.append(self._hifi(x)[:, :h, :w])
        if self.l_heads:
            parts.append(self._lofi(x)[:, :h, :w])
        y = torch.cat(parts, dim=-1).reshape(b, n, -1)  # (B, N, hidden)
        mask = (F.normalize(y, dim=-1) @ F.normalize(self.prompt, dim=0)).clamp(0, 1)  # (B, N)
        y = (y * mask.unsqueeze(-1)) @ self.channel
        return feats + self.out_proj(y)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self._options.items())
