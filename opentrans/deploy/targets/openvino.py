"""OpenVINO target: IR (``model.xml`` + ``model.bin``) converted from the ONNX export, fp32 or NNCF INT8.

Weights are saved as they are (``compress_to_fp16=False``): an fp32 build holds fp32 weights, an INT8 build
holds FakeQuantize operations that the CPU plugin runs as INT8 kernels.

On CPUs with avx512_bf16/AMX, OpenVINO runs fp32 models in bf16 unless told otherwise (max |diff| 3e-2 instead
of 3e-6 on this project's machine); parity checks compile with ``INFERENCE_PRECISION_HINT=f32``, and every
:class:`OpenVINORunner` records the hint it actually compiled with.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from opentrans.deploy.targets.onnx import _check_inputs
from opentrans.errors import OpenTransError

MODEL_FILE = "model.xml"
WEIGHTS_FILE = "model.bin"
INFERENCE_PRECISIONS = ("f32", "bf16", "f16")
_CORE = None


def _core():
    global _CORE
    if _CORE is None:
        import openvino as ov

        _CORE = ov.Core()
    return _CORE


def check_available() -> None:
    """Raises OpenTransError when the ``openvino`` and ``nncf`` packages are not installed."""
    import importlib.util

    missing = [m for m in ("openvino", "nncf") if importlib.util.find_spec(m) is None]
    if missing:
        raise OpenTransError(f"{' and '.join(missing)} not installed: pip install 'opentrans[openvino]'")


class OpenVINORunner:
    """Runs an OpenVINO IR of the image graph on the CPU plugin.

    ``runner(images float32 (B,3,H,W), text_embeds float32 (C,D)) -> logits float32 (B,C,H,W)``.

    Args:
        xml_path: ``model.xml`` (its ``.bin`` beside it).
        name: reported back end name, e.g. ``openvino-int8``.
        inference_precision: ``f32`` (parity checks: exact fp32 arithmetic outside INT8 layers), ``bf16``,
            ``f16``, or ``None`` for the device default (bf16 on CPUs with avx512_bf16 or AMX).

    Attributes:
        inference_precision: the INFERENCE_PRECISION_HINT the model was compiled with, as OpenVINO reports it
            (``f32``, ``bf16``, ...), whatever was asked.

    Raises:
        OpenTransError: a missing file or an unknown ``inference_precision``.
    """

    def __init__(self, xml_path: str | os.PathLike, name: str = "openvino-fp32", inference_precision: str | None = "f32"):
        self.path = Path(xml_path)
        if not self.path.exists():
            raise OpenTransError(f"{self.path}: file not found")
        if inference_precision is not None and inference_precision not in INFERENCE_PRECISIONS:
            raise OpenTransError(f"OpenVINO inference precision {inference_precision}: choose "
                                 f"{', '.join(INFERENCE_PRECISIONS)} or the device default")
        self.name = name
        config = {} if inference_precision is None else {"INFERENCE_PRECISION_HINT": inference_precision}
        core = _core()
        model = core.read_model(str(self.path))
        shapes = {p.output(0).get_any_name(): p.get_partial_shape() for p in model.get_parameters()}
        self.image_shape = tuple(d.get_length() for d in shapes["images"][1:])
        self.embed_dim = shapes["text_embeds"][1].get_length()
        self.compiled = core.compile_model(model, "CPU", config)
        self.inference_precision = self.compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
        self._request = self.compiled.create_infer_request()

    def __call__(self, images: np.ndarray, text_embeds: np.ndarray) -> np.ndarray:
        """Logits float32 (B,C,H,W) (a copy; the next call does not overwrite it).

        Raises:
            OpenTransError: images not (B,3,H,W) at the IR's size, or text_embeds not (C,D).
        """
        _check_inputs(self.path, images, text_embeds, self.image_shape, self.embed_dim)
        self._request.infer({"images": np.ascontiguousarray(images, dtype=np.float32),
                             "text_embeds": np.ascontiguousarray(text_embeds, dtype=np.float32)})
        return np.array(self._request.get_output_tensor(0).data, dtype=np.float32, copy=True)


def build(ctx) -> "BuildOutput":  # noqa: F821 - see opentrans.deploy.targets.BuildOutput
    """Convert ``ctx.onnx_path`` to an IR in ``ctx.build_dir``; quantise it to INT8 when ``ctx.precision`` is int8.

    The fp32 ONNX export is an intermediate here and is removed once converted. INT8 calibration uses
    ``ctx.calibration()`` (training-split images) and ``ctx.options["smooth_quant_alpha"]``.
    """
    import openvino as ov

    from opentrans.artifacts import atomic_path
    from opentrans.deploy.quantize import DEFAULT_SMOOTH_QUANT_ALPHA, quantize_openvino_int8
    from opentrans.deploy.targets import BuildOutput

    timings, info = {}, {"converted_from": f"ONNX opset {ctx.opset}", "compress_to_fp16": False}
    start = time.perf_counter()
    model = ov.convert_model(str(ctx.onnx_path))
    timings["convert_s"] = time.perf_counter() - start
    if ctx.precision == "int8":
        alpha = ctx.options.get("smooth_quant_alpha", DEFAULT_SMOOTH_QUANT_ALPHA)
        images = ctx.calibration()
        start = time.perf_counter()
        model = quantize_openvino_int8(model, images, ctx.text_embeds, model_type_transformer=ctx.segmentor.is_vit,
                                       subset_size=len(images), smooth_quant_alpha=alpha)
        timings["quantize_s"] = time.perf_counter() - start
        info.update(quantizer="nncf.quantize (PTQ)", calibration_images=len(images), calibration_split="train",
                    model_type="transformer" if ctx.segmentor.is_vit else "cnn",
                    smooth_quant_alpha=alpha if ctx.segmentor.is_vit else None,
                    fp32_ops="text_embeds path (similarity MatMul, upsampling)",
                    fake_quantize_ops=sum(op.get_type_name() == "FakeQuantize" for op in model.get_ops()))
    xml = ctx.build_dir / MODEL_FILE
    with atomic_path(xml) as tmp:
        ov.save_model(model, str(tmp), compress_to_fp16=False)
        os.replace(tmp.with_suffix(".bin"), ctx.build_dir / WEIGHTS_FILE)  # the .bin is named after the .xml
    ctx.onnx_path.unlink()
    runner = OpenVINORunner(xml, name=f"openvino-{ctx.precision}", inference_precision="f32")
    info["parity_inference_precision"] = runner.inference_precision
    return BuildOutput(file=MODEL_FILE, model_files=[MODEL_FILE, WEIGHTS_FILE], runner=runner,
                       checked_precision=ctx.precision, info=info, timings=timings)
