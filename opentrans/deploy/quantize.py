"""Quantisation of the image graph: NNCF INT8 (OpenVINO FakeQuantize or ONNX Q/DQ), accuracy control, fp16.

Activations are calibrated on real images (by default the training split of the deploy dataset, or any
``--calib-data``, see :mod:`opentrans.deploy.calibration`). Choices that matter:

* **SmoothQuant alpha** (ViTs only: NNCF applies SmoothQuant with ``model_type=TRANSFORMER``). NNCF's default
  for MatMuls is 0.95; for CLIP image towers a smaller migration strength is reported to keep accuracy
  better (0.95 hurt, 0.6 better, see ``docs/pitfalls.md``), so the default here is
  :data:`DEFAULT_SMOOTH_QUANT_ALPHA` = 0.6. ``-1`` turns SmoothQuant off.
* **The class-similarity path stays fp32.** ``text_embeds`` is a graph input that changes with the class
  list on the device; quantising the similarity MatMul would freeze activation ranges measured for the
  calibration classes. Every operation reachable from ``text_embeds`` (its L2 normalisation, the similarity
  MatMul, logit scale, reshape and upsampling) is put in NNCF's ignored scope, so only the image encoder is
  INT8. The cost is one (B*h*w, D) x (D, C) fp32 MatMul. The same holds for the ONNX Q/DQ graph
  (:func:`quantize_onnx_qdq`) shipped to TensorRT.
* **Ignored scopes** (``--ignore-ops``): regular expressions (``re.search`` on operation names such as
  ``/resblocks.0/mlp/c_fc/MatMul``; the ONNX node name and the OpenVINO friendly name coincide) of further
  operations to keep in floating point, e.g. the layers at the top of a sensitivity report
  (:mod:`opentrans.deploy.sensitivity`).
* **Accuracy control** (:func:`quantize_openvino_accuracy_control`): NNCF quantises everything, measures the
  drop of a metric (mIoU on labels, or argmax agreement with the fp32 PyTorch model) on validation images with
  the compiled INT8 artifact, and reverts the most harmful layers to floating point until the drop is within
  ``max_drop``. Which layers were reverted is found by comparing the fully quantised model with the returned one
  (:func:`quantized_ops`), not by parsing NNCF's log.

fp16 (:func:`convert_onnx_fp16`): ONNX Runtime's ``float16`` converter, inputs and outputs kept float32.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from opentrans.errors import OpenTransError

DEFAULT_SMOOTH_QUANT_ALPHA = 0.6
#: Metrics ``--drop-metric`` accepts for accuracy-controlled quantisation (both in percent).
DROP_METRICS = ("agreement", "miou")
#: Operation types whose inputs a quantised layer has (OpenVINO and ONNX names).
LAYER_TYPES = ("MatMul", "Convolution", "Conv", "Gemm", "ScaledDotProductAttention")
_LOW_PRECISION = ("i8", "u8", "i4", "u4")
#: NNCF ``OverflowFix`` policies (values of ``nncf.OverflowFix``): ``enable`` keeps every layer's INT8 weights
#: within 7 bits, so that CPUs without VNNI, whose int8 kernels add u8 x s8 products in pairs in int16, cannot
#: saturate; ``first_layer_only`` (NNCF's default) only the first convolution's. Chosen per build by
#: :func:`opentrans.hardware.int8_overflow_fix` from ``--cpu-isa``.
OVERFLOW_FIXES = ("enable", "first_layer_only", "disable")


def check_smooth_quant_alpha(alpha: float) -> float:
    """``alpha`` if it is a valid SmoothQuant alpha: in (0, 1], or -1 (off).

    Raises:
        OpenTransError: any other value.
    """
    if alpha != -1 and not 0 < alpha <= 1:
        raise OpenTransError(f"--smooth-quant-alpha {alpha}: choose a value in (0, 1], or -1 to disable")
    return float(alpha)


def check_ignore_patterns(patterns: Sequence[str] | None) -> list[str]:
    """The ``--ignore-ops`` patterns as a list, each checked to be a valid regular expression.

    Raises:
        OpenTransError: a pattern that does not compile.
    """
    out = []
    for p in patterns or ():
        try:
            re.compile(p)
        except re.error as exc:
            raise OpenTransError(f"--ignore-ops {p!r}: not a regular expression ({exc})") from None
        out.append(str(p))
    return out


def match_ignored(names: Iterable[str], patterns: Sequence[str]) -> list[str]:
    """The ``names`` that any of ``patterns`` matches (``re.search``), in order.

    Raises:
        OpenTransError: a pattern that matches none of ``names`` (a typo would otherwise silently quantise
            everything).
    """
    names = list(names)
    hits: list[str] = []
    for p in patterns:
        matched = [n for n in names if re.search(p, n)]
        if not matched:
            raise OpenTransError(f"--ignore-ops {p!r}: matches no operation of the image graph "
                                 f"(names look like {names[len(names) // 2] if names else '?'})")
        hits.extend(m for m in matched if m not in hits)
    return hits


@contextmanager
def _quiet_nncf():
    """NNCF logs one INFO line per ignored node; keep warnings."""
    import nncf

    level = nncf.nncf_logger.level
    nncf.nncf_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        nncf.nncf_logger.setLevel(level)


def check_overflow_fix(overflow_fix: str) -> str:
    """``overflow_fix`` if it is one of :data:`OVERFLOW_FIXES`.

    Raises:
        OpenTransError: any other value.
    """
    if overflow_fix not in OVERFLOW_FIXES:
        raise OpenTransError(f"overflow fix {overflow_fix!r}: choose one of {', '.join(OVERFLOW_FIXES)}")
    return overflow_fix


def _advanced(smooth_quant_alpha: float, overflow_fix: str):
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        AdvancedSmoothQuantParameters,
        OverflowFix,
    )

    return AdvancedQuantizationParameters(
        smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=float(smooth_quant_alpha)),
        overflow_fix=OverflowFix(check_overflow_fix(overflow_fix)))


def _calibration_dataset(calib_images: Iterable[np.ndarray], text_embeds: np.ndarray, subset_size: int | None):
    import nncf

    if subset_size is not None and subset_size < 1:
        raise OpenTransError(f"--calib-size {subset_size}: must be at least 1")
    images = [np.ascontiguousarray(x, dtype=np.float32) for x in calib_images]
    if not images:
        raise OpenTransError("no calibration images")
    text = np.ascontiguousarray(text_embeds, dtype=np.float32)
    size = len(images) if subset_size is None else subset_size
    return nncf.Dataset(images, lambda x: {"images": x, "text_embeds": text}), size


# --- OpenVINO -----------------------------------------------------------------------------------------------


def text_path_ops(ov_model) -> list[str]:
    """Friendly names of every operation of ``ov_model`` that depends on its ``text_embeds`` input.

    Raises:
        OpenTransError: the model has no ``text_embeds`` input.
    """
    starts = [p for p in ov_model.get_parameters() if "text_embeds" in p.output(0).get_names()]
    if not starts:
        raise OpenTransError("the OpenVINO model has no 'text_embeds' input; is it an OpenTrans image graph?")
    seen: dict[str, object] = {}
    stack = [starts[0]]
    while stack:
        node = stack.pop()
        for out in node.outputs():
            for target in out.get_target_inputs():
                consumer = target.get_node()
                name = consumer.get_friendly_name()
                if name not in seen and consumer.get_type_name() != "Result":
                    seen[name] = consumer
                    stack.append(consumer)
    return sorted(seen)


def _ov_ignored_scope(ov_model, ignore_patterns: Sequence[str]):
    import nncf

    text_ops = text_path_ops(ov_model)
    extra = match_ignored([op.get_friendly_name() for op in ov_model.get_ops()], check_ignore_patterns(ignore_patterns))
    return nncf.IgnoredScope(names=sorted(set(text_ops) | set(extra))), extra


def quantize_openvino_int8(ov_model, calib_images: Iterable[np.ndarray], text_embeds: np.ndarray,
                           model_type_transformer: bool, subset_size: int,
                           smooth_quant_alpha: float = DEFAULT_SMOOTH_QUANT_ALPHA,
                           ignore_patterns: Sequence[str] = (), overflow_fix: str = "enable"):
    """INT8 post-training quantisation (NNCF, symmetric/"performance" preset) of an fp32 OpenVINO image graph.

    Args:
        ov_model: ``openvino.Model`` with inputs ``images`` (B,3,H,W) and ``text_embeds`` (C,D).
        calib_images: calibration images, each float32 (1,3,H,W), normalised like the model's input; at least
            ``subset_size`` of them are used if there are that many.
        text_embeds: float32 (C,D) class embeddings fed with every calibration image (the path they feed is
            not quantised, see the module docstring).
        model_type_transformer: True for ViT image towers (enables NNCF's transformer scheme and SmoothQuant).
        subset_size: number of calibration samples NNCF reads.
        smooth_quant_alpha: SmoothQuant migration strength for MatMuls in (0, 1], or -1 to disable; ignored
            when ``model_type_transformer`` is False.
        ignore_patterns: regular expressions of further operation names to keep in floating point.
        overflow_fix: one of :data:`OVERFLOW_FIXES`; the default ``enable`` is safe on every x86 CPU, and
            ``first_layer_only`` keeps full 8-bit weights for CPUs with VNNI/AMX (see :mod:`opentrans.hardware`).

    Returns:
        A new ``openvino.Model`` with FakeQuantize operations on the image encoder.

    Raises:
        OpenTransError: ``subset_size`` < 1, an alpha outside (0, 1] other than -1, no calibration images,
            a model without a ``text_embeds`` input, an ignore pattern that is invalid or matches nothing, or an
            unknown ``overflow_fix``.
    """
    import nncf

    check_smooth_quant_alpha(smooth_quant_alpha)
    dataset, subset_size = _calibration_dataset(calib_images, text_embeds, subset_size)
    scope, _ = _ov_ignored_scope(ov_model, ignore_patterns)
    with _quiet_nncf():
        return nncf.quantize(
            ov_model, dataset,
            model_type=nncf.ModelType.TRANSFORMER if model_type_transformer else None,
            subset_size=int(subset_size), ignored_scope=scope,
            advanced_parameters=_advanced(smooth_quant_alpha, overflow_fix),
        )


def _quantized_input(value, depth: int = 0) -> bool:
    """Whether an OpenVINO input value comes from a FakeQuantize, or is a dequantised low-precision constant
    (``Constant(i8) -> Convert -> [Subtract] -> Multiply [-> Reshape/Transpose]``, NNCF's compressed weights)."""
    node = value.get_node()
    kind = node.get_type_name()
    if kind == "FakeQuantize":
        return depth == 0
    if kind == "Constant":
        return depth > 0 and node.get_element_type().get_type_name() in _LOW_PRECISION
    if depth < 5 and kind in ("Convert", "Subtract", "Multiply", "Reshape", "Transpose"):
        return any(_quantized_input(v, depth + 1) for v in node.input_values())
    return False


def quantized_ops(ov_model) -> dict[str, str]:
    """Operations of an OpenVINO model with at least one quantised input: ``{friendly name: type}``.

    An input is quantised when it comes straight from a FakeQuantize (activations, and weights before
    compression) or is an INT8/UINT8 constant dequantised by Convert/Subtract/Multiply (compressed weights).
    FakeQuantize operations themselves and their dequantisation chains are not listed.
    """
    skip = {"FakeQuantize", "Convert", "Subtract", "Multiply", "Reshape", "Transpose", "Result"}
    out = {}
    for op in ov_model.get_ordered_ops():
        kind = op.get_type_name()
        if kind in skip and not (kind == "Multiply" and any(v.get_node().get_type_name() == "FakeQuantize"
                                                            for v in op.input_values())):
            continue
        if any(_quantized_input(v) for v in op.input_values()):
            out[op.get_friendly_name()] = kind
    return out


def quantize_openvino_accuracy_control(
        ov_model, calib_images: Sequence[np.ndarray], text_embeds: np.ndarray,
        validation_items: Sequence[Any], metric_fn: Callable[[Callable[[np.ndarray], np.ndarray], Sequence[Any]],
                                                             tuple[float, list[float]]],
        max_drop: float, model_type_transformer: bool, subset_size: int,
        smooth_quant_alpha: float = DEFAULT_SMOOTH_QUANT_ALPHA, ignore_patterns: Sequence[str] = (),
        max_iterations: int | None = None, overflow_fix: str = "enable"):
    """INT8 quantisation with NNCF's accuracy control: layers are reverted to floating point, most harmful first,
    until the metric drop on ``validation_items`` is at most ``max_drop`` (absolute, in the metric's units).

    Args:
        ov_model: fp32 ``openvino.Model`` (inputs ``images`` (B,3,H,W), ``text_embeds`` (C,D)).
        calib_images, text_embeds, model_type_transformer, subset_size, ignore_patterns, overflow_fix: as
            :func:`quantize_openvino_int8`.
        smooth_quant_alpha: checked, but SmoothQuant is always OFF here (recorded as ``smooth_quant_alpha: -1``
            in the report): NNCF 3.4's accuracy restorer puts a reverted layer's original (unsmoothed) weights back
            behind SmoothQuant's activation Multiply, which breaks the model (measured on the tiny ViT: argmax
            agreement with fp32 39.7 % after reverting with alpha 0.6, 100 % with SmoothQuant off).
        validation_items: one item per validation image, passed back to ``metric_fn`` (e.g. ``(image
            float32 (1,3,H,W), labels)``).
        metric_fn: ``metric_fn(infer, items) -> (metric, per-item values)``: ``infer(images float32 (1,3,H,W))``
            returns logits float32 (1,C,H,W) of the model being validated (NNCF hands over an already compiled
            model, compiled with f32 inference precision; ``infer`` wraps it); higher is better.
        max_drop: the largest acceptable absolute drop of the metric (e.g. 1.0 = one percentage point).
        max_iterations: at most this many layer groups are reverted (default: no limit).

    Returns:
        ``(model, report)``: the ``openvino.Model`` (FakeQuantize on the layers left INT8) and a dict with
        ``reverted_ops`` (sorted names of the operations that lost their quantised inputs compared with plain
        quantisation: kept in floating point), ``reverted_layers`` (those of them that are MatMul/Convolution
        layers), ``quantized_ops_plain`` / ``quantized_ops_final`` (counts), ``max_drop``.

    Raises:
        OpenTransError: bad alpha, subset size, ignore patterns, no calibration or validation items, or a
            negative ``max_drop``.
    """
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    check_smooth_quant_alpha(smooth_quant_alpha)
    if max_drop < 0:
        raise OpenTransError(f"--max-drop {max_drop}: must be >= 0")
    items = list(validation_items)
    if not items:
        raise OpenTransError("accuracy control needs validation images; none given")
    dataset, subset_size = _calibration_dataset(calib_images, text_embeds, subset_size)
    scope, _ = _ov_ignored_scope(ov_model, ignore_patterns)
    text = np.ascontiguousarray(text_embeds, dtype=np.float32)
    smooth_quant_alpha = -1.0  # see the docstring: reverting smoothed layers breaks the model

    def validation_fn(compiled_model, data: Iterable[Any]):
        def infer(images: np.ndarray) -> np.ndarray:
            return np.asarray(compiled_model({"images": np.ascontiguousarray(images, dtype=np.float32),
                                              "text_embeds": text})[0], dtype=np.float32)

        metric, per_item = metric_fn(infer, list(data))
        return float(metric), [float(v) for v in per_item]

    restorer = {} if max_iterations is None else {"max_num_iterations": int(max_iterations)}
    with tempfile.TemporaryDirectory(prefix="opentrans-aac-") as tmp, _quiet_nncf():
        model = nncf.quantize_with_accuracy_control(
            ov_model, dataset, nncf.Dataset(items), validation_fn, max_drop=float(max_drop),
            drop_type=nncf.DropType.ABSOLUTE,
            model_type=nncf.ModelType.TRANSFORMER if model_type_transformer else None,
            subset_size=int(subset_size), ignored_scope=scope,
            advanced_quantization_parameters=_advanced(smooth_quant_alpha, overflow_fix),
            advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(
                intermediate_model_dir=tmp, **restorer),
        )
        plain = quantized_ops(ov.Core().read_model(os.path.join(tmp, "intermediate_model.xml")))
    final = quantized_ops(model)
    reverted = sorted(set(plain) - set(final))
    return model, {
        "reverted_ops": reverted,
        "reverted_layers": [n for n in reverted if plain[n] in LAYER_TYPES],
        "quantized_ops_plain": len(plain), "quantized_ops_final": len(final), "max_drop": float(max_drop),
        "smooth_quant_alpha": smooth_quant_alpha,
    }


def drop_metric(metric: str, num_classes: int, ignore_index: int = 255):
    """The ``metric_fn`` of :func:`quantize_openvino_accuracy_control` for ``--drop-metric``.

    * ``agreement``: items ``(image float32 (1,3,H,W), reference labels int (H,W))`` where the labels are the fp32
      PyTorch model's argmax at the network's resolution; metric = % of pixels whose argmax matches (100 for the
      fp32 graph itself), per item the image's %.
    * ``miou``: items ``(image, mask int (h0,w0))`` with dataset labels; logits are resized to the mask; metric =
      mIoU (%) over all items' pixels, per item the image's own mIoU (%).

    Raises:
        OpenTransError: an unknown metric.
    """
    import torch

    from opentrans.evaluate import predict_labels
    from opentrans.metrics import ConfusionMatrix

    if metric not in DROP_METRICS:
        raise OpenTransError(f"--drop-metric {metric}: choose {', '.join(DROP_METRICS)}")

    def agreement(infer, items):
        per = [100.0 * float((infer(img)[0].argmax(0) == np.asarray(ref)).mean()) for img, ref in items]
        return float(np.mean(per)), per

    def miou(infer, items):
        total, per = ConfusionMatrix(num_classes, ignore_index), []
        for img, mask in items:
            mask = torch.as_tensor(np.asarray(mask), dtype=torch.int64)
            pred = predict_labels(infer(img), tuple(mask.shape))[0]
            one = ConfusionMatrix(num_classes, ignore_index)
            one.update(pred, mask)
            total.update(pred, mask)
            per.append(100.0 * float(np.nan_to_num(one.miou())))
        return 100.0 * float(np.nan_to_num(total.miou())), per

    return agreement if metric == "agreement" else miou


# --- ONNX ---------------------------------------------------------------------------------------------------


def text_path_nodes(model) -> list[str]:
    """Names of every node of an ONNX image graph (``onnx.ModelProto``) that depends on its ``text_embeds``
    input, sorted.

    Raises:
        OpenTransError: the graph has no ``text_embeds`` input.
    """
    if "text_embeds" not in {i.name for i in model.graph.input}:
        raise OpenTransError("the ONNX model has no 'text_embeds' input; is it an OpenTrans image graph?")
    tainted, names = {"text_embeds"}, set()
    changed = True
    while changed:  # nodes are topologically sorted, but loop until stable to be safe
        changed = False
        for node in model.graph.node:
            if node.name not in names and any(i in tainted for i in node.input):
                names.add(node.name)
                tainted.update(node.output)
                changed = True
    return sorted(names)


def image_layers(model) -> list[str]:
    """Names of the MatMul/Gemm/Conv nodes of an ONNX image graph outside the text path, in graph order.

    Raises:
        OpenTransError: the graph has no ``text_embeds`` input.
    """
    text = set(text_path_nodes(model))
    return [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm", "Conv") and n.name not in text]


def quantize_onnx_qdq(onnx_path: str | os.PathLike, calib_images: Iterable[np.ndarray], text_embeds: np.ndarray,
                      out_path: str | os.PathLike, *, model_type_transformer: bool = True,
                      subset_size: int | None = None, smooth_quant_alpha: float = DEFAULT_SMOOTH_QUANT_ALPHA,
                      ignore_patterns: Sequence[str] = (), overflow_fix: str = "enable") -> Path:
    """INT8 ONNX with explicit QuantizeLinear/DequantizeLinear nodes (NNCF on an ``onnx.ModelProto``), e.g. for
    TensorRT (>= 8.6 builds INT8 engines from Q/DQ graphs without a calibrator) or ONNX Runtime.

    Weights of MatMul/Gemm/Conv are per-channel INT8 initializers followed by DequantizeLinear; activations get
    Q/DQ pairs. The ``text_embeds`` path (see the module docstring) and ``ignore_patterns`` stay float32.
    Inputs and outputs stay float32, names and dynamic axes unchanged.

    Args:
        onnx_path: fp32 ONNX image graph (:func:`opentrans.deploy.export.export_onnx`), opset >= 13.
        calib_images: float32 (1,3,H,W) normalised images.
        text_embeds: float32 (C,D) class embeddings fed during calibration.
        out_path: where to write the Q/DQ model (written atomically, one self-contained file).
        model_type_transformer: ViT image towers (NNCF's transformer scheme with SmoothQuant).
        subset_size: calibration samples NNCF reads (default: all of ``calib_images``).
        smooth_quant_alpha: as :func:`quantize_openvino_int8`.
        ignore_patterns: regular expressions of further node names to keep in float32.
        overflow_fix: as :func:`quantize_openvino_int8` (``first_layer_only`` for TensorRT engines and VNNI CPUs).

    Returns:
        ``out_path``.

    Raises:
        OpenTransError: opset < 13, no ``text_embeds`` input, no calibration images, bad alpha, subset size or
            ignore patterns.
    """
    import onnx

    from opentrans.artifacts import atomic_path

    check_smooth_quant_alpha(smooth_quant_alpha)
    model = onnx.load(str(onnx_path))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        raise OpenTransError(f"{onnx_path}: opset {opset}; Q/DQ INT8 needs opset >= 13 (per-channel weights)")
    quantized = quantize_onnx_model(model, calib_images, text_embeds, model_type_transformer=model_type_transformer,
                                    subset_size=subset_size, smooth_quant_alpha=smooth_quant_alpha,
                                    ignore_patterns=ignore_patterns, overflow_fix=overflow_fix)
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        onnx.save(quantized, str(tmp))
    return out_path


def quantize_onnx_model(model, calib_images: Iterable[np.ndarray], text_embeds: np.ndarray, *,
                        model_type_transformer: bool = True, subset_size: int | None = None,
                        smooth_quant_alpha: float = DEFAULT_SMOOTH_QUANT_ALPHA, ignore_patterns: Sequence[str] = (),
                        compress_weights: bool = True, overflow_fix: str = "enable"):
    """:func:`quantize_onnx_qdq` on an in-memory ``onnx.ModelProto``; returns the Q/DQ ``ModelProto``.

    ``compress_weights=False`` keeps float32 weight initializers followed by a QuantizeLinear/DequantizeLinear
    pair (instead of INT8 initializers), so that a weight's quantisation can be bypassed exactly
    (:mod:`opentrans.deploy.sensitivity`).

    Raises:
        OpenTransError: as :func:`quantize_onnx_qdq`.
    """
    import nncf
    from nncf.onnx.quantization.backend_parameters import BackendParameters

    check_smooth_quant_alpha(smooth_quant_alpha)
    dataset, subset_size = _calibration_dataset(calib_images, text_embeds, subset_size)
    extra = match_ignored([n.name for n in model.graph.node], check_ignore_patterns(ignore_patterns))
    scope = nncf.IgnoredScope(names=sorted(set(text_path_nodes(model)) | set(extra)))
    advanced = _advanced(smooth_quant_alpha, overflow_fix)
    advanced.backend_params[BackendParameters.COMPRESS_WEIGHTS] = bool(compress_weights)
    with _quiet_nncf():
        return nncf.quantize(
            model, dataset, model_type=nncf.ModelType.TRANSFORMER if model_type_transformer else None,
            subset_size=int(subset_size), ignored_scope=scope, advanced_parameters=advanced)


def qdq_layers(model) -> dict[str, dict[str, bool]]:
    """For each MatMul/Gemm/Conv node of an ONNX graph: whether its activation input (``activation``) and its
    weight input (``weight``: an initializer or constant) come from a DequantizeLinear, and whether it has a
    constant weight input at all (``has_weight``)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name for i in model.graph.initializer}

    def from_dq(name: str) -> bool:
        node = producers.get(name)
        return node is not None and node.op_type == "DequantizeLinear"

    def is_const(name: str) -> bool:
        node = producers.get(name)
        if name in inits:
            return True
        if node is None:
            return False
        if node.op_type == "Constant":
            return True
        return node.op_type in ("DequantizeLinear", "Transpose", "Reshape", "Cast") and all(
            is_const(i) for i in node.input[:1])

    out = {}
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm", "Conv"):
            continue
        ins = list(node.input[:2])
        weights = [i for i in ins if is_const(i)]
        acts = [i for i in ins if not is_const(i)]
        out[node.name] = {"activation": bool(acts) and all(from_dq(i) for i in acts),
                          "weight": bool(weights) and all(from_dq(i) for i in weights), "has_weight": bool(weights)}
    return out


def convert_onnx_fp16(onnx_path: str | os.PathLike, out_path: str | os.PathLike,
                      keep_fp32_nodes: Sequence[str] = ()) -> Path:
    """fp16 copy of an fp32 ONNX graph: weights and arithmetic in float16, inputs and outputs still float32
    (Cast nodes at the boundary), with ONNX Runtime's converter (``onnxruntime.transformers.float16``,
    ``keep_io_types=True``; its default block list keeps ops without fp16 kernels, e.g. Resize scales, fp32).

    Args:
        onnx_path: fp32 ONNX file; out_path: where to write the fp16 model (atomically).
        keep_fp32_nodes: node names to leave in float32.

    Returns:
        ``out_path``.
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from opentrans.artifacts import atomic_path

    model = convert_float_to_float16(onnx.load(str(onnx_path)), keep_io_types=True,
                                     node_block_list=list(keep_fp32_nodes) or None)
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        onnx.save(model, str(tmp))
    return out_path
