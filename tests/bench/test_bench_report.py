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
    rows = [{**r, "p90_ms": r["median_ms"] * 1.1, "p99_ms": r["median_ms"] * 1.2, "images_per_s": 1e3 / r["median_ms"],
             "speedup": 100.0 / r["median_ms"], "batch": 1, "pixel_acc": 80.0, "agreement": 99.0, "teacher_miou": 95.0,
             "size_mb": 1.0, "pareto": r["name"] in front, "backend": "openvino-int8" if "int8" in r["name"] else "torch-fp32",
             "precision": "int8" if "int8" in r["name"] else "fp32", "path": f"runs/x/{r['name']}", "gmacs": 4.0,
             "params_m": 50.0, "achieved_gmac_per_s": 4e3 / r["median_ms"], "roofline_precision": "fp32",
             "roofline_fraction": 4e3 / r["median_ms"] / 100.0, "peak_rss_mb": 900.0, "weights": "random-init weights",
             "lineage": ["prune"], "latency_by_batch": {"1": {"median_ms": r["median_ms"], "images_per_s": 1e3 / r["median_ms"]},
                                                        "4": {"median_ms": 3 * r["median_ms"], "images_per_s": 4e3 / (3 * r["median_ms"])}}}
            for r in ROWS]
    header = {"run": "r", "weights": "random-init weights", "image_size": [224, 288], "batch": 1, "batch_sizes": [1, 4],
              "warmup": 1, "repeats": 2, "dataset": "camvid:x", "split": "val", "images": 3, "num_classes": 11,
              "reference": "torch", "load_average": [1.0, 1.0, 1.0], "roofline_gmac_per_s": {"fp32": 100.0, "int8": 800.0},
              "machine": {"cpu": "cpu", "logical_cores": 2, "torch_threads": 2, "isa": ["avx2"]}}
    md, js, csv_path, png, *cards = write_bench_report(rows, header, tmp_path)
    text = md.read_text()
    assert "random-init weights" in text and "| ov-int8 | 30.0 | 33.0 | 36.0 |" in text and "3.33x" in text
    assert "| 99.00 | n/a | 1.0 |" in text  # no parity figure for a row without one
    assert "133.3 (fp32)" in text  # 4 GMACs in 30 ms = 133 GMAC/s against a 100 GMAC/s peak
    assert "| ov-int8 | 90.0 / 44.44 |" in text  # the batch-4 table
    assert json.loads(js.read_text())["rows"][2]["pareto"] is True
    lines = csv_path.read_text().splitlines()
    assert lines[0].startswith("name,backend,precision,median_ms") and len(lines) == 1 + len(ROWS)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(cards) == len(ROWS)
    card = (tmp_path / "cards" / "ov-int8.md").read_text()
    assert "random-init weights" in card and "prune -> then" not in card and "openvino-int8" in card


def test_roofline_gemm_is_really_quantized_and_measured():
    from opentrans.bench.roofline import _gemm_model, gemm_peak

    shape = (64, 128, 256)
    ops = {op.get_type_name() for op in _gemm_model("int8", shape).get_ops()}
    assert "FakeQuantize" in ops and "MatMul" in ops
    assert "FakeQuantize" not in {op.get_type_name() for op in _gemm_model("fp32", shape).get_ops()}
    for precision in ("fp32", "int8"):
        peak = gemm_peak(precision, shape, repeats=3)
        assert 0 < peak < 1e5  # GMAC/s: positive and below any CPU's reach
    with pytest.raises(ValueError, match="unknown precision"):
        gemm_peak("int4", shape)


def test_peak_rss_is_the_workers_own():
    """A spawned worker reports its own peak memory, not its parent's (ru_maxrss would carry the parent's over)."""
    import concurrent.futures
    import multiprocessing

    from opentrans.bench.worker import peak_rss_mb

    ballast = np.ones(300 * 2**20 // 8)  # ~300 MB resident in this process
    parent = peak_rss_mb()
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        child = pool.submit(peak_rss_mb).result()
    assert parent > 300 and child < parent - 200, (parent, child)
    del ballast


def test_interleaved_times_alternates_order_and_counts_calls():
    from opentrans.timing import interleaved_ms, interleaved_times

    log = []
    calls = {"a": lambda: log.append("a"), "b": lambda: log.append("b")}
    times = interleaved_times(calls, repeats=3, warmup=2)
    assert log == ["a", "a", "b", "b", "a", "b", "b", "a", "a", "b"]  # warm-ups, then a-b, b-a, a-b
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3} and all(t >= 0 for v in times.values() for t in v)
    assert set(interleaved_ms(calls, repeats=1, warmup=0)) == {"a", "b"}
    with pytest.raises(ValueError):
        interleaved_times(calls, repeats=0)
