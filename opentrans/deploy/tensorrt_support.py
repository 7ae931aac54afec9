"""Static check that an ONNX graph would parse in TensorRT, without TensorRT (which needs an NVIDIA GPU).

TensorRT cannot run on the machines this project is built on, so the ``jetson`` and ``nvidia`` targets check every
ONNX they write against TensorRT's published ONNX operator support matrix before anything is written: each node's
operator must be supported, its data type (the first input's, or the output's for nodes without inputs) must be
one the matrix lists for that operator, the opset must be in the parser's range, and three restrictions that
OpenTrans graphs can meet are checked (Q/DQ zero points 0, Resize mode ``nearest``/``linear``).

The matrix is kept as data, ``data/tensorrt_onnx_10.json``, with its source: onnx/onnx-tensorrt
``docs/operators.md`` at ``release/10.1-GA`` (commit 96e781103cfc, 2024-06-17; the newest release branch
reachable here). It is used for TensorRT 10.3 (JetPack 6.1/6.2; operators are only added within 10.x, so
a graph that passes the 10.1 matrix parses in 10.3) and for TensorRT 11, whose matrix could not be reached here
(:data:`VERSIONS` says so in every report): a graph that passes may still meet an 11-only change.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

from opentrans.errors import OpenTransError

_DATA = Path(__file__).parent / "data"
#: TensorRT version checked -> (support-matrix file, note written into reports).
VERSIONS: dict[str, tuple[str, str]] = {
    "10.3": ("tensorrt_onnx_10.json", "onnx-tensorrt release/10.1-GA matrix (operators only grow within 10.x)"),
    "11": ("tensorrt_onnx_10.json", "TensorRT 11 matrix not reachable here: checked against the 10.x matrix"),
}
#: ONNX TensorProto element type -> the name the support matrix uses.
_TYPE_NAMES = {1: "FP32", 10: "FP16", 16: "BF16", 6: "INT32", 7: "INT64", 3: "INT8", 2: "UINT8", 9: "BOOL",
               11: "DOUBLE", 22: "INT4", 17: "FP8", 18: "FP8", 19: "FP8", 20: "FP8"}
_SHOWN = 5  # problems named in the one-line error
#: Operators whose first input is a shape: the matrix lists the types of their output.
_OUTPUT_TYPED = ("ConstantOfShape",)


@functools.lru_cache(maxsize=None)
def support_matrix(version: str) -> dict[str, Any]:
    """The support matrix for TensorRT ``version`` (a key of :data:`VERSIONS`).

    Raises:
        OpenTransError: an unknown version.
    """
    if version not in VERSIONS:
        raise OpenTransError(f"TensorRT {version}: no ONNX support matrix; known: {', '.join(VERSIONS)}")
    return json.loads((_DATA / VERSIONS[version][0]).read_text())


def _elem_types(model) -> dict[str, int]:
    """Element type of every named value of ``model``: after ONNX shape inference, or as declared where inference
    fails (an operator of an unknown domain, which is reported as a problem of its own)."""
    import onnx

    try:
        graph = onnx.shape_inference.infer_shapes(model).graph
    except onnx.shape_inference.InferenceError:
        graph = model.graph
    types = {i.name: i.data_type for i in graph.initializer}
    for value in (*graph.input, *graph.value_info, *graph.output):
        if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
            types[value.name] = value.type.tensor_type.elem_type
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    types[node.output[0]] = attr.t.data_type
    return types


def _zero(model, name: str) -> bool:
    """Whether the initializer or Constant ``name`` is all zeros (True when absent: ONNX's default zero point)."""
    from onnx import numpy_helper

    if not name:
        return True
    for init in model.graph.initializer:
        if init.name == name:
            return not numpy_helper.to_array(init).any()
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return not numpy_helper.to_array(node.attribute[0].t).any()
    return False  # computed at run time: TensorRT needs a constant zero


def tensorrt_problems(model, version: str) -> list[str]:
    """Why ``model`` (an ``onnx.ModelProto``) would not parse in TensorRT ``version``: one string per problem,
    ``"NODE (OP): reason"``; empty when the static check finds none.

    Raises:
        OpenTransError: an unknown ``version``.
    """
    matrix = support_matrix(version)
    ops, (low, high) = matrix["operators"], matrix["opset"]
    problems = []
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or not low <= opset <= high:
        problems.append(f"graph: opset {opset} outside TensorRT {version}'s {low}..{high}")
    types = _elem_types(model)
    for node in model.graph.node:
        where = f"{node.name or node.output[0]} ({node.op_type})"
        if node.domain not in ("", "ai.onnx") or node.op_type not in ops:
            domain = f" of domain {node.domain}" if node.domain not in ("", "ai.onnx") else ""
            problems.append(f"{where}: operator{domain} not supported by the TensorRT {version} ONNX parser")
            continue
        by_input = node.input and node.input[0] and node.op_type not in _OUTPUT_TYPED
        value = node.input[0] if by_input else (node.output[0] if node.output else "")
        kind = _TYPE_NAMES.get(types.get(value, 0))
        allowed = set(ops[node.op_type]) | ({"DOUBLE"} if "FP32" in ops[node.op_type] else set())
        if kind is not None and allowed and kind not in allowed:
            problems.append(f"{where}: {kind} input; TensorRT {version} supports {', '.join(ops[node.op_type])}")
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 2 \
                and not _zero(model, node.input[2]):
            problems.append(f"{where}: non-zero zero point (TensorRT takes symmetric quantisation only)")
        if node.op_type == "Resize":
            mode = next((a.s.decode() for a in node.attribute if a.name == "mode"), "nearest")
            if mode not in ("nearest", "linear"):
                problems.append(f"{where}: mode {mode}; TensorRT {version} resizes nearest or linear only")
    return problems


def check_tensorrt_parsable(path: str | os.PathLike, versions: tuple[str, ...] = tuple(VERSIONS)) -> dict[str, str]:
    """Statically check the ONNX file ``path`` for every TensorRT version in ``versions``.

    Returns:
        ``{version: note}`` for build.json (each version passed; the note names the matrix used).

    Raises:
        OpenTransError: (one line) the graph would not parse in one of ``versions``: the first problems and how
            many there are.
    """
    import onnx

    model = onnx.load(str(path))
    for version in versions:
        problems = tensorrt_problems(model, version)
        if problems:
            more = f" (+{len(problems) - _SHOWN} more)" if len(problems) > _SHOWN else ""
            raise OpenTransError(f"{Path(path).name} would not parse in TensorRT {version} ({len(problems)} problems "
                                 f"by its ONNX support matrix): {'; '.join(problems[:_SHOWN])}{more}")
    return {version: f"passed the static check ({VERSIONS[version][1]})" for version in versions}
