"""This machine's peak GEMM throughput per precision, measured with OpenVINO on one large MatMul.

The roofline a build is held against is the GEMM throughput of the engine that runs it, at its precision:
``fp32`` (OpenVINO, f32 inference precision), ``bf16`` (OpenVINO, bf16 inference precision, where the CPU
has it) and ``int8`` (the same MatMul quantized by NNCF: int8 weights and activations, VNNI/AMX kernels).
A build's *roofline fraction* is its achieved GMAC/s (model GMACs / median latency) over that peak.
"""

from __future__ import annotations

import time

import numpy as np

#: GEMM shape (M tokens x K -> N): large enough to be compute-bound, small enough to measure in seconds.
GEMM_SHAPE = (1024, 1024, 4096)
PRECISIONS = ("fp32", "bf16", "int8")


def _gemm_model(precision: str, shape: tuple[int, int, int]):
    import openvino as ov
    import torch

    m, k, n = shape
    linear = torch.nn.Linear(k, n, bias=False).eval()
    example = torch.randn(m, k)
    with torch.no_grad():
        model = ov.convert_model(torch.export.export(linear, (example,)))
    if precision == "int8":
        import nncf

        calib = [np.random.default_rng(i).standard_normal((m, k)).astype(np.float32) for i in range(2)]
        model = nncf.quantize(model, nncf.Dataset(calib), subset_size=2)
    return model


def gemm_peak(precision: str, shape: tuple[int, int, int] = GEMM_SHAPE, repeats: int = 10) -> float:
    """Peak GEMM throughput in GMAC/s for ``precision`` (the best of ``repeats`` timed calls after warm-up).

    Raises:
        ValueError: an unknown precision.
    """
    import openvino as ov

    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    hint = "bf16" if precision == "bf16" else "f32"
    compiled = ov.Core().compile_model(_gemm_model(precision, shape), "CPU", {"INFERENCE_PRECISION_HINT": hint})
    request = compiled.create_infer_request()
    x = np.random.default_rng(0).standard_normal(shape[:2]).astype(np.float32)
    for _ in range(3):
        request.infer([x])
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        request.infer([x])
        best = min(best, time.perf_counter() - start)
    m, k, n = shape
    return m * k * n / best / 1e9


def measure_roofline(precisions: tuple[str, ...] = PRECISIONS) -> dict[str, float]:
    """``{precision: peak GMAC/s}`` for each precision, measured now, in this process."""
    return {p: round(gemm_peak(p), 1) for p in precisions}
