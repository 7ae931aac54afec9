"""Untrusted input at the command line: checkpoints, artifacts, images, text files and option values that come
from anyone. Each probe checks the exit status, a one-line ``Error:`` message, and that nothing was written or
damaged."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from opentrans.cli import cli
from conftest import CAMVID_SPEC, TINY_VIT, real_data


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_one_line_error(result, *fragments, exit_code=1):
    """``result`` exited with ``exit_code`` and printed one ``Error:`` line holding every fragment."""
    assert result.exit_code == exit_code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    text = result.output.strip()
    assert text.count("\n") == 0 and text.startswith("Error:"), text
    for fragment in fragments:
        assert fragment in text, text


def tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` with its bytes (to show nothing changed)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# --- 1. checkpoints are never unpickled by default ------------------------------------------------------------

class Evil:
    """Unpickling this runs a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".pth"])
def test_pickled_checkpoint_is_refused(tmp_path, monkeypatch, suffix):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "PWNED"
    evil = tmp_path / f"evil{suffix}"
    torch.save({"state_dict": Evil(marker)}, evil)
    result = invoke("eval", "--model", TINY_VIT, "--pretrained", evil, "--data", CAMVID_SPEC, "--limit", 1)
    assert_one_line_error(result, str(evil), "--allow-pickle", "pickled")
    assert not marker.exists()
    out = tmp_path / "prune"
    result = invoke("prune", "--model", TINY_VIT, "--pretrained", evil, "--sparsity", 0.5, "--out", out)
    assert_one_line_error(result, "--allow-pickle")
    assert not marker.exists() and not out.exists()


def test_allow_pickle_is_on_every_verb_with_pretrained_and_says_the_risk():
    for verb in ("analyze", "prune", "finetune", "deploy", "eval", "segment"):
        result = invoke(verb, "--help")
        assert result.exit_code == 0 and "--allow-pickle" in result.output, verb
        assert "runs any code" in " ".join(result.output.split()), verb


def test_checkpoints_that_need_no_pickle_load(tmp_path):
    from safetensors.torch import save_file

    from opentrans.models.clip import create_architecture, load_clip, pickle_allowed

    model = create_architecture(TINY_VIT, seed=3)
    state = model.state_dict()
    plain, wrapped, safe, traced = (tmp_path / n for n in ("plain.pt", "wrapped.bin", "w.safetensors", "openai.pt"))
    torch.save(state, plain)
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, wrapped)
    save_file({k: v.contiguous() for k, v in state.items()}, str(safe))
    image = torch.randn(1, 3, *model.visual.image_size)
    with pytest.warns(Warning):  # torch.jit.trace's deprecation and tracer notices
        torch.jit.trace(model, (image, torch.zeros(1, 77, dtype=torch.long)), strict=False, check_trace=False).save(traced)
    for path in (plain, wrapped, safe, traced):
        loaded = load_clip(TINY_VIT, str(path))
        assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in state.items()), path
    # a training checkpoint that pickles its argparse options: refused, loaded with --allow-pickle
    with_args = tmp_path / "with_args.pt"
    torch.save({"state_dict": state, "args": argparse.Namespace(lr=0.1)}, with_args)
    from opentrans.errors import OpenTransError

    with pytest.raises(OpenTransError, match="--allow-pickle"):
        load_clip(TINY_VIT, str(with_args))
    with pickle_allowed(True):
        loaded = load_clip(TINY_VIT, str(with_args))
    assert torch.equal(loaded.model.state_dict()["logit_scale"], state["logit_scale"])


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04truncated zip"])
def test_garbage_checkpoint_is_one_line(tmp_path, content):
    for name in ("bad.pt", "bad.safetensors", "bad.bin"):
        path = tmp_path / name
        path.write_bytes(content)
        result = invoke("eval", "--model", TINY_VIT, "--pretrained", path, "--data", CAMVID_SPEC, "--limit", 1)
        assert_one_line_error(result, str(path))


# --- 2./3. artifacts are input: --from directories are validated, verified and must be finished ----------------

