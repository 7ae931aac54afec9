"""Export details: the text graph, dynamic H/W, merged weights, TensorRT build planning, the Jetson bundle runner.

Tiny random-initialised models; CamVid class names and images. Nothing here needs TensorRT or a GPU: the engine
build is planned with fake version strings, and the Jetson runner runs with ONNX Runtime as its back end.
"""

from __future__ import annotations

import json
import os
import py_compile
import subprocess
import sys

import numpy as np
import onnx
import open_clip
import pytest
import torch
from conftest import CAMVID_SPEC, TINY_RN, TINY_VIT, fake_trtexec, real_data, skip_where_tensorrt_exists

from opentrans.data import open_dataset
from opentrans.deploy import clip_tokenizer
from opentrans.deploy.export import export_onnx, unmerged_reparametrizations
from opentrans.deploy.targets import tensorrt as trt_plan
from opentrans.deploy.targets.onnx import OnnxRuntimeRunner
from opentrans.deploy.text_graph import (
    TextEncoder,
    build_text_graph,
    export_text_onnx,
    text_parity,
)
from opentrans.errors import OpenTransError
from opentrans.inference.evaluate import TorchRunner
from opentrans.models.artifact import build_segmentor
from opentrans.models.segmentor import TEMPLATES

FP32_TOL = 1e-4  # logits: logit_scale x cosine; measured 2e-6..1.1e-5
TEXT_TOL = 1e-5  # unit-length text embeddings; measured 1e-7..5e-7


def _camvid_names() -> list[str]:
    return list(open_dataset(CAMVID_SPEC, "val", (64, 64), (0, 0, 0), (1, 1, 1), limit=1).class_names)


def _images(spec, n: int, size=None) -> np.ndarray:
    ds = open_dataset(CAMVID_SPEC, "val", size or spec.image_size, spec.mean, spec.std, limit=n)
    return torch.stack([ds[i][0] for i in range(n)]).numpy()


# --- text graph ---------------------------------------------------------------------------------------------


@real_data
def test_standalone_tokenizer_matches_open_clip():
    names = _camvid_names()
    texts = clip_tokenizer.prompts_for(names, TEMPLATES) + [
        "Traffic-light &amp; stop sign!", "  many   spaces\tand\nnewlines ", "café 3 bikes", "it's the dog's bone",
        " ".join(["long"] * 100)]  # truncated to 77 with the end token kept last
    ours = clip_tokenizer.ClipTokenizer(clip_tokenizer.default_bpe_path())(texts)
    assert ours.dtype == np.int64 and ours.shape == (len(texts), 77)
    np.testing.assert_array_equal(ours, open_clip.tokenize(texts).numpy())
    assert ours[-1, -1] == 49407


@real_data
@pytest.mark.parametrize("model", [TINY_VIT, TINY_RN])
def test_text_graph_matches_torch_encode_text_on_camvid_names(model, tmp_path):
    seg, _ = build_segmentor(model, "none")
    path = export_text_onnx(seg, tmp_path / "text_encoder.onnx")
    graph = onnx.load(str(path)).graph
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert dims == {"input_ids": ["prompts", 77]}
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64

    names = _camvid_names()
    encoder = TextEncoder(path, TEMPLATES)
    figures = text_parity(seg, encoder, names)
    assert figures["tokens_equal"] and figures["classes"] == 11 and figures["templates"] == len(TEMPLATES)
    assert figures["max_abs_diff"] < TEXT_TOL and figures["prompt_max_abs_diff"] < TEXT_TOL
    assert figures["cosine"] > 0.99999
    # another batch size than the trace (2) and the class-level API against the segmentor's own
    out = encoder.encode_classes(names[:3])
    np.testing.assert_allclose(out, seg.encode_classes(names[:3]).numpy(), atol=TEXT_TOL, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 1.0, atol=1e-6)
    with pytest.raises(OpenTransError, match="no class names"):
        encoder.encode_classes([])


@real_data
def test_text_graph_as_openvino_ir_and_its_build_entry(tmp_path):
    seg, spec = build_segmentor(TINY_VIT, "none")
    info = build_text_graph(tmp_path, "openvino", seg, spec, _camvid_names())
    assert info["files"] == ["text_encoder.xml", "text_encoder.bin"] and not (tmp_path / "text_encoder.onnx").exists()
    assert (tmp_path / "bpe_simple_vocab_16e6.txt.gz").is_file() and (tmp_path / "tokenizer.py").is_file()
    assert info["tokenizer"] == "clip-bpe" and info["templates"] == list(TEMPLATES)
    assert info["parity"]["max_abs_diff"] < TEXT_TOL and info["parity"]["tokens_equal"]
    assert info["input"] == "input_ids int64 (N,77)" and info["output"].startswith("text_embeds float32 (N,32)")


