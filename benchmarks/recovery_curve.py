"""How the mIoU drop and the argmax agreement of a pruned model recover with distillation steps.

The fidelity benchmark (``benchmarks/fidelity.py``) runs each plan with one recovery budget; this script follows
the 2x plan (about half the image-encoder MACs: MLP channels 0.45, heads 0.42, width 0.125) from no recovery to
``--steps`` (default 480) of label-free distillation on CamVid train images, with the same settings as the fidelity
run (batch 4, Adam lr 1e-4, frozen head and text tower), and measures the val mIoU on all 101 CamVid val images and
the per-pixel argmax agreement with the reference at each checkpoint (0, 60, 120, 240, 480 steps by default).

The steps between two checkpoints are one call of :func:`opentrans.prune.distill.recover` with its own data-order
seed (the checkpoint index), so Adam's moment estimates restart at each checkpoint; the first 60 steps are exactly
the fidelity run's ``2x+rec60``.

    python benchmarks/recovery_curve.py [--reference runs/reference/ViT-B-32-224x288] [--checkpoints 60,120,240,480]

Writes ``runs/fidelity/<reference>/recovery_curve.{md,json,png}``. The reference is a model trained here on
CamVid's 367 training images from random init, not pretrained CLIP: the table says so.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from opentrans.artifacts import read_json, write_json, write_text  # noqa: E402
from opentrans.data import open_dataset  # noqa: E402
from opentrans.inference.evaluate import TorchRunner, agreement, evaluate  # noqa: E402
from opentrans.hardware import cpu_isa  # noqa: E402
from opentrans.models.artifact import load_segmentor  # noqa: E402
from opentrans.prune.distill import open_images, recover  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = f"camvid:{ROOT.parent / 'shared' / 'data' / 'camvid'}"
BATCH, LR = 4, 1e-4  # the fidelity run's recovery settings


def _pruned_2x(reference: Path, out: Path) -> Path:
    """The fidelity run's 2x plan without recovery (pruned here if the fidelity run has not written it)."""
    import fidelity  # benchmarks/fidelity.py, beside this file

    return fidelity._prune(reference, out / "2x", "2x", 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, default=ROOT / "runs" / "reference" / "ViT-B-32-224x288")
    parser.add_argument("--checkpoints", default="60,120,240,480", help="cumulative recovery steps to measure at")
    args = parser.parse_args()
    checkpoints = [int(s) for s in args.checkpoints.split(",")]
    info = read_json(args.reference / "reference.json")
    out = ROOT / "runs" / "fidelity" / args.reference.name
    teacher, spec = load_segmentor(args.reference)
    student, _ = load_segmentor(_pruned_2x(args.reference, out))
    val = open_dataset(DATA, "val", spec.image_size, spec.mean, spec.std)
    train = open_images(DATA, spec.image_size, spec.mean, spec.std)
    text = teacher.encode_classes(list(val.class_names), model_name=spec.model).numpy()
    ref_runner = TorchRunner(teacher)
    ref_miou = evaluate(ref_runner, val, text)["miou"]
    print(f"CPU: {cpu_isa().summary()}; reference {args.reference} ({info['weights']}): val mIoU {ref_miou:.2f} %")

    rows, done, seconds = [], 0, 0.0
    for index, target in enumerate([0, *checkpoints]):
        started = time.perf_counter()
        recover(student, teacher, train, target - done, [], BATCH, LR, seed=index - 1 if index else 0)
        seconds += time.perf_counter() - started
        done = target
        student.eval()
        runner = TorchRunner(student)
        miou = evaluate(runner, val, text)["miou"]
        agree = agreement(ref_runner, runner, val, text)["pixel_agreement"]
        rows.append({"steps": done, "miou": miou, "miou_drop": ref_miou - miou, "agreement": agree,
                     "recovery_s": seconds})
        print(f"{done:4d} steps: mIoU {miou:.2f} % (drop {ref_miou - miou:+.2f} points), agreement {agree:.2f} %, "
              f"{seconds:.0f} s")
        _write(rows, out, args.reference, info["weights"], ref_miou, len(val))  # after every checkpoint


def _write(rows: list[dict], out: Path, reference: Path, weights: str, ref_miou: float, val_images: int) -> None:
    """``recovery_curve.{md,json,png}`` in ``out`` for the checkpoints measured so far."""
    lines = [f"# Recovery curve: {reference.name}, 2x plan", "",
             f"- Weights: **{weights}** (reference val mIoU {ref_miou:.2f} % on {val_images} CamVid val images)",
             f"- Machine: {cpu_isa().summary()}; recovery: label-free distillation on CamVid train images, batch "
             f"{BATCH}, Adam lr {LR:g}, Adam state restarted at each checkpoint", "",
             "| recovery steps | val mIoU % | mIoU drop (points) | agreement % | recovery s |",
             "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['steps']} | {r['miou']:.2f} | {r['miou_drop']:.2f} | {r['agreement']:.2f} | "
              f"{r['recovery_s']:.0f} |" for r in rows]
    write_text(out / "recovery_curve.md", "\n".join(lines) + "\n")
    write_json(out / "recovery_curve.json", {"reference": str(reference), "weights": weights,
                                             "cpu": cpu_isa().to_json(), "batch_size": BATCH, "lr": LR, "rows": rows})
    _plot(rows, out / "recovery_curve.png", reference.name, weights)


def _plot(rows: list[dict], path: Path, name: str, weights: str) -> None:
    steps = [r["steps"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    left.plot(steps, [r["miou_drop"] for r in rows], "o-")
    left.axhline(1.0, color="grey", ls="--", label="goal: drop <= 1 point")
    left.set(xlabel="recovery steps (batch 4)", ylabel="val mIoU drop vs reference (points)", title="mIoU drop")
    right.plot(steps, [r["agreement"] for r in rows], "o-", color="C1")
    right.axhline(97.0, color="grey", ls="--", label="goal: agreement >= 97 %")
    right.set(xlabel="recovery steps (batch 4)", ylabel="argmax agreement with reference (%)", title="agreement")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
    fig.suptitle(f"{name}, 2x fewer MACs: recovery by distillation\n{weights}; {cpu_isa().summary()}", fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