@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished prune artifact and an ONNX fp32 build made from it (module-scoped; tests copy before damaging)."""
    root = tmp_path_factory.mktemp("finished")
    result = invoke("prune", "--model", TINY_VIT, "--sparsity", 0.5, "--round-to", 4, "--latency-repeats", 0,
                    "--out", root / "prune")
    assert result.exit_code == 0, result.output
    result = invoke("deploy", "--from", root / "prune", "--target", "onnx", "--data", CAMVID_SPEC, "--parity-limit", 1,
                    "--out", root / "onnx")
    assert result.exit_code == 0, result.output
    return root


def copy_artifact(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def tamper(artifact: Path, name: str, content: bytes, rehash: bool = True) -> None:
    """Replace ``artifact/name``; with ``rehash`` also record its new sha256 in the manifest, as a crafted directory
    would (so the checks behind the sha256 comparison are reached)."""
    import json

    from opentrans.artifacts import sha256

    (artifact / name).write_bytes(content)
    if rehash:
        manifest = json.loads((artifact / "manifest.json").read_text())
        for out in manifest["outputs"]:
            if out["path"] == name:
                out["sha256"] = sha256(artifact / name)
        (artifact / "manifest.json").write_text(json.dumps(manifest))


def eval_from(artifact: Path):
    return invoke("eval", "--from", artifact, "--data", CAMVID_SPEC, "--limit", 1)


def spec_variant(artifact: Path, edit) -> bytes:
    import json

    spec = json.loads((artifact / "model.json").read_text())
    edit(spec)
    return json.dumps(spec).encode()


def _set(key, value):
    return lambda spec: spec.__setitem__(key, value)


@real_data
@pytest.mark.parametrize("edit, message", [
    (lambda s: s["shapes"].__setitem__(next(iter(s["shapes"])), [-4, 16]), "outside [1, inf]"),
    (lambda s: s["shapes"].__setitem__(next(iter(s["shapes"])), [10 ** 9, 10 ** 9]), "does not fit its unpruned shape"),
    (lambda s: s.pop("image_size"), "missing key 'image_size'"),
    (_set("extra", 1), "unknown key 'extra'"),
    (_set("head_options", []), "head_options: expected an object, found a list"),
    (_set("shapes", [[1]]), "shapes: expected an object, found a list"),
    (_set("image_size", [100000, 100000]), "image_size[0]: 100000 is outside"),
    (_set("std", [0.2, 0.0, 0.2]), "std[1]"),
    (_set("model", "ViT-Z-99"), "unknown architecture"),
    (_set("head", "linear-but-not"), "head: 'linear-but-not' is not one of"),
    (_set("image_size", "64x64"), "image_size: expected a list, found a string"),
    (lambda s: s.__setitem__("head_options", {"hidden": 10 ** 12}), "head_options.hidden"),
])
def test_crafted_model_json_is_refused_before_building(finished, tmp_path, edit, message):
    artifact = copy_artifact(finished / "prune", tmp_path / "prune")
    tamper(artifact, "model.json", spec_variant(artifact, edit))
    before = tree(artifact)
    assert_one_line_error(eval_from(artifact), "model.json", message)
    assert tree(artifact) == before


@real_data
def test_head_options_that_would_allocate_terabytes_are_refused(finished, tmp_path):
    artifact = copy_artifact(finished / "prune", tmp_path / "prune")
    tamper(artifact, "model.json", spec_variant(artifact, lambda s: s.update(head="spt-seg",
                                                                             head_options={"hidden": 8192, "heads": 1})))
    result = eval_from(artifact)
    assert_one_line_error(result, "parameters, more than the whole")


@real_data
@pytest.mark.parametrize("content", [b"", b"\x00" * 7, None, b"pickle"])
def test_damaged_weights_are_one_line(finished, tmp_path, content):
    artifact = copy_artifact(finished / "prune", tmp_path / "prune")
    weights = artifact / "model.safetensors"
    if content is None:  # truncated
        content = weights.read_bytes()[: weights.stat().st_size // 2]
    elif content == b"pickle":
        buffer = __import__("io").BytesIO()
        torch.save({"a": torch.zeros(3)}, buffer)
        content = buffer.getvalue()
    tamper(artifact, "model.safetensors", content, rehash=False)
    assert_one_line_error(eval_from(artifact), "model.safetensors", "sha256 differs")
    tamper(artifact, "model.safetensors", content, rehash=True)  # a crafted directory: manifest agrees
    assert_one_line_error(eval_from(artifact), "model.safetensors", "not a readable safetensors file")


@real_data
def test_weights_of_other_shapes_are_one_line(finished, tmp_path):
    from safetensors.torch import load_file, save_file

    artifact = copy_artifact(finished / "prune", tmp_path / "prune")
    state = load_file(str(artifact / "model.safetensors"))
    name = next(k for k, v in state.items() if v.ndim == 2)
    state[name] = torch.zeros(3, 3)
    buffer = tmp_path / "w.safetensors"
    save_file(state, str(buffer))
    tamper(artifact, "model.safetensors", buffer.read_bytes())
    assert_one_line_error(eval_from(artifact), "does not match", name)


@real_data
@pytest.mark.parametrize("how", ["no manifest", "running", "not a manifest"])
def test_unfinished_stage_is_refused(finished, tmp_path, how):
    import json

    artifact = copy_artifact(finished / "prune", tmp_path / "prune")
    manifest = artifact / "manifest.json"
    if how == "no manifest":
        manifest.unlink()
        message = "no manifest.json"
    elif how == "running":
        manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "status": "running"}))
        message = "did not finish"
    else:
        manifest.write_text("[1, 2]")
        message = "expected an object, found a list"
    assert_one_line_error(eval_from(artifact), message)
    out = tmp_path / "finetune"
    result = invoke("finetune", "--from", artifact, "--data", CAMVID_SPEC, "--steps", 1, "--limit", 1, "--out", out)
    assert_one_line_error(result, message)
    assert not out.exists()


@real_data
def test_damaged_build_is_one_line_in_eval_segment_and_bench(finished, tmp_path):
    from conftest import CAMVID

    build = copy_artifact(finished / "onnx", tmp_path / "onnx")
    copy_artifact(finished / "prune", tmp_path / "prune")  # the build's source model, at the same relative place
    onnx_bytes = (build / "model.onnx").read_bytes()
    image = sorted((CAMVID / "test").iterdir())[0]
    for rehash, message in ((False, "sha256 differs"), (True, "ONNX Runtime cannot load it")):
        tamper(build, "model.onnx", onnx_bytes[: len(onnx_bytes) // 3], rehash=rehash)
        assert_one_line_error(eval_from(build), "model.onnx", message)
        result = invoke("segment", image, "--classes", "road,sky", "--from", build, "--out", tmp_path / "o.png")
        assert_one_line_error(result, "model.onnx", message)
        assert not (tmp_path / "o.png").exists()
        result = invoke("bench", build, "--reference", tmp_path / "prune", "--data", CAMVID_SPEC, "--limit", 1,
                        "--repeats", 1, "--warmup", 0, "--no-roofline", "--out", tmp_path / "bench")
        assert_one_line_error(result, "model.onnx", message)


@real_data
@pytest.mark.parametrize("edit, message", [
    (lambda b: b.__setitem__("file", "../../prune/model.safetensors"), "must be a path inside"),
    (lambda b: b.__setitem__("file", "/etc/passwd"), "must be a path inside"),
    (lambda b: b.pop("spec"), "missing key 'spec'"),
    (lambda b: b.__setitem__("precision", "int4"), "precision: 'int4' is not one of"),
    (lambda b: b.__setitem__("class_names", {"a": 1}), "class_names: expected a list"),
    (lambda b: b["spec"].__setitem__("image_size", [-1, 64]), "spec: image_size[0]"),
])
def test_crafted_build_json_is_refused(finished, tmp_path, edit, message):
    import json

    build = copy_artifact(finished / "onnx", tmp_path / "onnx")
    raw = json.loads((build / "build.json").read_text())
    edit(raw)
    tamper(build, "build.json", json.dumps(raw).encode())
    assert_one_line_error(eval_from(build), "build.json", message)


# --- 4. decompression bombs ----------------------------------------------------------------------------------

def png_header_only(path: Path, width: int, height: int) -> Path:
    """A tiny PNG file declaring ``width`` x ``height`` pixels (a decompression bomb's header)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))
    return path


def test_decompression_bomb_is_one_line_with_the_limit_and_how_to_raise_it(tmp_path, monkeypatch):
    bomb = png_header_only(tmp_path / "bomb.png", 20000, 20000)
    out = tmp_path / "overlay.png"
    result = invoke("segment", bomb, "--classes", "road,sky", "--model", TINY_VIT, "--out", out)
    assert_one_line_error(result, str(bomb), "20000x20000", "89,478,485", "OPENTRANS_MAX_IMAGE_PIXELS")
    assert not out.exists()
    monkeypatch.setenv("OPENTRANS_MAX_IMAGE_PIXELS", "1000")
    small = png_header_only(tmp_path / "small.png", 40, 40)
    assert_one_line_error(invoke("segment", small, "--classes", "a", "--model", TINY_VIT, "--out", out), "1,000")
    monkeypatch.setenv("OPENTRANS_MAX_IMAGE_PIXELS", "lots")
    assert_one_line_error(invoke("segment", small, "--classes", "a", "--model", TINY_VIT, "--out", out),
                          "OPENTRANS_MAX_IMAGE_PIXELS=lots")


# --- 6.-9. user text files, option values, class lists, label values ---------------------------------------------

def folder_dataset(root: Path, classes: str | bytes = "road\nsky\n", mask_value=None, n: int = 2) -> str:
    """A ``folder:`` dataset of ``n`` real CamVid val images with masks (CamVid labels, or all ``mask_value``)."""
    import numpy as np
    from PIL import Image

    from conftest import CAMVID

    pairs = [line.split() for line in (CAMVID / "val.txt").read_text().splitlines()[:n]]
    for split in ("train", "val"):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
        for image, mask in pairs:
            image = CAMVID / image.replace("/SegNet/CamVid/", "")
            mask = np.asarray(Image.open(CAMVID / mask.replace("/SegNet/CamVid/", "")))
            if mask_value is not None:
                mask = np.full_like(mask, mask_value)
            Image.open(image).save(root / split / "images" / image.name)
            Image.fromarray(np.minimum(mask, 1) if mask_value is None else mask).save(root / split / "masks" / f"{image.stem}.png")
    (root / "classes.txt").write_bytes(classes.encode() if isinstance(classes, str) else classes)
    return f"folder:{root}"


@real_data
def test_text_files_that_are_not_utf8_are_one_line(tmp_path):
    data = folder_dataset(tmp_path / "d", classes="road\nstra\xdfe\n".encode("latin-1"))
    assert_one_line_error(invoke("eval", "--model", TINY_VIT, "--data", data), "classes.txt", "not UTF-8", "line 2")
    camvid_copy = tmp_path / "camvid"
    camvid_copy.mkdir()
    (camvid_copy / "val.txt").write_bytes(b"caf\xe9.png x.png\n")
    assert_one_line_error(invoke("eval", "--model", TINY_VIT, "--data", f"camvid:{camvid_copy}"), "val.txt", "not UTF-8")
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"road\n\xff\xfesky\n")
    result = invoke("eval", "--model", TINY_VIT, "--data", CAMVID_SPEC, "--limit", 1, "--prompt-sets", prompts)
    assert_one_line_error(result, "prompts.txt", "not UTF-8")
    templates = tmp_path / "templates.txt"
    templates.write_bytes(b"a photo of a {}\xe9.\n")
    result = invoke("eval", "--model", TINY_VIT, "--data", CAMVID_SPEC, "--limit", 1, "--templates", templates)
    assert_one_line_error(result, "templates.txt", "not UTF-8")
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(b"name: caf\xe9\n")
    assert_one_line_error(invoke("run", recipe, "--runs-root", tmp_path / "runs"), "r.yaml", "not UTF-8")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args", [
    ["deploy", "--model", TINY_VIT, "--target", "openvino", "--precision", "int8", "--data", CAMVID_SPEC, "--max-drop", "nan"],
    ["deploy", "--model", TINY_VIT, "--target", "onnx", "--data", CAMVID_SPEC, "--smooth-quant-alpha", "inf"],
    ["prune", "--model", TINY_VIT, "--sparsity", "nan"],
    ["prune", "--model", TINY_VIT, "--method", "imp", "--sparsity", "0.5", "--rate", "-inf"],
    ["prune", "--model", TINY_VIT, "--sparsity", "0.5", "--lr", "NaN"],
    ["finetune", "--model", TINY_VIT, "--data", CAMVID_SPEC, "--lr", "inf"],
    ["finetune", "--model", TINY_VIT, "--data", CAMVID_SPEC, "--freeze-fraction", "nan"],
    ["eval", "--model", TINY_VIT, "--data", CAMVID_SPEC, "--bg-threshold", "nan"],
])
def test_float_options_refuse_nan_and_inf(tmp_path, args):
    out = tmp_path / "out"
    result = invoke(*args, *(["--out", out] if args[0] != "eval" else []))
    assert result.exit_code == 2, result.output  # a usage error, as click reports it
    assert "Error: Invalid value for" in result.output and ("finite" in result.output or "range" in result.output)
    assert not out.exists()


