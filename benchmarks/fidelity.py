"""What compression costs in mIoU, measured on a reference trained here (``benchmarks/train_reference.py``).

On one reference: structured plans at about 1.5x, 2x and 3x fewer image-encoder MACs (MLP channels, whole heads,
residual width) and OpenTrans IMP at 50 % (our ViT target set, ``--imp-targets extended``), each without and with
recovery (label-free distillation on CamVid train images, ``--recovery-steps`` in all: IMP spreads them over its 7
rounds); then the 2x plan with recovery
deployed with OpenVINO at fp32, int8 and auto. One table from one run: GMACs, latency (batch 1, every model and
build timed interleaved in this process), val mIoU on all 101 CamVid val images, argmax agreement and mIoU drop
against the reference, recovery time; plus the Pareto plot and a JSON beside them (``runs/fidelity/<reference>/``).

    python benchmarks/fidelity.py [--reference runs/reference/ViT-B-32-224x288] [--recovery-steps 60]
    python benchmarks/fidelity.py --reference runs/reference/ViT-B-16-224x224 --plans 2x   # the 2x plan only

The reference is a model trained here on CamVid's 367 training images from random init, not pretrained CLIP:
the table says so.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from opentrans.artifacts import machine_description, read_json, write_json, write_text
from opentrans.bench.report import plot_pareto
from opentrans.data import open_dataset
from opentrans.deploy.options import DeployOptions
from opentrans.deploy.stage import deploy_stage
from opentrans.models.source import ModelSource
from opentrans.deploy.targets import load_runner
from opentrans.inference.evaluate import TorchRunner, agreement, evaluate
from opentrans.hardware import cpu_isa
from opentrans.models.artifact import load_segmentor
from opentrans.models.cost import count_encoder_cost
from opentrans.prune.imp_stage import imp_stage
from opentrans.prune.options import ImpOptions, StructuredOptions
from opentrans.prune.stage import prune_stage
from opentrans.timing import interleaved_ms

ROOT = Path(__file__).resolve().parents[1]
DATA = f"camvid:{ROOT.parent / 'shared' / 'data' / 'camvid'}"
#: name -> (MLP channel, head, width sparsity); measured on ViT-B-32 at 224x288: 1.54x, 1.99x, about 3x fewer MACs.
PLANS = {"1.5x": (0.35, 0.25, 0.0625), "2x": (0.45, 0.42, 0.125), "3x": (0.6, 0.5, 0.25)}
#: OpenTrans IMP rounds from dense to 50 % at 10 % of the remaining weights per round (1 - 0.9^7 >= 0.5).
IMP_ROUNDS = 7


def _prune(reference: Path, out: Path, plan: str, recovery_steps: int) -> Path:
    if (out / "manifest.json").exists():
        return out
    common = dict(recovery_steps=recovery_steps, distill_data=DATA if recovery_steps else None, batch_size=4,
                  lr=1e-4, seed=0)
    if plan == "imp50":  # the same step budget, spread over IMP's rounds (7 rounds of 10 % of the rest to 50 %)
        common["recovery_steps"] = -(-recovery_steps // IMP_ROUNDS) if recovery_steps else 0
        imp_stage(ModelSource(from_dir=reference),
                  ImpOptions(sparsity=0.5, imp_targets="extended", eval_data=None, **common), out)
    else:
        channels, heads, width = PLANS[plan]
        prune_stage(ModelSource(from_dir=reference),
                    StructuredOptions(sparsity=channels, structures="channels,heads,width", head_sparsity=heads,
                                      width_sparsity=width, latency_repeats=0, **common), out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, default=ROOT / "runs" / "reference" / "ViT-B-32-224x288")
    parser.add_argument("--recovery-steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved latency rounds")
    parser.add_argument("--plans", default=",".join([*PLANS, "imp50"]),
                        help="comma-separated subset of 1.5x,2x,3x,imp50 (2x is deployed, so it is always run)")
    args = parser.parse_args()
    plans = list(dict.fromkeys([p for p in args.plans.split(",") if p] + ["2x"]))
    unknown = sorted(set(plans) - {*PLANS, "imp50"})
    if unknown:
        parser.error(f"--plans: unknown {', '.join(unknown)}")
    ref_dir = args.reference
    info = read_json(ref_dir / "reference.json")
    out = ROOT / "runs" / "fidelity" / ref_dir.name
    started = time.perf_counter()
    print(f"CPU: {cpu_isa().summary()}; reference {ref_dir} ({info['weights']})")

    models = {"reference": ref_dir}
    recovery_s = {}
    for plan in [p for p in (*PLANS, "imp50") if p in plans]:
        for steps in (0, args.recovery_steps):
            name = f"{plan}{'+rec' + str(steps) if steps else ''}"
            t = time.perf_counter()
            models[name] = _prune(ref_dir, out / name, plan, steps)
            recovery_s[name] = read_json(out / name / "manifest.json")["wall_time_s"] if steps else 0.0
            print(f"{name}: {time.perf_counter() - t:.0f} s")
    builds = {f"2x+rec{args.recovery_steps} openvino-{p}": out / "deploy" / p for p in ("fp32", "int8", "auto")}
    for name, path in builds.items():
        if not (path / "manifest.json").exists():
            deploy_stage(ModelSource(from_dir=models[f"2x+rec{args.recovery_steps}"]),
                         DeployOptions(target="openvino", precision=name.rsplit("-", 1)[1], data=DATA,
                                       parity_limit=8, calib_size=32), path)

    ref_seg, spec = load_segmentor(ref_dir)
    val = open_dataset(DATA, "val", spec.image_size, spec.mean, spec.std)
    text = ref_seg.encode_classes(list(val.class_names), model_name=spec.model).numpy()
    runners = {"reference": TorchRunner(ref_seg)}
    gmacs = {}
    for name, path in models.items():
        seg = ref_seg if name == "reference" else load_segmentor(path)[0]
        runners[name] = runners.get(name) or TorchRunner(seg)
        gmacs[name] = count_encoder_cost(seg)["gmacs"]
    for name, path in builds.items():
        runners[name] = load_runner(path)
        gmacs[name] = gmacs[f"2x+rec{args.recovery_steps}"]
    image = np.ascontiguousarray(val[0][0][None].numpy(), dtype=np.float32)
    medians = interleaved_ms({k: (lambda r=r: r(image, text)) for k, r in runners.items()}, repeats=args.rounds)
    ref_eval = evaluate(runners["reference"], val, text)
    rows = []
    for name, runner in runners.items():
        ev = ref_eval if name == "reference" else evaluate(runner, val, text)
        agree = agreement(runners["reference"], runner, val, text)["pixel_agreement"]
        rows.append({"name": name, "gmacs": gmacs[name], "mac_reduction": gmacs["reference"] / gmacs[name],
                     "median_ms": medians[name], "miou": ev["miou"],
                     "miou_drop": ref_eval["miou"] - ev["miou"], "agreement": agree,
                     "recovery_s": recovery_s.get(name, 0.0)})
    for r in rows:
        r["speedup"] = rows[0]["median_ms"] / r["median_ms"]
        r["pareto"] = not any(o["median_ms"] <= r["median_ms"] and o["miou"] >= r["miou"] and o is not r
                              and (o["median_ms"] < r["median_ms"] or o["miou"] > r["miou"]) for o in rows)
    machine = machine_description()
    lines = [f"# Fidelity of compression: {ref_dir.name}", "",
             f"- Weights: **{info['weights']}** (reference val mIoU {ref_eval['miou']:.2f} % on {len(val)} CamVid "
             f"val images)",
             f"- Machine: {cpu_isa().summary()}, {machine['logical_cores']} cores; latency batch 1, "
             f"{args.rounds} interleaved rounds, one process; recovery: {args.recovery_steps} steps of label-free "
             f"distillation on CamVid train images (batch 4, lr 1e-4)", "",
             "| model | GMACs | MAC reduction | median ms | speed-up | val mIoU % | mIoU drop (points) | "
             "agreement % | recovery s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['gmacs']:.2f} | {r['mac_reduction']:.2f}x | {r['median_ms']:.1f} | "
                     f"{r['speedup']:.2f}x | {r['miou']:.2f} | {r['miou_drop']:.2f} | {r['agreement']:.2f} | "
                     f"{r['recovery_s']:.0f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    write_text(out / "fidelity.md", table)
    write_json(out / "fidelity.json", {"reference": str(ref_dir), "weights": info["weights"], "cpu": cpu_isa().to_json(),
                                       "recovery_steps": args.recovery_steps, "rows": rows,
                                       "seconds": time.perf_counter() - started})
    plot_pareto(rows, out / "fidelity.png", f"Latency vs mIoU after compression: {ref_dir.name}",
                f"Weights: {info['weights']}. Machine: {cpu_isa().summary()}. CamVid val, {len(val)} images.")
    print(f"{out / 'fidelity.md'}, {out / 'fidelity.png'}; load average {os.getloadavg()}")
    print(json.dumps({r["name"]: round(r["miou_drop"], 2) for r in rows}))


if __name__ == "__main__":
    main()
