"""The command line as a user runs it: the whole pipeline on a tiny model and real CamVid images."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from opentrans.cli import cli
from conftest import CAMVID, CAMVID_SPEC, TINY_VIT, real_data

RECIPE = f"""
name: tiny
model: {TINY_VIT}
pretrained: none
data: {CAMVID_SPEC}
analyze: {{}}
prune: {{sparsity: 0.5, round_to: 4}}
finetune: {{steps: 3, batch_size: 2, train_limit: 4, val_limit: 2}}
deploy:
  builds:
    - {{target: onnx, precision: fp32}}
    - {{target: openvino, precision: int8}}
    - {{target: jetson, precision: fp16}}
  parity_limit: 2
  calib_size: 4
bench: {{limit: 2, warmup: 1, repeats: 2}}
"""


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    recipe = root / "tiny.yaml"
    recipe.write_text(RECIPE)
    result = invoke("run", recipe, "--runs-root", root)
    assert result.exit_code == 0, result.output
    return root / "tiny", recipe, result.output


@real_data
def test_run_writes_every_stage(tiny_run):
    run_dir, _, output = tiny_run
    for stage in ("base", "analyze", "prune", "finetune", "deploy/onnx-fp32", "deploy/openvino-int8", "deploy/jetson-fp16",
                  "bench"):
        manifest = json.loads((run_dir / stage / "manifest.json").read_text())
        assert manifest["status"] == "complete", stage
        assert manifest["weights"] == "random-init weights", stage
        assert manifest["wall_time_s"] >= 0
        for out in manifest["outputs"]:
            assert (run_dir / stage / out["path"]).exists() or (run_dir / out["path"]).exists()
    analyze = json.loads((run_dir / "analyze" / "manifest.json").read_text())
    assert analyze["wall_time_s"] >= analyze["figures"]["seconds"]  # the whole stage is timed, analysis included
    report = (run_dir / "report.md").read_text()
    assert "random-init weights" in report and "openvino-int8" in report
    assert f"report: {run_dir / 'report.md'}" in output
    bench = json.loads((run_dir / "bench" / "bench.json").read_text())
    backends = {r["backend"] for r in bench["rows"]}
    assert {"torch-fp32", "onnxruntime-fp32"} <= backends and any("int8" in b for b in backends)
    names = [r["name"] for r in bench["rows"]]
    assert any(n.startswith("tiny/base") for n in names) and any(n.startswith("tiny/prune") for n in names)
    assert bench["header"]["reference"].startswith(str(run_dir / "base"))
    int8 = next(r for r in bench["rows"] if "int8" in r["backend"])
    parity = json.loads((run_dir / "deploy" / "openvino-int8" / "parity.json").read_text())
    assert int8["parity_agreement"] == pytest.approx(parity["figures"]["pixel_agreement"])
    assert next(r for r in bench["rows"] if r["name"].startswith("tiny/base"))["parity_agreement"] is None
    assert all(r["median_ms"] > 0 and 0 <= r["miou"] <= 100 for r in bench["rows"])


@real_data
def test_rerun_skips_finished_stages(tiny_run):
    run_dir, recipe, _ = tiny_run
    before = (run_dir / "prune" / "model.safetensors").stat().st_mtime_ns
    result = invoke("run", recipe, "--runs-root", run_dir.parent)
    assert result.exit_code == 0, result.output
    assert result.output.count("[skip]") == 8 and "[run ]" not in result.output
    assert (run_dir / "prune" / "model.safetensors").stat().st_mtime_ns == before


@real_data
def test_eval_and_segment_on_artifacts(tiny_run, tmp_path):
    run_dir, _, _ = tiny_run
    for artifact in (run_dir / "finetune", run_dir / "deploy" / "openvino-int8"):
        result = invoke("eval", "--from", artifact, "--data", CAMVID_SPEC, "--limit", 2, "--out", tmp_path / "m.json")
        assert result.exit_code == 0, result.output
        metrics = json.loads((tmp_path / "m.json").read_text())
        assert metrics["images"] == 2 and 0 <= metrics["miou"] <= 100
        assert f"mIoU {metrics['miou']:.2f} %" in result.output
    image = sorted((CAMVID / "test").iterdir())[0]
    out = tmp_path / "overlay.png"
    result = invoke("segment", image, "--classes", "road,car,sky", "--from", run_dir / "finetune", "--out", out)
    assert result.exit_code == 0, result.output
    overlay = Image.open(out)
    assert overlay.width == 480 and overlay.height > 360  # the image plus a legend below it
    assert not np.array_equal(np.asarray(overlay)[:360], np.asarray(Image.open(image).convert("RGB")))
    build = invoke("segment", image, "--classes", "road,car,sky", "--from", run_dir / "deploy" / "onnx-fp32",
                   "--out", tmp_path / "overlay_build.png")
    assert build.exit_code == 0, build.output
    assert "classes encoded by the build's text-encoder graph" in build.output
    assert "classes encoded by the PyTorch text tower" in result.output
    # the build (same weights, its own text graph) labels the image like the PyTorch model it came from
    assert build.output.split("): ")[1] == result.output.split("): ")[1]


@real_data
def test_deploy_data_defaults_to_the_artifacts_recorded_dataset(tiny_run, tmp_path):
    """The card's own usage: ``opentrans deploy --from runs/x/finetune --target ...`` without --data."""
    run_dir, _, _ = tiny_run
    out = tmp_path / "onnx"
    result = invoke("deploy", "--from", run_dir / "finetune", "--target", "onnx", "--parity-limit", 1, "--out", out)
    assert result.exit_code == 0, result.output
    assert f"--data: {CAMVID_SPEC} (recorded in {run_dir / 'finetune'}/manifest.json)" in result.output
    assert json.loads((out / "manifest.json").read_text())["options"]["data"] == CAMVID_SPEC
    # a prune artifact records no dataset: one line, nothing written
    refused = CliRunner().invoke(cli, ["deploy", "--from", str(run_dir / "prune"), "--target", "onnx",
                                       "--out", str(tmp_path / "x")])
    assert refused.exit_code == 1 and "records no dataset" in refused.output
    assert refused.output.strip().count("\n") == 0 and not (tmp_path / "x").exists()


def test_bad_input_one_line_and_nothing_written(tmp_path):
    out = tmp_path / "prune"
    cmd = [sys.executable, "-m", "opentrans.cli", "prune", "--model", TINY_VIT, "--sparsity", "1.5", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("Error:") and "sparsity" in proc.stderr
    assert not out.exists()
    for args, message in [
        (["eval", "--model", TINY_VIT, "--data", "camvid:/nowhere"], "not a folder"),
        (["segment", str(tmp_path / "none.png"), "--classes", "a", "--model", TINY_VIT, "--out", str(tmp_path / "o.png")],
         "file not found"),
        (["run", str(tmp_path / "missing.yaml")], "recipe not found"),
        (["analyze", "--model", "ViT-Z-1", "--out", str(tmp_path / "a")], "unknown model"),
    ]:
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 1, (args, result.output)
        assert message in result.output and result.output.strip().count("\n") == 0, result.output


def test_every_verb_help_has_an_example():
    for verb in ("analyze", "prune", "finetune", "deploy", "bench", "eval", "segment", "run"):
        result = invoke(verb, "--help")
        assert result.exit_code == 0 and re.search(r"Examples?:\s+opentrans " + verb, result.output), result.output
