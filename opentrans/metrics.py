"""Confusion-matrix segmentation metrics: mIoU, pixel accuracy, per-class IoU.

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
