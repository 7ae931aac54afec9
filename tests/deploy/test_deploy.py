"""Deploy stage: ONNX export, OpenVINO fp32/INT8, Jetson bundle, TensorRT gate, parity gate, load_runner.

Tiny random-initialised models on real CamVid images; every artifact is compared with PyTorch.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from conftest import CAMVID_SPEC, TINY_RN, TINY_VIT, fake_trtexec, real_data, save_finished, skip_where_tensorrt_exists
from opentrans.artifacts import is_complete, read_json
from opentrans.data import open_dataset
from opentrans.deploy import PARITY_THRESHOLDS, deploy_stage, export_onnx, load_runner, read_build, source_model_dir
from opentrans.deploy.export import onnx_opset
from opentrans.deploy.options import DeployOptions
from opentrans.models.source import ModelSource
from opentrans.deploy.targets.onnx import OnnxRuntimeRunner
from opentrans.errors import OpenTransError
from opentrans.hardware import cpu_isa
from opentrans.inference.evaluate import TorchRunner, agreement
from opentrans.models.artifact import build_segmentor

FP32_TOL = 1e-4  # logits are logit_scale x cosine (|logit| <= 100); fp32 re-implementations differ by ~1e-5


def _real_images(spec, n: int, split: str = "val") -> np.ndarray:
    ds = open_dataset(CAMVID_SPEC, split, spec.image_size, spec.mean, spec.std, limit=n)
    return torch.stack([ds[i][0] for i in range(n)]).numpy()


def _deploy(out, model, target, precision, **kw):
    kw.setdefault("parity_limit", 2)
    kw.setdefault("calib_size", 4)
    return deploy_stage(ModelSource(model=model), DeployOptions(target=target, precision=precision, data=CAMVID_SPEC, **kw), out)


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir()) if parent.exists() else []


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """One build per (model, target, precision) used by several tests, built once for the module."""
    root = tmp_path_factory.mktemp("deploy")
    out = {}
    for key, model, target, precision in [
        ("rn-onnx", TINY_RN, "onnx", "fp32"),
        ("vit-openvino", TINY_VIT, "openvino", "fp32"),
        ("vit-int8", TINY_VIT, "openvino", "int8"),
        ("vit-jetson", TINY_VIT, "jetson", "fp16"),
    ]:
        figures = _deploy(root / key, model, target, precision)
        out[key] = (root / key, figures)
    return out


# --- export -----------------------------------------------------------------------------------------------


@real_data
@pytest.mark.parametrize("model", [TINY_VIT, TINY_RN])
def test_onnx_export_matches_torch_with_other_batch_and_classes(model, tmp_path):
    seg, spec = build_segmentor(model, "none")
    fastpath = torch.backends.mha.get_fastpath_enabled()
    path = export_onnx(seg, tmp_path / "m.onnx", opset=17)
    assert torch.backends.mha.get_fastpath_enabled() == fastpath  # the export restores the MHA fast path flag
    assert onnx_opset(path) == 17
    assert list(tmp_path.iterdir()) == [path]  # one self-contained file, no .onnx.data, no temp files
    graph = onnx.load(str(path)).graph
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    h, w = spec.image_size
    assert dims == {"images": ["batch", 3, h, w], "text_embeds": ["classes", seg.embed_dim]}

    runner = OnnxRuntimeRunner(path)
    images = _real_images(spec, 3)  # traced with B=2, C=3: run B=3, C=5 and B=1, C=1
    for imgs, classes in ((images, 5), (images[:1], 1)):
        text = torch.nn.functional.normalize(torch.randn(classes, seg.embed_dim), dim=-1).numpy()
        out = runner(imgs, text)
        ref = TorchRunner(seg)(imgs, text)
        assert out.shape == (len(imgs), classes, h, w)
        np.testing.assert_allclose(out, ref, atol=FP32_TOL, rtol=0)


def test_onnx_runner_rejects_wrong_image_size(tmp_path):
    seg, spec = build_segmentor(TINY_RN, "none")
    runner = OnnxRuntimeRunner(export_onnx(seg, tmp_path / "m.onnx"))
    with pytest.raises(OpenTransError, match="expects images"):
        runner(np.zeros((1, 3, 32, 32), np.float32), np.zeros((2, seg.embed_dim), np.float32))


def test_export_rejects_unsupported_opset(tmp_path):
    seg, _ = build_segmentor(TINY_RN, "none")
    with pytest.raises(OpenTransError, match="--opset 9"):
        export_onnx(seg, tmp_path / "m.onnx", opset=9)
    assert not any(tmp_path.iterdir())


# --- builds -------------------------------------------------------------------------------------------------


def _check_build_dir(path: Path, backend: str, precision: str, model_files: list[str]) -> dict:
    assert is_complete(path)
    build = read_build(path)
    assert (build["backend"], build["precision"], build["model_files"]) == (backend, precision, model_files)
    assert all((path / f).is_file() for f in model_files)
    names = json.loads((path / "classes.json").read_text())
    assert names == build["class_names"] and len(names) == 11  # CamVid
    assert np.load(path / "text_embeds.npy").shape == (11, build["embed_dim"])
    manifest = read_json(path / "manifest.json")
    assert manifest["weights"] == "random-init weights"
    listed = {o["path"] for o in manifest["outputs"]}
    assert {"build.json", "parity.json", *model_files} <= listed
    assert not [p for p in path.parent.iterdir() if "deploy-tmp" in p.name]  # temp build dir renamed away
    return build


@real_data
def test_onnx_build_round_trips_through_load_runner(builds):
    path, figures = builds["rn-onnx"]
    _check_build_dir(path, "onnxruntime", "fp32", ["model.onnx"])
    parity = read_json(path / "parity.json")
    assert parity["passed"] and parity["images"] == 2 and parity["figures"]["max_abs_diff"] < 1e-3
    assert figures["max_abs_diff"] == parity["figures"]["max_abs_diff"]
    assert figures["size_mb"] == pytest.approx((path / "model.onnx").stat().st_size / 1e6)

    seg, spec = build_segmentor(TINY_RN, "none")  # random init is seeded: the same weights as the build
    runner = load_runner(path)
    assert runner.name == "onnxruntime-fp32"
    images, text = _real_images(spec, 2), np.load(path / "text_embeds.npy")
    np.testing.assert_allclose(runner(images, text), TorchRunner(seg)(images, text), atol=FP32_TOL, rtol=0)


@real_data
def test_openvino_fp32_matches_torch_at_f32_precision(builds):
    path, figures = builds["vit-openvino"]
    build = _check_build_dir(path, "openvino", "fp32", ["model.xml", "model.bin"])
    assert not (path / "model.onnx").exists()  # the export is an intermediate for this target
    assert build["parity_inference_precision"] == "f32"
    assert figures["max_abs_diff"] < 1e-3 and figures["pixel_agreement"] >= 99.5

    seg, spec = build_segmentor(TINY_VIT, "none")
    runner = load_runner(path)
    assert runner.name == "openvino-fp32" and runner.inference_precision == "f32"
    images = _real_images(spec, 3)
    text = np.load(path / "text_embeds.npy")[:4]  # fewer classes and another batch size than the calibration
    np.testing.assert_allclose(runner(images, text), TorchRunner(seg)(images, text), atol=FP32_TOL, rtol=0)
    default = load_runner(path, openvino_precision=None)
    assert default.inference_precision in ("f32", "bf16", "f16")  # recorded, whatever the CPU chose


@real_data
def test_openvino_int8_is_quantised_and_keeps_the_text_path_fp32(builds):
    import openvino as ov

    path, figures = builds["vit-int8"]
    build = _check_build_dir(path, "openvino", "int8", ["model.xml", "model.bin"])
    model = ov.Core().read_model(str(path / "model.xml"))
    types = [op.get_type_name() for op in model.get_ops()]
    assert types.count("FakeQuantize") >= 5 and build["fake_quantize_ops"] == types.count("FakeQuantize")
    assert any(op.get_type_name() == "Constant" and op.get_element_type() == ov.Type.i8 for op in model.get_ops())
    assert build["calibration_images"] == 4 and build["calibration_split"] == "train"
    assert build["smooth_quant_alpha"] == 0.6 and build["model_type"] == "transformer"
    # --cpu-isa native: INT8 weights within 7 bits on a CPU without VNNI, NNCF's default where it has VNNI/AMX
    isa = cpu_isa()
    assert build["cpu_isa"] == {"mode": "native", "overflow_fix": "first_layer_only" if isa.vnni else "enable",
                                "built_on": json.loads(json.dumps(isa.to_json()))}
    assert build["overflow_fix"] == build["cpu_isa"]["overflow_fix"]
    # nothing that depends on text_embeds is quantised (the class list changes on the device)
    text = next(p for p in model.get_parameters() if p.get_friendly_name() == "text_embeds")
    stack, seen = [text], set()
    while stack:
        node = stack.pop()
        for out in node.outputs():
            for target in out.get_target_inputs():
                consumer = target.get_node()
                assert consumer.get_type_name() != "FakeQuantize"
                for inp in consumer.inputs():
                    assert inp.get_source_output().get_node().get_type_name() != "FakeQuantize"
                if consumer.get_friendly_name() not in seen:
                    seen.add(consumer.get_friendly_name())
                    stack.append(consumer)
    parity = read_json(path / "parity.json")
    assert parity["checked_precision"] == "int8" and parity["thresholds"] == json.loads(json.dumps(PARITY_THRESHOLDS["int8"]))
    for key in ("max_abs_diff", "cosine", "pixel_agreement", "teacher_miou", "decided_pixels_pct", "decided_agreement"):
        assert parity["figures"][key] == figures[key]
    assert parity["figures"]["decided_pixels_pct"] > 1 and parity["figures"]["decided_agreement"] >= 99.9
    assert 0 < figures["max_abs_diff"] and figures["cosine"] >= 0.99  # quantised: not bit-exact, still close
    fp32_mb = sum((builds["vit-openvino"][0] / f).stat().st_size for f in ("model.xml", "model.bin")) / 1e6
    assert figures["size_mb"] < 0.7 * fp32_mb  # int8 weights

    seg, spec = build_segmentor(TINY_VIT, "none")
    images, text = _real_images(spec, 2), np.load(path / "text_embeds.npy")[:6]
    out, ref = load_runner(path)(images, text), TorchRunner(seg)(images, text)
    assert out.shape == ref.shape
    cos = float((out * ref).sum() / np.linalg.norm(out) / np.linalg.norm(ref))
    assert cos > 0.99


@real_data
def test_parity_gates_reject_bf16_and_a_badly_calibrated_int8(builds, tmp_path):
    """The fp32 gate fails OpenVINO's bf16 default (on CPUs that use it); the int8 gate fails a quantisation
    calibrated on unnormalised images, while the sound int8 build (fixture) passed it."""
    import openvino as ov

    from opentrans.deploy.quantize import quantize_openvino_int8
    from opentrans.deploy.parity import decided_margin
    from opentrans.deploy.stage import check_parity
    from opentrans.deploy.targets.openvino import OpenVINORunner

    seg, spec = build_segmentor(TINY_VIT, "none")
    val = open_dataset(CAMVID_SPEC, "val", spec.image_size, spec.mean, spec.std, limit=2)
    text = np.load(builds["vit-openvino"][0] / "text_embeds.npy")
    default = load_runner(builds["vit-openvino"][0], openvino_precision=None)
    if default.inference_precision == "bf16":
        assert any(f.startswith("max_abs_diff") for f in check_parity(agreement(TorchRunner(seg), default, val, text), "fp32"))

    onnx_path = export_onnx(seg, tmp_path / "m.onnx")
    mean, std = (np.array(v, np.float32).reshape(1, 3, 1, 1) for v in (spec.mean, spec.std))
    unnormalised = [x[None] * std + mean for x in _real_images(spec, 4, "train")]
    bad = quantize_openvino_int8(ov.convert_model(str(onnx_path)), unnormalised, text, True, 4)
    ov.save_model(bad, str(tmp_path / "bad.xml"), compress_to_fp16=False)
    figures = agreement(TorchRunner(seg), OpenVINORunner(tmp_path / "bad.xml", "openvino-int8"), val, text,
                        decided_margin=decided_margin(seg))
    failures = check_parity(figures, "int8")
    assert [f.split()[0] for f in failures] == ["cosine", "pixel_agreement", "decided_agreement"]


def test_quantize_rejects_bad_smooth_quant_alpha():
    from opentrans.deploy.quantize import quantize_openvino_int8

    with pytest.raises(OpenTransError, match="smooth-quant-alpha"):
        quantize_openvino_int8(None, [], np.zeros((1, 4), np.float32), True, 4, smooth_quant_alpha=1.5)


@real_data
def test_jetson_bundle_contents_and_build_script(builds, tmp_path):
    path, figures = builds["vit-jetson"]
    build = _check_build_dir(path, "jetson", "fp16", ["model.onnx", "model_fp16.onnx"])
    assert onnx_opset(path / "model.onnx") == 17 and build["opset"] == 17
    # parity is checked on the fp16 ONNX (ONNX Runtime); the engine itself is only built on the device
    assert figures["checked_precision"] == "fp16" and build["engine_built"] is False
    for name in ("README.md", "build_engine.sh", "sample_images.npy", "sample_logits.npy", "sample_images.bin",
                 "text_embeds.bin"):
        assert (path / name).is_file(), name
    script = path / "build_engine.sh"
    assert os.access(script, os.X_OK)
    text = script.read_text()
    assert "ONNX=model.onnx" in text and "--saveEngine=model.engine" in text and "--fp16" in text

    # the sample logits (PyTorch) match what ONNX Runtime computes from the bundle's own files
    sample, expected = np.load(path / "sample_images.npy"), np.load(path / "sample_logits.npy")
    embeds = np.load(path / "text_embeds.npy")
    assert sample.shape == (1, 3, *build["image_size"]) and expected.shape == (1, 11, *build["image_size"])
    np.testing.assert_allclose(OnnxRuntimeRunner(path / "model.onnx")(sample, embeds), expected, atol=FP32_TOL, rtol=0)
    np.testing.assert_array_equal(np.fromfile(path / "sample_images.bin", "<f4").reshape(sample.shape), sample)
    np.testing.assert_array_equal(np.fromfile(path / "text_embeds.bin", "<f4").reshape(embeds.shape), embeds)

    # run the script against a fake trtexec: TensorRT 10.3 gets --fp16 and the profile shapes
    h, w = build["image_size"]
    env = {**os.environ, "TRTEXEC": str(fake_trtexec(tmp_path, "v100300"))}
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    args = (tmp_path / "args-v100300.txt").read_text().split("--\n")[0].split()  # the image engine's call
    assert args[:2] == ["--onnx=model.onnx", "--saveEngine=model.engine"] and args[-1] == "--fp16"
    assert f"--maxShapes=images:4x3x{h}x{w},text_embeds:64x32" in args
    assert f"--optShapes=images:1x3x{h}x{w},text_embeds:11x32" in args
    # TensorRT 11 has no --fp16: the fp16 engine comes from the fp16 ONNX, without precision flags
    env["TRTEXEC"] = str(fake_trtexec(tmp_path, "v110000"))
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    args = (tmp_path / "args-v110000.txt").read_text().split("--\n")[0].split()
    assert args[0] == "--onnx=model_fp16.onnx" and "--fp16" not in args
    assert load_runner(path).name == "onnxruntime-fp16 (jetson bundle)"


# --- refusals -------------------------------------------------------------------------------------------------


@real_data
def test_nvidia_target_without_tensorrt_raises_before_writing(tmp_path):
    skip_where_tensorrt_exists()
    with pytest.raises(OpenTransError, match="TensorRT is not installed here.*--target jetson"):
        _deploy(tmp_path / "out" / "trt", TINY_RN, "nvidia", "fp16")
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("target, precision, message", [
    ("tflite", "fp32", "--target tflite"),
    ("onnx", "int4", "--precision int4: target onnx builds fp32, fp16, int8"),
    ("openvino", "bf16", "--precision bf16: target openvino builds fp32, fp16, int8"),
    ("jetson", "bf16", "--precision bf16"),
])
def test_unknown_target_or_precision_raises_and_writes_nothing(tmp_path, target, precision, message):
    with pytest.raises(OpenTransError, match=message):
        _deploy(tmp_path / "out" / "x", TINY_RN, target, precision)
    assert _leftovers(tmp_path) == []


@real_data
@pytest.mark.parametrize("target, cpu_isa_mode, message", [
    ("jetson", "portable", "--cpu-isa: applies to the CPU targets onnx, openvino"),
    ("onnx", "avx9", "--cpu-isa avx9: choose one of native, portable, vnni"),
])
def test_cpu_isa_refusals_write_nothing(tmp_path, target, cpu_isa_mode, message):
    with pytest.raises(OpenTransError, match=message):
        _deploy(tmp_path / "out" / "x", TINY_RN, target, "int8", cpu_isa=cpu_isa_mode)
    assert _leftovers(tmp_path) == []


@real_data
def test_out_dir_that_is_not_a_build_is_refused(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    with pytest.raises(OpenTransError, match="not a deploy build"):
        _deploy(tmp_path / "x", TINY_RN, "onnx", "fp32")
    assert _leftovers(tmp_path / "x") == ["notes.txt"]


@real_data
def test_failed_parity_writes_nothing_and_keeps_the_previous_build(builds, tmp_path, monkeypatch):
    import opentrans.deploy.stage as stage

    monkeypatch.setitem(stage.PARITY_THRESHOLDS, "fp32", {"cosine": (">=", 1.01)})  # impossible
    with pytest.raises(OpenTransError, match=r"parity check .* failed .*cosine 1 < 1.01"):
        _deploy(tmp_path / "fresh" / "out", TINY_RN, "onnx", "fp32")
    assert _leftovers(tmp_path) == []  # neither the build, nor its temp dir, nor the parent it created

    # an earlier complete build in out_dir survives a failed rebuild untouched
    path, _ = builds["rn-onnx"]
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    with pytest.raises(OpenTransError, match="nothing written"):
        _deploy(path, TINY_RN, "onnx", "fp32")
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in path.parent.iterdir()) == sorted(builds)


@real_data
def test_rebuild_replaces_an_earlier_build(tmp_path):
    out = tmp_path / "out"
    _deploy(out, TINY_RN, "jetson", "fp32")
    assert (out / "build_engine.sh").exists()
    _deploy(out, TINY_RN, "onnx", "fp32")
    assert read_build(out)["backend"] == "onnxruntime" and not (out / "build_engine.sh").exists()
    assert _leftovers(tmp_path) == ["out"]


@real_data
def test_build_from_a_model_directory_records_its_source(builds, tmp_path):
    seg, spec = build_segmentor(TINY_RN, "none")
    seg.head.proj.bias.data.fill_(0.05)  # not the fresh model: the build must come from these weights
    save_finished(seg, spec, tmp_path / "run" / "finetune")
    with pytest.raises(OpenTransError, match="keeps its input size"):
        deploy_stage(ModelSource(tmp_path / "run" / "finetune", image_size=(32, 32)),
                     DeployOptions(target="onnx", precision="fp32", data=CAMVID_SPEC, parity_limit=1),
                     tmp_path / "run" / "deploy" / "x")
    out = tmp_path / "run" / "deploy" / "onnx-fp32"
    deploy_stage(ModelSource(tmp_path / "run" / "finetune"),
                 DeployOptions(target="onnx", precision="fp32", data=CAMVID_SPEC, parity_limit=1), out)
    assert source_model_dir(out) == (tmp_path / "run" / "finetune").resolve()
    images, text = _real_images(spec, 1), np.load(out / "text_embeds.npy")
    np.testing.assert_allclose(load_runner(out)(images, text), TorchRunner(seg)(images, text), atol=FP32_TOL, rtol=0)
    (tmp_path / "run").rename(tmp_path / "moved")  # the whole run moves: the relative link still resolves
    assert (source_model_dir(tmp_path / "moved" / "deploy" / "onnx-fp32") / "model.json").exists()
    with pytest.raises(OpenTransError, match="built from --model opentrans-tiny-rn"):
        source_model_dir(builds["rn-onnx"][0])


def test_parity_thresholds_gate_each_figure():
    from opentrans.deploy.stage import check_parity

    good = {"max_abs_diff": 1e-5, "cosine": 1.0, "pixel_agreement": 100.0, "teacher_miou": 100.0,
            "decided_agreement": 100.0}
    assert check_parity(good, "fp32") == []
    bad = {**good, "max_abs_diff": 0.5, "pixel_agreement": 97.0}
    assert check_parity(bad, "fp32") == ["max_abs_diff 0.5 > 0.001", "pixel_agreement 97 < 99.5"]
    assert check_parity({**good, "cosine": 0.9}, "int8") == ["cosine 0.9 < 0.99"]


# --- load_runner ------------------------------------------------------------------------------------------------


@real_data
def test_load_runner_on_a_model_directory_and_on_anything_else(tmp_path):
    seg, spec = build_segmentor(TINY_RN, "none")
    save_finished(seg, spec, tmp_path / "model")
    runner = load_runner(tmp_path / "model")
    assert isinstance(runner, TorchRunner)
    images, text = _real_images(spec, 1), np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32)
    np.testing.assert_array_equal(runner(images, text), TorchRunner(seg)(images, text))
    with pytest.raises(OpenTransError, match="neither a deploy build"):
        load_runner(tmp_path)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "build.json").write_text(json.dumps({"format": "opentrans.deploy/1", "backend": "tflite",
                                                             "precision": "fp32", "file": "build.json"}))
    with pytest.raises(OpenTransError, match="missing key 'target'"):
        load_runner(tmp_path / "bad")


# --- registry and runtime contract ------------------------------------------------------------------------------


def test_targets_register_themselves_and_import_base_not_the_package():
    import ast

    from opentrans.deploy.targets import TARGETS

    assert TARGETS.names() == ["jetson", "nvidia", "onnx", "openvino"]
    assert [n for n, t in TARGETS.items() if t.cpu] == ["onnx", "openvino"]
    assert {n: TARGETS.get(n).backend for n in TARGETS.names()} == {
        "jetson": "jetson", "nvidia": "tensorrt", "onnx": "onnxruntime", "openvino": "openvino"}
    folder = Path(__file__).resolve().parents[2] / "opentrans" / "deploy" / "targets"
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.module != "opentrans.deploy.targets", f"{path.name} imports the package __init__"
    with pytest.raises(OpenTransError, match="--target tflite: choose one of jetson, nvidia, onnx, openvino"):
        TARGETS.get_target("tflite")


@real_data
def test_every_runner_meets_the_runtime_contract(builds):
    from opentrans.runtime import Runner

    for path, _ in builds.values():
        runner, build = load_runner(path), read_build(path)
        assert isinstance(runner, Runner)
        assert runner.input_size == tuple(build["image_size"])
        text = runner.encode_classes(["road", "car"])
        assert text.dtype == np.float32 and text.shape == (2, build["embed_dim"])
    seg, spec = build_segmentor(TINY_RN, "none")
    torch_runner = TorchRunner(seg, model_name=spec.model)
    assert isinstance(torch_runner, Runner) and torch_runner.input_size is None
    np.testing.assert_allclose(torch_runner.encode_classes(["road"]),
                               seg.encode_classes(["road"], model_name=spec.model).numpy(), rtol=0, atol=0)
