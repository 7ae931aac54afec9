"""Wall-clock latency of a runner on a fixed batch."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from opentrans.evaluate import Runner


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


def interleaved_times(calls: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Wall-clock milliseconds of every call of each zero-argument function, measured **interleaved**: ``warmup``
    untimed calls each, then ``repeats`` rounds that time every function once, the order reversed every other
    round, so load drift and turbo affect all of them alike (a ratio of two results is a side-by-side measurement).

    Returns:
        ``{name: [ms per call, one per round]}``.

    Raises:
        ValueError: ``repeats`` < 1 or ``warmup`` < 0.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    for call in calls.values():
        for _ in range(warmup):
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    order = list(calls)
    for r in range(repeats):
        for name in (order if r % 2 == 0 else order[::-1]):
            start = time.perf_counter()
            calls[name]()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def interleaved_ms(calls: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median milliseconds per call of each function, measured by :func:`interleaved_times`: ``{name: median ms}``.

    Raises:
        ValueError: ``repeats`` < 1 or ``warmup`` < 0.
    """
    return {name: float(np.median(t)) for name, t in interleaved_times(calls, repeats, warmup).items()}
