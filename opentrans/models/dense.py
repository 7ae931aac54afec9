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
scales (identity for OpenAI CLIP, the only weights the authors ran) are applied wherever the original block
applies them.

**Every mode computes what its authors' released code computes** (issue 12), including how the positional
embedding is resized to another patch grid (:data:`POS_RESIZE`). Each docstring names the paper (arXiv id and
method section), writes out the equation, and cites the repository, the commit that was read and the lines.
Variants of OpenTrans's own are named options, documented as such: the ``maskclip-noresidual`` mode (the
ClearCLIP repository's residual-free MaskCLIP baseline), ``cliper_scores(fusion="row-average")`` and
``embed_tokens(pos_resize=...)`` with a resize other than the mode's. ``tests/test_dense.py`` holds each mode
against an independent transcription of the authors' code. Paper equation numbers were not available offline
and are not quoted.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from opentrans.errors import OpenTransError

#: The training-free modes a ViT segmentor supports, in the order reports list them. Each computes what its
#: authors' released code computes; ``maskclip-noresidual`` is the baseline the ClearCLIP repository calls
#: MaskCLIP (see :func:`maskclip_noresidual`).
VIT_MODES = ("maskclip", "maskclip-noresidual", "sclip", "clearclip", "naclip", "cliper")
#: NACLIP's Gaussian standard deviation in patches (``gaussian_std=5.`` in sinahmr/NACLIP ``naclip.py`` L21).
NACLIP_STD = 5.0
#: CLIPer keeps, per class, only last-layer probabilities above this share of the class's maximum over patches
#: (``seg_last[seg_last < seg_last.amax((-1, -2), keepdim=True) * self.cfg.attention_thr] = 0`` in
#: linsun449/cliper.code ``modified_clip/model.py`` L227). ``attention_thr`` is 0.2 in most of the authors'
#: ViT-B/16 configs (``scripts/config/vit-b-16/ovs_*.yaml``), 0.1 for VOC-21/VOC-20 and 0.35 for Cityscapes;
#: :mod:`opentrans.training_free` sets the per-dataset value under ``--protocol paper``.
CLIPER_KEEP = 0.2
#: CLIPer's softmax temperature: ``self.logit_scale = cfg.logit_scale`` (``modified_clip/model.py`` L30), 100 in the
#: authors' ViT-B/16 configs but for COCO-Object (``ovs_coco5k.yaml``) and COCO-Stuff, 50. A constant of
#: the method, not CLIP's learnt logit scale (which is also 100 for OpenAI's weights).
CLIPER_LOGIT_SCALE = 100.0
#: Score fusions :func:`cliper_scores` offers: the authors' (default) and OpenTrans's own earlier variant.
CLIPER_FUSIONS = ("cliper", "row-average")


_SYMBOLIC_GRID: list[bool] = []

#: How each mode resizes the positional embedding to another patch grid, as its authors' code does:
#:
#: * ``"bicubic"``: bicubic to the exact grid, ``align_corners=False`` (chongzhou96/MaskCLIP
#:   ``mmseg/models/backbones/vit.py`` L383-410, ``interpolate_mode='bicubic'``);
#: * ``"dino"``: DINO's bicubic resize by ``scale_factor=((h + 0.1) / gh, (w + 0.1) / gw)`` (wangf3014/SCLIP
#:   ``clip/model.py`` L263-281, mc-lan/ClearCLIP ``open_clip/transformer.py`` L569-587, sinahmr/NACLIP
#:   ``clip/model.py`` L134-151); the source coordinate of output patch ``i`` is ``(i + 0.5) gh / (h + 0.1) - 0.5``,
#:   not ``(i + 0.5) gh / h - 0.5``, so it differs from ``"bicubic"`` at every grid but the pretraining one;
#: * ``"bilinear"``: bilinear to the exact grid, applied at every size (linsun449/cliper.code
#:   ``modified_clip/model.py`` L165-174, ``upsample_pos_emb``).
#:
#: ``"bicubic"`` and ``"dino"`` are skipped, as there, whenever the token count equals the pretraining one
#: (``h * w == gh * gw``), even for another grid shape (then the embedding is added in its flattened order).
POS_RESIZE = {"maskclip": "bicubic", "maskclip-noresidual": "dino", "sclip": "dino", "clearclip": "dino",
              "naclip": "dino", "cliper": "bilinear"}
#: PyTorch's bicubic convolution coefficient (``upsample_bicubic2d``, ONNX ``cubic_coeff_a``).
_CUBIC_A = -0.75


