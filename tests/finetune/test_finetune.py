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
    row_masked_parameters,
)
from opentrans.analyze.spectral import LayerAlpha, analyze_model, analyze_spectrum
from opentrans.finetune.trainer import resize_masks, resolve_amp, train_segmentor
from conftest import CAMVID_SPEC, TINY_VIT, real_data


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
    if attr in ("in_proj_weight", "in_proj_bias"):
        return any(f"{mod}.in_proj_weight[{t}]" in plan.trainable for t in "qkv")
    return name.startswith("head.") or (mod in plan.trainable and attr in ("weight", "bias"))


def test_apply_freeze_plan_sets_requires_grad_exactly(tiny_vit):
    seg, _ = tiny_vit
    plan = freeze_plan(analyze_model(seg, ("image",), "opentrans-qkv")["opentrans-qkv"].layers)
    assert plan.frozen and plan.trainable and any(n.endswith("]") for n in plan.frozen + plan.trainable)
    counts = apply_freeze_plan(seg, plan)
    flags = {n: p.requires_grad for n, p in seg.named_parameters()}
    assert flags == {n: _expected_grad(plan, n) for n in flags}
    masked = {id(p): int(m.sum()) for p, m in row_masked_parameters(seg)}
    assert counts["trainable_params"] == sum(
        p.numel() if id(p) not in masked else masked[id(p)] * (p.numel() // p.shape[0])
        for p in seg.parameters() if p.requires_grad)
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


@real_data
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


@real_data
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


def _param_name(layer: str) -> str:
    return layer[: layer.index("[")] if layer.endswith("]") else f"{layer}.weight"


def _layer_weight(state: dict, layer: str) -> torch.Tensor:
    """The weight of a plan layer: a Linear's weight or the rows of a Q/K/V slice of in_proj_weight."""
    w = state[_param_name(layer)]
    if layer.endswith("]"):
        w = w.chunk(3)["qkv".index(layer[-2])]
    return w


@real_data
def test_finetune_stage_writes_loadable_model(tmp_path):
    from opentrans.artifacts import load_manifest
    from opentrans.finetune.options import FinetuneOptions
    from opentrans.finetune.stage import finetune_stage
    from opentrans.models.source import ModelSource
    from opentrans.models.artifact import build_segmentor, load_segmentor

    out = tmp_path / "ft"
    figures = finetune_stage(ModelSource(model=TINY_VIT),
                             FinetuneOptions(steps=3, batch_size=2, lr=1e-3, train_limit=2, val_limit=2), out,
                             CAMVID_SPEC, progress=False)
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
        assert torch.equal(_layer_weight(state, layer), _layer_weight(fresh_state, layer))
    assert not torch.equal(state["head.proj.weight"], fresh_state["head.proj.weight"])
    assert torch.equal(state["clip.logit_scale"], fresh_state["clip.logit_scale"])

    report = json.loads((out / "finetune_report.json").read_text())
    assert report["frozen_layers"] == plan["frozen"] and report["weights"] == "random-init weights"
    trained = [n for n in plan["trainable"] if _param_name(n) not in report["gradient_free"]]
    assert trained and all(not torch.equal(_layer_weight(state, n), _layer_weight(fresh_state, n)) for n in trained)
    assert report["trainable_layer_params"].keys() == set(plan["trainable"])
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
    from opentrans.finetune.options import FinetuneOptions
    from opentrans.finetune.stage import finetune_stage
    from opentrans.models.source import ModelSource

    out = tmp_path / "ft"
    args = {"data": CAMVID_SPEC, "steps": 2, "train_limit": 1, "val_limit": 1, **kwargs}
    data = args.pop("data")
    with pytest.raises(OpenTransError, match=match) as info:
        finetune_stage(ModelSource(model=TINY_VIT), FinetuneOptions(**args), out, data, progress=False)
    assert "\n" not in str(info.value)
    assert not out.exists()


def test_freeze_policies_fraction_inverse_random():
    layers = [_la(n, a) for n, a in zip("abcdefgh", (1.0, 8.0, 3.0, 5.0, 2.0, 7.0, 4.0, 6.0))]
    by_alpha = sorted("abcdefgh", key=lambda n: dict(zip("abcdefgh", (1, 8, 3, 5, 2, 7, 4, 6)))[n])
    for fraction, k in ((0.25, 2), (0.5, 4), (0.75, 6)):
        plan = freeze_plan(layers, "fraction", fraction=fraction)
        assert plan.frozen == tuple(sorted(by_alpha[:k])) and plan.fraction == fraction
        assert set(plan.frozen) | set(plan.trainable) == set("abcdefgh") and not set(plan.frozen) & set(plan.trainable)
    median = freeze_plan(layers, "median")
    inverse = freeze_plan(layers, "inverse")
    assert median.median_alpha == inverse.median_alpha == 4.5
    assert inverse.frozen == median.trainable and inverse.trainable == median.frozen
    r1, r2, r3 = (freeze_plan(layers, "random", seed=s) for s in (1, 1, 2))
    assert r1 == r2 and len(r1.frozen) == len(median.frozen) and r1.seed == 1
    assert {freeze_plan(layers, "random", seed=s).frozen for s in range(6)} != {r1.frozen}  # the seed matters
    assert r3.to_json()["policy"] == "random"
    with pytest.raises(OpenTransError, match="--freeze-fraction"):
        freeze_plan(layers, "fraction", fraction=1.5)


@real_data
def test_qkv_slice_trains_alone_and_frozen_rows_stay_exact(tiny_vit):
    seg, spec = tiny_vit
    ds = open_dataset(CAMVID_SPEC, "train", spec.image_size, spec.mean, spec.std, limit=2)
    text = seg.encode_classes(list(ds.class_names), model_name=spec.model)
    mha = "clip.visual.transformer.resblocks.0.attn"
    plan = FreezePlan("median", 1.0, (f"{mha}.in_proj_weight[q]", f"{mha}.in_proj_weight[k]"),
                      (f"{mha}.in_proj_weight[v]",), {})
    counts = apply_freeze_plan(seg, plan)
    attn = seg.get_submodule(mha)
    e = attn.embed_dim
    assert counts["trainable_params"] == e * e + e + counts["head_params"]
    w0, b0 = attn.in_proj_weight.detach().clone(), attn.in_proj_bias.detach().clone()
    train_segmentor(seg, ds, text, steps=2, batch_size=2, lr=1e-2, seed=0, progress=False)
    assert torch.equal(attn.in_proj_weight[: 2 * e], w0[: 2 * e])
    assert torch.equal(attn.in_proj_bias[: 2 * e], b0[: 2 * e])
    assert not torch.equal(attn.in_proj_weight[2 * e:], w0[2 * e:])
    # re-planning removes the hook and mask of the earlier plan
    apply_freeze_plan(seg, head_only_plan())
    assert row_masked_parameters(seg) == [] and not attn.in_proj_weight.requires_grad
    with pytest.raises(OpenTransError, match="slice"):
        apply_freeze_plan(seg, FreezePlan("median", 1.0, (), (f"{mha}.out_proj.in_proj_weight[q]",), {}))


def _resume_setup():
    from opentrans.models.artifact import build_segmentor

    seg, spec = build_segmentor(TINY_VIT, "none")
    ds = open_dataset(CAMVID_SPEC, "train", spec.image_size, spec.mean, spec.std, limit=3)
    apply_freeze_plan(seg, freeze_plan(analyze_model(seg, ("image",), "opentrans-qkv")["opentrans-qkv"].layers))
    text = seg.encode_classes(list(ds.class_names), model_name=spec.model)
    return seg, ds, text


@real_data
def test_killed_run_resumes_to_the_same_result(tmp_path):
    kwargs = {"steps": 4, "batch_size": 1, "lr": 1e-3, "seed": 3, "progress": False, "grad_accum": 2}
    seg, ds, text = _resume_setup()
    assert row_masked_parameters(seg)  # the plan splits some in-projection: masks are checkpointed too
    full = train_segmentor(seg, ds, text, **kwargs)
    final = {n: p.detach().clone() for n, p in seg.named_parameters()}

    class Killed(Exception):
        pass

    def kill(step, loss):
        if step == 3:
            raise Killed

    ckpt = tmp_path / "ckpt"
    seg, ds, text = _resume_setup()
    with pytest.raises(Killed):
        train_segmentor(seg, ds, text, checkpoint_dir=ckpt, checkpoint_every=2, on_step=kill, **kwargs)
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 2  # step 3 was never saved

    seg, ds, text = _resume_setup()
    seen = []
    resumed = train_segmentor(seg, ds, text, checkpoint_dir=ckpt, checkpoint_every=2,
                              on_step=lambda s, _: seen.append(s), **kwargs)
    assert seen == [3, 4]  # steps 1-2 came from the checkpoint
    assert resumed == full
    assert all(torch.equal(p, final[n]) for n, p in seg.named_parameters())

    seg, ds, text = _resume_setup()
    with pytest.raises(OpenTransError, match="another run"):
        train_segmentor(seg, ds, text, checkpoint_dir=ckpt, checkpoint_every=2, **{**kwargs, "lr": 2e-3})


@real_data
def test_bf16_autocast_and_gradient_accumulation(tiny_vit):
    seg, spec = tiny_vit
    ds = open_dataset(CAMVID_SPEC, "train", spec.image_size, spec.mean, spec.std, limit=2)
    text = seg.encode_classes(list(ds.class_names), model_name=spec.model)
    apply_freeze_plan(seg, head_only_plan())
    start = {n: p.detach().clone() for n, p in seg.named_parameters()}
    fp32 = train_segmentor(seg, ds, text, steps=1, batch_size=2, lr=1e-3, progress=False)
    after_full = {n: p.detach().clone() for n, p in seg.named_parameters() if p.requires_grad}
    seg.load_state_dict(start)
    bf16 = train_segmentor(seg, ds, text, steps=1, batch_size=2, lr=1e-3, progress=False, amp="bf16")
    assert bf16[0] != fp32[0] and bf16[0] == pytest.approx(fp32[0], rel=0.05)  # really ran in bf16, close
    # two micro-batches of 1 with the same two images ~ one batch of 2: the accumulated loss is the mean of the two
    # per-image means, the batch loss the mean over all labelled pixels; the two CamVid images have 4903 and 4867
    # labelled pixels at 64x80, so they differ by (L1 - L2) * 36 / 19540 (rel. 2e-5 with issue 12's MaskCLIP
    # features, which is why the tolerance is 1e-4 and not the 1e-5 the old residual-free features happened to meet)
    seg.load_state_dict(start)
    accum = train_segmentor(seg, ds, text, steps=1, batch_size=1, lr=1e-3, progress=False, grad_accum=2)
    assert accum[0] == pytest.approx(fp32[0], rel=1e-4)
    # Adam's first step is about -lr * sign(grad): the accumulated gradient must point where the full one does
    # (only the last micro-batch's gradient, say, would disagree on a large share of elements)
    for n, p in seg.named_parameters():
        if p.requires_grad:
            agree = torch.sign(p - start[n]) == torch.sign(after_full[n] - start[n])
            assert agree.float().mean() > 0.98, (n, agree.float().mean())
    with pytest.raises(OpenTransError, match="--amp"):
        resolve_amp("fp8")
    with pytest.raises(OpenTransError, match="--grad-accum 0"):
        train_segmentor(seg, ds, text, steps=1, batch_size=1, lr=1e-3, grad_accum=0)


def test_focal_and_dice_losses():
    from opentrans.finetune.losses import dice_loss, focal_loss, segmentation_loss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, 6, generator=g)
    target = torch.randint(0, 4, (2, 5, 6), generator=g)
    target[0, 0] = 255
    ce = torch.nn.functional.cross_entropy(logits, target, ignore_index=255)
    assert focal_loss(logits, target, 255, gamma=0.0) == pytest.approx(float(ce), rel=1e-6)
    assert focal_loss(logits, target, 255) < ce  # (1 - p_t)^2 < 1 down-weights every pixel
    perfect = torch.nn.functional.one_hot(target.clamp(max=3), 4).permute(0, 3, 1, 2).float() * 50
    assert float(dice_loss(perfect, target, 255)) == pytest.approx(0.0, abs=1e-4)
    assert 0.3 < float(dice_loss(logits, target, 255)) < 1.0
    # ignored pixels do not count: changing their logits changes nothing
    other = logits.clone()
    other[0, :, 0] = 100.0
    assert segmentation_loss(other, target, 255, "focal-dice") == segmentation_loss(logits, target, 255, "focal-dice")
    with pytest.raises(OpenTransError, match="--loss"):
        segmentation_loss(logits, target, 255, "tversky")


