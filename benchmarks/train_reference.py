"""Train a reference CLIP segmentor on CamVid here, from random init: the trained model every accuracy figure of
``benchmarks/fidelity.py`` is measured against (no pretrained CLIP weights can be had on these machines).

Every layer of the image tower and the head trains (AdamW with the trainer's warm-up + cosine schedule, seeded: the
same command gives the same weights). The text tower stays at its random init, so the class embeddings are fixed
random directions the image tower learns to point at: training it too costs about 30 s a step on 2 cores (11
classes x 6 templates x 77 tokens through 12 layers, forward and backward), three times the image side; pass
``--train-text`` to train it anyway. The model is cached: a directory that already holds a finished
reference with the same settings is reused, so the command returns at once the second time.

    python benchmarks/train_reference.py --model ViT-B-32 --size 224x288   # the quickstart's architecture
    python benchmarks/train_reference.py --model ViT-B-16 --size 224x224

Output: ``runs/reference/<model>-<H>x<W>/`` (a model directory like ``finetune``'s: ``model.json``,
``model.safetensors``, ``manifest.json`` with the training figures, ``reference.json``: val mIoU on all 101 CamVid
val images and how peaked the logits are, against the same architecture at random init). Say wherever a figure from
it appears: **a model trained here on CamVid's 367 training images, not pretrained CLIP**.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from opentrans.artifacts import StageRecord, is_complete, read_json, write_json
from opentrans.data import open_dataset
from opentrans.inference.evaluate import TorchRunner, evaluate
from opentrans.finetune.trainer import train_segmentor
from opentrans.models.artifact import build_segmentor, save_segmentor

ROOT = Path(__file__).resolve().parents[1]
DATA = f"camvid:{ROOT.parent / 'shared' / 'data' / 'camvid'}"
TRAINED_HERE = "model trained here on CamVid's 367 training images from random init (not pretrained CLIP)"


@torch.no_grad()
def logit_peakedness(seg, dataset, text: torch.Tensor, images: int = 8) -> dict:
    """How decided the per-pixel class scores are on ``images`` val images: the median gap between the top-1 and
    top-2 logit and the median top-1 softmax probability (random-init CLIP: gap about 0.1, i.e. nearly flat)."""
    gaps, top1 = [], []
    for i in range(min(images, len(dataset))):
        logits = seg(dataset[i][0][None], text)[0]  # (C, H, W)
        top = logits.topk(2, dim=0).values
        gaps.append((top[0] - top[1]).flatten())
        top1.append(logits.softmax(0).max(0).values.flatten())
    return {"median_top1_top2_gap": float(torch.cat(gaps).median()),
            "median_top1_probability": float(torch.cat(top1).median())}


def train_reference(model: str, size: tuple[int, int], steps: int, batch_size: int, lr: float, seed: int,
                    out: Path, train_text: bool = False) -> dict:
    """Train (or reuse) the reference in ``out``; returns its ``reference.json`` figures."""
    trainable = "image tower, text tower, head" if train_text else "image tower and head (text tower at random init)"
    options = {"model": model, "image_size": list(size), "steps": steps, "batch_size": batch_size, "lr": lr,
               "seed": seed, "data": DATA, "trainable": trainable}
    if is_complete(out) and read_json(out / "manifest.json")["options"] == options:
        return read_json(out / "reference.json")
    torch.manual_seed(seed)
    seg, spec = build_segmentor(model, "none", image_size=size)
    train = open_dataset(DATA, "train", spec.image_size, spec.mean, spec.std)
    val = open_dataset(DATA, "val", spec.image_size, spec.mean, spec.std)
    names = list(train.class_names)
    with torch.no_grad():
        text0 = seg.encode_classes(names, model_name=spec.model)
    before = {**evaluate(TorchRunner(seg), val, text0.numpy()), **logit_peakedness(seg, val, text0)}
    for name, p in seg.named_parameters():
        p.requires_grad_(train_text or name.startswith(("clip.visual.", "head.")))
    encode = type(seg).encode_classes.__wrapped__  # with gradient (only the text tower needs it)
    train_text_embeds = (lambda: encode(seg, names, model_name=spec.model)) if train_text else text0

    started = time.perf_counter()
    with StageRecord("reference", out, options) as rec:
        losses = train_segmentor(seg, train, train_text_embeds, steps=steps,
                                 batch_size=batch_size, lr=lr, seed=seed, progress=True)
        seconds = time.perf_counter() - started
        seg.eval()
        with torch.no_grad():
            text = seg.encode_classes(names, model_name=spec.model)
        after = {**evaluate(TorchRunner(seg), val, text.numpy()), **logit_peakedness(seg, val, text)}
        spec.weights = TRAINED_HERE
        spec.lineage = [*spec.lineage, "reference"]
        rec.add_output(save_segmentor(seg, spec, out))
        rec.add_output(out / "model.json")
        rec.weights = TRAINED_HERE
        figures = {"weights": TRAINED_HERE, "model": model, "image_size": list(size), "train_seconds": seconds,
                   "steps": steps, "trainable": trainable, "final_loss": float(np.mean(losses[-10:])), "val_images": len(val),
                   "val_miou": after["miou"], "val_pixel_acc": after["pixel_acc"],
                   "random_init_val_miou": before["miou"], "logits": {"random_init": {k: before[k] for k in (
                       "median_top1_top2_gap", "median_top1_probability")}, "trained": {k: after[k] for k in (
                           "median_top1_top2_gap", "median_top1_probability")}},
                   "per_class_iou": after.get("per_class_iou")}
        write_json(out / "reference.json", figures)
        rec.add_output(out / "reference.json")
        rec.figures = {k: figures[k] for k in ("val_miou", "val_pixel_acc", "train_seconds", "final_loss")}
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--size", default="224x288", help="HxW")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-text", action="store_true", help="train the text tower too (slow, see above)")
    parser.add_argument("--out", type=Path, default=None, help="default: runs/reference/MODEL-HxW")
    args = parser.parse_args()
    h, w = (int(v) for v in args.size.lower().split("x"))
    out = args.out or ROOT / "runs" / "reference" / f"{args.model}-{h}x{w}"
    figures = train_reference(args.model, (h, w), args.steps, args.batch_size, args.lr, args.seed, out,
                              train_text=args.train_text)
    print(f"{out}: {figures['weights']}")
    print(f"val mIoU {figures['val_miou']:.2f} % on {figures['val_images']} CamVid val images (random init "
          f"{figures['random_init_val_miou']:.2f} %); logits: {figures['logits']}; {figures['train_seconds']:.0f} s")


if __name__ == "__main__":
    main()
