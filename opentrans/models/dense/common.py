"""The machinery every training-free dense mode shares, and the registry of the modes.

A mode is one file of :mod:`opentrans.models.dense` that registers a :class:`DenseMode` with :func:`register`
(its feature function, how it resizes the positional embedding, whether a ResNet supports it, its paper's
evaluation protocol). Everything else (the CLI's ``--dense-mode`` choices, :data:`~opentrans.models.dense.VIT_MODES`,
the spec check, ``--protocol paper``) reads the registry, so adding a mode is one new file (and its test).

Token sequences are ``x`` of shape ``(B, 1 + h*w, W)`` (CLS first); see :mod:`opentrans.models.dense` for the
notation.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from opentrans.errors import OpenTransError
from opentrans.registry import Registry

_SYMBOLIC_GRID: list[bool] = []

#: How a mode may resize the positional embedding to another patch grid, as its authors' code does:
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
#: (each mode names its method: :attr:`DenseMode.pos_resize`).
POS_RESIZE_METHODS = ("bicubic", "dino", "bilinear")
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
    """``(gh*gw, W)`` patch embeddings -> ``(h*w, W)`` by ``method`` (see :data:`POS_RESIZE_METHODS`)."""
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
    ``method`` (:data:`POS_RESIZE_METHODS`; ``new_grid`` may hold traced sizes inside :func:`symbolic_grid`).

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

    The positional embedding is resized by ``pos_resize`` (:data:`POS_RESIZE_METHODS`) when the grid differs from the
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


@dataclass(frozen=True)
class DenseMode:
    """One training-free dense mode.

    Attributes:
        name: the ``--dense-mode`` value.
        rank: position in reports and in :data:`~opentrans.models.dense.VIT_MODES` (ascending).
        features: ``(visual, images (B, 3, H, W)) -> dense features (B, h*w, D)``, not normalised, on a ViT.
        pos_resize: how the positional embedding is resized to another grid (``bicubic``, ``dino``, ``bilinear``;
            see :data:`~opentrans.models.dense.POS_RESIZE`).
        resnet: whether a ModifiedResNet image tower supports the mode too.
        protocol: the paper's evaluation settings (see :func:`opentrans.inference.training_free.paper_protocol`), or None.
        logits: for a mode whose logits are not ``scale * cos(features, text)``:
            ``(segmentor, images (B, 3, H, W), text (C, D)) -> logits (B, C, H, W)``, replacing
            :meth:`~opentrans.models.segmentor.OpenVocabSegmentor.forward`'s; None for the cosine logits.
        logit_scale: the method's own softmax temperature, or None for CLIP's learnt logit scale.
    """

    name: str
    rank: int
    features: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    pos_resize: str
    resnet: bool = False
    protocol: dict | None = None
    logits: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    logit_scale: float | None = None


#: Every training-free dense mode, by name; each registers itself in its own module of this package.
DENSE = Registry("dense mode", plugins="opentrans.models.dense")


def register(name: str, *, rank: int, pos_resize: str, resnet: bool = False, protocol: dict | None = None,
             logits: Callable | None = None, logit_scale: float | None = None):
    """Decorator: register the decorated feature function as the dense mode ``name`` (see :class:`DenseMode`)."""

    def deco(features):
        DENSE.add(name, DenseMode(name, rank, features, pos_resize, resnet, protocol, logits, logit_scale))
        return features

    return deco


def modes() -> list[DenseMode]:
    """Every registered mode, in report order (:attr:`DenseMode.rank`)."""
    return sorted((mode for _, mode in DENSE.items()), key=lambda m: (m.rank, m.name))


def vit_modes() -> tuple[str, ...]:
    """The names of the modes a ViT supports (all of them), in report order."""
    return tuple(m.name for m in modes())


def resnet_modes() -> tuple[str, ...]:
    """The names of the modes a ModifiedResNet image tower supports, in report order."""
    return tuple(m.name for m in modes() if m.resnet)


def vit_dense(mode: str, visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Dense features ``(B, h*w, D)`` of ``mode`` (for ``cliper``: those of the last-layer embedding).

    Raises:
        OpenTransError: an unknown mode.
    """
    if mode not in DENSE:
        raise OpenTransError(f"unknown dense mode '{mode}'; choose one of {', '.join(vit_modes())}")
    return DENSE.get(mode).features(visual, images)


def grid_logits_to_image(scores: torch.Tensor, grid: tuple[int, int], size) -> torch.Tensor:
    """``(B, h*w, C)`` -> ``(B, C, H, W)``, bilinearly upsampled to ``size``."""
    b, _, c = scores.shape
    out = scores.transpose(1, 2).reshape(b, c, grid[0], grid[1])
    return F.interpolate(out, size=tuple(size), mode="bilinear", align_corners=False)
