"""Latency-versus-mIoU benchmarking of every build of a run."""

from opentrans.bench.latency import measure_latency
from opentrans.bench.stage import bench_stage, discover_artifacts

__all__ = ["bench_stage", "discover_artifacts", "measure_latency"]
