"""Benchmark (not a test): structured pruning of whole heads, MLP channels and residual width, MACs vs CPU speed-up.

ViT-B-16 and RN50 image encoders with random-init weights (no pretrained weights can be downloaded here: latency
and MACs do not depend on the weight values; accuracy does and is not measured). Each model is pruned with
:func:`opentrans.prune.prune_structured` (``structures=channels,heads,width``, magnitude, per-layer, round_to 8)
to remove about half of the image encoder's MACs (defaults below: ViT-B-16 at 224x224 keeps 7/12 heads per block,
1688/3072 MLP channels and 672/768 residual width; RN50 keeps 3/4 of the Bottleneck channels, 16/32 pool heads and
about 55 % of every stage's residual width: ~50 % fewer MACs), then the unpruned and the pruned encoder
(the segmentor's dense path, batch 1) are timed side by side in one process: ``torch.utils.benchmark.Timer``
``blocked_autorange`` rounds, alternating between the two models, a fixed number of threads.

Printed per model: params, GMACs, MAC reduction ratio (before / after), median latency before/after, speed-up
ratio, and speed-up / MAC-reduction (1.0 = latency falls exactly like MACs; the target is >= 0.9).

    python benchmarks/prune_structured_speedup.py [--models ViT-B-16,RN50] [--threads 2] [--rounds 5]
    python benchmarks/prune_structured_speedup.py --models RN50 --plan 0.3,0.5,0.35   # another plan
    python benchmarks/prune_structured_speedup.py --tiny        # smoke run on the tiny test configs (seconds)
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from importlib import metadata

import torch
from torch.utils import benchmark

from opentrans.models.artifact import build_segmentor
from opentrans.prune import prune_structured

#: Default pruning plan per model: (channel sparsity, head sparsity, width sparsity) -> about 50 % of the MACs.
PLANS = {
    "ViT-B-16": (0.45, 0.42, 0.125),
    # RN50: width prunes the residual stream of every stage (layer1..layer4); a width-heavy plan lowers the
    # memory traffic of the 56x56..14x14 stages, so latency follows MACs better than (0.4, 0.5, 0.25).
    "RN50": (0.25, 0.5, 0.45),
    "opentrans-tiny-vit": (0.5, 0.5, 0.25),
    "opentrans-tiny-rn": (0.5, 0.5, 0.25),
}
TINY = {"ViT-B-16": "opentrans-tiny-vit", "RN50": "opentrans-tiny-rn"}


def latency_ms(models: dict, x: torch.Tensor, rounds: int, min_run_time: float, threads: int) -> dict:
    """Median wall time in ms of each ``models[name].dense_features(x)``, interleaved: ``rounds`` rounds, each
    running every model's ``Timer.blocked_autorange(min_run_time)`` in turn on ``threads`` threads. Returns
    ``{name: (median of the round medians, min, max)}``."""
    times = {name: [] for name in models}
    with torch.inference_mode():
        for m in models.values():
            m.dense_features(x)  # warm-up
        for _ in range(rounds):
            for name, m in models.items():
                timer = benchmark.Timer("m.dense_features(x)", globals={"m": m, "x": x}, num_threads=threads)
                times[name].append(timer.blocked_autorange(min_run_time=min_run_time).median * 1e3)
    return {name: (statistics.median(t), min(t), max(t)) for name, t in times.items()}


def cpu_ms(models: dict, x: torch.Tensor, rounds: int, iters: int) -> dict:
    """Median single-thread CPU time in ms per ``dense_features(x)`` call (``time.thread_time``), alternating
    between the models. On a shared machine wall time mostly measures the other processes; the CPU time of a
    single-threaded run barely depends on them, so its ratio is the robust speed-up."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times = {name: [] for name in models}
    try:
        with torch.inference_mode():
            for _ in range(rounds):
                for name, m in models.items():
                    m.dense_features(x)
                    start = time.thread_time()
                    for _ in range(iters):
                        m.dense_features(x)
                    times[name].append((time.thread_time() - start) / iters * 1e3)
    finally:
        torch.set_num_threads(threads)
    return {name: statistics.median(t) for name, t in times.items()}


