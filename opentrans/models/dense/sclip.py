"""The ``sclip`` dense mode: SCLIP's correlative self-attention."""

from __future__ import annotations

import torch
from torch import nn

from opentrans.models.dense.common import _head, _self_softmax, _trunk, attend, qkv, register


#: How sclip resizes the positional embedding (:data:`opentrans.models.dense.common.POS_RESIZE_METHODS`).
POS_RESIZE = "dino"
#: The paper's published ViT-B/16 evaluation settings (see :func:`opentrans.inference.training_free.paper_protocol`):
#: ``"*"`` for every dataset, a ``--data`` format key for what differs, ``"source"`` the files read,
#: ``"notes"`` what OpenTrans does not reproduce.
PROTOCOL = {
    "source": "wangf3014/SCLIP@b56bd3014b9e8a3ee3450bcfc53700a67d627b7a clip_segmentor.py L19-21, "
              "configs/cfg_*.py (Resize scale=(2048, 336))",
    "*": {"short_side": 336, "window": (224, 224), "stride": (112, 112), "templates": "imagenet80",
          "logit_scale": 40.0},
    "coco-object": {"logit_scale": 50.0, "bg_threshold": 0.1, "prompt_sets": "coco-object"},
    "voc": {"logit_scale": 65.0, "bg_threshold": 0.1, "prompt_sets": "voc",
            "notes": ("SCLIP's area_thd=0.1 on VOC-21 (small predicted classes sent to background) is not "
                      "implemented",)},
    "notes": ("prompt sets: OpenTrans's built-in coco-object/voc sets differ from the authors' "
              "configs/cls_*.txt in a few names; pass theirs with --prompt-sets for an exact match",),
}


@register("sclip", rank=2, pos_resize=POS_RESIZE, protocol=PROTOCOL)
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
    x, last, grid = _trunk(visual, images, POS_RESIZE)
    q, k, v = qkv(last.attn, last.ln_1(x))
    weights = _self_softmax(q) + _self_softmax(k)
    x = x + last.ls_1(attend(last.attn, weights, v))
    x = x + last.ls_2(last.mlp(last.ln_2(x)))
    return _head(visual, x, grid)
