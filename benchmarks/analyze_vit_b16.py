"""Benchmark (not a test): heavy-tail spectral analysis of ViT-B-16, OpenTrans estimator vs weightwatcher.

Random-init weights (no pretrained weights can be downloaded here): the SVD cost does not depend on the
weight values; the alphas do and are not meaningful. Prints the load average before and after (the machine
is shared: a loaded machine inflates wall time), wall and process CPU time of
:func:`opentrans.analyze.spectral.analyze_model` for each tower and estimator, and the layer counts.
Target: the OpenTrans estimator on the image tower in at most 15 s on the project's 2-core CPU machine.

    python benchmarks/analyze_vit_b16.py [--towers image,text] [--estimator opentrans|weightwatcher|both]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from opentrans.analyze.spectral import analyze_model
from opentrans.models.artifact import build_segmentor

MODEL = "ViT-B-16"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--towers", default="image,text")
    ap.add_argument("--estimator", default="opentrans", choices=["opentrans", "opentrans-qkv", "weightwatcher", "both"])
    args = ap.parse_args()
    print(f"load average before: {os.getloadavg()}  cores: {os.cpu_count()}  torch threads: {torch.get_num_threads()}")
    seg, _ = build_segmentor(MODEL, "none")
    ests = ["opentrans", "weightwatcher"] if args.estimator == "both" else [args.estimator]
    for tower in args.towers.split(","):
        for est in ests:
            wall, cpu = time.perf_counter(), time.process_time()
            report = analyze_model(seg, (tower,), est)[est]
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            alphas = [la.alpha for la in report.layers]
            print(f"{MODEL} {tower:5s} {est:13s} layers={len(report.layers):3d} excluded={len(report.excluded)} "
                  f"wall={wall:6.2f} s cpu={cpu:6.2f} s  alpha median={sorted(alphas)[len(alphas) // 2]:.2f}"
                  f"  (random-init weights)")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
