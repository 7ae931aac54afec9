"""Recipe parsing and validation."""

import pytest

from opentrans.errors import OpenTransError
from opentrans.recipe import load_recipe
from conftest import ROOT


def test_quickstart_recipe_parses():
    r = load_recipe(ROOT / "recipes" / "quickstart.yaml")
    assert r.stages == ["analyze", "prune", "finetune", "deploy", "bench"]
    assert r.prune.sparsity == 0.5
    assert r.finetune.freeze_heavy_tail is True
    assert {(b.target, b.precision) for b in r.deploy.builds} >= {("onnx", "fp32"), ("openvino", "auto")}


@pytest.mark.parametrize("text, message", [
    ("name: x\nmodel: ViT-B-32\n", "missing required key 'data'"),
    ("name: x\nmodel: m\ndata: d\nprune: {sparsity: 0.5, speed: 3}\n", "unknown key.*speed"),
    ("name: x\nmodel: m\ndata: d\ndeploy: {builds: [{target: onnx, bits: 4}]}\n", "deploy.builds: unknown key.*bits"),
    ("name: x\nmodel: m\ndata: d\nprune: [1, 2]\n", "expected a mapping"),
    ("name: ../evil\nmodel: m\ndata: d\n", "must be letters"),
    ("name: x\n  model: : :\n", "invalid YAML"),
])
def test_bad_recipes(tmp_path, text, message):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(OpenTransError, match=message):
        load_recipe(path)


def test_missing_recipe(tmp_path):
    with pytest.raises(OpenTransError, match="recipe not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_stage_left_out_is_not_run(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\nmodel: m\ndata: d\nprune: {}\n")
    r = load_recipe(path)
    assert r.stages == ["prune"] and r.prune.sparsity == 0.5 and r.finetune is None
