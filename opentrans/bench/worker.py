"""Measures one artifact in a fresh process, so peak memory is its own and no back end's thread pool
(OpenVINO, ONNX Runtime, torch) lingers into the next build's timings."""

from __future__ import annotations

import concurrent.futures
import multiprocessing
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Job:
    """What to measure: an artifact, the data, the class embeddings and the timing protocol."""

    artifact: str
    data: str
    split: str
    limit: int | None
    text_embeds: np.ndarray  # float32 (C, D)
    batch_sizes: tuple[int, ...]
    warmup: int
    repeats: int


def encoder_cost(spec) -> dict:
    """Image-encoder ``gmacs`` and ``params_m`` of a :class:`SegmentorSpec` (pruned shapes included), counted
    on the architecture alone (no weights needed)."""
    from opentrans.models.artifact import segmentor_from_spec
    from opentrans.models.cost import count_encoder_cost

    return count_encoder_cost(segmentor_from_spec(spec))


def _artifact_spec(path: Path):
    from opentrans.deploy.targets import read_build
    from opentrans.models.artifact import SPEC_FILE, read_spec, spec_from_dict

    if (path / SPEC_FILE).exists():
        return read_spec(path), "fp32"
    build = read_build(path)
    return spec_from_dict(build["spec"]), build["precision"]


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB (2^20 bytes).

    Reads ``VmHWM`` from ``/proc/self/status``: unlike ``getrusage``'s ``ru_maxrss``, which Linux carries across
    ``exec`` (so a spawned worker would report its parent's peak), it belongs to this process alone.

    Raises:
        OpenTransError: not on Linux (no ``/proc/self/status``).
    """
    from opentrans.errors import OpenTransError

    status = Path("/proc/self/status")
    if not status.exists():
        raise OpenTransError("peak memory is read from /proc/self/status, which this OS does not have")
    for line in status.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB -> MB
    raise OpenTransError("/proc/self/status has no VmHWM line")


def measure(job: Job) -> dict:
    """Latency per batch size, mIoU, argmax labels, peak RSS and encoder cost of ``job.artifact``.

    Returns:
        ``{"backend", "precision", "latency": {batch: measure_latency(...)}, "miou", "pixel_acc",
        "argmax" (uint8 (N,H,W)), "peak_rss_mb", "gmacs", "params_m", "spec"}``.
    """
    from opentrans.bench.latency import measure_latency
    from opentrans.data import open_dataset
    from opentrans.deploy.targets import load_runner
    from opentrans.inference.evaluate import evaluate

    path = Path(job.artifact)
    spec, precision = _artifact_spec(path)
    runner = load_runner(path)
    dataset = open_dataset(job.data, job.split, spec.image_size, spec.mean, spec.std, limit=job.limit)
    latency = {}
    for b in job.batch_sizes:
        images = np.stack([dataset[i % len(dataset)][0].numpy() for i in range(b)])
        latency[b] = measure_latency(runner, images, job.text_embeds, warmup=job.warmup, repeats=job.repeats)
    metrics = evaluate(runner, dataset, job.text_embeds, keep_argmax=True)
    cost = encoder_cost(spec)
    return {"backend": runner.name, "precision": precision, "latency": latency, "miou": metrics["miou"],
            "pixel_acc": metrics["pixel_acc"], "argmax": metrics["argmax"], "spec": spec, **cost,
            "peak_rss_mb": peak_rss_mb()}


def die_with_parent(parent_pid: int) -> None:
    """Make this (worker) process receive SIGKILL when its parent dies (Linux ``prctl(PR_SET_PDEATHSIG)``), so a
    killed ``opentrans bench`` leaves no worker measuring on; exit at once if the parent is already gone. A no-op
    where the C library has no ``prctl`` (not Linux)."""
    import ctypes
    import ctypes.util
    import os
    import signal

    libc_name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(libc_name, use_errno=True) if libc_name else None
    if libc is not None and hasattr(libc, "prctl"):
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)


def measure_isolated(job: Job) -> dict:
    """:func:`measure` in a freshly spawned process (which dies with this one: :func:`die_with_parent`); its
    exceptions (e.g. OpenTransError) propagate."""
    import os

    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx, initializer=die_with_parent,
                                                initargs=(os.getpid(),)) as pool:
        return pool.submit(measure, job).result()
