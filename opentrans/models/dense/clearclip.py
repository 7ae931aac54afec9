"""The ``clearclip`` dense mode: ClearCLIP's residual-free, FFN-free q-q attention."""

from __future__ import annotations

import torch
from torch import nn

from opentrans.models.dense.common import _head, _self_softmax, _trunk, attend, qkv, register


#: How clearclip resizes the positional embedding (:data:`opentrans.models.dense.common.POS_RESIZE_METHODS`).
POS_RESIZE = "dino"
#: The paper's published ViT-B/16 evaluation settings (see :func:`opentrans.inference.training_free.paper_protocol`):
#: ``"*"`` for every dataset, a ``--data`` format key for what differs, ``"source"`` the files read,
#: ``"notes"`` what OpenTrans does not reproduce.
PROTOCOL = {
    "source": "mc-lan/ClearCLIP@ad68a404d55d48d27330b93554eb64a234ff717f clearclip_segmentor.py L22-23, "
              "configs/cfg_*.py (Resize scale=(2048, 448))",
    "*": {"short_side": 448, "window": (448, 448), "stride": (224, 224), "templates": "imagenet80",
          "logit_scale": 50.0},
    "coco-object": {"bg_threshold": 0.4, "prompt_sets": "coco-object"},
    "voc": {"bg_threshold": 0.5, "prompt_sets": "voc"},
    "notes": ("prompt sets: ClearCLIP's configs/cls_*.txt name one prompt per class ('background', 'person'); "
              "pass such a file with --prompt-sets for an exact match",
              "ClearCLIP pads crops whose size is not a multiple of the patch size; OpenTrans floors them"),
}


@register("clearclip", rank=3, pos_resize=POS_RESIZE, protocol=PROTOCOL)
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
    x, last, grid = _trunk(visual, images, POS_RESIZE)
    q, _, v = qkv(last.attn, last.ln_1(x))
    return _head(visual, last.ls_1(attend(last.attn, _self_softmax(q), v)), grid)
