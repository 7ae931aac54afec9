"""One runner protocol for every back end, and the evaluation loops built on it.

A runner maps ``images`` float32 ``(B, 3, H, W)`` (normalised, at the model's input size) and
``text_embeds`` float32 ``(C, D)`` to logits float32 ``(B, C, H, W)``, all numpy arrays. ``eval`` and
``bench`` take any runner, so every number in a report comes from the artifact that ships.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from opentrans.data import SegDataset, collate
from opentrans.metrics import ConfusionMatrix
from opentrans.progress import progress
from opentrans.runtime import Runner  # noqa: F401 - the runtime contract, re-exported


class TorchRunner:
    """Runs an :class:`~opentrans.models.segmentor.OpenVocabSegmentor` eagerly in fp32 on CPU (a
    :class:`~opentrans.runtime.Runner` of any input size; ``model_name`` picks the tokenizer of its text tower)."""

    input_size = None
    text_source = "the PyTorch text tower"

    def __init__(self, segmentor: torch.nn.Module, name: str = "torch-fp32", model_name: str | None = None):
        self.segmentor = segmentor.eval()
        self.name = name
        self.model_name = model_name

    @torch.inference_mode()
    def encode_classes(self, names) -> np.ndarray:
        """Class names -> float32 (C, D) L2-normalised embeddings from the PyTorch text tower."""
        return np.ascontiguousarray(self.segmentor.encode_classes(list(names), model_name=self.model_name).numpy(),
                                    dtype=np.float32)

    @torch.inference_mode()
    def __call__(self, images: np.ndarray, text_embeds: np.ndarray) -> np.ndarray:
        return self.segmentor(torch.as_tensor(images), torch.as_tensor(text_embeds)).numpy()


def predict_labels(logits: np.ndarray | torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Argmax labels ``(B, h0, w0)`` after bilinear resizing of logits ``(B, C, H, W)`` to ``size``."""
    logits = torch.as_tensor(logits)
    if tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    return logits.argmax(1)


def batches(dataset: SegDataset, batch_size: int = 4, desc: str | None = None):
    """Iterate ``(images (B,3,H,W) tensor, masks list of (h0,w0) tensors)`` over a dataset, in order."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    return progress(loader, desc=desc, leave=False, disable=desc is None)


def evaluate(runner: Runner, dataset: SegDataset, text_embeds: np.ndarray, batch_size: int = 4,
             desc: str | None = None, keep_argmax: bool = False) -> dict:
    """mIoU, pixel accuracy and per-class IoU of ``runner`` on ``dataset``, in percent.

    Args:
        keep_argmax: also return ``"argmax"``: uint8 ``(N, H, W)`` labels at the network's input resolution
            (what :func:`label_agreement` compares between builds).

    Returns:
        ``{"miou", "pixel_acc", "per_class_iou", "images"}`` (see :meth:`ConfusionMatrix.summary`).
    """
    cm = ConfusionMatrix(len(dataset.class_names), dataset.ignore_index)
    text_embeds = np.asarray(text_embeds, dtype=np.float32)
    argmaxes = []
    for images, masks in batches(dataset, batch_size, desc):
        logits = runner(images.numpy(), text_embeds)
        if keep_argmax:
            argmaxes.append(np.asarray(logits).argmax(1).astype(np.uint8))
        for lg, mask in zip(logits, masks):
            cm.update(predict_labels(lg[None], mask.shape)[0], mask)
    result = {**cm.summary(dataset.class_names), "images": len(dataset)}
    if keep_argmax:
        result["argmax"] = np.concatenate(argmaxes)
    return result


def label_agreement(reference: np.ndarray, candidate: np.ndarray, num_classes: int) -> dict:
    """How often two label maps of equal shape agree: ``pixel_agreement`` (% of equal pixels) and
    ``teacher_miou`` (%: mIoU of ``candidate`` with ``reference`` as the labels, over ``num_classes``)."""
    reference, candidate = np.asarray(reference), np.asarray(candidate)
    cm = ConfusionMatrix(num_classes, ignore_index=-1)
    cm.update(torch.from_numpy(candidate.astype(np.int64)), torch.from_numpy(reference.astype(np.int64)))
    return {"pixel_agreement": 100.0 * float((reference == candidate).mean()), "teacher_miou": 100.0 * cm.miou()}


#: Fewer decided pixels than this share (%) and ``decided_agreement`` is not computed (too few to gate on).
MIN_DECIDED_PCT = 1.0


def decided_counts(reference: np.ndarray, candidate: np.ndarray, margin: float) -> tuple[int, int, int]:
    """``(pixels, decided pixels, decided pixels with the same argmax)`` of logits ``(B, C, H, W)``: a pixel is
    decided where the reference's top-1 logit leads its top-2 by at least ``margin`` (logit units)."""
    top2 = np.partition(reference, -2, axis=1)[:, -2:]
    decided = (top2[:, 1] - top2[:, 0]) >= margin
    same = reference.argmax(1) == candidate.argmax(1)
    return int(decided.size), int(decided.sum()), int((decided & same).sum())


