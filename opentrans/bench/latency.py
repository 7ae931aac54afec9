"""Wall-clock latency of a runner on a fixed batch."""

from __future__ import annotations

import time

import numpy as np

from opentrans.inference.evaluate import Runner
from opentrans.timing import interleaved_ms, interleaved_times  # noqa: F401 - part of this module's API


def measure_latency(runner: Runner, images: np.ndarray, text_embeds: np.ndarray, warmup: int = 3,
                    repeats: int = 20) -> dict:
    """Time ``runner(images, text_embeds)``: ``warmup`` untimed calls, then ``repeats`` timed ones.

    Args:
        images: float32 ``(B, 3, H, W)``; B is the batch the latency refers to.
        text_embeds: float32 ``(C, D)``.

    Returns:
        ``median_ms``, ``p90_ms``, ``p99_ms``, ``mean_ms`` (per call, ms), ``images_per_s`` (B / median), ``batch``,
        ``repeats``.

    Raises:
        ValueError: ``repeats`` < 1 or ``warmup`` < 0.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    for _ in range(warmup):
        runner(images, text_embeds)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        runner(images, text_embeds)
        times.append((time.perf_counter() - start) * 1e3)
    times_arr = np.asarray(times)
    median = float(np.median(times_arr))
    return {
        "median_ms": median,
        "p90_ms": float(np.percentile(times_arr, 90)),
        "p99_ms": float(np.percentile(times_arr, 99)),
        "mean_ms": float(times_arr.mean()),
        "images_per_s": images.shape[0] * 1e3 / median,
        "batch": int(images.shape[0]),
        "repeats": repeats,
    }
