"""NNCF INT8 on OpenVINO models: FakeQuantize PTQ and accuracy control (see :mod:`opentrans.deploy.quantize`)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from opentrans.deploy.quantize.common import (
    _LOW_PRECISION,
    DEFAULT_SMOOTH_QUANT_ALPHA,
    LAYER_TYPES,
    _advanced,
    _calibration_dataset,
    _quiet_nncf,
    check_ignore_patterns,
    check_smooth_quant_alpha,
    match_ignored,
)
from opentrans.errors import OpenTransError


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
