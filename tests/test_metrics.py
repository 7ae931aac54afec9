"""Confusion-matrix metrics against a small example worked out by hand."""

import math

import numpy as np
import pytest
import torch

from opentrans.metrics import ConfusionMatrix

# 2x3 label map with one ignored pixel (255) and a prediction for it.
TARGET = torch.tensor([[0, 0, 1], [1, 2, 255]])
PRED = torch.tensor([[0, 1, 1], [1, 2, 0]])


def test_hand_worked_example():
    # Counted pixels (t, p): (0,0) (0,1) (1,1) (1,1) (2,2); the ignored pixel's prediction is dropped.
    # Confusion rows: [1,1,0] [0,2,0] [0,0,1].
    # IoU0 = 1 / (1 + 1) = 0.5; IoU1 = 2 / (2 + 1) = 2/3; IoU2 = 1 / 1 = 1.
    cm = ConfusionMatrix(3, ignore_index=255)
    cm.update(PRED, TARGET)
    assert cm.matrix.tolist() == [[1, 1, 0], [0, 2, 0], [0, 0, 1]]
    np.testing.assert_allclose(cm.iou(), [0.5, 2 / 3, 1.0])
    assert cm.miou() == pytest.approx((0.5 + 2 / 3 + 1.0) / 3)
    assert cm.pixel_accuracy() == pytest.approx(4 / 5)
    summary = cm.summary(["a", "b", "c"])
    assert summary["miou"] == pytest.approx(72.22, abs=0.01)
    assert summary["per_class_iou"] == {"a": 50.0, "b": 66.67, "c": 100.0}


def test_absent_class_is_left_out_of_the_mean():
    cm = ConfusionMatrix(4, ignore_index=255)
    cm.update(PRED, TARGET)
    iou = cm.iou()
    assert math.isnan(iou[3])
    assert cm.miou() == pytest.approx((0.5 + 2 / 3 + 1.0) / 3)
    assert cm.summary()["per_class_iou"]["3"] is None


def test_accumulates_over_updates():
    cm = ConfusionMatrix(3, ignore_index=255)
    cm.update(PRED, TARGET)
    cm.update(TARGET.clamp(max=2), TARGET)  # a perfect prediction adds only to the diagonal
    assert cm.matrix.diag().tolist() == [3, 4, 2]
    assert cm.pixel_accuracy() == pytest.approx(9 / 10)


def test_rejects_bad_input():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="pixels"):
        cm.update(torch.zeros(4), torch.zeros(5))
    with pytest.raises(ValueError, match="outside"):
        cm.update(torch.tensor([3]), torch.tensor([0]))