@real_data
def test_duplicate_class_names_are_refused(tmp_path):
    out = tmp_path / "overlay.png"
    image = sorted((__import__("tests.conftest", fromlist=["CAMVID"]).CAMVID / "test").iterdir())[0]
    result = invoke("segment", image, "--classes", "road,sky,road", "--model", TINY_VIT, "--out", out)
    assert_one_line_error(result, "--classes", "'road' appears twice", "positions 1 and 3")
    assert not out.exists()
    data = folder_dataset(tmp_path / "d", classes="road\nsky\nroad\n")
    assert_one_line_error(invoke("eval", "--model", TINY_VIT, "--data", data), "classes.txt", "'road' appears twice")


@real_data
def test_mask_values_beyond_the_classes_are_counted_and_mostly_unknown_masks_refused(tmp_path):
    import json

    data = folder_dataset(tmp_path / "ok", classes="road\nsky\n")  # masks 0/1: every value a class
    result = invoke("eval", "--model", TINY_VIT, "--data", data, "--out", tmp_path / "ok.json")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "ok.json").read_text())["unknown_label_pixels"] == 0
    assert "ignored:" not in result.output
    data = folder_dataset(tmp_path / "bad", classes="road\nsky\n", mask_value=7)  # every pixel an unknown value
    out = tmp_path / "bad.json"
    assert_one_line_error(invoke("eval", "--model", TINY_VIT, "--data", data, "--out", out), "masks", "100 %", "e.g. 7")
    assert not out.exists()
    data = folder_dataset(tmp_path / "some", classes="road\nsky\n", n=2)
    mask = next((tmp_path / "some" / "val" / "masks").iterdir())
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(mask)).copy()
    pixels[:10] = 9  # a few rows of an unknown value: counted and reported, not refused
    Image.fromarray(pixels).save(mask)
    result = invoke("eval", "--model", TINY_VIT, "--data", data, "--out", tmp_path / "some.json")
    assert result.exit_code == 0, result.output
    unknown = json.loads((tmp_path / "some.json").read_text())["unknown_label_pixels"]
    assert unknown == 10 * pixels.shape[1] and f"ignored: {unknown} mask pixels" in result.output


