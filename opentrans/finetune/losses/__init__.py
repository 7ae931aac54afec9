"""Segmentation losses for finetuning: cross-entropy, focal, soft Dice and their sum.

All take logits ``(B, C, H, W)`` (any float dtype; computed in float32) and int64 targets ``(B, H, W)`` with
``ignore_index`` for unlabelled pixels, and return a scalar averaged over labelled pixels (nats for the
cross-entropy and focal terms; the Dice term is dimensionless in [0, 1]).

* focal (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017, eq. 5, without the alpha weights):
  ``-(1 - p_t)^gamma * log p_t``;
* soft Dice (Milletari et al., "V-Net", 3DV 2016, eq. 1, squared-free form of Sudre et al. 2017):
  ``1 - mean_c (2 sum p_c y_c + eps) / (sum p_c + sum y_c + eps)`` over the classes present in the batch's
  labels or predicted mass, probabilities from a softmax, ignored pixels removed;
* ``focal-dice``: focal + Dice, the combination used by several open-vocabulary segmentation decoders;
* SSIM (Wang, Bovik, Sheikh & Simoncelli, "Image Quality Assessment: From Error Visibility to Structural
  Similarity", IEEE TIP 2004, eq. 13, with the 11x11 circular-symmetric Gaussian window of sigma 1.5 of their
  Sec. III-C and ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2``, dynamic range ``L = 1``) between the softmax
  probability map and the one-hot label map of every class: :func:`ssim_loss` is ``1 - mean SSIM``;
* ``focal-ssim``: focal + SSIM, the loss of SPT-SEG (Xu et al., "Spectral Prompt Tuning: Unveiling Unseen
  Classes for Zero-Shot Semantic Segmentation", AAAI 2024; official code ``clearxu/SPT``,
  ``models/losses/criterion.py``: ``loss_mask`` = sigmoid focal loss on the per-class mask logits, weight 20,
  plus ``loss_ssim`` = ``1 - SSIM`` with the same 11x11, sigma 1.5 window, weight 1). Here the focal term is
  the softmax focal loss above (nats per pixel) and both terms weigh 1 (``ssim_weight``): SPT-SEG's weight 20
  is tuned for its per-class *sigmoid* focal term (a different scale), so it is not carried over as a number.

Each ``--loss`` name is an entry of :data:`LOSS_FUNCTIONS` (a :class:`~opentrans.registry.Registry`): the six
above register here; another loss registers itself in its own module of this package (imported on the first
lookup), e.g. ``@LOSS_FUNCTIONS.register("tversky")`` on ``def tversky(logits, target, ignore_index, **weights)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from opentrans.errors import OpenTransError
from opentrans.registry import Registry

#: ``--loss`` name -> ``fn(logits (B, C, H, W), target (B, H, W) int64, ignore_index, **weights) -> scalar``
#: (``weights``: ``ssim_weight``; a loss ignores the weights it has no term for).
LOSS_FUNCTIONS: Registry = Registry("loss", plugins="opentrans.finetune.losses")
#: the built-in ``loss`` choices of :func:`segmentation_loss`, in the order of ``--help`` (plug-ins: :func:`loss_names`)
LOSSES = ("ce", "focal", "dice", "focal-dice", "ssim", "focal-ssim")


def loss_names() -> list[str]:
    """Every registered ``--loss`` name: the built-in ones in :data:`LOSSES` order, then plug-ins by name."""
    names = LOSS_FUNCTIONS.names()
    return [n for n in LOSSES if n in names] + [n for n in names if n not in LOSSES]
#: SSIM constants of Wang et al. 2004 (Sec. III-C): window side, Gaussian sigma (pixels), K1, K2.
SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03


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


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Normalised 2-D Gaussian weights ``(size, size)`` summing to 1 (Wang et al. 2004, Sec. III-C: 11x11,
    sigma 1.5 pixels), the outer product of a 1-D Gaussian with itself."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return torch.outer(g, g).float()


def ssim_map(x: torch.Tensor, y: torch.Tensor, valid: torch.Tensor | None = None, size: int = SSIM_WINDOW,
             sigma: float = SSIM_SIGMA, data_range: float = 1.0) -> torch.Tensor:
    """Local SSIM of two stacks of maps, channel by channel (Wang et al. 2004, eq. 13).

    ``SSIM = (2 mu_x mu_y + C1)(2 sigma_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2))`` with
    Gaussian-weighted local means, variances and covariance (their eqs. 14-16), ``C1 = (0.01 L)^2``,
    ``C2 = (0.03 L)^2``. The local statistics are normalised convolutions over the *valid* pixels of each
    window only: pixels outside the image (zero padding) and pixels with ``valid`` False have weight 0 and
    the remaining Gaussian weights are renormalised to sum to 1, so ignored pixels and the border do not bias
    the statistics (the paper slides the window over the image only; this is that reading with masking).

    Args:
        x, y: float ``(B, C, H, W)`` maps (values in ``[0, data_range]``).
        valid: bool ``(B, H, W)`` pixels to use, or None (all).
        size, sigma: Gaussian window side (pixels, odd) and standard deviation (pixels).
        data_range: L, the dynamic range of the maps (1 for probabilities).

    Returns:
        float32 ``(B, C, H, W)`` SSIM at every pixel (1 where the two maps agree in the window; values at
        invalid pixels are meaningless, mask them out).
    """
    x, y = x.float(), y.float()
    b, c, h, w = x.shape
    m = torch.ones(b, 1, h, w) if valid is None else valid.float().unsqueeze(1)
    win = gaussian_window(size, sigma).to(x.device)[None, None]
    pad = size // 2

    def local(t: torch.Tensor) -> torch.Tensor:  # weighted sum over the window, per channel
        ch = t.shape[1]
        return F.conv2d(t, win.expand(ch, 1, size, size), padding=pad, groups=ch)

    norm = local(m).clamp(min=1e-12)
    mu_x, mu_y = local(x * m) / norm, local(y * m) / norm
    var_x = local(x * x * m) / norm - mu_x ** 2
    var_y = local(y * y * m) / norm - mu_y ** 2
    cov = local(x * y * m) / norm - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    return ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))


def ssim_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """``1 - SSIM`` between the softmax probabilities and the one-hot labels, averaged over classes and labelled
    pixels (:func:`ssim_map` with ignored pixels masked); dimensionless, about 0 for a perfect prediction."""
    c = logits.shape[1]
    valid = target != ignore_index
    prob = F.softmax(logits.float(), dim=1)
    onehot = F.one_hot(target.clamp(0, c - 1), c).permute(0, 3, 1, 2).float() * valid.unsqueeze(1)
    local = ssim_map(prob, onehot, valid)
    return 1.0 - local.permute(0, 2, 3, 1)[valid].mean()


LOSS_FUNCTIONS.add("ce", lambda logits, target, ignore_index, **weights: F.cross_entropy(
    logits.float(), target, ignore_index=ignore_index))
LOSS_FUNCTIONS.add("focal", lambda logits, target, ignore_index, **weights: focal_loss(logits, target, ignore_index))
LOSS_FUNCTIONS.add("dice", lambda logits, target, ignore_index, **weights: dice_loss(logits, target, ignore_index))
LOSS_FUNCTIONS.add("focal-dice", lambda logits, target, ignore_index, **weights: (
    focal_loss(logits, target, ignore_index) + dice_loss(logits, target, ignore_index)))
LOSS_FUNCTIONS.add("ssim", lambda logits, target, ignore_index, **weights: ssim_loss(logits, target, ignore_index))
LOSS_FUNCTIONS.add("focal-ssim", lambda logits, target, ignore_index, ssim_weight=1.0, **weights: (
    focal_loss(logits, target, ignore_index) + ssim_weight * ssim_loss(logits, target, ignore_index)))


def check_loss(loss: str) -> None:
    """Raises :class:`OpenTransError` (``--loss NAME: choose one of ...``) for an unregistered loss."""
    if loss not in LOSS_FUNCTIONS:
        raise OpenTransError(f"--loss {loss}: choose one of {', '.join(loss_names())}")


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int, loss: str = "ce",
                      ssim_weight: float = 1.0) -> torch.Tensor:
    """The registered ``loss`` (:data:`LOSS_FUNCTIONS`; ``ce`` is ``F.cross_entropy``) on logits ``(B, C, H, W)``
    and int64 targets ``(B, H, W)``; ``ssim_weight`` multiplies the SSIM term of ``focal-ssim``.

    Raises:
        OpenTransError: an unknown loss name.
    """
    check_loss(loss)
    return LOSS_FUNCTIONS.get(loss)(logits, target, ignore_index, ssim_weight=ssim_weight)
