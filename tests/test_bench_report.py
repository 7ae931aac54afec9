"""Latency harness and bench report: Pareto front, table, plot."""

import json

import numpy as np
import pytest

from opentrans.bench.latency import measure_latency
from opentrans.bench.report import pareto_front, write_bench_report


class CountingRunner:
    name = "counting"

    def __init__(self):
        self.calls = 0

    def __call__(self, images, text):
        self.calls += 1
        return np.zeros((images.shape[0], text.shape[0], *images.shape[2:]), np.float32)


def test_measure_latency_counts_and_units():
    r = CountingRunner()
    out = measure_latency(r, np.zeros((2, 3, 8, 8), np.float32), np.zeros((3, 4), np.float32), warmup=2, repeats=5)
    assert r.calls == 7
    assert out["batch"] == 2 and out["repeats"] == 5
    assert 0 < out["median_ms"] <= out["p90_ms"]
    assert out["images_per_s"] == pytest.approx(2e3 / out["median_ms"], rel=1e-2)
    with pytest.raises(ValueError):
        measure_latency(r, np.zeros((1, 3, 8, 8), np.float32), np.zeros((3, 4), np.float32), repeats=0)


ROWS = [
    {"name": "torch", "median_ms": 100.0, "miou": 50.0},
    {"name": "ov-fp32", "median_ms": 60.0, "miou": 50.0},   # beats torch: same mIoU, faster
    {"name": "ov-int8", "median_ms": 30.0, "miou": 48.0},   # fastest
    {"name": "slow-bad", "median_ms": 80.0, "miou": 40.0},  # dominated by ov-fp32
    {"name": "best", "median_ms": 90.0, "miou": 55.0},      # most accurate
]


def test_pareto_front():
    assert sorted(pareto_front(ROWS)) == ["best", "ov-fp32", "ov-int8"]


def test_report_files(tmp_path):
    front = pareto_front(ROWS)
    rows = [{**r, "p90_ms": r["median_ms"] * 1.1, "images_per_s": 1e3 / r["median_ms"], "speedup": 100.0 / r["median_ms"],
             "pixel_acc": 80.0, "agreement": 99.0, "size_mb": 1.0, "pareto": r["name"] in front} for r in ROWS]
    header = {"run": "r", "weights": "random-init weights", "image_size": [224, 288], "batch": 1, "warmup": 1,
              "repeats": 2, "dataset": "camvid:x", "split": "val", "images": 3, "num_classes": 11, "reference": "torch",
              "machine": {"cpu": "cpu", "logical_cores": 2, "torch_threads": 2, "isa": ["avx2"]}}
    md, js, png = write_bench_report(rows, header, tmp_path)
    text = md.read_text()
    assert "random-init weights" in text and "| ov-int8 | 30.0 |" in text and "3.33x" in text
    assert json.loads(js.read_text())["rows"][2]["pareto"] is True
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