def test_ssim_loss_hand_checked_cases():
    from opentrans.finetune.losses import gaussian_window, segmentation_loss, ssim_loss, ssim_map

    win = gaussian_window()
    assert win.shape == (11, 11) and float(win.sum()) == pytest.approx(1.0, abs=1e-6)
    assert float(win[5, 5]) == pytest.approx(float(win.max()))  # centred, circular-symmetric
    torch.testing.assert_close(win, win.T)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 20, generator=g)
    torch.testing.assert_close(ssim_map(x, x), torch.ones_like(x))  # SSIM of identical maps = 1
    # constant maps a and b: no variance, so SSIM = (2ab + C1) / (a^2 + b^2 + C1) (eq. 13, C2 terms cancel)
    a, b, c1 = 0.8, 0.2, 0.01 ** 2
    const = ssim_map(torch.full((1, 1, 12, 12), a), torch.full((1, 1, 12, 12), b))
    # (float32 E[x^2] - mu^2 leaves ~1e-7 of variance against C2 = 9e-4: agreement to 1e-3)
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    torch.testing.assert_close(const, torch.full_like(const, expected), atol=1e-3, rtol=0)
    # a map and its negative about its mean: sigma_xy = -sigma^2, so SSIM < 0 where there is structure
    assert float(ssim_map(x, 1 - x).mean()) < 0.5

    target = torch.randint(0, 4, (2, 16, 20), generator=g)
    target[0, :4] = 255
    perfect = torch.nn.functional.one_hot(target.clamp(max=3), 4).permute(0, 3, 1, 2).float() * 50
    assert float(ssim_loss(perfect, target, 255)) == pytest.approx(0.0, abs=1e-4)  # perfect prediction -> ~0
    logits = torch.randn(2, 4, 16, 20, generator=g)
    assert 0.5 < float(ssim_loss(logits, target, 255)) <= 2.0
    # ignored pixels are masked out of the window statistics: their logits change nothing
    other = logits.clone()
    other[0, :, :4] = 100.0
    assert segmentation_loss(other, target, 255, "focal-ssim") == segmentation_loss(logits, target, 255, "focal-ssim")
    fs = segmentation_loss(logits, target, 255, "focal-ssim")
    focal = segmentation_loss(logits, target, 255, "focal")
    assert float(fs) == pytest.approx(float(focal + ssim_loss(logits, target, 255)))
    # gradient flows to the logits and descends towards the labels
    logits.requires_grad_(True)
    ssim_loss(logits, target, 255).backward()
    stepped = logits.detach() - 5.0 * logits.grad
    assert ssim_loss(stepped, target, 255) < ssim_loss(logits.detach(), target, 255)


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