# --- 10. errors start a line of their own; no CUDA notice on CPU-only machines ------------------------------------

@real_data
def test_error_after_a_progress_bar_starts_its_own_line(tmp_path):
    import re

    data = folder_dataset(tmp_path / "d", classes="road\nsky\n")
    image = sorted((tmp_path / "d" / "val" / "images").iterdir())[0]
    image.write_bytes(b"not an image")  # read inside the evaluation loop, after the bar appeared
    result = invoke("eval", "--model", TINY_VIT, "--data", data)
    assert result.exit_code == 1, result.output
    assert "|" in result.output  # the bar was drawn
    assert re.search(r"\nError: .*cannot read image", result.output), repr(result.output)  # own line, in a log too


def test_cuda_runtime_notice_is_filtered():
    import logging

    import opentrans.cli  # noqa: F401  (installs the filter)

    logger = logging.getLogger("torch.utils.cpp_extension")
    record = logger.makeRecord(logger.name, logging.WARNING, __file__, 0, "No CUDA runtime is found, using "
                               "CUDA_HOME='%s'", ("/usr/local/cuda",), None)
    assert not logger.filter(record)
    other = logger.makeRecord(logger.name, logging.WARNING, __file__, 0, "something else", (), None)
    assert logger.filter(other)


@real_data
@pytest.mark.parametrize("target, precision", [("openvino", "fp32"), ("jetson", "fp16")])
def test_verified_builds_of_other_targets_still_load(finished, tmp_path, target, precision):
    out = tmp_path / f"{target}-{precision}"
    result = invoke("deploy", "--from", finished / "prune", "--target", target, "--precision", precision,
                    "--data", CAMVID_SPEC, "--parity-limit", 1, "--out", out)
    assert result.exit_code == 0, result.output
    result = eval_from(out)
    assert result.exit_code == 0 and "mIoU" in result.output, result.output


