"""Parity figures: the decided-pixel agreement that the INT8 and fp16 gates use (docs/quantization.md)."""

from __future__ import annotations

import numpy as np
import torch

from opentrans.deploy.parity import check_parity
from opentrans.deploy.targets.jetson_runner import compare
from opentrans.inference.evaluate import agreement


class _Fixed:
    """A runner returning fixed logits (B, C, H, W) whatever the input."""

    name, input_size, text_source = "fixed", None, "none"

    def __init__(self, logits: np.ndarray):
        self.logits = logits

    def encode_classes(self, names):
        raise NotImplementedError

    def __call__(self, images, text):
        return self.logits[: len(images)]


class _Images(torch.utils.data.Dataset):
    def __len__(self):
        return 1

    def __getitem__(self, i):
        return torch.zeros(3, 2, 2), torch.zeros(2, 2, dtype=torch.long)


def _pair():
    """Reference logits over 2 classes on a 1x2x2 image: pixel (0,0) decided (gap 2.0), the rest near-ties (0.1);
    the candidate flips the near-tie at (0,1) only, then also the decided pixel."""
    ref = np.array([[[[3.0, 1.0], [1.0, 1.0]], [[1.0, 1.1], [1.1, 1.1]]]])  # (1, 2, 2, 2)
    flip_tie = ref.copy()
    flip_tie[0, 0, 0, 1] = 1.2  # class 0 now wins at (0, 1): a near-tie flipped
    flip_decided = flip_tie.copy()
    flip_decided[0, 1, 0, 0] = 3.5  # class 1 now wins at (0, 0), where the reference led by 2.0
    return ref, flip_tie, flip_decided


def test_agreement_counts_only_decided_pixels(monkeypatch):
    ref, flip_tie, flip_decided = _pair()
    dataset = _Images()
    monkeypatch.setattr("opentrans.inference.evaluate.batches",
                        lambda ds, bs, desc: [(torch.zeros(1, 3, 2, 2), [torch.zeros(2, 2)])])
    tie = agreement(_Fixed(ref), _Fixed(flip_tie), dataset, np.zeros((2, 4), np.float32), decided_margin=1.0)
    assert tie["pixel_agreement"] == 75.0 and tie["decided_pixels_pct"] == 25.0 and tie["decided_agreement"] == 100.0
    bad = agreement(_Fixed(ref), _Fixed(flip_decided), dataset, np.zeros((2, 4), np.float32), decided_margin=1.0)
    assert bad["pixel_agreement"] == 50.0 and bad["decided_agreement"] == 0.0
    none = agreement(_Fixed(ref), _Fixed(ref), dataset, np.zeros((2, 4), np.float32), decided_margin=5.0)
    assert none["decided_pixels_pct"] == 0.0 and none["decided_agreement"] is None
    assert "decided_agreement" not in agreement(_Fixed(ref), _Fixed(ref), dataset, np.zeros((2, 4), np.float32))


def test_int8_gate_fails_a_flip_where_the_reference_was_decided():
    ok = {"cosine": 0.999, "pixel_agreement": 95.0, "decided_agreement": 100.0}
    assert check_parity(ok, "int8") == []
    assert check_parity({**ok, "decided_agreement": 99.0}, "int8") == ["decided_agreement 99 < 99.9"]
    assert check_parity({**ok, "decided_agreement": None}, "int8") == []  # too few decided pixels: not gated


def test_jetson_device_check_computes_the_same_figure():
    ref, flip_tie, flip_decided = _pair()
    bounds = {"pixel_agreement": [">=", 50.0], "decided_agreement": [">=", 99.9]}
    assert compare(ref, flip_tie, bounds, decided_margin=1.0)["passed"]
    bad = compare(ref, flip_decided, bounds, decided_margin=1.0)
    assert bad["decided_agreement"] == 0.0 and bad["failures"] == ["decided_agreement 0 < 99.9"]
