"""ONNX Runtime target: ship the fp32 ONNX export as is, run it with the CPU execution provider."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from opentrans.errors import OpenTransError

MODEL_FILE = "model.onnx"


def check_available() -> None:
    """ONNX Runtime is a required dependency: always available."""


class OnnxRuntimeRunner:
    """Runs an exported image graph with ONNX Runtime (CPUExecutionProvider).

    ``runner(images float32 (B,3,H,W), text_embeds float32 (C,D)) -> logits float32 (B,C,H,W)``; B and C may
    differ from the export's, (H, W) and D may not.

    Args:
        path: the ``.onnx`` file.
        name: reported back end name, e.g. ``onnxruntime-fp32``.
        threads: intra-op threads (``None``: ONNX Runtime's default, one per physical core).

    Raises:
        OpenTransError: the file does not exist.
    """

    def __init__(self, path: str | os.PathLike, name: str = "onnxruntime-fp32", threads: int | None = None):
        self.path = Path(path)
        if not self.path.exists():
            raise OpenTransError(f"{self.path}: file not found")
        self.name = name
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
        self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        shapes = {i.name: i.shape for i in self.session.get_inputs()}
        self.image_shape = tuple(shapes["images"][1:])  # (3, H, W)
        self.embed_dim = shapes["text_embeds"][1]

    def __call__(self, images: np.ndarray, text_embeds: np.ndarray) -> np.ndarray:
        """Logits float32 (B,C,H,W).

        Raises:
            OpenTransError: images not (B,3,H,W) at the exported size, or text_embeds not (C,D).
        """
        _check_inputs(self.path, images, text_embeds, self.image_shape, self.embed_dim)
        feeds = {"images": np.ascontiguousarray(images, dtype=np.float32),
                 "text_embeds": np.ascontiguousarray(text_embeds, dtype=np.float32)}
        return self.session.run(["logits"], feeds)[0]


def _check_inputs(path: Path, images: np.ndarray, text_embeds: np.ndarray, image_shape: tuple, embed_dim: int) -> None:
    if images.ndim != 4 or tuple(images.shape[1:]) != tuple(image_shape):
        raise OpenTransError(f"{path}: expects images (B,{','.join(map(str, image_shape))}), got {tuple(images.shape)}")
    if text_embeds.ndim != 2 or text_embeds.shape[1] != embed_dim:
        raise OpenTransError(f"{path}: expects text_embeds (C,{embed_dim}), got {tuple(text_embeds.shape)}")


def build(ctx) -> "BuildOutput":  # noqa: F821 - see opentrans.deploy.targets.BuildOutput
    """Ship the fp32 export ``model.onnx`` (already in ``ctx.build_dir``) and check it with ONNX Runtime."""
    from opentrans.deploy.targets import BuildOutput

    return BuildOutput(file=MODEL_FILE, model_files=[MODEL_FILE], runner=OnnxRuntimeRunner(ctx.onnx_path),
                       checked_precision="fp32", info={"opset": ctx.opset, "execution_provider": "CPUExecutionProvider"})
