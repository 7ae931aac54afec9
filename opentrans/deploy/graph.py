"""The image graph's interface, described once: input and output names, dtypes and axes. The ONNX export
(:func:`opentrans.deploy.export.export_onnx`), the runners of every back end and ``build.json`` /
``bundle.json`` read it from here.

``images`` float32 (B, 3, H, W) and ``text_embeds`` float32 (C, D) -> ``logits`` float32 (B, C, H, W); the batch
and class axes are always dynamic, height and width only in a ``dynamic_hw`` export.
"""

from __future__ import annotations

IMAGES = "images"
TEXT_EMBEDS = "text_embeds"
LOGITS = "logits"
INPUT_NAMES = (IMAGES, TEXT_EMBEDS)
OUTPUT_NAME = LOGITS
DTYPE = "float32"

#: Dynamic axes (ONNX export form: tensor -> {axis: name}).
DYNAMIC_AXES = {IMAGES: {0: "batch"}, TEXT_EMBEDS: {0: "classes"}, LOGITS: {0: "batch", 1: "classes"}}
#: Dynamic axes with ``dynamic_hw=True``.
DYNAMIC_HW_AXES = {IMAGES: {0: "batch", 2: "height", 3: "width"}, TEXT_EMBEDS: {0: "classes"},
                   LOGITS: {0: "batch", 1: "classes", 2: "height", 3: "width"}}


def dynamic_axes(dynamic_hw: bool) -> dict[str, dict[int, str]]:
    """The dynamic axes of the export (:data:`DYNAMIC_HW_AXES` with ``dynamic_hw``, else :data:`DYNAMIC_AXES`)."""
    return DYNAMIC_HW_AXES if dynamic_hw else DYNAMIC_AXES


def graph_io(image_size: tuple[int, int], embed_dim: int, dynamic_hw: bool) -> dict[str, object]:
    """``build.json``'s ``inputs`` and ``output``: each tensor's dtype and shape, as text."""
    h, w = image_size
    return {"inputs": {IMAGES: f"{DTYPE} (B,3,H,W)" if dynamic_hw else f"{DTYPE} (B,3,{h},{w})",
                       TEXT_EMBEDS: f"{DTYPE} (C,{embed_dim})"},
            "output": f"{LOGITS} {DTYPE} (B,C,{h},{w})"}


def feeds(images, text_embeds) -> dict:
    """The graph's inputs for ``images`` (B, 3, H, W) and ``text_embeds`` (C, D), contiguous float32."""
    import numpy as np

    return {IMAGES: np.ascontiguousarray(images, dtype=np.float32),
            TEXT_EMBEDS: np.ascontiguousarray(text_embeds, dtype=np.float32)}
