"""ONNX Runtime target: the ONNX export for ONNX Runtime, fp32, fp16 or INT8 Q/DQ, checked on the CPU provider.

* fp32: the export as is.
* fp16: weights and arithmetic in float16, inputs/outputs float32 (:func:`opentrans.deploy.quantize.convert_onnx_fp16`).
  ONNX Runtime's CPU provider lacks fp16 kernels for some ops and runs them through casts, so fp16 is for GPU
  providers (CUDA, TensorRT, DirectML) and for size; the parity check on the CPU still measures its accuracy.
* int8: explicit QuantizeLinear/DequantizeLinear nodes from NNCF
  (:func:`opentrans.deploy.quantize.quantize_onnx_qdq`), the text-embedding path kept float32; the same file
  TensorRT builds an INT8 engine from.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from opentrans.deploy.graph import IMAGES, LOGITS, TEXT_EMBEDS, feeds
from opentrans.deploy.targets.base import TARGETS, BuildContext, BuildOutput, GraphRunner, Target
from opentrans.errors import OpenTransError

MODEL_FILE = "model.onnx"


def check_available() -> None:
    """ONNX Runtime is a required dependency: always available."""


def open_session(path: Path, opts=None):
    """An ONNX Runtime CPU session on ``path``.

    Raises:
        OpenTransError: a file ONNX Runtime cannot load (truncated, not ONNX, an invalid graph).
    """
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except (ort_state.InvalidProtobuf, ort_state.InvalidGraph, ort_state.Fail, ort_state.NoSuchFile,
            ort_state.InvalidArgument, ort_state.NotImplemented) as exc:
        text = str(exc).strip().splitlines()
        raise OpenTransError(f"{path}: ONNX Runtime cannot load it ({exc.__class__.__name__}"
                             f"{': ' + text[0][:200] if text else ''})") from None


class OnnxRuntimeRunner(GraphRunner):
    """Runs an exported image graph with ONNX Runtime (CPUExecutionProvider).

    ``runner(images float32 (B,3,H,W), text_embeds float32 (C,D)) -> logits float32 (B,C,H,W)``; B and C may
    differ from the export's, (H, W) and D may not.

    Args:
        path: the ``.onnx`` file.
        name: reported back end name, e.g. ``onnxruntime-fp32``.
        threads: intra-op threads (``None``: ONNX Runtime's default, one per physical core).
        reference_qdq: run with graph optimisations off, so a Q/DQ graph is executed as written (each
            DequantizeLinear, then float arithmetic: the INT8 semantics a TensorRT engine implements with int32
            accumulation) instead of ONNX Runtime's fused int8 CPU kernels, which on CPUs without VNNI add
            u8 x s8 products in int16 and can saturate. For checking GPU-bound (jetson, nvidia) Q/DQ graphs here.

    Raises:
        OpenTransError: the file does not exist, cannot be loaded, or is not an image graph.
    """

    def __init__(self, path: str | os.PathLike, name: str = "onnxruntime-fp32", threads: int | None = None,
                 reference_qdq: bool = False):
        self.path = Path(path)
        if not self.path.exists():
            raise OpenTransError(f"{self.path}: file not found")
        self.name = name
        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # fp16 graphs warn about every op without an fp16 CPU kernel
        if threads:
            opts.intra_op_num_threads = int(threads)
        if reference_qdq:
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self.session = open_session(self.path, opts)
        shapes = {i.name: i.shape for i in self.session.get_inputs()}
        if IMAGES not in shapes or TEXT_EMBEDS not in shapes:
            raise OpenTransError(f"{self.path}: not an opentrans image graph (inputs {', '.join(shapes)})")
        self.image_shape = tuple(shapes[IMAGES][1:])  # (3, H, W)
        self.embed_dim = shapes[TEXT_EMBEDS][1]

    def __call__(self, images: np.ndarray, text_embeds: np.ndarray) -> np.ndarray:
        """Logits float32 (B,C,H,W).

        Raises:
            OpenTransError: images not (B,3,H,W) at the exported size, or text_embeds not (C,D).
        """
        _check_inputs(self.path, images, text_embeds, self.image_shape, self.embed_dim)
        return self.session.run([LOGITS], feeds(images, text_embeds))[0]


def _check_inputs(path: Path, images: np.ndarray, text_embeds: np.ndarray, image_shape: tuple, embed_dim: int) -> None:
    # symbolic dims (dynamic height/width exports: "height", "width" or None) accept any size
    if images.ndim != 4 or any(isinstance(d, int) and d != n for d, n in zip(image_shape, images.shape[1:])):
        raise OpenTransError(f"{path}: expects images (B,{','.join(map(str, image_shape))}), got {tuple(images.shape)}")
    if text_embeds.ndim != 2 or text_embeds.shape[1] != embed_dim:
        raise OpenTransError(f"{path}: expects text_embeds (C,{embed_dim}), got {tuple(text_embeds.shape)}")


def build(ctx: BuildContext) -> BuildOutput:
    """``model.onnx`` in ``ctx.build_dir`` at ``ctx.precision``, checked with ONNX Runtime on the CPU.

    fp32 ships the export; fp16 and int8 replace it in place (int8 calibrates on ``ctx.calibration()`` with
    ``ctx.options`` ``smooth_quant_alpha`` and ``ignore_ops``).
    """
    import time

    from opentrans.deploy import quantize as q

    info: dict = {"opset": ctx.opset, "execution_provider": "CPUExecutionProvider"}
    timings: dict = {}
    path = ctx.onnx_path
    start = time.perf_counter()
    if ctx.precision == "fp16":
        q.convert_onnx_fp16(path, path)
        timings["convert_s"] = time.perf_counter() - start
        info.update(converter="onnxruntime.transformers.float16 (keep_io_types)", io_types="float32")
    elif ctx.precision == "int8":
        import onnx

        alpha = ctx.options.get("smooth_quant_alpha", q.DEFAULT_SMOOTH_QUANT_ALPHA)
        ignore = list(ctx.options.get("ignore_ops") or ())
        images = ctx.calibration()
        overflow_fix = ctx.options.get("overflow_fix", "enable")
        q.quantize_onnx_qdq(path, images, ctx.text_embeds, path, model_type_transformer=ctx.segmentor.is_vit,
                            subset_size=len(images), smooth_quant_alpha=alpha, ignore_patterns=ignore,
                            overflow_fix=overflow_fix)
        timings["quantize_s"] = time.perf_counter() - start
        layers = q.qdq_layers(onnx.load(str(path)))
        info.update(quantizer="nncf.quantize (ONNX Q/DQ)", calibration_images=len(images),
                    calibration_data=ctx.options.get("calib_data") or "train split",
                    calibration_split=None if ctx.options.get("calib_data") else "train",
                    smooth_quant_alpha=alpha if ctx.segmentor.is_vit else None, ignore_ops=ignore,
                    overflow_fix=overflow_fix,
                    fp32_ops="text_embeds path (similarity MatMul, upsampling)",
                    quantized_layers=sorted(n for n, v in layers.items() if v["activation"] or v["weight"]))
    return BuildOutput(file=MODEL_FILE, model_files=[MODEL_FILE],
                       runner=OnnxRuntimeRunner(path, name=f"onnxruntime-{ctx.precision}"),
                       checked_precision=ctx.precision, info=info, timings=timings)


def open_runner(model_file: Path, build: dict, openvino_precision: str | None = None) -> "OnnxRuntimeRunner":
    """An ONNX Runtime runner on a finished onnx build's ``model_file`` (``openvino_precision`` is not used)."""
    return OnnxRuntimeRunner(model_file, name=f"onnxruntime-{build['precision']}")


TARGETS.add("onnx", Target(name="onnx", backend="onnxruntime", precisions=("fp32", "fp16", "int8"), cpu=True,
                           build=build, check_available=check_available, open_runner=open_runner))