@real_data
def test_finetune_wires_paper_prompts_and_heads_and_keeps_them(tmp_path):
    """--prompts ldvc --head ldvc: both are built, trained (LDVC's text prompts through a text forward with
    gradient at every step), counted per component, saved in the artifact, and kept by a later finetune."""
    from opentrans.finetune.options import FinetuneOptions
    from opentrans.finetune.stage import finetune_stage
    from opentrans.models.source import ModelSource
    from opentrans.models.artifact import load_segmentor

    common = {"steps": 1, "batch_size": 2, "lr": 1e-3, "train_limit": 2, "val_limit": 1, "freeze_heavy_tail": False}
    first = tmp_path / "ldvc"
    finetune_stage(ModelSource(model=TINY_VIT), FinetuneOptions(prompts="ldvc", head="ldvc", **common), first,
                   CAMVID_SPEC, progress=False)
    report = json.loads((first / "finetune_report.json").read_text())
    seg, spec = load_segmentor(first)
    assert spec.head == "ldvc" and spec.prompts["kind"] == "ldvc" and seg.prompts.kind == "ldvc"
    parts = report["trainable_by_component"]
    assert parts == {"head": _count(seg.head), "prompts": _count(seg.prompts), "adapter": 0, "clip_layers": 0}
    assert report["trainable_params"] == parts["head"] + parts["prompts"] > 0
    assert report["text_side_trained"] and report["head"] == "ldvc" and report["prompts"] == "ldvc"
    assert f"prompts {parts['prompts']:,}" in (first / "finetune_report.md").read_text()

    second = tmp_path / "again"
    finetune_stage(ModelSource(from_dir=first), FinetuneOptions(**common), second, CAMVID_SPEC, progress=False)
    again = json.loads((second / "finetune_report.json").read_text())
    assert again["head"] == "ldvc" and again["prompts"] == "ldvc"  # not given: the artifact's are kept
    assert again["trainable_by_component"] == parts
    reloaded, _ = load_segmentor(second)
    moved = [n for n, p in reloaded.state_dict().items() if n.startswith("prompts.")
             and not torch.equal(p, seg.state_dict()[n])]
    assert moved  # the kept prompts trained again


