"""NNCF INT8 on ONNX models (explicit Q/DQ) and the fp16 conversion (see :mod:`opentrans.deploy.quantize`)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from opentrans.deploy.quantize.common import (
    DEFAULT_SMOOTH_QUANT_ALPHA,
    _advanced,
    _calibration_dataset,
    _quiet_nncf,
    check_ignore_patterns,
    check_smooth_quant_alpha,
    match_ignored,
)
from opentrans.errors import OpenTransError


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
