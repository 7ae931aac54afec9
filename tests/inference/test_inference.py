"""Sliding windows, short-side resize, prompt sets + background threshold, text-embedding cache, and
`opentrans eval` across dense modes (table, JSON, plot) on the real CamVid and COCO-Object mini."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import CAMVID_SPEC, COCO_OBJECT, TINY_VIT, real_data
from opentrans.cli import cli
from opentrans.data import open_dataset
from opentrans.errors import OpenTransError
from opentrans.inference.sliding import (
    PromptSetRunner,
    ShortSideDataset,
    SlidingWindowRunner,
    cached_text_embeddings,
    read_prompt_sets,
    window_origins,
)


class _Recorder:
    """A runner whose logits encode the absolute pixel position (so window placement is checkable)."""

    name = "recorder"

    def __init__(self, window, origin_log):
        self.window, self.log = window, origin_log

    def __call__(self, images, text):
        assert images.shape[-2:] == self.window
        self.log.append(images[0, 0, 0, 0])
        # channel 0: the image's own channel 0 (pixel ids), channel 1: ones
        return np.stack([images[:, 0], np.ones_like(images[:, 0])], axis=1)


def test_window_origins_cover_the_axis():
    assert window_origins(336, 224, 112) == [0, 112]
    assert window_origins(448, 224, 112) == [0, 112, 224]
    assert window_origins(500, 224, 112) == [0, 112, 224, 276]  # last crop flush with the border
    assert window_origins(100, 224, 112) == [0]


def test_sliding_window_places_crops_and_averages():
    h, w = 7, 11
    ids = np.arange(h * w, dtype=np.float32).reshape(1, 1, h, w).repeat(3, axis=1)
    log = []
    runner = SlidingWindowRunner(_Recorder((4, 6), log), window=(4, 6), stride=(3, 2))
    out = runner(ids, np.zeros((2, 5), np.float32))
    assert out.shape == (1, 2, h, w)
    np.testing.assert_allclose(out[0, 0], ids[0, 0])  # every crop returned its own pixels: average is exact
    np.testing.assert_allclose(out[0, 1], 1.0)
    assert len(log) == len(window_origins(h, 4, 3)) * len(window_origins(w, 6, 2))
    # an image smaller than the window is padded, and cropped back
    small = SlidingWindowRunner(_Recorder((8, 8), []), 8, 4)(ids[:, :, :5, :6], np.zeros((2, 5), np.float32))
    np.testing.assert_allclose(small[0, 0], ids[0, 0, :5, :6])
    with pytest.raises(OpenTransError, match="larger than --window"):
        SlidingWindowRunner(_Recorder((4, 4), []), 4, 5)


def test_sliding_window_matches_whole_image_when_window_is_the_image(tiny_vit, camvid_val):
    from opentrans.inference.evaluate import TorchRunner

    seg, spec = tiny_vit
    image = camvid_val[0][0][None].numpy()
    text = np.random.default_rng(0).standard_normal((3, seg.embed_dim)).astype(np.float32)
    whole = TorchRunner(seg)(image, text)
    slid = SlidingWindowRunner(TorchRunner(seg), spec.image_size, (16, 16))(image, text)
    np.testing.assert_allclose(slid, whole, rtol=1e-5, atol=1e-5)


@real_data
def test_short_side_dataset_keeps_aspect():
    ds = open_dataset(CAMVID_SPEC, "val", (64, 80), (0.5,) * 3, (0.25,) * 3, limit=2)
    short = ShortSideDataset.wrap(ds, 120)
    image, mask = short[0]
    assert image.shape == (3, 120, 160) and mask.shape == (360, 480)  # 360x480 -> 120x160, labels untouched
    assert short.class_names == ds.class_names and short.ignore_index == ds.ignore_index
    with pytest.raises(OpenTransError, match="short-side"):
        ShortSideDataset.wrap(ds, 0)


class _Fixed:
    name = "fixed"

    def __init__(self, logits):
        self.logits = logits

    def __call__(self, images, text):
        return self.logits


def test_prompt_sets_take_max_over_prompts_and_threshold_to_background():
    # 3 classes (0 = background with two prompts), 4 prompts, 1x1x3 pixels
    logits = np.log(np.array([[0.05, 0.30, 0.05], [0.50, 0.05, 0.05], [0.25, 0.30, 0.10], [0.20, 0.35, 0.80]],
                             dtype=np.float32))[None, :, None, :]  # (1, 4, 1, 3), columns sum to 1
    runner = PromptSetRunner(_Fixed(logits), [0, 0, 1, 2], 3)
    probs = np.exp(runner(None, np.zeros((4, 2), np.float32)))[0, :, 0]
    np.testing.assert_allclose(probs, [[0.50, 0.30, 0.05], [0.25, 0.30, 0.10], [0.20, 0.35, 0.80]], rtol=1e-5)
    labels = runner(None, np.zeros((4, 2), np.float32)).argmax(1)[0, 0]
    assert labels.tolist() == [0, 2, 2]  # pixel 1: background max(0.30, 0.05) ties class 1 only below class 2
    thr = PromptSetRunner(_Fixed(logits), [0, 0, 1, 2], 3, threshold=0.4)
    assert thr(None, np.zeros((4, 2), np.float32)).argmax(1)[0, 0].tolist() == [0, 0, 2]  # 0.35 < 0.4 -> bg
    with pytest.raises(OpenTransError, match="no prompt for class"):
        PromptSetRunner(_Fixed(logits), [0, 0, 2, 2], 3)
    with pytest.raises(OpenTransError, match="4 prompts"):
        runner(None, np.zeros((3, 2), np.float32))


def test_builtin_prompt_sets_follow_label_order():
    sets = read_prompt_sets("coco-object")
    assert len(sets) == 81 and sets[0][0] == "background" and "sky" in sets[0] and sets[1][0] == "person"
    assert sets[80] == ["toothbrush"]
    assert len(read_prompt_sets("voc")) == 21


def test_text_embedding_cache(tiny_vit, tmp_path):
    seg, spec = tiny_vit
    first = cached_text_embeddings(seg, ["road", "car"], spec.model, cache_dir=tmp_path)
    files = list(tmp_path.glob("*.npy"))
    assert len(files) == 1
    np.testing.assert_allclose(first, seg.encode_classes(["road", "car"], model_name=spec.model).numpy(), atol=1e-6)
    np.save(files[0], np.full_like(first, 7.0))  # a hit is read from disk, not recomputed
    assert (cached_text_embeddings(seg, ["road", "car"], spec.model, cache_dir=tmp_path) == 7.0).all()
    with torch.no_grad():
        seg.clip.logit_scale.add_(1.0)  # other text-side weights -> another key
    cached_text_embeddings(seg, ["road", "car"], spec.model, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.npy"))) == 2


@real_data
def test_eval_across_modes_writes_table_json_and_plot(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENTRANS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "modes" / "coco.json"
    res = CliRunner().invoke(cli, ["eval", "--model", TINY_VIT, "--dense-mode", "naclip,cliper",
                                   "--data", f"coco-object:{COCO_OBJECT}", "--limit", "1", "--short-side", "80",
                                   "--window", "64x64", "--stride", "32x32", "--prompt-sets", "coco-object",
                                   "--bg-threshold", "0.1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert [r["mode"] for r in report["rows"]] == ["naclip", "cliper"]
    assert report["header"]["weights"] == "random-init weights" and report["header"]["images"] == 1
    assert all(0 <= r["miou"] <= 100 and r["median_ms"] > 0 for r in report["rows"])
    md = out.with_suffix(".md").read_text()
    assert "| naclip |" in md and "random-init weights" in md and "sliding window 64x64" in md
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


@real_data
def test_eval_single_mode_and_option_errors(tmp_path):
    runner = CliRunner()
    out = tmp_path / "m.json"
    res = runner.invoke(cli, ["eval", "--model", TINY_VIT, "--dense-mode", "clearclip", "--data", CAMVID_SPEC,
                              "--limit", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["dense_mode"] == "clearclip"
    res = runner.invoke(cli, ["eval", "--model", TINY_VIT, "--dense-mode", "gem", "--data", CAMVID_SPEC])
    assert res.exit_code == 1 and "--dense-mode gem" in res.output
    res = runner.invoke(cli, ["eval", "--model", TINY_VIT, "--data", CAMVID_SPEC, "--bg-threshold", "0.1", "--limit", "1"])
    assert res.exit_code == 1 and "no background class" in res.output
    res = runner.invoke(cli, ["segment", "x.png", "--classes", "a", "--model", TINY_VIT, "--dense-mode", "all",
                              "--out", str(tmp_path / "o.png")])
    assert res.exit_code == 1 and "takes one mode" in res.output


def test_dense_mode_option_reaches_stages_and_overrides_from(tmp_path, tiny_vit):
    """--dense-mode with --model builds that mode; with --from it replaces the stored one."""
    from opentrans.models.artifact import resolve_model
    from conftest import save_finished

    seg, spec = tiny_vit
    save_finished(seg, spec, tmp_path)
    fresh, fresh_spec, _ = resolve_model(None, TINY_VIT, dense_mode="naclip")
    loaded, loaded_spec, _ = resolve_model(tmp_path, None, dense_mode="naclip")
    assert fresh.dense_mode == fresh_spec.dense_mode == "naclip"
    assert loaded.dense_mode == loaded_spec.dense_mode == "naclip"
    assert resolve_model(tmp_path, None)[1].dense_mode == "maskclip"
    with pytest.raises(OpenTransError, match="ResNet supports only maskclip"):
        resolve_model(None, "opentrans-tiny-rn", dense_mode="sclip")


def test_templates_file(tmp_path, tiny_vit):
    from opentrans.inference.sliding import read_templates

    good = tmp_path / "t.txt"
    good.write_text("a photo of a {}.\n\nitap of a {}.\n")
    assert read_templates(good) == ("a photo of a {}.", "itap of a {}.")
    seg, spec = tiny_vit
    embeds = cached_text_embeddings(seg, ["car"], spec.model, tmp_path / "c", read_templates(good))
    np.testing.assert_allclose(embeds, seg.encode_classes(["car"], ("a photo of a {}.", "itap of a {}."),
                                                          model_name=spec.model).numpy(), atol=1e-6)
    bad = tmp_path / "b.txt"
    bad.write_text("a photo\n")
    with pytest.raises(OpenTransError, match="exactly one"):
        read_templates(bad)


@real_data
def test_deploy_bakes_the_dense_mode_and_eval_refuses_another(tmp_path):
    runner = CliRunner()
    build = tmp_path / "onnx"
    res = runner.invoke(cli, ["deploy", "--model", TINY_VIT, "--dense-mode", "naclip", "--target", "onnx",
                              "--data", CAMVID_SPEC, "--parity-limit", "1", "--out", str(build)])
    assert res.exit_code == 0, res.output
    assert json.loads((build / "build.json").read_text())["spec"]["dense_mode"] == "naclip"
    out = tmp_path / "m.json"
    res = runner.invoke(cli, ["eval", "--from", str(build), "--data", CAMVID_SPEC, "--limit", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["dense_mode"] == "naclip"
    res = runner.invoke(cli, ["eval", "--from", str(build), "--dense-mode", "clearclip", "--data", CAMVID_SPEC,
                              "--limit", "1"])
    assert res.exit_code == 1 and "exported with dense mode naclip" in res.output