# --- 5. input sizes far beyond memory are refused before allocating -------------------------------------------------

@real_data
@pytest.mark.parametrize("args, what", [
    (["eval", "--model", TINY_VIT, "--data", CAMVID_SPEC, "--limit", 1, "--image-size", "20000x20000"], "--image-size"),
    (["eval", "--model", TINY_VIT, "--data", CAMVID_SPEC, "--limit", 1, "--window", "20000x20000"], "--window"),
    (["eval", "--model", TINY_VIT, "--data", CAMVID_SPEC, "--limit", 1, "--short-side", "50000"], "--short-side"),
    (["eval", "--model", "opentrans-tiny-rn", "--data", CAMVID_SPEC, "--limit", 1, "--image-size", "99840x99840"],
     "--image-size"),
])
def test_input_sizes_beyond_memory_are_one_line(args, what):
    result = invoke(*args)
    assert_one_line_error(result, what, "GiB", "available; choose a smaller size")


def test_prune_at_an_impossible_size_writes_nothing(tmp_path):
    out = tmp_path / "prune"
    result = invoke("prune", "--model", TINY_VIT, "--sparsity", 0.5, "--image-size", "16000x16000", "--out", out)
    assert_one_line_error(result, "--image-size 16000x16000")
    assert not out.exists()