# --- dynamic height/width -----------------------------------------------------------------------------------


@real_data
@pytest.mark.parametrize("model, mode", [(TINY_VIT, "maskclip"), (TINY_VIT, "naclip"), (TINY_RN, "maskclip")])
def test_dynamic_hw_export_matches_torch_at_two_other_sizes(model, mode, tmp_path):
    seg, spec = build_segmentor(model, "none", dense_mode=mode)
    path = export_onnx(seg, tmp_path / "m.onnx", dynamic_hw=True)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in onnx.load(str(path)).graph.input}
    assert dims["images"] == ["batch", 3, "height", "width"]
    runner = OnnxRuntimeRunner(path)
    text = torch.nn.functional.normalize(torch.randn(4, seg.embed_dim), dim=-1).numpy()
    # two sizes other than the export's; 64x64 is the tiny ViT's pretraining grid (identity resize), 96x128 is not
    sizes = ((64, 64) if seg.is_vit else (128, 64), (96, 128))
    assert spec.image_size not in sizes
    for size in sizes:
        images = _images(spec, 2, size)
        out, ref = runner(images, text), TorchRunner(seg)(images, text)
        assert out.shape == (2, 4, *size)
        np.testing.assert_allclose(out, ref, atol=FP32_TOL, rtol=0)


def test_fixed_size_export_still_rejects_other_sizes(tmp_path):
    seg, _ = build_segmentor(TINY_VIT, "none")
    runner = OnnxRuntimeRunner(export_onnx(seg, tmp_path / "m.onnx"))
    with pytest.raises(OpenTransError, match="expects images"):
        runner(np.zeros((1, 3, 96, 128), np.float32), np.zeros((2, seg.embed_dim), np.float32))


# --- adapters and prune masks ---------------------------------------------------------------------------------


def _adapted_and_masked(seed: int = 0):
    from torch.nn.utils import prune

    from opentrans.finetune.adapters import adapter_parameters, add_lora

    seg, spec = build_segmentor(TINY_VIT, "none")
    blocks = "clip.visual.transformer.resblocks"
    add_lora(seg, [f"{blocks}.0.mlp.c_fc", f"{blocks}.1.attn.in_proj_weight[v]"], rank=2)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(seg):  # LoRA's B starts at zero: make the adapters change the output
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    prune.l1_unstructured(seg.get_submodule(f"{blocks}.2.mlp.c_proj"), "weight", amount=0.5)
    return seg, spec


@real_data
def test_export_merges_adapters_and_prune_masks_or_refuses(tmp_path):
    seg, spec = _adapted_and_masked()
    pending = unmerged_reparametrizations(seg)
    assert len(pending) == 3 and any("prune mask" in p for p in pending) and any("LoRA" in p for p in pending)
    with pytest.raises(OpenTransError, match="3 weights are still reparametrised"):
        export_onnx(seg, tmp_path / "refused.onnx", merge=False)
    assert not (tmp_path / "refused.onnx").exists()

    path = export_onnx(seg, tmp_path / "m.onnx")
    assert len(unmerged_reparametrizations(seg)) == 3  # the caller's model is untouched
    inits = [i.name for i in onnx.load(str(path)).graph.initializer]
    assert not [n for n in inits if "weight_orig" in n or "weight_mask" in n or "parametrizations" in n]
    images = _images(spec, 2)
    text = seg.encode_classes(["road", "car", "sky"]).numpy()
    ref = TorchRunner(seg)(images, text)
    plain, _ = build_segmentor(TINY_VIT, "none")
    assert np.abs(TorchRunner(plain)(images, text) - ref).max() > 1e-2  # the adapters and mask matter
    np.testing.assert_allclose(OnnxRuntimeRunner(path)(images, text), ref, atol=FP32_TOL, rtol=0)


# --- TensorRT planning (pure) ------------------------------------------------------------------------------------