def agreement(reference: Runner, candidate: Runner, dataset: SegDataset, text_embeds: np.ndarray,
              batch_size: int = 4, desc: str | None = None, decided_margin: float | None = None) -> dict:
    """How closely ``candidate`` reproduces ``reference`` on real images.

    Args:
        decided_margin: with it, also the agreement on the pixels the reference is decided about (top-1 logit
            ahead of top-2 by at least this many logits): a flip there is an error of the candidate, not a
            near-tie (see docs/quantization.md, "Parity thresholds").

    Returns:
        ``max_abs_diff`` (logits), ``mean_abs_diff``, ``cosine`` (min over images of the cosine between the
        flattened logits), ``pixel_agreement`` (% of pixels with the same argmax) and ``teacher_miou`` (%: mIoU
        of the candidate against the reference's argmax as labels, over the C classes); with ``decided_margin``
        also ``decided_pixels_pct`` (% of pixels decided) and ``decided_agreement`` (% of those with the same
        argmax; None where fewer than :data:`MIN_DECIDED_PCT` % are decided).
    """
    text_embeds = np.asarray(text_embeds, dtype=np.float32)
    max_abs, sum_abs, count, cosines, ref_labels, out_labels = 0.0, 0.0, 0, [], [], []
    decided = np.zeros(3, dtype=np.int64)
    for images, _ in batches(dataset, batch_size, desc):
        ref = np.asarray(reference(images.numpy(), text_embeds), dtype=np.float64)
        out = np.asarray(candidate(images.numpy(), text_embeds), dtype=np.float64)
        diff = np.abs(ref - out)
        max_abs = max(max_abs, float(diff.max()))
        sum_abs, count = sum_abs + float(diff.sum()), count + diff.size
        for r, o in zip(ref.reshape(len(ref), -1), out.reshape(len(out), -1)):
            cosines.append(float(r @ o / (np.linalg.norm(r) * np.linalg.norm(o) + 1e-12)))
        ref_labels.append(ref.argmax(1))
        out_labels.append(out.argmax(1))
        if decided_margin is not None:
            decided += decided_counts(ref, out, decided_margin)
    labels = label_agreement(np.concatenate(ref_labels), np.concatenate(out_labels), text_embeds.shape[0])
    figures = {"max_abs_diff": max_abs, "mean_abs_diff": sum_abs / max(count, 1), "cosine": min(cosines), **labels}
    if decided_margin is not None:
        pct = 100.0 * decided[1] / max(decided[0], 1)
        figures["decided_pixels_pct"] = float(pct)
        figures["decided_agreement"] = float(100.0 * decided[2] / decided[1]) if pct >= MIN_DECIDED_PCT else None
    return figures