#: H-CLIP kept small for speed: POP alone (no DCRC), every image layer, one text layer (the text side still trains)
HCLIP_FAST = {"block_size": 16, "dcrc": False, "text_targets": ["clip.transformer.resblocks.0.mlp.c_fc"]}


@real_data
def test_finetune_hclip_with_spt_seg_prompts_and_head_merges_before_saving(tmp_path):
    from opentrans.finetune.options import FinetuneOptions
    from opentrans.finetune.stage import finetune_stage
    from opentrans.models.source import ModelSource
    from opentrans.models.artifact import build_segmentor, load_segmentor

    out = tmp_path / "hclip"
    figures = finetune_stage(ModelSource(model=TINY_VIT),
                             FinetuneOptions(steps=1, batch_size=2, lr=1e-3, train_limit=2, val_limit=1,
                                             freeze_heavy_tail=False, adapter="hclip", adapter_options=HCLIP_FAST,
                                             prompts="spt-seg", head="spt-seg"), out, CAMVID_SPEC, progress=False)
    report = json.loads((out / "finetune_report.json").read_text())
    parts = report["trainable_by_component"]
    assert report["adapter"]["kind"] == "hclip" and report["adapter"]["merged"] > 0
    assert parts["adapter"] > 0 and parts["head"] > 0 and parts["prompts"] > 0 and parts["clip_layers"] == 0
    assert figures["trainable_params"] == sum(parts.values())
    assert report["text_side_trained"]  # H-CLIP adapts the text tower too: class embeddings recomputed per step
    seg, spec = load_segmentor(out)
    fresh, _ = build_segmentor(TINY_VIT, "none")
    keys = set(seg.state_dict())
    assert not any("parametrizations" in k for k in keys)  # merged into plain weights
    assert keys - set(fresh.state_dict()) == {k for k in keys if k.startswith(("prompts.", "head."))}
    changed = [k for k, v in seg.state_dict().items() if k.startswith("clip.transformer.")
               and not torch.equal(v, fresh.state_dict()[k])]
    assert changed  # the text tower's adapted weights trained and were merged