def test_memory_estimate_passes_ordinary_sizes(tiny_vit, tiny_rn):
    from opentrans.models.segmentor import check_inference_memory

    for seg, _ in (tiny_vit, tiny_rn):
        check_inference_memory(seg, (448, 448), "--image-size 448x448")  # no error
        needed, _ = seg.inference_bytes((448, 448))
        assert 0 < needed < 2**30


# --- 12.-15. output directories: user files, failed reruns, full disks, read-only places, files as --out -----------

@real_data
def test_deploy_refuses_to_replace_a_build_holding_user_files(finished, tmp_path):
    build = copy_artifact(finished / "onnx", tmp_path / "onnx")
    (build / "notes.txt").write_text("my measurements\n")
    before = tree(build)
    result = invoke("deploy", "--from", finished / "prune", "--target", "onnx", "--data", CAMVID_SPEC,
                    "--parity-limit", 1, "--out", build)
    assert_one_line_error(result, str(build), "notes.txt", "did not write")
    assert tree(build) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary build left beside it


@real_data
def test_prune_rerun_on_a_full_disk_keeps_the_finished_artifact(finished, tmp_path, monkeypatch):
    import errno

    import safetensors.torch

    out = copy_artifact(finished / "prune", tmp_path / "prune")
    before = tree(out)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    result = invoke("prune", "--model", TINY_VIT, "--sparsity", 0.25, "--round-to", 4, "--latency-repeats", 0,
                    "--out", out)
    assert_one_line_error(result, "No space left on device: ".lower(), "model.safetensors")
    assert tree(out) == before  # the old manifest and model are untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prune"]  # the staging directory is gone
    monkeypatch.undo()
    assert eval_from(out).exit_code == 0  # still a finished, verified artifact


@real_data
def test_prune_rerun_replaces_a_finished_artifact_and_refuses_user_files(finished, tmp_path):
    import json

    out = copy_artifact(finished / "prune", tmp_path / "prune")
    result = invoke("prune", "--model", TINY_VIT, "--sparsity", 0.25, "--round-to", 4, "--latency-repeats", 0,
                    "--out", out)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "manifest.json").read_text())["options"]["sparsity"] == 0.25
    (out / "mine.txt").write_text("x")
    result = invoke("prune", "--model", TINY_VIT, "--sparsity", 0.5, "--round-to", 4, "--latency-repeats", 0,
                    "--out", out)
    assert_one_line_error(result, "mine.txt")
    assert (out / "mine.txt").exists()


