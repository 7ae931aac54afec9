"""The ``maskclip-noresidual`` dense mode: the ClearCLIP repository's residual-free MaskCLIP baseline."""

from __future__ import annotations

import torch
from torch import nn

from opentrans.models.dense.common import _head, _trunk, _value_path, register


#: How maskclip-noresidual resizes the positional embedding (:data:`opentrans.models.dense.common.POS_RESIZE_METHODS`).
POS_RESIZE = "dino"
#: The paper's published ViT-B/16 evaluation settings (see :func:`opentrans.inference.training_free.paper_protocol`):
#: ``"*"`` for every dataset, a ``--data`` format key for what differs, ``"source"`` the files read,
#: ``"notes"`` what OpenTrans does not reproduce.
PROTOCOL = {
    "source": "mc-lan/ClearCLIP@ad68a404d55d48d27330b93554eb64a234ff717f (the repository that evaluates this "
              "baseline, model_type='MaskCLIP'): clearclip_segmentor.py L22-23, configs/cfg_*.py",
    "*": {"short_side": 448, "window": (448, 448), "stride": (224, 224), "templates": "imagenet80",
          "logit_scale": 50.0},
    "coco-object": {"bg_threshold": 0.4, "prompt_sets": "coco-object"},
    "voc": {"bg_threshold": 0.5, "prompt_sets": "voc"},
    "notes": ("prompt sets: ClearCLIP's configs/cls_*.txt name one prompt per class; pass such a file with "
              "--prompt-sets for an exact match",),
}


@register("maskclip-noresidual", rank=1, pos_resize=POS_RESIZE, protocol=PROTOCOL)
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
    x, last, grid = _trunk(visual, images, POS_RESIZE)
    return _head(visual, last.ls_1(_value_path(last, x)), grid)
