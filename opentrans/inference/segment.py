"""``opentrans segment``: one image, a list of class names, an overlay PNG."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from opentrans.artifacts import atomic_path
from opentrans.data.datasets import _read, preprocess_image
from opentrans.inference.evaluate import Runner, predict_labels


def palette(n: int) -> np.ndarray:
    """``(n, 3)`` uint8 colours, distinct for up to 20 classes (matplotlib's tab20), cycling after."""
    import matplotlib

    colours = matplotlib.colormaps["tab20"].colors
    return (np.asarray([colours[i % len(colours)] for i in range(n)]) * 255).astype(np.uint8)


def overlay(rgb: np.ndarray, labels: np.ndarray, class_names: list[str], alpha: float = 0.5) -> Image.Image:
    """Blend a label map over an image and add a legend of the classes present.

    Args:
        rgb: uint8 ``(h, w, 3)``.
        labels: int ``(h, w)`` class indices into ``class_names``.
        alpha: weight of the label colours, in [0, 1].
    """
    colours = palette(len(class_names))
    blended = (rgb.astype(np.float32) * (1 - alpha) + colours[labels].astype(np.float32) * alpha).astype(np.uint8)
    present = [i for i in range(len(class_names)) if (labels == i).any()]
    row = 16
    canvas = Image.new("RGB", (rgb.shape[1], rgb.shape[0] + row * len(present) + 4), "white")
    canvas.paste(Image.fromarray(blended), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for k, i in enumerate(present):
        y = rgb.shape[0] + 2 + k * row
        draw.rectangle([4, y + 2, 16, y + 12], fill=tuple(int(c) for c in colours[i]))
        share = 100.0 * float((labels == i).mean())
        draw.text((22, y), f"{class_names[i]} ({share:.1f} %)", fill="black")
    return canvas


def segment_image(runner: Runner, image: str | os.PathLike, class_names: list[str], text_embeds: np.ndarray,
                  image_size: tuple[int, int], mean, std, out: str | os.PathLike) -> dict:
    """Segment one image file and write an overlay PNG to ``out`` (atomically).

    Returns:
        ``{"out": path, "shares": {class: % of pixels}}``.

    Raises:
        OpenTransError: the image is missing or unreadable.
    """
    rgb, size = _read(Path(image), "RGB")
    x = preprocess_image(rgb, image_size, mean, std).numpy()[None]
    logits = runner(x, np.asarray(text_embeds, dtype=np.float32))
    labels = predict_labels(logits, size)[0].numpy()
    with atomic_path(out) as tmp:
        overlay(rgb, labels, class_names).save(tmp, format="PNG")
    shares = {n: round(100.0 * float((labels == i).mean()), 2) for i, n in enumerate(class_names)}
    return {"out": str(out), "shares": shares}