@real_data
def test_stale_staging_directories_of_dead_processes_are_removed(finished, tmp_path):
    stale = tmp_path / ".prune.999999999.abcd.stage-tmp"  # no such pid
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    result = invoke("prune", "--model", TINY_VIT, "--sparsity", 0.5, "--round-to", 4, "--latency-repeats", 0,
                    "--out", tmp_path / "prune")
    assert result.exit_code == 0, result.output
    assert not stale.exists()


@real_data
def test_out_naming_a_file_or_an_unwritable_place_is_one_line(tmp_path):
    existing = tmp_path / "file.txt"
    existing.write_text("keep me")
    for args in (["prune", "--model", TINY_VIT, "--sparsity", 0.5, "--latency-repeats", 0],
                 ["analyze", "--model", TINY_VIT],
                 ["deploy", "--model", TINY_VIT, "--target", "onnx", "--data", CAMVID_SPEC, "--parity-limit", 1]):
        result = invoke(*args, "--out", existing)
        assert_one_line_error(result, str(existing))
        assert existing.read_text() == "keep me"
    if os.geteuid() == 0:  # root writes through permission bits; /sys refuses every mkdir
        unwritable = Path("/sys/opentrans-test/out")
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        unwritable = locked / "out"
    for args in (["analyze", "--model", TINY_VIT], ["prune", "--model", TINY_VIT, "--sparsity", 0.5, "--latency-repeats", 0]):
        result = invoke(*args, "--out", unwritable)
        assert_one_line_error(result, "not permitted" if os.geteuid() == 0 else "ermission denied")
    result = invoke("eval", "--model", TINY_VIT, "--data", CAMVID_SPEC, "--limit", 1, "--out", unwritable / "m.json")
    assert_one_line_error(result, "m.json")


# --- 16.-17. leftovers of killed runs are removed; bench workers die with their parent ----------------------------

@real_data
def test_stale_deploy_directories_of_dead_processes_are_removed(finished, tmp_path):
    stale = tmp_path / ".onnx.999999999.abcd.deploy-tmp"
    stale.mkdir()
    (stale / "model.onnx").write_bytes(b"half")
    result = invoke("deploy", "--from", finished / "prune", "--target", "onnx", "--data", CAMVID_SPEC,
                    "--parity-limit", 1, "--out", tmp_path / "onnx")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]


WORKER_PARENT = """
import concurrent.futures, multiprocessing, os, sys, time
from opentrans.bench.worker import die_with_parent
if __name__ == "__main__":
    ctx = multiprocessing.get_context("spawn")
    pool = concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx, initializer=die_with_parent,
                                                  initargs=(os.getpid(),))
    pid = pool.submit(os.getpid).result()
    pool.submit(time.sleep, 600)  # the worker is busy measuring, not waiting on its queue
    time.sleep(1)
    print(pid, flush=True)
    time.sleep(600)
"""


def test_bench_workers_die_with_their_parent(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    script = tmp_path / "parent.py"
    script.write_text(WORKER_PARENT)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    worker = int(parent.stdout.readline())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            break
        if Path(f"/proc/{worker}/stat").exists() and Path(f"/proc/{worker}/stat").read_text().split()[2] == "Z":
            break  # dead, waiting to be reaped by init
        time.sleep(0.2)
    else:
        os.kill(worker, signal.SIGKILL)
        pytest.fail("the bench worker outlived its killed parent")


# --- 18. reruns are deterministic -----------------------------------------------------------------------------------

@real_data
def test_prune_reruns_write_identical_artifacts(finished, tmp_path):
    from opentrans.artifacts import sha256

    again = tmp_path / "again"
    result = invoke("prune", "--model", TINY_VIT, "--sparsity", 0.5, "--round-to", 4, "--latency-repeats", 0,
                    "--out", again)
    assert result.exit_code == 0, result.output
    for name in ("model.safetensors", "model.json", "kept_indices.json"):
        assert sha256(again / name) == sha256(finished / "prune" / name), name


def test_recipe_floats_refuse_nan_and_inf(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: r\nmodel: {TINY_VIT}\ndata: {CAMVID_SPEC}\nprune: {{sparsity: .nan}}\n")
    assert_one_line_error(invoke("run", recipe, "--runs-root", tmp_path / "runs"), "prune: sparsity: nan")
    assert not (tmp_path / "runs").exists()
