"""Latency-versus-mIoU benchmarking of every build of a run.

The names below are imported on first use, so reading :mod:`opentrans.bench.options` (the CLI does, to build
its flags) does not load the stage.
"""

import importlib

_EXPORTS = {"BenchOptions": "opentrans.bench.options", "bench_stage": "opentrans.bench.stage",
            "discover_artifacts": "opentrans.bench.stage", "measure_latency": "opentrans.bench.latency"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    """The public names above, imported from their modules on first use."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'opentrans.bench' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
