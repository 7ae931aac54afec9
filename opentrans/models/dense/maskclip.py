"""The ``maskclip`` dense mode: MaskCLIP as its authors' code computes it (the default; ResNets too)."""

from __future__ import annotations

import torch
from torch import nn

from opentrans.models.dense.common import _head, _trunk, _value_path, register


#: How maskclip resizes the positional embedding (:data:`opentrans.models.dense.common.POS_RESIZE_METHODS`).
POS_RESIZE = "bicubic"


@register("maskclip", rank=0, pos_resize=POS_RESIZE, resnet=True)
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
    x, last, grid = _trunk(visual, images, POS_RESIZE)
    v = x + last.ls_1(_value_path(last, x))
    v = v + last.ls_2(last.mlp(last.ln_2(v)))
    return _head(visual, v, grid)