@contextlib.contextmanager
def symbolic_grid():
    """Within the block, :func:`embed_tokens` keeps the patch grid as traced sizes (``x.shape``, not Python ints)
    and resizes the positional embedding without Python control flow, so a traced/exported graph accepts any
    input (H, W) (ONNX export with dynamic height/width, :func:`opentrans.deploy.export.export_onnx`
    ``dynamic_hw=True``). Outside it (eager runs, fixed-size exports) nothing changes. The traced resize computes
    what the eager one does at every grid, including the authors' skip at the pretraining token count (both
    branches are computed and one is selected with ``torch.where``); ``"dino"`` is traced as two interpolation
    matrices (:func:`_dino_matrix`, in every trace) because ``F.interpolate`` takes its scale factor only as a
    Python float and runtimes do not all evaluate ONNX ``Resize`` with ``scales`` alike."""
    _SYMBOLIC_GRID.append(True)
    try:
        yield
    finally:
        _SYMBOLIC_GRID.pop()


def _cubic_weights(t: torch.Tensor) -> list[torch.Tensor]:
    """PyTorch's four bicubic weights for fractional offsets ``t`` (taps at -1, 0, 1, 2)."""
    a = _CUBIC_A

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def _dino_matrix(n_out, n_in: int) -> torch.Tensor:
    """``(n_out, n_in)`` matrix ``R`` with ``R @ p`` equal to ``F.interpolate(p, scale_factor=(n_out + 0.1) / n_in,
    mode="bicubic", align_corners=False)`` along one axis (``n_out`` may be a traced size).

    Source coordinate ``(i + 0.5) n_in / (n_out + 0.1) - 0.5``, taps clamped to the border, as PyTorch's
    ``upsample_bicubic2d`` with a given scale factor.
    """
    i = torch.arange(n_out, dtype=torch.float32)
    src = (i + 0.5) * (n_in / (n_out + 0.1)) - 0.5
    base = torch.floor(src)
    weights = _cubic_weights(src - base)
    cols = torch.arange(n_in, dtype=torch.float32)
    out = 0
    for tap, w in zip((-1, 0, 1, 2), weights):
        idx = torch.clamp(base + tap, min=0, max=n_in - 1)
        out = out + w[:, None] * (idx[:, None] == cols[None, :]).to(torch.float32)
    return out


def _resize_grid(patch_pos: torch.Tensor, old_grid, new_grid, method: str) -> torch.Tensor:
    """``(gh*gw, W)`` patch embeddings -> ``(h*w, W)`` by ``method`` (see :data:`POS_RESIZE`)."""
    width = patch_pos.shape[-1]
    gh, gw = int(old_grid[0]), int(old_grid[1])
    grid = patch_pos.reshape(1, gh, gw, width).permute(0, 3, 1, 2)  # (1, W, gh, gw)
    if method == "dino" and (_SYMBOLIC_GRID or torch.jit.is_tracing()):
        # traced (an ONNX export): interpolation matrices, because the exporter's Resize-with-scales is not
        # evaluated alike by every runtime (OpenVINO recomputes the scales from the sizes)
        rh, rw = _dino_matrix(new_grid[0], gh).to(grid.dtype), _dino_matrix(new_grid[1], gw).to(grid.dtype)
        out = torch.einsum("ia,cab,jb->cij", rh, grid[0], rw)[None]
    elif method == "dino":
        h, w = int(new_grid[0]), int(new_grid[1])
        out = F.interpolate(grid, scale_factor=((h + 0.1) / gh, (w + 0.1) / gw), mode="bicubic",
                            align_corners=False, recompute_scale_factor=False)
        if tuple(out.shape[-2:]) != (h, w):  # floor((g + 0.1) / g0 * g0) is g for every grid a ViT meets
            raise OpenTransError(f"positional-embedding resize gave {tuple(out.shape[-2:])} for grid {(h, w)}")
    elif method in ("bicubic", "bilinear"):
        out = F.interpolate(grid, size=tuple(new_grid), mode=method, align_corners=False)
    else:
        raise OpenTransError(f"unknown positional-embedding resize '{method}'; choose one of bicubic, dino, bilinear")
    return out.permute(0, 2, 3, 1).reshape(new_grid[0] * new_grid[1], width)


