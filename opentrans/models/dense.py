"""Training-free dense CLIP features: how the last ViT block is read out, one function per method.

Every function takes an open_clip ``VisionTransformer`` (possibly pruned) and images ``(B, 3, H, W)`` (H, W
multiples of the patch size) and works on the token sequence ``x`` of shape ``(B, 1 + h*w, W)`` (CLS first,
``h = H / patch``, ``w = W / patch``). All of them are plain tensor code (no data-dependent Python control
flow, no in-place updates), so ``torch.onnx.export(dynamo=False)`` traces them; the only trace-time constants
are the patch grid (fixed by the exported input size) and NACLIP's neighbourhood bias built from it.

Notation (per attention head, ``d`` = head width, ``s = d ** -0.5``)::

    q, k, v = split(W_in ln_1(x) + b_in)          # (B, heads, N, d)
    Attn(A)  = out_proj(concat_heads(A v))        # A: (B, heads, N, N) row-stochastic weights

followed in every mode by ``ln_post`` and ``proj`` on the patch tokens. open_clip's ``ls_1``/``ls_2`` layer
scales (identity for OpenAI CLIP) are applied wherever the original block applies them.

Each docstring names the paper (arXiv id and method section) and writes out the equation this code
implements. The equations were transcribed from the authors' code (repository and file named in each docstring),
which is what the published numbers come from; paper equation numbers were not available offline and are not
quoted, so check them against the paper's method section.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

#: The training-free modes a ViT segmentor supports, in the order reports list them.
VIT_MODES = ("maskclip", "sclip", "clearclip", "naclip", "cliper")
#: NACLIP's Gaussian standard deviation in patches (``gaussian_std=5.`` in sinahmr/NACLIP ``naclip.py``).
NACLIP_STD = 5.0
#: CLIPer keeps, per class, only last-layer probabilities above this share of the class's maximum over patches
#: (``seg_last < seg_last.amax(0) * 0.2`` in linsun449/cliper.code ``modified_clip/model.py``).
CLIPER_KEEP = 0.2


_SYMBOLIC_GRID: list[bool] = []


@contextlib.contextmanager
def symbolic_grid():
    """Within the block, :func:`embed_tokens` keeps the patch grid as traced sizes (``x.shape``, not Python ints)
    and always resizes the positional embedding, so a traced/exported graph accepts any input (H, W) (ONNX
    export with dynamic height/width, :func:`opentrans.deploy.export.export_onnx` ``dynamic_hw=True``). Outside
    it (eager runs, fixed-size exports) nothing changes. Resizing to the pretraining grid itself is the identity
    (bicubic, ``align_corners=False``, scale 1), so eager and traced results agree at every size."""
    _SYMBOLIC_GRID.append(True)
    try:
        yield
    finally:
        _SYMBOLIC_GRID.pop()


def _interpolate_pos_embed(pos: torch.Tensor, old_grid, new_grid) -> torch.Tensor:
    """Bicubically resize a ViT positional embedding ``(1 + gh*gw, W)`` to another patch grid (``new_grid`` may
    hold traced sizes inside :func:`symbolic_grid`)."""
    if not _SYMBOLIC_GRID and tuple(old_grid) == tuple(new_grid):
        return pos
    cls_pos, patch_pos = pos[:1], pos[1:]
    width = pos.shape[-1]
    patch_pos = patch_pos.reshape(1, old_grid[0], old_grid[1], width).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos, size=tuple(new_grid), mode="bicubic", align_corners=False)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(new_grid[0] * new_grid[1], width)
    return torch.cat([cls_pos, patch_pos], dim=0)


def embed_tokens(visual: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Patch + CLS tokens after ``ln_pre``: ``(B, 1 + h*w, W)`` and the grid ``(h, w)``.

    The positional embedding is bicubically resized when the grid differs from the pretraining grid.
    """
    x = visual.conv1(images)  # (B, W, h, w)
    grid = (x.shape[-2], x.shape[-1]) if _SYMBOLIC_GRID else (int(x.shape[-2]), int(x.shape[-1]))
    x = x.flatten(2).transpose(1, 2)  # (B, h*w, W)
    cls = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
    x = torch.cat([cls, x], dim=1)
    x = x + _interpolate_pos_embed(visual.positional_embedding, visual.grid_size, grid).to(x.dtype)
    return visual.ln_pre(x), grid


