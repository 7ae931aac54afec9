"""OpenVINO target: IR (``model.xml`` + ``model.bin``) converted from the ONNX export, fp32, fp16 or NNCF INT8.

* fp32: weights saved as they are (``compress_to_fp16=False``).
* fp16: weights stored as FP16 in the IR (``ov.save_model(compress_to_fp16=True)``: half the ``.bin``; OpenVINO
  decompresses them when compiling). The inference precision is a runtime choice, not a property of the IR:
  CPUs run it in f32 or bf16 (their default where avx512_bf16/AMX exist), GPUs/NPUs in f16. The parity check
  compiles with the f32 hint like the other builds, so it measures the FP16 weight rounding, the part that
  ships; ``load_runner(..., openvino_precision="f16"/None)`` runs it at the device's own precision.
* int8: FakeQuantize operations that the CPU plugin runs as INT8 kernels (NNCF PTQ, optionally with accuracy
  control: ``max_drop``), see :mod:`opentrans.deploy.quantize`.

On CPUs with avx512_bf16/AMX, OpenVINO runs fp32 models in bf16 unless told otherwise (max |diff| 3e-2 instead
of 3e-6 on this project's machine); parity checks compile with ``INFERENCE_PRECISION_HINT=f32``, and every
:class:`OpenVINORunner` records the hint it actually compiled with.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from opentrans.deploy.graph import IMAGES, TEXT_EMBEDS, feeds
from opentrans.deploy.targets.base import TARGETS, BuildContext, BuildOutput, GraphRunner, Target
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


class OpenVINORunner(GraphRunner):
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
        try:
            model = core.read_model(str(self.path))
        except RuntimeError as exc:
            text = str(exc).strip().splitlines()
            raise OpenTransError(f"{self.path}: OpenVINO cannot read it ({text[0][:200] if text else 'RuntimeError'})") from None
        shapes = {p.output(0).get_any_name(): p.get_partial_shape() for p in model.get_parameters()}
        if IMAGES not in shapes or TEXT_EMBEDS not in shapes:
            raise OpenTransError(f"{self.path}: not an opentrans image graph (inputs {', '.join(shapes)})")
        self.image_shape = tuple(d.get_length() if d.is_static else "?" for d in shapes[IMAGES][1:])  # "?": dynamic
        self.embed_dim = shapes[TEXT_EMBEDS][1].get_length()
        self.compiled = core.compile_model(model, "CPU", config)
        self.inference_precision = self.compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
        self._request = self.compiled.create_infer_request()

    def __call__(self, images: np.ndarray, text_embeds: np.ndarray) -> np.ndarray:
        """Logits float32 (B,C,H,W) (a copy; the next call does not overwrite it).

        Raises:
            OpenTransError: images not (B,3,H,W) at the IR's size, or text_embeds not (C,D).
        """
        _check_inputs(self.path, images, text_embeds, self.image_shape, self.embed_dim)
        self._request.infer(feeds(images, text_embeds))
        return np.array(self._request.get_output_tensor(0).data, dtype=np.float32, copy=True)


def build(ctx: BuildContext) -> BuildOutput:
    """Convert ``ctx.onnx_path`` to an IR in ``ctx.build_dir``: fp32, fp16 (FP16 weights) or INT8.

    The fp32 ONNX export is an intermediate here and is removed once converted. INT8 calibration uses
    ``ctx.calibration()`` and ``ctx.options``: ``smooth_quant_alpha``, ``ignore_ops`` (regex patterns kept in
    floating point), ``max_drop`` and ``drop_metric`` (accuracy control on ``ctx.validation()``); with accuracy
    control ``info["quant_report"]`` lists the operations NNCF kept in floating point.
    """
    import openvino as ov

    from opentrans.artifacts import atomic_path
    from opentrans.deploy import quantize as q

    compress = ctx.precision == "fp16"
    timings, info = {}, {"converted_from": f"ONNX opset {ctx.opset}", "compress_to_fp16": compress}
    start = time.perf_counter()
    model = ov.convert_model(str(ctx.onnx_path))
    timings["convert_s"] = time.perf_counter() - start
    if ctx.precision == "int8":
        alpha = ctx.options.get("smooth_quant_alpha", q.DEFAULT_SMOOTH_QUANT_ALPHA)
        ignore = list(ctx.options.get("ignore_ops") or ())
        max_drop = ctx.options.get("max_drop")
        images = ctx.calibration()
        vit = ctx.segmentor.is_vit
        overflow_fix = ctx.options.get("overflow_fix", "enable")
        start = time.perf_counter()
        if max_drop is None:
            model = q.quantize_openvino_int8(model, images, ctx.text_embeds, model_type_transformer=vit,
                                             subset_size=len(images), smooth_quant_alpha=alpha, ignore_patterns=ignore,
                                             overflow_fix=overflow_fix)
            quant_report = None
        else:
            metric = ctx.options.get("drop_metric", "agreement")
            items = _validation_items(ctx, metric)
            model, quant_report = q.quantize_openvino_accuracy_control(
                model, images, ctx.text_embeds, items, q.drop_metric(metric, len(ctx.class_names),
                                                                     ctx.options.get("ignore_index", 255)),
                max_drop=float(max_drop), model_type_transformer=vit, subset_size=len(images),
                smooth_quant_alpha=alpha, ignore_patterns=ignore, overflow_fix=overflow_fix)
            quant_report.update(drop_metric=metric, validation_images=len(items),
                                method="nncf.quantize_with_accuracy_control")
        timings["quantize_s"] = time.perf_counter() - start
        info.update(quantizer="nncf.quantize (PTQ)" if max_drop is None else "nncf.quantize_with_accuracy_control",
                    calibration_images=len(images), calibration_data=ctx.options.get("calib_data") or "train split",
                    calibration_split=None if ctx.options.get("calib_data") else "train",
                    model_type="transformer" if vit else "cnn",
                    smooth_quant_alpha=(alpha if max_drop is None else -1.0) if vit else None,
                    ignore_ops=ignore, fp32_ops="text_embeds path (similarity MatMul, upsampling)",
                    overflow_fix=overflow_fix,
                    fake_quantize_ops=sum(op.get_type_name() == "FakeQuantize" for op in model.get_ops()),
                    quantized_layers=sorted(n for n, t in q.quantized_ops(model).items() if t in q.LAYER_TYPES))
        if quant_report is not None:
            info["quant_report"] = quant_report
    xml = ctx.build_dir / MODEL_FILE
    with atomic_path(xml) as tmp:
        ov.save_model(model, str(tmp), compress_to_fp16=compress)
        os.replace(tmp.with_suffix(".bin"), ctx.build_dir / WEIGHTS_FILE)  # the .bin is named after the .xml
    ctx.onnx_path.unlink()
    runner = OpenVINORunner(xml, name=f"openvino-{ctx.precision}", inference_precision="f32")
    info["parity_inference_precision"] = runner.inference_precision
    return BuildOutput(file=MODEL_FILE, model_files=[MODEL_FILE, WEIGHTS_FILE], runner=runner,
                       checked_precision=ctx.precision, info=info, timings=timings)


def _validation_items(ctx, metric: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Accuracy-control items from ``ctx.validation()``: ``(image (1,3,H,W), fp32 PyTorch argmax (H,W))`` for
    ``agreement``, ``(image, dataset mask (h0,w0))`` for ``miou``.

    Raises:
        OpenTransError: no validation images in the build context.
    """
    import torch

    pairs = ctx.validation() if ctx.validation is not None else []
    if not pairs:
        raise OpenTransError("--max-drop: accuracy control needs validation images (none in the build context)")
    if metric == "miou":
        return [(np.ascontiguousarray(img, dtype=np.float32), np.asarray(mask)) for img, mask in pairs]
    items = []
    with torch.inference_mode():
        for img, _ in pairs:
            img = np.ascontiguousarray(img, dtype=np.float32)
            ref = ctx.segmentor(torch.from_numpy(img), torch.from_numpy(ctx.text_embeds)).numpy()
            items.append((img, ref[0].argmax(0)))
    return items


def open_runner(model_file: Path, build: dict, openvino_precision: str | None = "f32") -> OpenVINORunner:
    """An OpenVINO runner on a finished openvino build's IR, compiled at ``openvino_precision`` (a bf16 build of
    ``--precision auto`` always at its recorded ``inference_precision``: the fp32 IR run at the bf16 hint it was
    checked with)."""
    hint = build.get("inference_precision") or openvino_precision
    return OpenVINORunner(model_file, name=f"openvino-{build['precision']}", inference_precision=hint)


TARGETS.add("openvino", Target(name="openvino", backend="openvino", precisions=("fp32", "fp16", "int8"), cpu=True,
                               build=build, check_available=check_available, open_runner=open_runner))
