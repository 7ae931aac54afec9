"""Latency-versus-mIoU benchmarking of every build of a run.

The names below are imported on first use, so reading :mod:`opentrans.bench.options` (the CLI does, to build
its flags) does not load the stage.
"""

from opentrans.registry import lazy_exports

_EXPORTS = {"BenchOptions": "opentrans.bench.options", "bench_stage": "opentrans.bench.stage",
            "discover_artifacts": "opentrans.bench.stage", "measure_latency": "opentrans.bench.latency"}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
