"""Headline comparison: ViT-B-16 at 448x448, torch fp32 eager unpruned versus pruned 50 % + OpenVINO INT8.

Goal (issue 7): the pruned + INT8 build at least 8x faster than torch fp32 eager unpruned on this CPU, in the
same run, at >= 70 % of the INT8 roofline, with teacher agreement >= 97 %. Prints the bench table and a
verdict per goal. Usage (from the project root, after `pip install -e ".[openvino]"`):

    python benchmarks/headline_vit_b16.py [--pretrained none|TAG|PATH] [--structures channels,heads,width]
        [--sparsity 0.45] [--head-sparsity 0.42] [--width-sparsity 0.125] [--limit 8]

The default plan removes MLP channels, whole heads and residual width for about half the image encoder's MACs
at 224x224 (the plan of ``benchmarks/prune_structured_speedup.py``); ``--structures channels --sparsity 0.5`` is
the earlier MLP-only plan.

With `--pretrained none` the weights are random-init (say so wherever the numbers go).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from opentrans.bench import bench_stage
from opentrans.deploy.stage import deploy_stage
from opentrans.models.artifact import build_segmentor, save_segmentor
from opentrans.prune.stage import prune_stage

ROOT = Path(__file__).resolve().parents[1]
DATA = f"camvid:{ROOT.parent / 'shared' / 'data' / 'camvid'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrained", default="none")
    parser.add_argument("--structures", default="channels,heads,width")
    parser.add_argument("--sparsity", type=float, default=0.45, help="MLP channel sparsity")
    parser.add_argument("--head-sparsity", type=float, default=0.42)
    parser.add_argument("--width-sparsity", type=float, default=0.125)
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--limit", type=int, default=8, help="val images for mIoU and agreement")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "headline-vit-b16")
    args = parser.parse_args()

    base_dir, prune_dir = args.out / "base", args.out / "prune"
    int8_dir = args.out / "deploy" / "openvino-int8"
    print(f"load average at start: {os.getloadavg()}")
    if not (base_dir / "model.json").exists():
        seg, spec = build_segmentor("ViT-B-16", args.pretrained, image_size=(args.size, args.size))
        save_segmentor(seg, spec, base_dir)
    if not (prune_dir / "manifest.json").exists():
        structures = tuple(args.structures.split(","))
        prune_stage(from_dir=base_dir, model=None, pretrained="none", out_dir=prune_dir, sparsity=args.sparsity,
                    structures=structures, head_sparsity=args.head_sparsity if "heads" in structures else None,
                    width_sparsity=args.width_sparsity if "width" in structures else None, latency_repeats=0)
    if not (int8_dir / "manifest.json").exists():
        deploy_stage(from_dir=prune_dir, model=None, pretrained="none", out_dir=int8_dir, target="openvino",
                     precision="int8", data=DATA, parity_limit=4, calib_size=32)
    result = bench_stage([base_dir, int8_dir], args.out / "bench", DATA, limit=args.limit, warmup=2,
                         repeats=args.repeats, reference=base_dir)
    print((args.out / "bench" / "bench.md").read_text())
    base, best = result["rows"][0], result["rows"][-1]
    speedup = base["median_ms"] / best["median_ms"]
    goals = {
        "speed-up >= 8x": (speedup, speedup >= 8.0),
        "INT8 roofline fraction >= 70 %": (100 * (best["roofline_fraction"] or 0), (best["roofline_fraction"] or 0) >= 0.70),
        "teacher agreement >= 97 %": (best["agreement"], best["agreement"] >= 97.0),
    }
    print(f"weights: {base['weights']}; load average at end: {os.getloadavg()}")
    for goal, (value, ok) in goals.items():
        print(f"{'MET   ' if ok else 'MISSED'} {goal}: {value:.2f}")
    print(json.dumps({"speedup": speedup, "gmacs": [base["gmacs"], best["gmacs"]],
                      "mac_reduction": base["gmacs"] / best["gmacs"]}, indent=1))


if __name__ == "__main__":
    main()