def _interpolate_pos_embed(pos: torch.Tensor, old_grid, new_grid, method: str = "bicubic") -> torch.Tensor:
    """Resize a ViT positional embedding ``(1 + gh*gw, W)`` to the patch grid ``new_grid`` ``(h, w)`` by
    ``method`` (:data:`POS_RESIZE`; ``new_grid`` may hold traced sizes inside :func:`symbolic_grid`).

    Returns:
        ``(1 + h*w, W)``; for ``"bicubic"``/``"dino"`` the input itself when ``h*w == gh*gw`` (the authors' rule).
    """
    skip_same_count = method in ("bicubic", "dino")
    n_old = int(old_grid[0]) * int(old_grid[1])
    if not _SYMBOLIC_GRID:
        if tuple(old_grid) == tuple(new_grid) or (skip_same_count and new_grid[0] * new_grid[1] == n_old):
            return pos
        return torch.cat([pos[:1], _resize_grid(pos[1:], old_grid, new_grid, method)], dim=0)
    patch_pos = _resize_grid(pos[1:], old_grid, new_grid, method)
    if skip_same_count:  # traced: select the unresized embedding where the token count is the pretraining one
        n_new = new_grid[0] * new_grid[1]
        same = torch.as_tensor(n_new) == n_old
        unresized = pos[1:][torch.arange(n_new) % n_old]  # (h*w, W); equals pos[1:] exactly when h*w == gh*gw
        patch_pos = torch.where(same, unresized, patch_pos)
    return torch.cat([pos[:1], patch_pos], dim=0)


def embed_tokens(visual: nn.Module, images: torch.Tensor,
                 pos_resize: str = "bicubic") -> tuple[torch.Tensor, tuple[int, int]]:
    """Patch + CLS tokens after ``ln_pre``: ``(B, 1 + h*w, W)`` and the grid ``(h, w)``.

    The positional embedding is resized by ``pos_resize`` (:data:`POS_RESIZE`) when the grid differs from the
    pretraining grid.
    """
    x = visual.conv1(images)  # (B, W, h, w)
    grid = (x.shape[-2], x.shape[-1]) if _SYMBOLIC_GRID else (int(x.shape[-2]), int(x.shape[-1]))
    x = x.flatten(2).transpose(1, 2)  # (B, h*w, W)
    cls = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
    x = torch.cat([cls, x], dim=1)
    x = x + _interpolate_pos_embed(visual.positional_embedding, visual.grid_size, grid, pos_resize).to(x.dtype)
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


def _trunk(visual: nn.Module, images: torch.Tensor, pos_resize: str):
    x, grid = embed_tokens(visual, images, pos_resize)
    blocks = visual.transformer.resblocks
    for block in blocks[:-1]:
        x = block(x)
    return x, blocks[-1], grid


