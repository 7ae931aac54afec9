"""Quantisation: fp16 builds, ONNX Q/DQ INT8, calibration sources, accuracy control, per-layer sensitivity.

Tiny random-initialised ViT on real CamVid images; every artifact is compared with the fp32 model.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from conftest import CAMVID, CAMVID_SPEC, TINY_VIT, real_data
from opentrans.cli import cli
from opentrans.data import open_dataset
from opentrans.deploy import deploy_stage
from opentrans.deploy import quantize as q
from opentrans.deploy.calibration import calibration_images
from opentrans.deploy.export import export_onnx
from opentrans.deploy.options import DeployOptions
from opentrans.models.source import ModelSource
from opentrans.deploy.sensitivity import layer_sensitivity, write_sensitivity_report
from opentrans.deploy.parity import decided_margin
from opentrans.deploy.stage import PARITY_THRESHOLDS, check_parity
from opentrans.deploy.targets import TARGETS
from opentrans.deploy.targets.onnx import OnnxRuntimeRunner
from opentrans.errors import OpenTransError
from opentrans.inference.evaluate import TorchRunner, agreement
from opentrans.models.artifact import build_segmentor


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    """(segmentor, spec, fp32 ONNX path, calibration images, val dataset, text embeddings) of the tiny ViT."""
    seg, spec = build_segmentor(TINY_VIT, "none")
    path = export_onnx(seg, tmp_path_factory.mktemp("qexport") / "model.onnx")
    calib = calibration_images(CAMVID_SPEC, spec.image_size, spec.mean, spec.std, 4)
    val = open_dataset(CAMVID_SPEC, "val", spec.image_size, spec.mean, spec.std, limit=2)
    text = seg.encode_classes(list(val.class_names), model_name=spec.model).numpy()
    return seg, spec, path, calib, val, text


def _deploy(out, target, precision, **kw):
    kw.setdefault("parity_limit", 2)
    kw.setdefault("calib_size", 4)
    return deploy_stage(ModelSource(model=TINY_VIT), DeployOptions(target=target, precision=precision, data=CAMVID_SPEC, **kw), out)


# --- fp16 ---------------------------------------------------------------------------------------------------


@real_data
@pytest.mark.parametrize("target", ["onnx", "openvino"])
def test_fp16_builds_pass_parity_with_fp16_weights(target, tmp_path):
    figures = _deploy(tmp_path / target, target, "fp16")
    assert figures["checked_precision"] == "fp16" and not check_parity(figures, "fp16")
    assert 0 < figures["max_abs_diff"] < 0.1 and figures["pixel_agreement"] >= 99.0  # measured 2e-3..1e-2, 99.9 %
    parity = json.loads((tmp_path / target / "parity.json").read_text())
    assert parity["thresholds"] == json.loads(json.dumps(PARITY_THRESHOLDS["fp16"]))
    if target == "onnx":
        model = onnx.load(str(tmp_path / target / "model.onnx"))
        inits = {i.data_type for i in model.graph.initializer if len(i.dims) >= 2}
        assert inits == {onnx.TensorProto.FLOAT16}  # weight matrices in fp16
        io = [t.type.tensor_type.elem_type for t in [*model.graph.input, *model.graph.output]]
        assert set(io) == {onnx.TensorProto.FLOAT}  # inputs/outputs stay fp32
    else:
        import openvino as ov

        model = ov.Core().read_model(str(tmp_path / target / "model.xml"))
        sizes: dict[str, int] = {}
        for op in model.get_ops():
            if op.get_type_name() == "Constant":
                kind = op.get_element_type().get_type_name()
                sizes[kind] = sizes.get(kind, 0) + int(np.prod(list(op.get_output_shape(0))))
        assert sizes["f16"] > 100 * sizes.get("f32", 0)  # weights in FP16 (a few f32 scalars remain)
        assert json.loads((tmp_path / target / "build.json").read_text())["compress_to_fp16"] is True


@real_data
def test_unknown_precision_lists_valid_ones_and_writes_nothing(tmp_path):
    with pytest.raises(OpenTransError, match="target onnx builds fp32, fp16, int8"):
        _deploy(tmp_path / "out", "onnx", "int4")
    assert TARGETS.get("openvino").precisions == ("fp32", "fp16", "int8")
    with pytest.raises(OpenTransError, match="--max-drop: applies to --precision int8"):
        _deploy(tmp_path / "out", "openvino", "fp16", max_drop=1.0)
    assert not any(tmp_path.iterdir())


# --- ONNX Q/DQ INT8 -----------------------------------------------------------------------------------------


@real_data
def test_qdq_onnx_quantises_the_image_encoder_and_keeps_the_text_path_fp32(vit, tmp_path):
    seg, spec, path, calib, val, text = vit
    out = q.quantize_onnx_qdq(path, calib, text, tmp_path / "qdq.onnx", subset_size=4)
    model = onnx.load(str(out))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 13
    types = [n.op_type for n in model.graph.node]
    assert types.count("QuantizeLinear") > 0 and types.count("DequantizeLinear") > 0

    layers = q.qdq_layers(model)
    text_nodes = set(q.text_path_nodes(model))
    image = [n for n in q.image_layers(model)]
    assert "/conv1/Conv" in image and len(image) >= 10
    with_weights = [n for n, v in q.qdq_layers(onnx.load(str(path))).items() if v["has_weight"]]
    assert len(with_weights) >= 10 and set(with_weights) <= set(image)
    for name in image:
        if name.endswith("attn/MatMul_2"):  # softmax @ V: NNCF's transformer scheme keeps it float
            continue
        assert layers[name]["activation"], name  # activations (both operands of Q @ K^T) behind Q/DQ
        assert layers[name]["weight"] == (name in with_weights), name  # every weight INT8 + DequantizeLinear
    # nothing on the text path: no Q/DQ node consumes a text-path tensor, no text-path node reads a DQ output
    producers = {o: n for n in model.graph.node for o in n.output}
    tainted = {"text_embeds"} | {o for n in model.graph.node if n.name in text_nodes for o in n.output}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            assert node.input[0] not in tainted, node.name
        if node.name in text_nodes:
            for i in node.input:
                if i in tainted and i in producers:
                    assert producers[i].op_type != "DequantizeLinear", node.name
    sim = [n for n in text_nodes if n in layers]  # the similarity MatMul
    assert sim and not any(layers[n]["activation"] or layers[n]["weight"] for n in sim)
    # fp32 inputs/outputs, same names; ONNX Runtime reproduces PyTorch within the INT8 gate
    assert [i.name for i in model.graph.input] == ["images", "text_embeds"]
    figures = agreement(TorchRunner(seg), OnnxRuntimeRunner(out, name="onnxruntime-int8"), val, text,
                        decided_margin=decided_margin(seg))
    assert not check_parity(figures, "int8"), figures  # measured cosine 0.9995, agreement 98.4 %


@real_data
def test_onnx_int8_build_writes_quant_and_sensitivity_reports(tmp_path):
    ignore = r"resblocks\.1/mlp/c_fc"
    figures = _deploy(tmp_path / "b", "onnx", "int8", ignore_ops=[ignore], sensitivity=True, sensitivity_images=1)
    assert figures["checked_precision"] == "int8" and not check_parity(figures, "int8")
    report = json.loads((tmp_path / "b" / "quant_report.json").read_text())
    assert report["ignore_ops"] == [ignore] and report["kept_fp32"]["ignore_ops"] == [ignore]
    assert "/resblocks.1/mlp/c_fc/MatMul" not in report["quantized_layers"]
    assert "/resblocks.0/mlp/c_fc/MatMul" in report["quantized_layers"]

    # sensitivity: one row per quantisable layer (the ignored one is not), most costly first
    sens = json.loads((tmp_path / "b" / "sensitivity.json").read_text())
    rows = sens["layers"]
    names = [r["layer"] for r in rows]
    assert sorted(names) == sorted(sens["quantizable_layers"]) and len(names) == len(set(names)) >= 10
    assert "/resblocks.1/mlp/c_fc/MatMul" not in names and "/conv1/Conv" in names
    assert set(names) <= set(report["quantized_layers"])
    keys = [(r["agreement_drop"], r["cosine_drop"]) for r in rows]
    assert keys == sorted(keys, reverse=True)
    assert all(0 <= r["agreement"] <= 100 and r["cosine"] <= 1 + 1e-9 for r in rows) and sens["images"] == 1
    table = [line for line in (tmp_path / "b" / "sensitivity.md").read_text().splitlines() if line[:3] == "| 1"]
    assert table and rows[0]["layer"] in table[0]
    build = json.loads((tmp_path / "b" / "build.json").read_text())
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert {"sensitivity.json", "sensitivity.md", "quant_report.json"} <= {o["path"] for o in manifest["outputs"]}
    assert build["precision"] == "int8"

    with pytest.raises(OpenTransError, match="matches no operation"):
        _deploy(tmp_path / "c", "onnx", "int8", ignore_ops=["no-such-layer"])
    assert not (tmp_path / "c").exists()


# --- calibration sources --------------------------------------------------------------------------------------


@real_data
def test_calibration_from_a_plain_image_folder(vit, tmp_path):
    _, spec, *_ = vit
    folder = tmp_path / "pics" / "site"
    folder.mkdir(parents=True)
    for src in sorted((CAMVID / "train").iterdir())[:3]:
        shutil.copy(src, folder / src.name)
    for spec_str in (str(tmp_path / "pics"), f"images:{tmp_path / 'pics'}", f"folder:{tmp_path / 'pics'}"):
        images = calibration_images(spec_str, spec.image_size, spec.mean, spec.std, limit=2)
        assert len(images) == 2 and images[0].shape == (1, 3, *spec.image_size) and images[0].dtype == np.float32
    # same preprocessing as the dataset
    ds = calibration_images(CAMVID_SPEC, spec.image_size, spec.mean, spec.std, limit=1)
    first = calibration_images(str(tmp_path / "pics"), spec.image_size, spec.mean, spec.std, limit=1)
    np.testing.assert_array_equal(ds[0], first[0])


@real_data
def test_empty_calibration_folder_is_a_one_line_error_and_writes_nothing(tmp_path):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("no pictures here")
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["deploy", "--model", TINY_VIT, "--target", "openvino", "--precision", "int8",
                                      "--data", CAMVID_SPEC, "--calib-data", str(empty), "--out", str(out)])
    assert result.exit_code != 0
    assert result.output.strip().count("\n") == 0 and "no images" in result.output, result.output
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["empty"]
    with pytest.raises(OpenTransError, match="applies to --precision int8"):
        _deploy(out, "onnx", "fp32", calib_data=str(empty))


# --- accuracy control -----------------------------------------------------------------------------------------


@real_data
def test_accuracy_control_reports_reverted_layers_consistently(vit):
    import openvino as ov

    seg, spec, path, calib, val, text = vit
    runner = TorchRunner(seg)
    items = [(val[i][0][None].numpy(), runner(val[i][0][None].numpy(), text)[0].argmax(0)) for i in range(2)]
    metric = q.drop_metric("agreement", len(val.class_names))

    model, report = q.quantize_openvino_accuracy_control(
        ov.convert_model(str(path)), calib[:2], text, items, metric, max_drop=100.0, model_type_transformer=True,
        subset_size=2)
    assert report["reverted_ops"] == [] and report["reverted_layers"] == []  # any drop is acceptable
    assert report["quantized_ops_final"] == report["quantized_ops_plain"] > 10
    assert set(q.quantized_ops(model)) >= {"/conv1/Conv", "/resblocks.0/mlp/c_fc/MatMul"}

    model, report = q.quantize_openvino_accuracy_control(
        ov.convert_model(str(path)), calib[:2], text, items, metric, max_drop=0.0, model_type_transformer=True,
        subset_size=2, max_iterations=1)  # an impossible drop: NNCF reverts one group, then stops
    assert report["reverted_layers"], report
    final = q.quantized_ops(model)
    assert report["quantized_ops_final"] == len(final) < report["quantized_ops_plain"]
    assert not set(report["reverted_ops"]) & set(final)
    assert set(report["reverted_layers"]) <= set(report["reverted_ops"])
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    value, per_item = metric(lambda x: compiled({"images": x, "text_embeds": text})[0], items)
    assert value >= 90.0 and len(per_item) == 2  # the returned model is sound (SmoothQuant off, see quantize.py)


@real_data
def test_sensitivity_modes_and_report_table(vit, tmp_path):
    _, _, path, calib, val, text = vit
    images = val[0][0][None].numpy()
    layers = ["/conv1/Conv", "/out_proj/MatMul", "/resblocks.0/mlp/c_fc/MatMul", "/MatMul_1"]
    report = layer_sensitivity(path, calib[:2], images, text, mode="all-but", layers=layers)
    assert sorted(r["layer"] for r in report["layers"]) == sorted(layers)
    keys = [(r["agreement_drop"], r["cosine_drop"]) for r in report["layers"]]
    assert keys == sorted(keys, reverse=True)
    paths = write_sensitivity_report(report, tmp_path, top_n=2)
    md = paths[1].read_text()
    assert sum(line.startswith("| ") and line[2].isdigit() for line in md.splitlines()) == 2
    assert "2 more layers" in md
    with pytest.raises(OpenTransError, match="not quantisable"):
        layer_sensitivity(path, calib[:1], images, text, layers=["/MatMul_2"])  # the text-path similarity MatMul


def test_recipe_quantisation_options_reach_int8_builds_only(tmp_path):
    from opentrans.pipeline import _stage_plan
    from opentrans.recipe import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
name: q
model: {TINY_VIT}
data: {CAMVID_SPEC}
deploy:
  builds: [{{target: openvino, precision: int8}}, {{target: onnx, precision: fp16}}]
  calib_data: images:{tmp_path}
  calib_size: 8
  smooth_quant_alpha: -1
  ignore_ops: ['mlp/c_fc']
  max_drop: 1.5
  drop_metric: miou
  sensitivity: true
""")
    plan = {label: options for label, _, options, _ in _stage_plan(load_recipe(recipe), tmp_path / "runs")}
    int8, fp16 = plan["deploy openvino-int8"], plan["deploy onnx-fp16"]
    assert (int8["calib_data"], int8["calib_size"], int8["smooth_quant_alpha"]) == (f"images:{tmp_path}", 8, -1)
    assert (int8["ignore_ops"], int8["max_drop"], int8["drop_metric"], int8["sensitivity"]) == (
        ["mlp/c_fc"], 1.5, "miou", True)
    assert "calib_data" not in fp16 and "max_drop" not in fp16
