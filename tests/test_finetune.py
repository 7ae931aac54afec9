"""Heavy-tail freeze plans, the training loop and the finetune stage, on tiny models and real CamVid images."""

from __future__ import annotations

import json

import pytest
import torch

from opentrans.data import open_dataset
from opentrans.errors import OpenTransError
from opentrans.finetune.freeze import (
    FreezePlan,
    apply_freeze_plan,
    freeze_plan,
    gradient_free_parameters,
    head_only_plan,
)
from opentrans.finetune.spectral import LayerAlpha, analyze_spectrum
from opentrans.finetune.trainer import resize_masks, train_segmentor
from tests.conftest import CAMVID_SPEC, TINY_VIT


def _la(name: str, alpha: float) -> LayerAlpha:
    return LayerAlpha(name=name, kind="Linear", shape=(4, 4), alpha=alpha, alpha_weighted=0.0, stable_rank=1.0,
                      num_eigs=4, xmin=0.1, warning="")


def test_freeze_plan_splits_at_median():
    plan = freeze_plan([_la("e", 5.0), _la("a", 1.0), _la("c", 3.0), _la("b", 2.0), _la("d", 4.0)])
    assert plan.median_alpha == 3.0
    assert plan.frozen == ("a", "b") and plan.trainable == ("c", "d", "e")  # the median layer itself trains
    even = freeze_plan([_la("x", 2.0), _la("y", 6.0), _la("z", 3.0), _la("w", 5.0)])
    assert even.median_alpha == 4.0 and even.frozen == ("x", "z") and even.trainable == ("w", "y")
    with pytest.raises(OpenTransError, match="policy"):
        freeze_plan([_la("a", 1.0)], policy="mean")
    with pytest.raises(OpenTransError, match="no analysed layers"):
        freeze_plan([])


def _expected_grad(plan, name: str) -> bool:
    mod, _, attr = name.rpartition(".")
    return name.startswith("head.") or (mod in plan.trainable and attr in ("weight", "bias"))


def test_apply_freeze_plan_sets_requires_grad_exactly(tiny_vit):
    seg, _ = tiny_vit
    plan = freeze_plan(analyze_spectrum(seg.visual, "clip.visual.").layers)
    assert plan.frozen and plan.trainable
    counts = apply_freeze_plan(seg, plan)
    flags = {n: p.requires_grad for n, p in seg.named_parameters()}
    assert flags == {n: _expected_grad(plan, n) for n in flags}
    assert counts["trainable_params"] == sum(p.numel() for p in seg.parameters() if p.requires_grad)
    assert counts["total_params"] == sum(p.numel() for p in seg.parameters())
    assert counts["frozen_layers"] == len(plan.frozen)

    # a plan naming a module this model does not have is refused before anything changes
    bad = FreezePlan("median", 1.0, (), ("clip.visual.no.such.layer",), {})
    with pytest.raises(OpenTransError, match="no.such.layer"):
        apply_freeze_plan(seg, bad)
    assert {n: p.requires_grad for n, p in seg.named_parameters()} == flags

    head = apply_freeze_plan(seg, head_only_plan())
    assert head["trainable_params"] == head["head_params"] > 0
    assert [n for n, p in seg.named_parameters() if p.requires_grad] == ["head.proj.weight", "head.proj.bias"]


def test_gradient_free_parameters_finds_layers_outside_the_dense_path(tiny_rn):
    seg, _ = tiny_rn
    for p in seg.visual.parameters():
        p.requires_grad_(True)
    missing = set(gradient_free_parameters(seg))
    # MaskCLIP's dense path for ModifiedResNet uses v_proj and c_proj of the attention pool, not q/k
    assert {"clip.visual.attnpool.q_proj.weight", "clip.visual.attnpool.k_proj.weight"} <= missing
    assert not missing & {"clip.visual.attnpool.v_proj.weight", "clip.visual.attnpool.c_proj.weight",
                          "clip.visual.layer4.0.conv3.weight", "clip.visual.conv1.weight"}
    assert all(p.grad is None for p in seg.parameters())


def test_resize_masks_keeps_labels_and_ignore_index():
    mask = torch.tensor([[0, 0, 11, 11], [3, 3, 11, 11]])
    out = resize_masks([mask], (4, 8))
    assert out.shape == (1, 4, 8) and out.dtype == torch.int64
    assert set(out.unique().tolist()) == {0, 3, 11}


