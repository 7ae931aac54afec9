"""Static TensorRT parse check of ONNX graphs (no TensorRT here): graphs that must pass and graphs that must fail."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import CAMVID_SPEC, TINY_VIT, real_data
from onnx import TensorProto, helper, numpy_helper

from opentrans.deploy.export import export_onnx, fold_constants
from opentrans.deploy.options import DeployOptions
from opentrans.deploy.stage import deploy_stage
from opentrans.deploy.tensorrt_support import VERSIONS, check_tensorrt_parsable, support_matrix, tensorrt_problems
from opentrans.errors import OpenTransError
from opentrans.models.artifact import build_segmentor
from opentrans.models.source import ModelSource


def _graph(nodes, inputs, outputs, initializers=(), opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _f32(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def test_matrix_is_data_with_its_source():
    matrix = support_matrix("10.3")
    assert matrix["source"]["repository"] == "onnx/onnx-tensorrt" and len(matrix["source"]["commit"]) == 40
    assert "MatMul" in matrix["operators"] and "QLinearMatMul" in matrix["unsupported"]
    assert set(VERSIONS) == {"10.3", "11"}
    with pytest.raises(OpenTransError, match="TensorRT 9: no ONNX support matrix"):
        support_matrix("9")


def test_a_plain_float_graph_passes():
    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    model = _graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
                    helper.make_node("Softmax", ["y"], ["z"], name="sm")],
                   [_f32("x", [2, 4])], [_f32("z", [2, 3])], [w])
    assert tensorrt_problems(model, "10.3") == [] and tensorrt_problems(model, "11") == []


@pytest.mark.parametrize(("build", "expected"), [
    # an operator the parser does not have
    (lambda: _graph([helper.make_node("QLinearMatMul", list("abcdefgh"), ["y"], name="q")],
                    [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in "abcdefgh"], [_f32("y", [1])]),
     "q (QLinearMatMul): operator not supported by the TensorRT 10.3 ONNX parser"),
    # a custom-domain operator (ONNX Runtime contrib op)
    (lambda: _graph([helper.make_node("FusedGemm", ["x", "x"], ["y"], name="f", domain="com.microsoft")],
                    [_f32("x", [2, 2])], [_f32("y", [2, 2])]),
     "f (FusedGemm): operator of domain com.microsoft not supported"),
    # a data type the operator does not take (MatMul on int32)
    (lambda: _graph([helper.make_node("MatMul", ["x", "x"], ["y"], name="mm")],
                    [helper.make_tensor_value_info("x", TensorProto.INT32, [2, 2])],
                    [helper.make_tensor_value_info("y", TensorProto.INT32, [2, 2])]),
     "mm (MatMul): INT32 input; TensorRT 10.3 supports FP32, FP16, BF16"),
    # asymmetric quantisation
    (lambda: _graph([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"], name="ql")],
                    [_f32("x", [4])], [helper.make_tensor_value_info("y", TensorProto.INT8, [4])],
                    [numpy_helper.from_array(np.array(0.1, np.float32), "s"),
                     numpy_helper.from_array(np.array(3, np.int8), "z")]),
     "ql (QuantizeLinear): non-zero zero point"),
    # cubic resize
    (lambda: _graph([helper.make_node("Resize", ["x", "", "sc"], ["y"], name="rs", mode="cubic")],
                    [_f32("x", [1, 1, 2, 2])], [_f32("y", [1, 1, 4, 4])],
                    [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "sc")]),
     "rs (Resize): mode cubic; TensorRT 10.3 resizes nearest or linear only"),
    # an opset newer than the parser's range
    (lambda: _graph([helper.make_node("Relu", ["x"], ["y"], name="r")], [_f32("x", [2])], [_f32("y", [2])], opset=22),
     "graph: opset 22 outside TensorRT 10.3's 9..20"),
])
def test_graphs_that_must_fail(build, expected):
    problems = tensorrt_problems(build(), "10.3")
    assert any(expected in p for p in problems), problems


def test_check_raises_one_line_naming_the_file(tmp_path):
    model = _graph([helper.make_node("Resize", ["x", "", "sc"], ["y"], name="rs", mode="cubic")],
                   [_f32("x", [1, 1, 2, 2])], [_f32("y", [1, 1, 4, 4])],
                   [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "sc")])
    onnx.save(model, str(tmp_path / "bad.onnx"))
    with pytest.raises(OpenTransError) as info:
        check_tensorrt_parsable(tmp_path / "bad.onnx")
    message = str(info.value)
    assert "\n" not in message and message.startswith("bad.onnx would not parse in TensorRT 10.3 (1 problems")


def test_exported_vit_parses_once_its_position_embedding_resize_is_folded(tmp_path):
    """The tiny ViT runs at 64x80, off its native grid: the export resizes the positional embedding bicubically,
    which TensorRT does not parse; folding that constant subgraph removes it and keeps the outputs."""
    import onnxruntime as ort

    seg, spec = build_segmentor(TINY_VIT, "none")
    path = export_onnx(seg, tmp_path / "m.onnx")
    assert any("mode cubic" in p for p in tensorrt_problems(onnx.load(str(path)), "10.3"))
    x = np.random.default_rng(0).standard_normal((1, 3, *spec.image_size)).astype(np.float32)
    text = np.random.default_rng(1).standard_normal((4, seg.embed_dim)).astype(np.float32)
    before = ort.InferenceSession(str(path)).run(None, {"images": x, "text_embeds": text})[0]
    fold_constants(path)
    assert check_tensorrt_parsable(path).keys() == {"10.3", "11"}
    after = ort.InferenceSession(str(path)).run(None, {"images": x, "text_embeds": text})[0]
    np.testing.assert_allclose(after, before, atol=1e-5, rtol=0)


@real_data
def test_jetson_dynamic_hw_bundle_is_refused_before_anything_is_written(tmp_path):
    """A dynamic-size export keeps the bicubic resize in the graph: the bundle would not build on the device."""
    out = tmp_path / "out" / "jetson"
    with pytest.raises(OpenTransError, match="would not parse in TensorRT 10.3 .*mode cubic"):
        deploy_stage(ModelSource(model=TINY_VIT), DeployOptions(target="jetson", precision="fp32", data=CAMVID_SPEC,
                                                               parity_limit=1, dynamic_hw=True), out)
    assert not (tmp_path / "out").exists()
