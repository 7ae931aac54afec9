"""``deploy --precision auto``: candidates per ISA, the choice rule, and a real auto build of the tiny ViT."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import CAMVID_SPEC, TINY_VIT, real_data

from opentrans.artifacts import load_manifest, read_json
from opentrans.deploy.auto import auto_candidates, choose
from opentrans.deploy.options import DeployOptions
from opentrans.deploy.stage import PARITY_THRESHOLDS, check_parity, deploy_stage
from opentrans.deploy.targets import load_runner, read_build
from opentrans.errors import OpenTransError
from opentrans.hardware import cpu_isa
from opentrans.models.source import ModelSource


def _row(precision, ms, failures=()):
    return {"precision": precision, "median_ms": None if failures else ms, "passed": not failures,
            "failures": list(failures)}


@pytest.mark.parametrize(("target", "native_bf16", "expected"), [
    ("openvino", False, ["fp32", "int8"]),  # bf16 emulated: never a candidate
    ("openvino", True, ["fp32", "bf16", "int8"]),
    ("onnx", True, ["fp32", "int8"]),  # ONNX Runtime's CPU provider has no bf16 inference hint
])
def test_candidates_follow_the_isa(target, native_bf16, expected):
    cands = auto_candidates(target, native_bf16)
    assert [c.precision for c in cands] == expected
    bf16 = [c for c in cands if c.precision == "bf16"]
    assert all(c.build_precision == "fp32" and c.inference_precision == "bf16" for c in bf16)


def test_auto_is_for_cpu_targets_only():
    with pytest.raises(OpenTransError, match="--precision auto: .* --target onnx or openvino \\(asked: jetson\\)"):
        auto_candidates("jetson", False)


def test_choose_keeps_the_fastest_passing_build():
    rows = [_row("fp32", 100.0), _row("bf16", 60.0, ["pixel_agreement 90 < 97"]), _row("int8", 80.0)]
    assert choose(rows) == "int8"
    assert [r["kept"] for r in rows] == [False, False, True]
    assert rows[0]["why"] == "slower than int8 (100.0 vs 80.0 ms)"
    assert rows[1]["why"].startswith("failed its parity gate: pixel_agreement")


def test_choose_never_keeps_a_build_slower_than_fp32():
    rows = [_row("fp32", 90.0), _row("int8", 101.0)]  # int8 without VNNI: slower (AMD EPYC, ViT-B-16)
    assert choose(rows) == "fp32"
    assert rows[1]["why"] == "slower than fp32 (101.0 vs 90.0 ms)"


def test_choose_refuses_when_fp32_fails():
    with pytest.raises(OpenTransError, match="the fp32 build failed its parity check \\(cosine 0.5 < 0.99999\\)"):
        choose([_row("fp32", 1.0, ["cosine 0.5 < 0.99999"]), _row("int8", 1.0)])


def test_bf16_gate_is_at_least_as_strict_as_fp16():
    assert PARITY_THRESHOLDS["bf16"] == PARITY_THRESHOLDS["fp16"]
    assert check_parity({"max_abs_diff": 0.03, "cosine": 0.9999, "pixel_agreement": 99.0,
                         "decided_agreement": 100.0}, "bf16") == []


@real_data
def test_auto_openvino_build_keeps_the_fastest_passing_candidate(tmp_path):
    out = tmp_path / "auto"
    figures = deploy_stage(ModelSource(model=TINY_VIT), DeployOptions(target="openvino", precision="auto", data=CAMVID_SPEC,
                                                                     parity_limit=2, calib_size=4), out)
    decision = read_json(out / "decision.json")
    rows = {r["precision"]: r for r in decision["candidates"]}
    assert list(rows) == [c.precision for c in auto_candidates("openvino", cpu_isa().native_bf16)]
    passing = {p: r["median_ms"] for p, r in rows.items() if r["passed"]}
    assert "fp32" in passing
    kept = decision["kept"]
    assert passing[kept] == min(passing.values()) <= passing["fp32"]  # never slower than fp32 in this measurement
    assert sum(r["kept"] for r in rows.values()) == 1 and rows[kept]["kept"]
    assert decision["cpu"] == cpu_isa().summary()

    build = read_build(out)
    assert build["precision"] == kept == figures["precision"]
    assert build["auto"] == {"file": "decision.json", "kept": kept,
                             "candidates": {p: r["median_ms"] for p, r in rows.items()}}
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no candidate folders left
    assert not (out / "model.onnx").exists()  # the IR replaced the export
    assert (out / "quant_report.json").exists() == (kept == "int8")
    manifest = load_manifest(out)
    assert manifest["figures"]["auto"][kept]["kept"] is True
    assert manifest["options"]["precision"] == "auto"
    parity = read_json(out / "parity.json")
    assert parity["figures"]["pixel_agreement"] == rows[kept]["figures"]["pixel_agreement"]
    assert check_parity(parity["figures"], kept) == []

    runner = load_runner(out)
    image = np.zeros((1, 3, *build["image_size"]), np.float32)
    assert runner(image, np.load(out / "text_embeds.npy")).shape[:2] == (1, len(json.loads((out / "classes.json")
                                                                                         .read_text())))
