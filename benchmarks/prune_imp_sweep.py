"""Benchmark (not a test): OpenTrans IMP sparsity sweep: fidelity, compressed size and latency versus sparsity.

One IMP run (global L1 magnitude, ``--rate`` of the remaining weights per round, optional distillation recovery)
is stopped at every ``--sparsities`` level; at each level the script measures, against the unpruned model:

* fidelity on CamVid val (``--eval-limit`` images): teacher-agreement mIoU (the unpruned model's argmax as
  labels, :func:`opentrans.inference.evaluate.agreement`) and the mean cosine of the dense features;
* zlib-compressed size of the image-tower weights (MB);
* latency of the dense path, batch 1, fp32: torch eager (unpruned and pruned measured in alternation in this
  process) and, with ``--openvino``, OpenVINO CPU at f32 inference precision (same process, alternating).

With ``--recovery-steps 0`` each level is reached in one global round: without recovery the weights do not
change between rounds, so iterative and one-shot global magnitude pruning select the same weights.
Unstructured zeros do not change any shape, so dense-kernel latency is expected to stay flat: the sweep shows it.
Writes ``sweep.json``, ``sweep.md`` and ``sweep.png`` into ``--out`` and prints the machine's load average.

    python benchmarks/prune_imp_sweep.py --model ViT-B-16 --sparsities 0.2,0.5,0.8 --openvino --out runs/imp-sweep
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time

import torch

from opentrans.artifacts import write_json, write_text
from opentrans.data import open_dataset
from opentrans.models.artifact import build_segmentor
from opentrans.prune.distill import open_images, recover
from opentrans.prune.imp import attach_masks, bake_masks, current_masks, global_magnitude_round, mask_sparsity
from opentrans.prune.imp_stage import LATENCY_NOTE, compressed_mb, fidelity

ROOT = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "camvid")


class _Dense(torch.nn.Module):
    def __init__(self, seg):
        super().__init__()
        self.seg = seg

    def forward(self, images):  # (1, 3, H, W) -> (1, h*w, D)
        return self.seg.dense_features(images)


def _openvino(seg, x):
    import openvino as ov

    with torch.no_grad():
        program = torch.export.export(_Dense(seg).eval(), (x,))
    compiled = ov.Core().compile_model(ov.convert_model(program), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    arr = x.numpy()
    return lambda: compiled(arr)


def _alternating_ms(fns: dict, rounds: int, iters: int) -> dict:
    """Median over ``rounds`` alternating rounds of the mean wall ms of ``iters`` calls of each callable."""
    times = {k: [] for k in fns}
    with torch.inference_mode():
        for fn in fns.values():
            fn()
        for _ in range(rounds):
            for k, fn in fns.items():
                start = time.perf_counter()
                for _ in range(iters):
                    fn()
                times[k].append((time.perf_counter() - start) / iters * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def _plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = [100 * r["sparsity"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(s, [r["teacher_miou"] for r in rows], "o-", label="teacher-agreement mIoU %")
    a.plot(s, [100 * r["feature_cosine"] for r in rows], "s-", label="feature cosine x100")
    a.set_xlabel("sparsity of pruned weights (%)")
    a.set_ylabel("fidelity to unpruned model")
    a.legend()
    a.grid(alpha=0.3)
    b.plot(s, [r["torch_ms"] for r in rows], "o-", label="torch pruned")
    b.plot(s, [r["torch_ms_unpruned"] for r in rows], "--", label="torch unpruned")
    if rows[0].get("openvino_ms") is not None:
        b.plot(s, [r["openvino_ms"] for r in rows], "o-", label="OpenVINO pruned")
        b.plot(s, [r["openvino_ms_unpruned"] for r in rows], "--", label="OpenVINO unpruned")
    b.set_xlabel("sparsity of pruned weights (%)")
    b.set_ylabel("dense-path latency, batch 1 (ms)")
    b.legend()
    b.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--sparsities", default="0.2,0.5,0.8")
    parser.add_argument("--rate", type=float, default=0.1)
    parser.add_argument("--imp-targets", default="extended", choices=["authors", "extended"],
                        help="IMP target set (a ViT needs extended, ours; authors = every Conv2d but the first)")
    parser.add_argument("--recovery-steps", type=int, default=0)
    parser.add_argument("--data", default=f"camvid:{os.path.normpath(ROOT)}")
    parser.add_argument("--eval-limit", type=int, default=8)
    parser.add_argument("--openvino", action="store_true")
    parser.add_argument("--rounds", type=int, default=5, help="alternating latency rounds")
    parser.add_argument("--iters", type=int, default=3, help="calls per latency round")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    levels = sorted(float(s) for s in args.sparsities.split(","))

    seg, spec = build_segmentor(args.model, "none")
    teacher = copy.deepcopy(seg).eval().requires_grad_(False)
    evalset = open_dataset(args.data, "val", spec.image_size, spec.mean, spec.std, limit=args.eval_limit)
    text = teacher.encode_classes(list(evalset.class_names), model_name=spec.model)
    distill = open_images(args.data, spec.image_size, spec.mean, spec.std) if args.recovery_steps else None
    x = evalset[0][0][None]  # (1, 3, H, W), a real CamVid val image
    header = (f"{args.model}, {spec.weights}, input {spec.image_size[0]}x{spec.image_size[1]}, batch 1, fp32; "
              f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(header)
    print(f"load average at start: {os.getloadavg()}")
    ov_teacher = _openvino(teacher, x) if args.openvino else None

    masks = current_masks(seg.visual, args.imp_targets)
    total = sum(m.numel() for m in masks.values())
    rows, rnd = [], 0
    for level in levels:
        while (pruned := total - sum(int(m.sum()) for m in masks.values())) < round(level * total):
            rnd += 1
            targets = attach_masks(seg.visual, masks)
            goal = min(round(level * total), pruned + max(1, round(args.rate * (total - pruned))))
            if not args.recovery_steps:
                # Without recovery the weights do not change between rounds, so iterative global magnitude
                # pruning selects exactly the weights one-shot pruning to the same sparsity does: one round.
                goal = round(level * total)
            global_magnitude_round(targets, goal - pruned)
            if args.recovery_steps:
                recover(seg, teacher, distill, args.recovery_steps, targets, seed=rnd)
            masks = bake_masks(targets)
        fid = fidelity(seg, teacher, evalset, text)
        fns = {"torch_ms_unpruned": lambda: teacher.dense_features(x), "torch_ms": lambda: seg.dense_features(x)}
        if args.openvino:
            fns |= {"openvino_ms_unpruned": ov_teacher, "openvino_ms": _openvino(seg, x)}
        lat = _alternating_ms(fns, args.rounds, args.iters)
        row = {"sparsity": mask_sparsity(masks), "rounds": rnd if args.recovery_steps else "one-shot", **{k: fid[k] for k in ("teacher_miou", "feature_cosine",
               "pixel_agreement")}, "compressed_mb": compressed_mb(seg.visual.state_dict()), **lat,
               "load_average": os.getloadavg()[0]}
        rows.append(row)
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)

    base_mb = compressed_mb(teacher.visual.state_dict())
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "sweep.json"), {"header": header, "weights": spec.weights, "rate": args.rate,
               "recovery_steps": args.recovery_steps, "compressed_mb_unpruned": base_mb, "rows": rows,
               "note": LATENCY_NOTE})
    lines = [f"# IMP sparsity sweep: {header}", "", f"**{LATENCY_NOTE}**", "",
             f"Recovery steps per round: {args.recovery_steps}. Fidelity on {len(evalset)} CamVid val images. "
             f"Unpruned compressed weights: {base_mb:.1f} MB. Latency: median of {args.rounds} alternating rounds "
             f"(unpruned and pruned in the same process), load average in the last column.", "",
             "| sparsity % | rounds | teacher mIoU % | feature cos | zlib MB | torch ms (unpruned) | OpenVINO ms (unpruned) | load |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ov_cell = f"{r['openvino_ms']:.1f} ({r['openvino_ms_unpruned']:.1f})" if "openvino_ms" in r else "n/a"
        lines.append(f"| {100 * r['sparsity']:.1f} | {r['rounds']} | {r['teacher_miou']:.2f} | {r['feature_cosine']:.4f} "
                     f"| {r['compressed_mb']:.1f} | {r['torch_ms']:.1f} ({r['torch_ms_unpruned']:.1f}) | {ov_cell} "
                     f"| {r['load_average']:.2f} |")
    write_text(os.path.join(args.out, "sweep.md"), "\n".join(lines) + "\n")
    _plot(rows, os.path.join(args.out, "sweep.png"), header + f" ({spec.weights})")
    print("\n".join(lines))
    print(f"load average at end: {os.getloadavg()}; wrote {args.out}/sweep.(json|md|png)")


if __name__ == "__main__":
    main()