def run(model: str, size: int | None, plan: tuple[float, float, float], rounds: int, min_run_time: float,
        threads: int, cpu_iters: int) -> dict:
    seg, spec = build_segmentor(model, "none", image_size=(size, size) if size else None)
    seg.eval()
    base = copy.deepcopy(seg)
    channels, heads, width = plan
    report = prune_structured(seg, channels, "magnitude", round_to=8, model_name=model,
                              structures="channels,heads,width", head_sparsity=heads, width_sparsity=width)
    x = torch.randn(1, 3, *spec.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the pruned model still runs and gives finite features
        assert torch.isfinite(seg.dense_features(x)).all()
    ms = latency_ms({"unpruned": base, "pruned": seg}, x, rounds, min_run_time, threads)
    cpu = cpu_ms({"unpruned": base, "pruned": seg}, x, rounds, cpu_iters) if cpu_iters else None
    mac_ratio = report["gmacs_before"] / report["gmacs_after"]
    speedup = ms["unpruned"][0] / ms["pruned"][0]
    return {"model": model, "size": list(spec.image_size), "plan": plan, "report": report, "ms": ms, "cpu": cpu,
            "mac_ratio": mac_ratio, "speedup": speedup, "efficiency": speedup / mac_ratio}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="ViT-B-16,RN50")
    parser.add_argument("--size", type=int, default=224, help="square input size in pixels (default 224)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads for both models (default 2)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-run-time", type=float, default=1.0, help="seconds per blocked_autorange")
    parser.add_argument("--cpu-iters", type=int, default=3,
                        help="calls per round of the single-thread CPU-time measurement (0: skip it)")
    parser.add_argument("--plan", default=None, metavar="C,H,W",
                        help="override the plan of every model: channel, head and width sparsity (e.g. 0.3,0.5,0.35)")
    parser.add_argument("--tiny", action="store_true", help="smoke run: tiny test configs, 64x64, short timing")
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    size, rounds, min_run_time = args.size, args.rounds, args.min_run_time
    if args.tiny:
        models, size, rounds, min_run_time = [TINY.get(m, m) for m in models], 64, 2, 0.05
        args.threads = 1  # a smoke run on a shared machine: no OpenMP oversubscription
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, open_clip {metadata.version('open_clip_torch')}, {platform.processor() or platform.machine()}, "
          f"{args.threads} threads; random-init weights; image encoder dense path, batch 1")
    rows = []
    for model in models:
        plan = tuple(float(v) for v in args.plan.split(",")) if args.plan else PLANS[model]
        r = run(model, size, plan, rounds, min_run_time, args.threads, args.cpu_iters)
        rep = r["report"]
        print(f"\n{model} {r['size'][0]}x{r['size'][1]}: plan channels {r['plan'][0]}, heads {r['plan'][1]}, "
              f"width {r['plan'][2]}")
        for s, info in rep["structures"].items():
            print(f"  {s:8s}: kept {info['kept']}/{info['original']} ({info['achieved']:.1%} removed)")
        print(f"  params {rep['params_m_before']:.2f}M -> {rep['params_m_after']:.2f}M; GMACs {rep['gmacs_before']:.3f} -> "
              f"{rep['gmacs_after']:.3f} (MAC reduction {1 - 1 / r['mac_ratio']:.1%}, ratio {r['mac_ratio']:.2f}x)")
        (b, bmin, bmax), (a, amin, amax) = r["ms"]["unpruned"], r["ms"]["pruned"]
        print(f"  latency unpruned {b:.2f} ms [{bmin:.2f}, {bmax:.2f}], pruned {a:.2f} ms [{amin:.2f}, {amax:.2f}]")
        print(f"  speed-up {r['speedup']:.2f}x; speed-up / MAC ratio = {r['efficiency']:.2f} (target >= 0.9)")
        if r["cpu"]:
            cb, ca = r["cpu"]["unpruned"], r["cpu"]["pruned"]
            print(f"  single-thread CPU time {cb:.2f} -> {ca:.2f} ms: speed-up {cb / ca:.2f}x, "
                  f"/ MAC ratio = {cb / ca / r['mac_ratio']:.2f}")
        rows.append(r)
    print("\n| Model | GMACs before | after | MAC ratio | ms before | ms after | speed-up | speed-up / MAC ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        rep = r["report"]
        print(f"| {r['model']} {r['size'][0]}x{r['size'][1]} | {rep['gmacs_before']:.3f} | {rep['gmacs_after']:.3f} | "
              f"{r['mac_ratio']:.2f}x | {r['ms']['unpruned'][0]:.2f} | {r['ms']['pruned'][0]:.2f} | {r['speedup']:.2f}x | "
              f"{r['efficiency']:.2f} |")


if __name__ == "__main__":
    main()