def qkv(attn: nn.MultiheadAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-head queries, keys and values ``(B, heads, N, d)`` of normalised tokens ``x`` ``(B, N, W)``.

    The width is read from ``in_proj_weight`` (not ``attn.embed_dim``) so a width-pruned block still works.
    """
    b, n, _ = x.shape
    heads = attn.num_heads
    q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    d = q.shape[-1] // heads
    return tuple(t.reshape(b, n, heads, d).transpose(1, 2) for t in (q, k, v))


def attend(attn: nn.MultiheadAttention, weights: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``out_proj(concat_heads(weights @ v))``: weights ``(B, heads, N, N)``, v ``(B, heads, N, d)`` -> ``(B, N, W)``."""
    out = weights @ v  # (B, heads, N, d)
    b, h, n, d = out.shape
    return attn.out_proj(out.transpose(1, 2).reshape(b, n, h * d))


def _self_softmax(t: torch.Tensor) -> torch.Tensor:
    """``softmax(s t t^T)`` over the last axis for t ``(B, heads, N, d)``."""
    return torch.softmax((t * t.shape[-1] ** -0.5) @ t.transpose(-2, -1), dim=-1)


def _head(visual: nn.Module, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``ln_post`` + ``proj`` of the patch tokens: ``(B, 1 + h*w [+ P], W) -> (B, h*w, D)``.

    Tokens after the ``h*w`` patches (learnable prompt tokens, see :mod:`opentrans.models.prompts`) are dropped.
    """
    return visual.ln_post(x[:, 1:1 + grid[0] * grid[1]]) @ visual.proj


def _trunk(visual: nn.Module, images: torch.Tensor):
    x, grid = embed_tokens(visual, images)
    blocks = visual.transformer.resblocks
    for block in blocks[:-1]:
        x = block(x)
    return x, blocks[-1], grid


def maskclip(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """MaskCLIP (Zhou, Loy, Dai, "Extract Free Dense Labels from CLIP", ECCV 2022, arXiv:2112.01071, Sec. 3).

    The last block's query-key attention, residual and FFN are dropped; every token keeps its own value::

        f = proj(ln_post(ls_1(out_proj(v))))          # i.e. Attn(I), the identity attention

    Returns:
        dense features ``(B, h*w, D)``, not normalised.
    """
    x, last, grid = _trunk(visual, images)
    width = last.attn.in_proj_weight.shape[0] // 3
    w_v = last.attn.in_proj_weight[2 * width:]
    b_v = None if last.attn.in_proj_bias is None else last.attn.in_proj_bias[2 * width:]
    x = last.ls_1(last.attn.out_proj(F.linear(last.ln_1(x), w_v, b_v)))
    return _head(visual, x, grid)


def sclip(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """SCLIP (Wang, Mei, Yuille, "SCLIP: Rethinking Self-Attention for Dense Vision-Language Inference",
    ECCV 2024, arXiv:2312.01597, method section: correlative self-attention, CSA).

    The last block keeps its residual and FFN; its attention is replaced by the sum of two self-correlations::

        A = softmax(s q q^T) + softmax(s k k^T)
        x' = x + ls_1(Attn(A));   x'' = x' + ls_2(mlp(ln_2(x')))
        f = proj(ln_post(x''))

    (wangf3014/SCLIP ``clip/model.py``: ``custom_attn(..., csa=True)``; note the rows of A sum to 2, as there.)

    Returns:
        dense features ``(B, h*w, D)``, not normalised.
    """
    x, last, grid = _trunk(visual, images)
    q, k, v = qkv(last.attn, last.ln_1(x))
    weights = _self_softmax(q) + _self_softmax(k)
    x = x + last.ls_1(attend(last.attn, weights, v))
    x = x + last.ls_2(last.mlp(last.ln_2(x)))
    return _head(visual, x, grid)


def clearclip(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """ClearCLIP (Lan et al., "ClearCLIP: Decomposing CLIP Representations for Dense Vision-Language
    Inference", ECCV 2024, arXiv:2407.12442, method section: residual-free, FFN-free last block with q-q attention).

    The last block drops the residual connection and the feed-forward network and uses query-query
    self-attention; only the attention output goes to ``ln_post``/``proj``::

        A = softmax(s q q^T)
        f = proj(ln_post(ls_1(Attn(A))))

    (mc-lan/ClearCLIP ``open_clip/transformer.py``: ``model_type='ClearCLIP'``, ``ignore_residual=True``.)

    Returns:
        dense features ``(B, h*w, D)``, not normalised.
    """
    x, last, grid = _trunk(visual, images)
    q, _, v = qkv(last.attn, last.ln_1(x))
    return _head(visual, last.ls_1(attend(last.attn, _self_softmax(q), v)), grid)


def gaussian_bias(grid: tuple[int, int], std: float = NACLIP_STD) -> torch.Tensor:
    """NACLIP's neighbourhood bias ``omega`` ``(1 + h*w, 1 + h*w)`` for a patch grid ``(h, w)``.

    ``omega[p, p'] = exp(-||p - p'||^2 / (2 std^2))`` with patch coordinates in patch units; the CLS row and
    column are 0 (as ``get_attention_addition(..., adjust_for_cls=True)`` in sinahmr/NACLIP ``clip/model.py``).
    """
    h, w = grid
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    coords = torch.stack([ys.reshape(-1), xs.reshape(-1)], dim=1)  # (h*w, 2)
    dist2 = ((coords[:, None, :] - coords[None, :, :]) ** 2).sum(-1)
    omega = torch.exp(-dist2 / (2.0 * std ** 2))
    return F.pad(omega, (1, 0, 1, 0))


def naclip(visual: nn.Module, images: torch.Tensor, std: float = NACLIP_STD) -> torch.Tensor:
    """NACLIP (Hajimiri, Ben Ayed, Dolz, "Pay Attention to Your Neighbours: Training-Free Open-Vocabulary
    Semantic Segmentation", WACV 2025, arXiv:2404.08181, method section: Gaussian neighbourhood attention,
    key-key similarity, reduced architecture).

    Key-key attention plus a Gaussian neighbourhood bias (std ``std`` patches, 5 in the paper's setting), in
    the *reduced* last block: no residual, no FFN::

        A = softmax(s k k^T + omega)                      # omega: :func:`gaussian_bias`
        f = proj(ln_post(ls_1(Attn(A))))

    (sinahmr/NACLIP ``clip/model.py``: ``arch='reduced'``, ``attn_strategy='naclip'``; the bias is not scaled.)
    NACLIP's optional PAMR post-processing is not part of this mode.

    Returns:
        dense features ``(B, h*w, D)``, not normalised.
    """
    x, last, grid = _trunk(visual, images)
    _, k, v = qkv(last.attn, last.ln_1(x))
    bias = gaussian_bias(grid, std).to(k.dtype)  # (1 + h*w, 1 + h*w); prompt tokens after the patches get none
    extra = k.shape[-2] - bias.shape[-1]
    if extra:
        bias = F.pad(bias, (0, extra, 0, extra))
    logits = (k * k.shape[-1] ** -0.5) @ k.transpose(-2, -1) + bias
    return _head(visual, last.ls_1(attend(last.attn, torch.softmax(logits, dim=-1), v)), grid)


def cliper_features(visual: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIPer's early-layer fusion (Sun et al., "CLIPer: Hierarchically Improving Spatial Representation of
    CLIP for Open-Vocabulary Semantic Segmentation", arXiv:2411.13836, method section: early-layer fusion).

    1. The first L-1 blocks run unchanged; their per-head attention maps are summed,
       ``M = sum_{l<L} A_l`` ``(B, heads, N, N)``, and their normalised inputs ``e_l = ln_1^l(x_l)`` are kept
       (the *embeddings* of early layers); ``e_L = x_L`` is the input of the last block.
    2. ``M`` is turned into a fused attention map: one Sinkhorn step (column then row normalisation), then
       ``A = relu((M + M^T)/2 - colmean)``, rows normalised to 1.
    3. Every embedding goes through the last block's value path under the fused map, without residual or FFN:
       ``f_l = proj(ln_post(ls_1(Attn_L(A) on ln_1^L(e_l))))``.

    The authors' code (linsun449/cliper.code ``modified_clip/model.py``, ``attn_type='fused-attn'``,
    ``fuse_feature=True``) applies the two normalisations of step 2 in place inside the loop over the L
    embeddings, so embedding l sees ``l + 1`` Sinkhorn steps and the map returned for score fusion sees L;
    this function reproduces that exactly.

    Returns:
        ``features`` ``(L, B, h*w, D)`` (one per embedding, not normalised) and the head-averaged fused map
        of the last embedding restricted to patches, ``(B, h*w, h*w)``.
    """
    x, grid = embed_tokens(visual, images)
    blocks = visual.transformer.resblocks
    last = blocks[-1]
    embeds, fused = [], None
    for block in blocks[:-1]:
        xn = block.ln_1(x)
        embeds.append(xn)
        q, k, v = qkv(block.attn, xn)
        weights = torch.softmax((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1), dim=-1)  # (B, heads, N, N)
        fused = weights if fused is None else fused + weights
        x = x + block.ls_1(attend(block.attn, weights, v))
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
    embeds.append(x)
    if fused is None:  # a one-block ViT has no early layers: fall back to the identity map
        n = x.shape[1]
        fused = torch.eye(n, dtype=x.dtype).expand(x.shape[0], last.attn.num_heads, n, n)
    feats, attn_map = [], None
    for e in embeds:
        fused = fused / fused.sum(dim=-2, keepdim=True)
        fused = fused / fused.sum(dim=-1, keepdim=True)
        a = (fused + fused.transpose(-2, -1)) / 2
        a = torch.clamp(a - a.mean(dim=-2, keepdim=True), min=0)
        a = a / a.sum(dim=-1, keepdim=True).clamp_min(1e-12)  # the floor only guards an all-zero row
        _, _, v = qkv(last.attn, last.ln_1(e))
        feats.append(_head(visual, last.ls_1(attend(last.attn, a, v)), grid))
        attn_map = a
    n = grid[0] * grid[1]
    return torch.stack(feats), attn_map.mean(dim=1)[:, 1:1 + n, 1:1 + n]


def cliper_scores(feats: torch.Tensor, attn_map: torch.Tensor, text: torch.Tensor, scale: torch.Tensor,
                  keep: float = CLIPER_KEEP) -> torch.Tensor:
    """CLIPer's score fusion (arXiv:2411.13836; linsun449/cliper.code ``CLIPer.forward``).

    ``P_l = softmax_c(scale * cos(f_l, [t_1..t_C, mean_c t_c]))[:C]`` per layer (the mean class embedding is an
    extra distractor, as in the authors' code); the last layer's map keeps, per class, the patches above
    ``keep`` times that class's maximum; the result is ``A P_L' + mean_{l<L} P_l``.

    Args:
        feats: ``(L, B, N, D)`` from :func:`cliper_features`; attn_map: ``(B, N, N)``;
        text: class embeddings ``(C, D)``; scale: the logit scale (a scalar tensor).

    Returns:
        fused scores ``(B, N, C)``, non-negative (not a distribution).
    """
    text = F.normalize(text, dim=-1)
    text = torch.cat([text, F.normalize(text.mean(0, keepdim=True), dim=-1)], dim=0)
    probs = torch.softmax(scale * F.normalize(feats, dim=-1) @ text.t(), dim=-1)[..., :-1]  # (L, B, N, C)
    last = probs[-1]
    last = torch.where(last < keep * last.amax(dim=1, keepdim=True), torch.zeros_like(last), last)
    fused = attn_map @ last
    if probs.shape[0] > 1:
        fused = fused + probs[:-1].mean(0)
    return fused


def vit_dense(mode: str, visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Dense features ``(B, h*w, D)`` of ``mode`` (for ``cliper``: those of the last-layer embedding)."""
    if mode == "cliper":
        return cliper_features(visual, images)[0][-1]
    return {"maskclip": maskclip, "sclip": sclip, "clearclip": clearclip, "naclip": naclip}[mode](visual, images)


def grid_logits_to_image(scores: torch.Tensor, grid: tuple[int, int], size) -> torch.Tensor:
    """``(B, h*w, C)`` -> ``(B, C, H, W)``, bilinearly upsampled to ``size``."""
    b, _, c = scores.shape
    out = scores.transpose(1, 2).reshape(b, c, grid[0], grid[1])
    return F.interpolate(out, size=tuple(size), mode="bilinear", align_corners=False)


__all__ = ["VIT_MODES", "NACLIP_STD", "CLIPER_KEEP", "embed_tokens", "qkv", "attend", "maskclip", "sclip",
           "clearclip", "gaussian_bias", "naclip", "cliper_features", "cliper_scores", "vit_dense",
           "grid_logits_to_image"]