@pytest.mark.parametrize("version, precision, onnx_kind, network, builder, trtexec", [
    ("10.3.0", "fp32", "fp32", (), (), ()),
    ("10.3.0", "fp16", "fp32", (), ("FP16",), ("--fp16",)),
    ("10.3.0", "int8", "int8-qdq", (), ("INT8", "FP16"), ("--int8", "--fp16")),
    ("11.0.0", "fp32", "fp32", ("STRONGLY_TYPED",), (), ()),
    ("11.0.0", "fp16", "fp16", ("STRONGLY_TYPED",), (), ()),
    ("11.0.0", "int8", "int8-qdq", ("STRONGLY_TYPED",), (), ()),
    ("8.5.2.2", "fp16", "fp32", ("EXPLICIT_BATCH",), ("FP16",), ("--fp16",)),
])
def test_tensorrt_plan_per_version_and_precision(version, precision, onnx_kind, network, builder, trtexec):
    plan = trt_plan.plan_engine(version, precision)
    assert (plan.onnx, plan.network_flags, plan.builder_flags, plan.trtexec_flags) == (onnx_kind, network, builder, trtexec)
    assert plan.strongly_typed == (trt_plan.trt_major(version) >= 11)
    assert plan.onnx_file == {"fp32": "model.onnx", "fp16": "model_fp16.onnx", "int8-qdq": "model_int8_qdq.onnx"}[onnx_kind]
    json.dumps(plan.to_json())


def test_tensorrt_plan_rejects_and_profiles():
    for version, precision, message in (("10.3.0", "bf16", "--precision bf16"), ("7.2.1", "fp16", "too old"),
                                        ("trt", "fp16", "expected MAJOR")):
        with pytest.raises(OpenTransError, match=message):
            trt_plan.plan_engine(version, precision)
    fixed = trt_plan.engine_profile((224, 288), 512, 11, 4, 64)
    assert fixed == {"images": ((1, 3, 224, 288), (1, 3, 224, 288), (4, 3, 224, 288)),
                     "text_embeds": ((1, 512), (11, 512), (64, 512))}
    dyn = trt_plan.engine_profile((224, 288), 512, 11, 4, 64, dynamic_hw=True, stride=16)
    assert dyn["images"] == ((1, 3, 112, 144), (1, 3, 224, 288), (4, 3, 448, 576))
    with pytest.raises(OpenTransError, match="max classes 8"):
        trt_plan.engine_profile((224, 288), 512, 11, 4, 8)
    cmd = trt_plan.trtexec_command(trt_plan.plan_engine("10.3.0", "int8"), fixed)
    assert cmd[:3] == ["trtexec", "--onnx=model_int8_qdq.onnx", "--saveEngine=model.engine"]
    assert "--maxShapes=images:4x3x224x288,text_embeds:64x512" in cmd and cmd[-2:] == ["--int8", "--fp16"]
    assert trt_plan.text_engine_profile(66) == {"input_ids": ((1, 77), (66, 77), (512, 77))}


def test_tensorrt_network_flags_skip_members_the_enum_lacks():
    class Flags:
        EXPLICIT_BATCH = 0
        STRONGLY_TYPED = 1

    class Fake:
        NetworkDefinitionCreationFlag = Flags

    assert trt_plan.network_flags_value(Fake, trt_plan.plan_engine("11.0.0", "fp16")) == 2
    assert trt_plan.network_flags_value(Fake, trt_plan.plan_engine("8.6.1", "fp32")) == 1
    del Flags.STRONGLY_TYPED  # a TensorRT whose networks are always strongly typed
    assert trt_plan.network_flags_value(Fake, trt_plan.plan_engine("11.0.0", "fp16")) == 0


@real_data
def test_nvidia_target_without_tensorrt_is_one_line_and_exit_1(tmp_path):
    from click.testing import CliRunner

    from opentrans.cli import cli

    skip_where_tensorrt_exists()
    result = CliRunner().invoke(cli, ["deploy", "--model", TINY_RN, "--target", "nvidia", "--precision", "int8",
                                      "--data", CAMVID_SPEC, "--out", str(tmp_path / "trt")])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1, result.output
    assert len(lines) == 1 and lines[0].startswith("Error: TensorRT is not installed here"), lines
    assert not (tmp_path / "trt").exists()


# --- Jetson bundle --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from opentrans.deploy import deploy_stage
    from opentrans.deploy.options import DeployOptions
    from opentrans.models.source import ModelSource

    out = tmp_path_factory.mktemp("jetson") / "vit-fp16"
    figures = deploy_stage(ModelSource(model=TINY_VIT),
                           DeployOptions(target="jetson", precision="fp16", data=CAMVID_SPEC, parity_limit=2), out)
    return out, figures


