"""Segmentation losses for finetuning: cross-entropy, focal, soft Dice and their sum.

All take logits ``(B, C, H, W)`` (any float dtype; computed in float32) and int64 targets ``(B, H, W)`` with
``ignore_index`` for unlabelled pixels, and return a scalar averaged over labelled pixels (nats for the
cross-entropy and focal terms; the Dice term is dimensionless in [0, 1]).

* focal (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017, eq. 5, without the alpha weights):
  ``-(1 - p_t)^gamma * log p_t``;
* soft Dice (Milletari et al., "V-Net", 3DV 2016, eq. 1, squared-free form of Sudre et al. 2017):
  ``1 - mean_c (2 sum p_c y_c + eps) / (sum p_c + sum y_c + eps)`` over the classes present in the batch's
  labels or predicted mass, probabilities from a softmax, ignored pixels removed;
* ``focal-dice``: focal + Dice, the combination used by several open-vocabulary segmentation decoders.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from opentrans.errors import OpenTransError

#: ``loss`` choices of :func:`segmentation_loss`.
LOSSES = ("ce", "focal", "dice", "focal-dice")


def focal_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int, gamma: float = 2.0) -> torch.Tensor:
    """Mean focal loss over labelled pixels; ``gamma = 0`` is the cross-entropy."""
    logp = F.log_softmax(logits.float(), dim=1)
    valid = target != ignore_index
    t = target.clamp(0, logits.shape[1] - 1).unsqueeze(1)
    logp_t = logp.gather(1, t).squeeze(1)[valid]
    return (-(1.0 - logp_t.exp()) ** gamma * logp_t).mean()


def dice_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int, eps: float = 1.0) -> torch.Tensor:
    """Soft multi-class Dice loss over labelled pixels (see the module notes)."""
    c = logits.shape[1]
    valid = (target != ignore_index)
    prob = F.softmax(logits.float(), dim=1).permute(0, 2, 3, 1)[valid]  # (N, C)
    onehot = F.one_hot(target[valid], c).float()  # (N, C)
    inter = (prob * onehot).sum(0)
    denom = prob.sum(0) + onehot.sum(0)
    present = onehot.sum(0) > 0
    dice = (2 * inter + eps) / (denom + eps)
    return 1.0 - dice[present].mean()


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int, loss: str = "ce") -> torch.Tensor:
    """The ``loss`` of :data:`LOSSES` (``ce`` is ``F.cross_entropy``).

    Raises:
        OpenTransError: an unknown loss name.
    """
    if loss == "ce":
        return F.cross_entropy(logits.float(), target, ignore_index=ignore_index)
    if loss == "focal":
        return focal_loss(logits, target, ignore_index)
    if loss == "dice":
        return dice_loss(logits, target, ignore_index)
    if loss == "focal-dice":
        return focal_loss(logits, target, ignore_index) + dice_loss(logits, target, ignore_index)
    raise OpenTransError(f"--loss {loss}: choose one of {', '.join(LOSSES)}")
