"""NVIDIA target: build a TensorRT engine here, with the ``tensorrt`` Python API, for the GPU of this machine.

UNTESTED: this project's machines have no TensorRT and no GPU, so this module has only been exercised on its
"TensorRT is not installed" path. It follows the TensorRT 10 Python API (``build_serialized_network``,
``execute_async_v3``, named I/O tensors); TensorRT 8.x needs the explicit-batch flag, which is set for it.
For a Jetson, use ``--target jetson`` (a bundle to build on the device: engines do not move between GPUs or
TensorRT versions).

The engine keeps the ONNX graph's fp32 inputs and outputs; ``fp16`` sets the builder's FP16 flag (TensorRT
< 11). TensorRT 11 removed it (precision must come from the ONNX), which raises instead of building fp32.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from opentrans.errors import OpenTransError

MODEL_FILE = "model.engine"
ONNX_FILE = "model.onnx"
DEFAULT_MAX_BATCH = 4
DEFAULT_MAX_CLASSES = 64


def _import_tensorrt():
    try:
        import tensorrt
    except (ImportError, OSError) as exc:  # OSError: the wheel is there but libnvinfer/CUDA is not
        raise OpenTransError(
            f"TensorRT is not installed here: import tensorrt failed ({exc.__class__.__name__}); "
            "use --target jetson to get a bundle to build on the device, or install TensorRT on a machine with an NVIDIA GPU"
        ) from None
    return tensorrt


def check_available() -> None:
    """Raises OpenTransError (before anything is written) when ``import tensorrt`` fails or no CUDA GPU is visible."""
    _import_tensorrt()
    import torch

    if not torch.cuda.is_available():
        raise OpenTransError("TensorRT is installed but no CUDA GPU is visible; use --target jetson for a device bundle")


def _major(trt) -> int:
    return int(trt.__version__.split(".")[0])


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, precision: str,
                 image_size: tuple[int, int], embed_dim: int, classes: int, max_batch: int, max_classes: int) -> Path:
    """Parse ``onnx_path`` and write a serialized engine for batch 1..``max_batch``, classes 1..``max_classes``.

    Raises:
        OpenTransError: TensorRT missing, a parser error, fp16 asked of TensorRT >= 11, or a failed build.
    """
    from opentrans.artifacts import atomic_path

    trt = _import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0 if _major(trt) >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise OpenTransError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    h, w = image_size
    profile = builder.create_optimization_profile()
    profile.set_shape("images", (1, 3, h, w), (1, 3, h, w), (max_batch, 3, h, w))
    profile.set_shape("text_embeds", (1, embed_dim), (classes, embed_dim), (max_classes, embed_dim))
    config.add_optimization_profile(profile)
    if precision == "fp16":
        if not hasattr(trt.BuilderFlag, "FP16"):
            raise OpenTransError(f"TensorRT {trt.__version__} has no FP16 builder flag (precision must come from the "
                                 "ONNX); build fp32, or use --target jetson and an fp16 ONNX")
        config.set_flag(trt.BuilderFlag.FP16)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise OpenTransError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
    with atomic_path(engine_path) as tmp:
        Path(tmp).write_bytes(bytes(serialized))
    return Path(engine_path)


class TensorRTRunner:
    """Runs a serialized TensorRT engine of the image graph on the current CUDA device.

    ``runner(images float32 (B,3,H,W), text_embeds float32 (C,D)) -> logits float32 (B,C,H,W)`` (host numpy in and
    out; device buffers are torch CUDA tensors). UNTESTED here (no GPU, no TensorRT).

    Raises:
        OpenTransError: TensorRT missing, a missing file, or an engine TensorRT cannot deserialize (another GPU or
            TensorRT version).
    """

    def __init__(self, path: str | os.PathLike, name: str = "tensorrt-fp32"):
        trt = _import_tensorrt()
        self.path = Path(path)
        if not self.path.exists():
            raise OpenTransError(f"{self.path}: file not found")
        self.name = name
        self._logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self._logger).deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise OpenTransError(f"{self.path}: TensorRT cannot load this engine (built for another GPU or TensorRT version?)")
        self.context = self.engine.create_execution_context()

    def __call__(self, images: np.ndarray, text_embeds: np.ndarray) -> np.ndarray:
        import torch

        inputs = {"images": torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).cuda(),
                  "text_embeds": torch.from_numpy(np.ascontiguousarray(text_embeds, dtype=np.float32)).cuda()}
        for name, tensor in inputs.items():
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        out = torch.empty(tuple(self.context.get_tensor_shape("logits")), dtype=torch.float32, device="cuda")
        self.context.set_tensor_address("logits", out.data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise OpenTransError(f"{self.path}: TensorRT execution failed")
        stream.synchronize()
        return out.cpu().numpy()


def build(ctx) -> "BuildOutput":  # noqa: F821 - see opentrans.deploy.targets.BuildOutput
    """Build ``model.engine`` from the fp32 ``model.onnx`` in ``ctx.build_dir`` (the ONNX is kept beside it)."""
    from opentrans.deploy.targets import BuildOutput

    classes, dim = ctx.text_embeds.shape
    max_batch = int(ctx.options.setdefault("max_batch", DEFAULT_MAX_BATCH))
    max_classes = int(ctx.options.setdefault("max_classes", max(DEFAULT_MAX_CLASSES, classes)))
    start = time.perf_counter()
    build_engine(ctx.onnx_path, ctx.build_dir / MODEL_FILE, ctx.precision, ctx.spec.image_size, dim, classes,
                 max_batch, max_classes)
    trt = _import_tensorrt()
    return BuildOutput(file=MODEL_FILE, model_files=[MODEL_FILE], runner=TensorRTRunner(ctx.build_dir / MODEL_FILE,
                       name=f"tensorrt-{ctx.precision}"), checked_precision=ctx.precision,
                       info={"tensorrt": trt.__version__, "max_batch": max_batch, "max_classes": max_classes,
                             "onnx": ONNX_FILE},
                       timings={"engine_build_s": time.perf_counter() - start})
