"""A small, deterministic CPU training loop for the open-vocabulary segmentor.

Pixel-wise cross-entropy between the segmentor's logits ``(B, C, H, W)`` (CLIP's logit scale times the
cosine of each patch feature with each class text embedding, upsampled to the input size) and the label
masks, resized with nearest-neighbour interpolation to the network input size ``(H, W)``. AdamW over the
parameters with ``requires_grad`` (set them with :func:`opentrans.finetune.freeze.apply_freeze_plan`), with
the "poly" learning-rate schedule of DeepLab (Chen et al., TPAMI 2018): ``lr_t = lr * (1 - t/steps)^0.9``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm import tqdm

from opentrans.data import SegDataset, collate
from opentrans.errors import OpenTransError
from opentrans.models.segmentor import OpenVocabSegmentor

POLY_POWER = 0.9


def resize_masks(masks: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Stack int64 label masks of any sizes ``(h0, w0)`` into ``(B, H, W)`` with nearest-neighbour resizing
    (label values, the ignore index included, are kept exactly)."""
    out = [F.interpolate(m[None, None].float(), size=tuple(size), mode="nearest")[0, 0] for m in masks]
    return torch.stack(out).long()


def _batches(n: int, batch_size: int, steps: int, generator: torch.Generator):
    """``steps`` index lists of ``min(batch_size, n)`` items: shuffled epochs, reshuffled when used up."""
    size = min(batch_size, n)
    order: list[int] = []
    for _ in range(steps):
        batch = []
        while len(batch) < size:
            if not order:
                order = torch.randperm(n, generator=generator).tolist()
            batch.append(order.pop())
        yield batch


def check_train_options(steps: int, batch_size: int, lr: float) -> None:
    """Validate the training budget.

    Raises:
        OpenTransError: ``steps`` or ``batch_size`` below 1, or ``lr`` not a positive finite number.
    """
    if steps < 1:
        raise OpenTransError(f"--steps {steps}: must be at least 1")
    if batch_size < 1:
        raise OpenTransError(f"--batch-size {batch_size}: must be at least 1")
    if not (lr > 0 and math.isfinite(lr)):
        raise OpenTransError(f"--lr {lr}: must be a positive number")


def train_segmentor(seg: OpenVocabSegmentor, dataset: SegDataset, text_embeds: torch.Tensor, steps: int,
                    batch_size: int, lr: float, seed: int = 0, weight_decay: float = 0.01,
                    progress: bool = True) -> list[float]:
    """Finetune the trainable parameters of ``seg`` on ``dataset`` for ``steps`` optimizer steps.

    The segmentor stays in eval mode (BatchNorm statistics of a ModifiedResNet are not updated, there is
    no dropout), so only parameters with ``requires_grad`` change. Batches are drawn without replacement
    from shuffled epochs of ``dataset`` with a ``torch.Generator`` seeded with ``seed``, so two runs with the
    same seed give identical losses. A batch whose pixels are all the ignore index is skipped (its loss is
    recorded as NaN); the learning-rate schedule still advances.

    Args:
        seg: the segmentor, parameters already frozen/unfrozen.
        dataset: images ``(3, H, W)`` at ``seg.image_size`` and masks ``(h0, w0)`` with
            ``dataset.ignore_index`` for unlabelled pixels; class i of the masks is row i of ``text_embeds``.
        text_embeds: float32 ``(C, D)`` class embeddings (fixed; the text tower is not trained).
        steps: optimizer steps (>= 1).
        batch_size: images per step (>= 1; capped at ``len(dataset)``).
        lr: peak AdamW learning rate, decayed with the poly schedule.
        seed: seeds the sampling order.
        weight_decay: AdamW decoupled weight decay.
        progress: show a tqdm bar with the loss and learning rate.

    Returns:
        The training loss (mean pixel cross-entropy, nats) of every step.

    Raises:
        OpenTransError: ``steps``/``batch_size`` < 1, ``lr`` not positive, an image size other than
            ``seg.image_size``, a class count other than ``len(text_embeds)``, no trainable parameter, or a
            loss that became NaN/inf (lower the learning rate).
    """
    check_train_options(steps, batch_size, lr)
    if tuple(dataset.image_size) != tuple(seg.image_size):
        raise OpenTransError(f"dataset images are {dataset.image_size} but the model takes {seg.image_size}")
    if len(dataset.class_names) != text_embeds.shape[0]:
        raise OpenTransError(f"{len(dataset.class_names)} classes in the dataset but {text_embeds.shape[0]} text embeddings")
    params = [p for p in seg.parameters() if p.requires_grad]
    if not params:
        raise OpenTransError("nothing to train: no parameter of the model requires a gradient")

    seg.eval()
    text_embeds = text_embeds.detach().float()
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=steps, power=POLY_POWER)
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    bar = tqdm(_batches(len(dataset), batch_size, steps, generator), total=steps, desc="finetune",
               disable=not progress, leave=False)
    with torch.enable_grad():
        for step, idx in enumerate(bar):
            images, masks = collate([dataset[i] for i in idx])
            target = resize_masks(masks, seg.image_size)
            current_lr = optimizer.param_groups[0]["lr"]
            if bool((target == dataset.ignore_index).all()):
                losses.append(float("nan"))
                scheduler.step()
                continue
            logits = seg(images, text_embeds)
            loss = F.cross_entropy(logits, target, ignore_index=dataset.ignore_index)
            if not torch.isfinite(loss):
                raise OpenTransError(f"training loss became {loss.item()} at step {step + 1}; lower --lr (now {lr})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{current_lr:.2e}")
    optimizer.zero_grad(set_to_none=True)
    return losses
