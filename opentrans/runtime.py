"""The runtime contract every back end's runner meets (PyTorch, ONNX Runtime, OpenVINO, TensorRT), so callers
(``eval``, ``segment``, ``bench``, the API) use any runner without probing it for attributes.

A runner has

* ``name``: back end and precision, e.g. ``torch-fp32``, ``onnxruntime-int8``, ``openvino-fp32``;
* ``input_size``: the (H, W) in pixels its image graph takes, or None when it takes any size;
* ``encode_classes(names) -> float32 (C, D)``: L2-normalised class embeddings, from the runner's own text tower
  (a deploy build's text graph, or the PyTorch model's), and ``text_source``, which of the two, in words;
* ``runner(images float32 (B, 3, H, W), text_embeds float32 (C, D)) -> logits float32 (B, C, H, W)``.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import numpy as np


@runtime_checkable
class Runner(Protocol):
    """Anything that turns a batch of images and class embeddings into logits (see the module docstring).

    Attributes:
        name: back end and precision, e.g. ``torch-fp32``, ``onnxruntime-fp32``, ``openvino-int8``.
        input_size: (H, W) in pixels the runner takes, or None for any size.
    """

    name: str
    input_size: tuple[int, int] | None
    text_source: str

    def encode_classes(self, names: Sequence[str]) -> np.ndarray:
        """Class names -> float32 (C, D) L2-normalised embeddings.

        Raises:
            OpenTransError: no class names, or a runner without a text tower (a build made before text graphs).
        """
        ...

    def __call__(self, images: np.ndarray, text_embeds: np.ndarray) -> np.ndarray:
        """images float32 (B,3,H,W), text_embeds float32 (C,D) -> logits float32 (B,C,H,W)."""
        ...


def static_size(shape: Sequence) -> tuple[int, int] | None:
    """``(H, W)`` of an image input's ``(..., H, W)`` shape when both are fixed integers, else None (dynamic)."""
    h, w = shape[-2], shape[-1]
    return (int(h), int(w)) if isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0 else None