def test_training_reduces_loss_and_moves_only_trainable_params(tiny_vit):
    seg, spec = tiny_vit
    ds = open_dataset(CAMVID_SPEC, "train", spec.image_size, spec.mean, spec.std, limit=2)
    text = seg.encode_classes(list(ds.class_names), model_name=spec.model)
    plan = freeze_plan(analyze_spectrum(seg.visual, "clip.visual.").layers)
    apply_freeze_plan(seg, plan)
    unused = set(gradient_free_parameters(seg))
    before = {n: p.detach().clone() for n, p in seg.named_parameters()}

    # batch_size = len(ds): the same two images every step
    losses = train_segmentor(seg, ds, text, steps=6, batch_size=2, lr=1e-3, seed=0, progress=False)
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.9 * losses[0]

    for name, p in seg.named_parameters():
        if p.requires_grad and name not in unused:
            assert not torch.equal(p, before[name]), f"{name} is trainable but did not change"
        else:
            assert torch.equal(p, before[name]), f"{name} is frozen but changed"
    assert any(not torch.equal(b, seg.state_dict()[n]) for n, b in before.items() if n.startswith("clip.visual."))

    with pytest.raises(OpenTransError, match="--steps 0"):
        train_segmentor(seg, ds, text, steps=0, batch_size=2, lr=1e-3)


def test_training_is_deterministic():
    from opentrans.models.artifact import build_segmentor

    runs = []
    for _ in range(2):
        seg, spec = build_segmentor(TINY_VIT, "none")
        ds = open_dataset(CAMVID_SPEC, "train", spec.image_size, spec.mean, spec.std, limit=3)
        apply_freeze_plan(seg, head_only_plan())
        text = seg.encode_classes(list(ds.class_names), model_name=spec.model)
        runs.append(train_segmentor(seg, ds, text, steps=2, batch_size=2, lr=1e-3, seed=7, progress=False))
    assert runs[0] == runs[1]


def test_finetune_stage_writes_loadable_model(tmp_path):
    from opentrans.artifacts import load_manifest
    from opentrans.finetune.stage import finetune_stage
    from opentrans.models.artifact import build_segmentor, load_segmentor

    out = tmp_path / "ft"
    figures = finetune_stage(None, TINY_VIT, "none", out, CAMVID_SPEC, steps=3, batch_size=2, lr=1e-3,
                             train_limit=2, val_limit=2, progress=False)
    manifest = load_manifest(out)
    assert manifest["status"] == "complete" and manifest["weights"] == "random-init weights"
    assert manifest["figures"] == figures
    assert set(figures) == {"miou_before", "miou_after", "trainable_params", "total_params", "frozen_layers",
                            "steps", "final_loss"}
    assert 0 < figures["trainable_params"] < figures["total_params"] and figures["steps"] == 3

    seg, spec = load_segmentor(out)
    assert spec.lineage == ["finetune"]
    plan = json.loads((out / "freeze_plan.json").read_text())
    assert figures["frozen_layers"] == len(plan["frozen"]) > 0
    fresh, _ = build_segmentor(TINY_VIT, "none")
    state, fresh_state = seg.state_dict(), fresh.state_dict()
    for layer in plan["frozen"]:
        assert torch.equal(state[f"{layer}.weight"], fresh_state[f"{layer}.weight"])
    assert not torch.equal(state["head.proj.weight"], fresh_state["head.proj.weight"])
    assert torch.equal(state["clip.logit_scale"], fresh_state["clip.logit_scale"])

    report = json.loads((out / "finetune_report.json").read_text())
    assert report["frozen_layers"] == plan["frozen"] and report["weights"] == "random-init weights"
    trained = [n for n in plan["trainable"] if f"{n}.weight" not in report["gradient_free"]]
    assert trained and all(not torch.equal(state[f"{n}.weight"], fresh_state[f"{n}.weight"]) for n in trained)
    assert figures["trainable_params"] == report["planned_trainable_params"] - report["gradient_free_params"]
    assert len(report["loss"]["curve"]) == 3
    md = (out / "finetune_report.md").read_text()
    assert "| val mIoU after |" in md
    assert all(line.endswith("| random-init weights |") for line in md.splitlines()
               if line.startswith("| ") and not line.startswith(("| figure", "| layer", "| `")))


@pytest.mark.parametrize("kwargs, match", [
    ({"steps": 0}, "--steps 0"),
    ({"lr": -1.0}, "--lr"),
    ({"data": "nope:/nowhere"}, "FORMAT:PATH"),
    ({"data": "camvid:/no/such/dir"}, "not a folder"),
    ({"train_limit": 0}, "--limit 0"),
])
def test_finetune_stage_bad_input_leaves_out_dir_untouched(tmp_path, kwargs, match):
    from opentrans.finetune.stage import finetune_stage

    out = tmp_path / "ft"
    args = {"data": CAMVID_SPEC, "steps": 2, "train_limit": 1, "val_limit": 1, "progress": False, **kwargs}
    with pytest.raises(OpenTransError, match=match) as info:
        finetune_stage(None, TINY_VIT, "none", out, **args)
    assert "\n" not in str(info.value)
    assert not out.exists()
