"""The Python API (opentrans.api) as a notebook uses it: tiny random-init ViT, real CamVid images."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import CAMVID, CAMVID_SPEC, TINY_VIT, real_data

from opentrans import api
from opentrans.errors import OpenTransError


@real_data
def test_notebook_session_load_prune_finetune_deploy_evaluate_segment(tmp_path):
    model = api.load_model(TINY_VIT)
    alphas = api.analyze(model)["opentrans"]
    assert alphas.layers and all(np.isfinite(layer.alpha) for layer in alphas.layers)

    report = api.prune(model, 0.5, round_to=4)
    assert report["gmacs_after"] < report["gmacs_before"] and model.spec.lineage[-1] == "prune"
    before = {k: v.clone() for k, v in model.segmentor.state_dict().items()}
    losses = api.finetune(model, CAMVID_SPEC, steps=2, batch_size=2, train_limit=4)
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert any(not (model.segmentor.state_dict()[k] == v).all() for k, v in before.items())  # it trained

    torch_eval = api.evaluate(model, CAMVID_SPEC, limit=2)
    build = api.deploy(model, "onnx", "fp32", CAMVID_SPEC, tmp_path / "onnx", parity_limit=1)
    assert build.figures["pixel_agreement"] >= 99.5 and (build.path / "build.json").exists()
    build_eval = api.evaluate(build, CAMVID_SPEC, limit=2)
    assert build_eval["miou"] == pytest.approx(torch_eval["miou"], abs=0.5)

    image = sorted((CAMVID / "test").iterdir())[0]
    labels = api.segment(model, image, ["road", "car", "sky"])
    assert labels.shape == (360, 480) and set(np.unique(labels)) <= {0, 1, 2}
    assert (api.segment(build, image, ["road", "car", "sky"]) == labels).mean() > 0.99


@real_data
def test_segment_refuses_duplicate_classes_and_foreign_objects():
    model = api.load_model(TINY_VIT)
    image = sorted((CAMVID / "test").iterdir())[0]
    with pytest.raises(OpenTransError, match="duplicate class names"):
        api.segment(model, image, ["road", "road"])
    with pytest.raises(OpenTransError, match="expected an api.Model or api.Build"):
        api.evaluate("ViT-B-16", CAMVID_SPEC)


def test_load_model_takes_or_builds_a_model_source(tmp_path):
    from opentrans.models.source import ModelSource

    assert api.model_source(tmp_path) == ModelSource(from_dir=tmp_path)
    assert api.model_source(TINY_VIT, image_size=(64, 64)) == ModelSource(model=TINY_VIT, image_size=(64, 64))
    model = api.load_model(ModelSource(model=TINY_VIT, dense_mode="sclip"))
    assert model.segmentor.dense_mode == model.spec.dense_mode == "sclip"
    assert api.load_model(TINY_VIT, dense_mode="naclip").spec.dense_mode == "naclip"
    with pytest.raises(OpenTransError, match="unknown dense mode"):
        api.load_model(TINY_VIT, dense_mode="gem")
