"""The ``naclip`` dense mode: NACLIP's Gaussian neighbourhood k-k attention in the reduced last block."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from opentrans.models.dense.common import _head, _trunk, attend, qkv, register


#: How naclip resizes the positional embedding (:data:`opentrans.models.dense.common.POS_RESIZE_METHODS`).
POS_RESIZE = "dino"
#: The paper's published ViT-B/16 evaluation settings (see :func:`opentrans.inference.training_free.paper_protocol`):
#: ``"*"`` for every dataset, a ``--data`` format key for what differs, ``"source"`` the files read,
#: ``"notes"`` what OpenTrans does not reproduce.
PROTOCOL = {
    "source": "sinahmr/NACLIP@0cac3a651f753b11315ea799cfbfabf79da1bd76 naclip.py L20-22, "
              "configs/cfg_*.py (Resize scale=(2048, 336))",
    "*": {"short_side": 336, "window": (224, 224), "stride": (112, 112), "templates": "imagenet80",
          "logit_scale": 40.0},
    "coco-object": {"bg_threshold": 0.1, "prompt_sets": "coco-object"},
    "voc": {"bg_threshold": 0.1, "prompt_sets": "voc", "window": None, "stride": None},
    "notes": ("NACLIP's PAMR post-processing (pamr_steps=10 by default) is not implemented",
              "prompt sets: OpenTrans's built-in coco-object/voc sets differ from the authors' "
              "configs/cls_*.txt in a few names; pass theirs with --prompt-sets for an exact match"),
}
#: NACLIP's Gaussian standard deviation in patches (``gaussian_std=5.`` in sinahmr/NACLIP ``naclip.py`` L21).
NACLIP_STD = 5.0


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


@register("naclip", rank=4, pos_resize=POS_RESIZE, protocol=PROTOCOL)
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
    x, last, grid = _trunk(visual, images, POS_RESIZE)
    _, k, v = qkv(last.attn, last.ln_1(x))
    bias = gaussian_bias(grid, std).to(k.dtype)  # (1 + h*w, 1 + h*w); prompt tokens after the patches get none
    extra = k.shape[-2] - bias.shape[-1]
    if extra:
        bias = F.pad(bias, (0, extra, 0, extra))
    logits = (k * k.shape[-1] ** -0.5) @ k.transpose(-2, -1) + bias
    return _head(visual, last.ls_1(attend(last.attn, torch.softmax(logits, dim=-1), v)), grid)
