"""Confusion-matrix segmentation metrics: mIoU, pixel accuracy, per-class IoU, and the zero-shot
mIoU(S) / mIoU(U) / hIoU (:func:`zero_shot_summary`).

IoU_c = TP_c / (TP_c + FP_c + FN_c). Pixels whose label is the ignore index are excluded. A class that
appears neither in the labels nor in the predictions has an undefined IoU (NaN) and is left out of the
mean, as in mmsegmentation.
"""

from __future__ import annotations

import numpy as np
import torch


class ConfusionMatrix:
    """Accumulates a ``(K, K)`` confusion matrix, rows = ground truth, columns = prediction.

    Args:
        num_classes: K.
        ignore_index: label value to skip.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add one prediction/label pair of any equal shape (int class indices).

        Raises:
            ValueError: shapes differ, or a prediction or label is outside ``[0, K)`` (ignore excepted).
        """
        pred, target = torch.as_tensor(pred).reshape(-1).long(), torch.as_tensor(target).reshape(-1).long()
        if pred.shape != target.shape:
            raise ValueError(f"prediction has {pred.numel()} pixels, target {target.numel()}")
        keep = target != self.ignore_index
        pred, target = pred[keep], target[keep]
        k = self.num_classes
        if pred.numel() and (pred.min() < 0 or pred.max() >= k or target.min() < 0 or target.max() >= k):
            raise ValueError(f"class index outside [0, {k})")
        self.matrix += torch.bincount(target * k + pred, minlength=k * k).reshape(k, k)

    def iou(self) -> np.ndarray:
        """Per-class IoU in [0, 1], NaN for a class absent from both labels and predictions."""
        m = self.matrix.double()
        tp = m.diag()
        union = m.sum(0) + m.sum(1) - tp
        iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
        return iou.numpy()

    def miou(self) -> float:
        """Mean IoU over classes with a defined IoU, in [0, 1] (NaN when nothing was counted)."""
        iou = self.iou()
        return float(np.nanmean(iou)) if not np.isnan(iou).all() else float("nan")

    def pixel_accuracy(self) -> float:
        """Correct pixels / labelled pixels, in [0, 1]."""
        total = int(self.matrix.sum())
        return float(self.matrix.diag().sum()) / total if total else float("nan")

    def summary(self, class_names: list[str] | tuple[str, ...] | None = None) -> dict:
        """``{"miou": %, "pixel_acc": %, "per_class_iou": {name: %}}`` with values in percent (NaN -> None)."""
        names = class_names or [str(i) for i in range(self.num_classes)]
        pct = lambda v: None if v != v else round(100.0 * float(v), 2)  # noqa: E731
        return {
            "miou": pct(self.miou()),
            "pixel_acc": pct(self.pixel_accuracy()),
            "per_class_iou": {n: pct(v) for n, v in zip(names, self.iou())},
        }


def harmonic_iou(seen: float | None, unseen: float | None) -> float | None:
    """hIoU = 2 S U / (S + U) of the seen and unseen mIoU (same unit, e.g. percent); 0 when both are 0, None
    when either is None/NaN.

    The zero-shot segmentation protocol of Xian et al. ("Semantic Projection Network for Zero- and Few-Label
    Semantic Segmentation", CVPR 2019, Sec. 4) and Bucher et al. (ZS3Net, NeurIPS 2019), reported by ZegCLIP,
    SPT-SEG and LDVC: the harmonic mean punishes a model that is good on one group only.
    """
    if seen is None or unseen is None or seen != seen or unseen != unseen:
        return None
    return 0.0 if seen + unseen == 0 else 2.0 * seen * unseen / (seen + unseen)


def zero_shot_summary(per_class_iou: dict[str, float | None], unseen: list[str] | tuple[str, ...]) -> dict:
    """mIoU over the seen classes, over the unseen classes, and their harmonic mean.

    Args:
        per_class_iou: ``{class name: IoU}`` of every evaluated class (any unit, e.g. percent as in
            :meth:`ConfusionMatrix.summary`); None/NaN for a class absent from labels and predictions, left
            out of its group's mean (like :meth:`ConfusionMatrix.miou`).
        unseen: names of the unseen classes (each must be a key of ``per_class_iou``); the others are seen.

    Returns:
        ``{"miou_seen", "miou_unseen", "hiou", "seen", "unseen"}``: the two means and hIoU in the unit of the
        input (None where a group has no defined IoU), and the two class lists.

    Raises:
        ValueError: an unseen name that is not an evaluated class.
    """
    missing = [n for n in unseen if n not in per_class_iou]
    if missing:
        raise ValueError(f"unseen class '{missing[0]}' is not one of the evaluated classes")
    groups = {"seen": [n for n in per_class_iou if n not in set(unseen)], "unseen": list(unseen)}

    def mean(names):
        vals = [v for v in (per_class_iou[n] for n in names) if v is not None and v == v]  # None/NaN left out
        return float(np.mean(vals)) if vals else None

    s, u = mean(groups["seen"]), mean(groups["unseen"])
    return {"miou_seen": s, "miou_unseen": u, "hiou": harmonic_iou(s, u), **groups}
