"""Side-by-side wall-clock timing of several functions (interleaved rounds), for every stage that compares speeds:
the prune report, ``deploy --precision auto`` and the benchmarks. Depends on nothing else in the package."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np


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
