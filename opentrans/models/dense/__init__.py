"""Training-free dense CLIP features: how the last ViT block is read out, one module per method.

Each mode lives in its own module of this package (``maskclip.py``, ``sclip.py``, ...) and registers itself in
:data:`~opentrans.models.dense.common.DENSE` (a new mode is one new file); the shared machinery (token
embedding, positional-embedding resizes, Q/K/V helpers, the registry) is :mod:`opentrans.models.dense.common`.
This package re-exports the functions and constants of the library API; the mode lists below are read from
the registry.

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
``embed_tokens(pos_resize=...)`` with a resize other than the mode's. ``tests/models/test_dense.py`` holds each mode
against an independent transcription of the authors' code. Paper equation numbers were not available offline
and are not quoted.
"""

from __future__ import annotations

from opentrans.models.dense.clearclip import clearclip
from opentrans.models.dense.cliper import (
    CLIPER_EPS,
    CLIPER_FUSIONS,
    CLIPER_KEEP,
    CLIPER_LOGIT_SCALE,
    cliper_features,
    cliper_scores,
)
from opentrans.models.dense.common import (
    _SYMBOLIC_GRID,
    DENSE,
    DenseMode,
    _dino_matrix,
    _interpolate_pos_embed,
    attend,
    embed_tokens,
    grid_logits_to_image,
    qkv,
    resnet_modes,
    symbolic_grid,
    vit_dense,
    vit_modes,
)
from opentrans.models.dense.maskclip import maskclip
from opentrans.models.dense.maskclip_noresidual import maskclip_noresidual
from opentrans.models.dense.naclip import NACLIP_STD, gaussian_bias, naclip
from opentrans.models.dense.sclip import sclip

#: The training-free modes a ViT segmentor supports, in the order reports list them (from :data:`DENSE`).
VIT_MODES = vit_modes()
#: The modes a ModifiedResNet image tower supports (``maskclip``).
RN_MODES = resnet_modes()
#: How each mode resizes the positional embedding to another patch grid (see
#: :data:`~opentrans.models.dense.common.POS_RESIZE_METHODS`).
POS_RESIZE = {name: DENSE.get(name).pos_resize for name in VIT_MODES}
#: Dense features ``(B, h*w, D)`` of each mode (for ``cliper``: those of the last-layer embedding).
MODE_FUNCTIONS = {name: DENSE.get(name).features for name in VIT_MODES}

__all__ = ["VIT_MODES", "RN_MODES", "NACLIP_STD", "CLIPER_EPS", "CLIPER_KEEP", "CLIPER_LOGIT_SCALE", "CLIPER_FUSIONS",
           "POS_RESIZE", "MODE_FUNCTIONS", "DENSE", "DenseMode", "embed_tokens", "qkv", "attend", "maskclip",
           "maskclip_noresidual", "sclip", "clearclip", "gaussian_bias", "naclip", "cliper_features",
           "cliper_scores", "vit_dense", "grid_logits_to_image", "symbolic_grid", "_SYMBOLIC_GRID", "_dino_matrix",
           "_interpolate_pos_embed"]
