"""Benchmark (not a test): MLP-channel pruning of the ViT-B-16 image encoder, cost and CPU latency.

Random-init weights (no pretrained weights can be downloaded here): latency and MACs do not depend on the
weight values, accuracy does and is not measured. Prints params/GMACs before/after, torch CPU latency of
the image encoder before/after (median of ``torch.utils.benchmark.Timer`` runs, same process, before and
after measured in alternation), the single-thread CPU time per call (robust to other processes on a shared
machine) and the speed-up next to the MAC reduction.

    python benchmarks/prune_vit_b16.py [--sparsity 0.5] [--size 224] [--rounds 5] [--min-run-time 1]
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time
from importlib import metadata

import torch
import torch_pruning as tp
from torch.utils import benchmark

from opentrans.models.artifact import build_segmentor
from opentrans.prune import count_encoder_cost, prune_structured

MODEL = "ViT-B-16"


def _latency_ms(models: dict, x: torch.Tensor, rounds: int, min_run_time: float, threads: int) -> dict:
    """Median wall time in ms of each ``models[name](x)`` under inference mode.

    The callables are measured in alternation, ``rounds`` times each (``Timer.blocked_autorange``), so a
    change of machine load hits before and after alike; the result is the median over rounds of each
    round's median, with the min and max of those medians.
    """
    times = {name: [] for name in models}
    with torch.inference_mode():
        for fn in models.values():
            fn(x)  # warm-up
        for _ in range(rounds):
            for name, fn in models.items():
                timer = benchmark.Timer(stmt="fn(x)", globals={"fn": fn, "x": x}, num_threads=threads)
                times[name].append(timer.blocked_autorange(min_run_time=min_run_time).median * 1e3)
    return {name: (statistics.median(t), min(t), max(t)) for name, t in times.items()}


def _cpu_ms(models: dict, x: torch.Tensor, rounds: int, iters: int) -> dict:
    """Median CPU time in ms of each ``models[name](x)`` on one thread (``time.thread_time``), alternating.

    Wall time on a shared 2-core machine mostly measures the other processes; the CPU time of a
    single-threaded run barely depends on them, so its ratio is the reliable speed-up.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times = {name: [] for name in models}
    try:
        with torch.inference_mode():
            for _ in range(rounds):
                for name, fn in models.items():
                    start = time.thread_time()
                    for _ in range(iters):
                        fn(x)
                    times[name].append((time.thread_time() - start) / iters * 1e3)
    finally:
        torch.set_num_threads(threads)
    return {name: statistics.median(t) for name, t in times.items()}


def _cost(seg, x: torch.Tensor) -> dict:
    cost = count_encoder_cost(seg)
    visual_macs, _ = tp.utils.count_ops_and_params(seg.visual, x)
    return {"params_m": cost["params_m"], "gmacs_dense": cost["gmacs"], "gmacs_visual_tp": visual_macs / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--importance", default="magnitude")
    parser.add_argument("--round-to", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=5, help="alternating latency measurements per model")
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds per latency measurement")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--cpu-iters", type=int, default=3, help="calls per 1-thread CPU-time measurement")
    args = parser.parse_args()

    seg, spec = build_segmentor(MODEL, "none", image_size=(args.size, args.size))
    x = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))  # (1, 3, H, W)
    print(f"{MODEL} image encoder, {spec.weights}, input {args.size}x{args.size}, batch 1, fp32")
    print(f"torch {torch.__version__}, torch-pruning {metadata.version('torch-pruning')}, "
          f"{platform.processor() or platform.machine()}, {args.threads} threads, "
          f"load average {os.getloadavg()[0]:.2f} at start")
    print(f"prune: MLP hidden channels, sparsity {args.sparsity}, importance {args.importance}, round_to {args.round_to}")

    unpruned = copy.deepcopy(seg)
    report = prune_structured(seg, args.sparsity, args.importance, args.round_to, model_name=MODEL)
    widths = sorted({row["after"] for row in report["layers"]})
    print(f"achieved sparsity {report['sparsity']:.3f}; MLP widths {report['layers'][0]['original']} -> {widths}")
    before, after = _cost(unpruned, x), _cost(seg, x)
    lat = _latency_ms({"dense_before": unpruned.dense_features, "dense_after": seg.dense_features,
                       "visual_before": unpruned.visual, "visual_after": seg.visual},
                      x, args.rounds, args.min_run_time, args.threads)
    cpu = _cpu_ms({"dense_before": unpruned.dense_features, "dense_after": seg.dense_features,
                   "visual_before": unpruned.visual, "visual_after": seg.visual}, x, args.rounds, args.cpu_iters)
    for key in ("dense", "visual"):
        before[f"ms_{key}"], after[f"ms_{key}"] = lat[f"{key}_before"][0], lat[f"{key}_after"][0]
        before[f"cpu_{key}"], after[f"cpu_{key}"] = cpu[f"{key}_before"], cpu[f"{key}_after"]

    rows = [
        ("params (M), image tower", "params_m", "{:.1f}"),
        ("GMACs, dense path (count_encoder_cost)", "gmacs_dense", "{:.2f}"),
        ("GMACs, visual forward (tp.count_ops_and_params)", "gmacs_visual_tp", "{:.2f}"),
        ("latency ms, dense path (median)", "ms_dense", "{:.1f}"),
        ("latency ms, visual forward (median)", "ms_visual", "{:.1f}"),
        ("CPU ms/call, 1 thread, dense path (median)", "cpu_dense", "{:.1f}"),
        ("CPU ms/call, 1 thread, visual forward (median)", "cpu_visual", "{:.1f}"),
    ]
    print(f"\n{'':50s} {'before':>9s} {'after':>9s} {'ratio':>7s}")
    for label, key, fmt in rows:
        print(f"{label:50s} {fmt.format(before[key]):>9s} {fmt.format(after[key]):>9s} "
              f"{before[key] / after[key]:>6.2f}x")
    print(f"\nlatency spread over {args.rounds} alternating rounds (min-max of round medians, ms):")
    for name, (_, lo, hi) in lat.items():
        print(f"  {name:14s} {lo:7.1f} - {hi:7.1f}")
    for path, key, macs in (("dense path", "dense", "gmacs_dense"), ("visual forward", "visual", "gmacs_visual_tp")):
        best = lat[f"{key}_before"][1] / lat[f"{key}_after"][1]
        print(f"{path}: speed-up {before[f'ms_{key}'] / after[f'ms_{key}']:.2f}x (wall medians; {best:.2f}x from the "
              f"fastest rounds; {before[f'cpu_{key}'] / after[f'cpu_{key}']:.2f}x in 1-thread CPU time) "
              f"vs MAC reduction {before[macs] / after[macs]:.2f}x")
    print(f"load average {os.getloadavg()[0]:.2f} at end (other processes on this machine skew latency)")


if __name__ == "__main__":
    main()