def _value_path(last: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``out_proj(W_v ln_1(x) + b_v)`` of block ``last`` for tokens ``x`` ``(B, N, W)`` -> ``(B, N, W)``."""
    width = last.attn.in_proj_weight.shape[0] // 3
    w_v = last.attn.in_proj_weight[2 * width:]
    b_v = None if last.attn.in_proj_bias is None else last.attn.in_proj_bias[2 * width:]
    return last.attn.out_proj(F.linear(last.ln_1(x), w_v, b_v))


def maskclip(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """MaskCLIP (Zhou, Loy, Dai, "Extract Free Dense Labels from CLIP", ECCV 2022, arXiv:2112.01071, Sec. 3),
    as the authors' code computes it on a ViT.

    The last block's query-key attention is replaced by the identity (each token keeps its own value); the
    block's residual connection and FFN stay on that value path::

        v  = x + ls_1(out_proj(W_v ln_1(x) + b_v))
        v' = v + ls_2(mlp(ln_2(v)))
        f  = proj(ln_post(v'))

    (chongzhou96/MaskCLIP at 245d31f809be9c1938f8f30561b6bf9ed033d746, ``mmseg/models/backbones/vit.py``
    L94-108: ``v += x; v = self.ffn(self.norm2(v), identity=v)``, then L434-437 the final norm and
    ``maskclip_head.py`` L79-80 ``proj``.) The positional embedding is resized bicubically to the exact grid
    (:data:`POS_RESIZE`). The residual-free variant is :func:`maskclip_noresidual`.

    Returns:
        dense features ``(B, h*w, D)``, not normalised.
    """
    x, last, grid = _trunk(visual, images, POS_RESIZE["maskclip"])
    v = x + last.ls_1(_value_path(last, x))
    v = v + last.ls_2(last.mlp(last.ln_2(v)))
    return _head(visual, v, grid)


def maskclip_noresidual(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The residual-free, FFN-free MaskCLIP baseline of the ClearCLIP repository (not MaskCLIP's own code).

    ClearCLIP's code calls this ``model_type='MaskCLIP'`` with ``ignore_residual=True``: the identity attention's
    output alone goes to ``ln_post``/``proj``::

        f = proj(ln_post(ls_1(out_proj(W_v ln_1(x) + b_v))))

    (mc-lan/ClearCLIP at ad68a404d55d48d27330b93554eb64a234ff717f, ``open_clip/transformer.py`` L524-526 and
    L604-609: a ``-inf`` mask with a zero diagonal, i.e. the identity.) The positional embedding is resized the
    DINO way, as in that repository (:data:`POS_RESIZE`). Before issue 12 this was OpenTrans's ``maskclip``.

    Returns:
        dense features ``(B, h*w, D)``, not normalised.
    """
    x, last, grid = _trunk(visual, images, POS_RESIZE["maskclip-noresidual"])
    return _head(visual, last.ls_1(_value_path(last, x)), grid)


def sclip(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """SCLIP (Wang, Mei, Yuille, "SCLIP: Rethinking Self-Attention for Dense Vision-Language Inference",
    ECCV 2024, arXiv:2312.01597, method section: correlative self-attention, CSA).

    The last block keeps its residual and FFN; its attention is replaced by the sum of two self-correlations::

        A = softmax(s q q^T) + softmax(s k k^T)
        x' = x + ls_1(Attn(A));   x'' = x' + ls_2(mlp(ln_2(x')))
        f = proj(ln_post(x''))

    (wangf3014/SCLIP at b56bd3014b9e8a3ee3450bcfc53700a67d627b7a, ``clip/model.py`` L247-251 and L295-298:
    ``custom_attn(..., csa=True)``; note the rows of A sum to 2, as there.) Positional embedding: DINO resize.

    Returns:
        dense features ``(B, h*w, D)``, not normalised.
    """
    x, last, grid = _trunk(visual, images, POS_RESIZE["sclip"])
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

    (mc-lan/ClearCLIP at ad68a404d55d48d27330b93554eb64a234ff717f, ``open_clip/transformer.py`` L524-526 and
    L614-616: ``model_type='ClearCLIP'``, ``ignore_residual=True``; the repository's ``configs/base_config.py``
    ships ``model_type='vanilla'``, which the paper's numbers do not use.) Positional embedding: DINO resize.

    Returns:
        dense features ``(B, h*w, D)``, not normalised.
    """
    x, last, grid = _trunk(visual, images, POS_RESIZE["clearclip"])
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

    (sinahmr/NACLIP at 0cac3a651f753b11315ea799cfbfabf79da1bd76, ``clip/model.py`` L118-119 and L189-207:
    ``arch='reduced'``, ``attn_strategy='naclip'``; the bias is not scaled.) Positional embedding: DINO resize.
    NACLIP's PAMR post-processing (``pamr_steps=10`` by default in ``naclip.py`` L21) is not part of this mode.

    Returns:
        dense features ``(B, h*w, D)``, not normalised.
    """
    x, last, grid = _trunk(visual, images, POS_RESIZE["naclip"])
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

    The authors' code (linsun449/cliper.code at c05fa41a4966d0a43af513546b17c346ccd42559,
    ``modified_clip/model.py`` L57-67 and L112-138, ``attn_type='fused-attn'``, ``fuse_feature=True``) applies
    the two normalisations of step 2 in place inside the loop over the L embeddings, so embedding l sees
    ``l + 1`` Sinkhorn steps and the map returned for score fusion sees L; this function reproduces that
    exactly. The positional embedding is resized bilinearly to the exact grid (L165-174, :data:`POS_RESIZE`).

    Returns:
        ``features`` ``(L, B, h*w, D)`` (one per embedding, not normalised) and the head-averaged fused map
        of the last embedding restricted to patches, ``(B, h*w, h*w)``.
    """
    x, grid = embed_tokens(visual, images, POS_RESIZE["cliper"])
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


def cliper_scores(feats: torch.Tensor, attn_map: torch.Tensor, text: torch.Tensor, scale,
                  keep: float = CLIPER_KEEP, fusion: str = "cliper") -> torch.Tensor:
    """CLIPer's score fusion (arXiv:2411.13836; linsun449/cliper.code at c05fa41a4966d0a43af513546b17c346ccd42559,
    ``modified_clip/model.py`` L214-230, ``CLIPer.forward`` with ``fuse_feature=True``, ``select_layer=-1``).

    ``P_l = softmax_c(scale * cos(f_l, [t_1..t_C, mean_c t_c]))[:C]`` per layer ``(N, C)`` (the mean class embedding
    is an extra distractor, as in the authors' code); the last layer's map keeps, per class, the patches at or
    above ``keep`` times that class's maximum over patches, ``P_L'``. Then, by ``fusion``:

    * ``"cliper"`` (default, the authors'): ``A^T P_L' + mean_{l<=L} P_l`` with ``P_L`` replaced by ``P_L'`` in
      the mean. Their ``seg_last.flatten(-2, -1) @ attn.mean(0)[1:, 1:]`` multiplies the ``(C, N)`` scores by
      ``A`` from the right, i.e. ``A^T P`` in this ``(N, C)`` layout, and the in-place thresholding of
      ``seg_last`` (a view of ``seg[-1]``) also zeroes the last layer inside ``seg.mean(0)``.
    * ``"row-average"`` (OpenTrans's own variant, not the authors'): ``A P_L' + mean_{l<L} P_l``, each patch
      averaging the last-layer scores over its row of ``A``, and the mean over the first L-1 layers only.

    Args:
        feats: ``(L, B, N, D)`` from :func:`cliper_features`; attn_map: ``(B, N, N)``;
        text: class embeddings ``(C, D)``; scale: the softmax temperature (a float or scalar tensor,
            :data:`CLIPER_LOGIT_SCALE` in the authors' code); keep: :data:`CLIPER_KEEP`; fusion: see above.

    Returns:
        fused scores ``(B, N, C)``, non-negative (not a distribution).

    Raises:
        OpenTransError: an unknown ``fusion``.
    """
    if fusion not in CLIPER_FUSIONS:
        raise OpenTransError(f"unknown CLIPer fusion '{fusion}'; choose one of {', '.join(CLIPER_FUSIONS)}")
    text = F.normalize(text, dim=-1)
    text = torch.cat([text, F.normalize(text.mean(0, keepdim=True), dim=-1)], dim=0)
    probs = torch.softmax(scale * F.normalize(feats, dim=-1) @ text.t(), dim=-1)[..., :-1]  # (L, B, N, C)
    last = probs[-1]
    last = torch.where(last < keep * last.amax(dim=1, keepdim=True), torch.zeros_like(last), last)  # (B, N, C)
    if fusion == "row-average":
        fused = attn_map @ last
        return fused + probs[:-1].mean(0) if probs.shape[0] > 1 else fused
    layers = torch.cat([probs[:-1], last[None]], dim=0)  # (L, B, N, C), the last layer thresholded
    return attn_map.transpose(-2, -1) @ last + layers.mean(0)


def _cliper_last(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return cliper_features(visual, images)[0][-1]


#: Dense features ``(B, h*w, D)`` of each mode (for ``cliper``: those of the last-layer embedding).
MODE_FUNCTIONS = {"maskclip": maskclip, "maskclip-noresidual": maskclip_noresidual, "sclip": sclip,
                  "clearclip": clearclip, "naclip": naclip, "cliper": _cliper_last}


def vit_dense(mode: str, visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Dense features ``(B, h*w, D)`` of ``mode`` (for ``cliper``: those of the last-layer embedding).

    Raises:
        OpenTransError: an unknown mode.
    """
    if mode not in MODE_FUNCTIONS:
        raise OpenTransError(f"unknown dense mode '{mode}'; choose one of {', '.join(VIT_MODES)}")
    return MODE_FUNCTIONS[mode](visual, images)


def grid_logits_to_image(scores: torch.Tensor, grid: tuple[int, int], size) -> torch.Tensor:
    """``(B, h*w, C)`` -> ``(B, C, H, W)``, bilinearly upsampled to ``size``."""
    b, _, c = scores.shape
    out = scores.transpose(1, 2).reshape(b, c, grid[0], grid[1])
    return F.interpolate(out, size=tuple(size), mode="bilinear", align_corners=False)


__all__ = ["VIT_MODES", "NACLIP_STD", "CLIPER_KEEP", "CLIPER_LOGIT_SCALE", "CLIPER_FUSIONS", "POS_RESIZE",
           "MODE_FUNCTIONS", "embed_tokens", "qkv", "attend", "maskclip", "maskclip_noresidual", "sclip",
           "clearclip", "gaussian_bias", "naclip", "cliper_features", "cliper_scores", "vit_dense",
           "grid_logits_to_image"]