@pytest.mark.parametrize("args, expected", [
    (["--prompts", "nope"], ["--prompts nope: choose one of none, ", "ldvc", "spt-seg", "vpt"]),
    (["--head", "nope"], ["--head nope: choose one of ", "ldvc", "linear", "none", "spt-seg"]),
    (["--adapter", "nope"], ["'nope' is not one of 'none', 'lora', 'oft', 'hclip'"]),
    (["--prompts", "vpt", "--prompt-options", "{bad"], ["--prompt-options: not valid JSON"]),
    (["--head", "linear", "--head-options", "[1]"], ["--head-options: expected a JSON object"]),
    (["--adapter-options", '{"block_size": 8}'], ["--adapter-options is for --adapter hclip"]),
    (["--loss", "ssim2"], ["'ssim2' is not one of"]),
])
def test_finetune_cli_bad_values_are_one_line_errors(tmp_path, args, expected):
    from click.testing import CliRunner

    from opentrans.cli import cli

    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["finetune", "--model", TINY_VIT, "--data", CAMVID_SPEC, "--out", str(out),
                                      *args])
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(lines) == 1 and all(part in lines[0] for part in expected), result.output
    assert not out.exists()


def test_loss_registry_takes_a_plugin():
    from opentrans.finetune.losses import LOSS_FUNCTIONS, loss_names, segmentation_loss
    from opentrans.finetune.options import FinetuneOptions

    assert loss_names() == ["ce", "focal", "dice", "focal-dice", "ssim", "focal-ssim"]
    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(1, 3, 4, 5, generator=g), torch.randint(0, 3, (1, 4, 5), generator=g)
    LOSS_FUNCTIONS.add("half-ce", lambda lg, tg, ignore_index, **weights: 0.5 * segmentation_loss(lg, tg, ignore_index))
    try:
        assert float(segmentation_loss(logits, target, 255, "half-ce")) == pytest.approx(
            0.5 * float(segmentation_loss(logits, target, 255)))
        FinetuneOptions(loss="half-ce").check()
    finally:
        LOSS_FUNCTIONS._entries.pop("half-ce")


def test_preserved_modes_restores_modes_and_flags_after_an_error():
    from opentrans.models.modes import frozen, preserved_modes

    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    net.train()
    net[1].eval()
    net[0].bias.requires_grad_(False)
    with frozen(net):
        assert not net.training and not any(p.requires_grad for p in net.parameters())
    with pytest.raises(RuntimeError), preserved_modes(net, train=False):
        net[0].weight.requires_grad_(False)
        raise RuntimeError
    assert net.training and not net[1].training
    assert net[0].weight.requires_grad and not net[0].bias.requires_grad