@real_data
def test_jetson_bundle_contents(bundle):
    path, figures = bundle
    for name in ("model.onnx", "model_fp16.onnx", "text_encoder.onnx", "tokenizer.py", "bpe_simple_vocab_16e6.txt.gz",
                 "runner.py", "build_engine.sh", "bundle.json", "README.md", "sample_images.npy", "sample_logits.npy",
                 "sample_prompt_ids.npy", "sample_text_embeds.npy"):
        assert (path / name).is_file(), name
    assert figures["checked_precision"] == "fp16"  # ONNX Runtime on model_fp16.onnx
    manifest = json.loads((path / "bundle.json").read_text())
    assert manifest["image_graph"]["onnxruntime"] == "model_fp16" and manifest["text_encoder"]["templates"] == list(TEMPLATES)
    build = json.loads((path / "build.json").read_text())
    assert build["file"] == "model_fp16.onnx" and build["text_encoder"]["parity"]["max_abs_diff"] < TEXT_TOL
    py_compile.compile(str(path / "runner.py"), doraise=True)
    assert subprocess.run(["bash", "-n", str(path / "build_engine.sh")], check=False).returncode == 0


@real_data
def test_jetson_build_script_per_tensorrt_version(bundle, tmp_path):
    path, _ = bundle
    script = path / "build_engine.sh"
    for tag, onnx_file, flags in (("v100300", "model.onnx", ["--fp16"]), ("v110000", "model_fp16.onnx", [])):
        env = {**os.environ, "TRTEXEC": str(fake_trtexec(tmp_path, tag))}
        done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30, check=False)
        assert done.returncode == 0, done.stderr
        image, text = (c.split() for c in (tmp_path / f"args-{tag}.txt").read_text().split("--\n")[:2])
        assert image[:2] == [f"--onnx={onnx_file}", "--saveEngine=model.engine"] and image[5:] == flags
        assert text[:2] == ["--onnx=text_encoder.onnx", "--saveEngine=text_encoder.engine"] and len(text) == 5
    refused = subprocess.run(["bash", str(script)], env={**env, "PRECISION": "int8"}, capture_output=True, text=True, timeout=30, check=False)
    assert refused.returncode == 2 and "builds fp16|fp32" in refused.stderr


@real_data
def test_jetson_runner_check_and_encode_with_onnxruntime_backend(bundle, tmp_path):
    path, _ = bundle
    run = lambda *args: subprocess.run([sys.executable, str(path / "runner.py"), *args],
                                       capture_output=True, text=True, timeout=60, check=False)
    done = run("check", "--backend", "onnxruntime")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["passed"] and report["tokens_equal"] and report["text"]["max_abs_diff"] < TEXT_TOL
    assert report["image"]["cosine"] > 0.999

    done = run("encode", "road,car,sky", "--out", str(tmp_path / "e.npy"), "--backend", "onnxruntime")
    assert done.returncode == 0, done.stderr
    seg, _ = build_segmentor(TINY_VIT, "none")
    np.testing.assert_allclose(np.load(tmp_path / "e.npy"), seg.encode_classes(["road", "car", "sky"]).numpy(),
                               atol=TEXT_TOL, rtol=0)
    assert "--backend tensorrt" in run("check").stderr  # one line, not a traceback, where TensorRT is missing

    # the check logic fails a wrong engine: load the runner module and feed it corrupted expectations
    sys.path.insert(0, str(path))
    try:
        import runner as bundle_runner
    finally:
        sys.path.remove(str(path))
    b = bundle_runner.Bundle("onnxruntime", root=str(path))
    expected = np.load(path / "sample_logits.npy")
    tol = b.manifest["tolerances"]["image"]["fp16"]
    assert bundle_runner.compare(expected, expected + 0.01, tol)["passed"]
    bad = bundle_runner.compare(expected, expected[:, ::-1].copy(), tol)
    assert not bad["passed"] and [f.split()[0] for f in bad["failures"]][:1] == ["max_abs_diff"]
    assert not bundle_runner.compare(expected, expected[:, :3], tol)["passed"]


@real_data
def test_load_runner_encode_classes_uses_the_text_graph(bundle):
    from opentrans.deploy import load_runner

    path, _ = bundle
    runner = load_runner(path)
    assert runner.text_encoder is not None and runner.text_encoder.path.name == "text_encoder.onnx"
    seg, _ = build_segmentor(TINY_VIT, "none")
    names = ["road", "bicyclist", "traffic cone"]
    np.testing.assert_allclose(runner.encode_classes(names), seg.encode_classes(names).numpy(), atol=TEXT_TOL, rtol=0)
