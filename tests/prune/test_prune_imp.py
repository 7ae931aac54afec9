"""OpenTrans IMP (global unstructured magnitude pruning + distillation recovery) on tiny random-init models and
real CamVid images."""

from __future__ import annotations

import copy
import importlib
import os
import shutil
import subprocess
import sys
import pytest
import torch
from conftest import CAMVID, CAMVID_SPEC, TINY_RN, TINY_VIT, real_data
from safetensors.torch import load_file

from opentrans.artifacts import read_json
from opentrans.errors import OpenTransError
from opentrans.models.artifact import build_segmentor, load_segmentor
from opentrans.prune import prune_structured
from opentrans.prune.distill import open_images
from opentrans.prune.imp import (
    apply_masks,
    attach_masks,
    bake_masks,
    current_masks,
    global_magnitude_round,
    imp_targets,
    mask_sparsity,
    read_masks,
    sparsity_schedule,
)


def prune_stage(from_dir, model, pretrained, out_dir, sparsity=None, image_size=None, **options):
    """:func:`opentrans.prune.stage.prune_stage` with the model source and options spelled out."""
    from opentrans.models.source import ModelSource
    from opentrans.prune.options import StructuredOptions
    from opentrans.prune.stage import prune_stage as stage

    return stage(ModelSource(from_dir, model, pretrained, image_size), StructuredOptions(sparsity=sparsity, **options),
                 out_dir)


def imp_stage(from_dir, model, pretrained, out_dir, sparsity=None, image_size=None, targets="authors", **options):
    """:func:`opentrans.prune.imp_stage.imp_stage` with the model source and options spelled out."""
    from opentrans.models.source import ModelSource
    from opentrans.prune.imp_stage import imp_stage as stage
    from opentrans.prune.options import ImpOptions

    return stage(ModelSource(from_dir, model, pretrained, image_size),
                 ImpOptions(sparsity=sparsity, imp_targets=targets, **options), out_dir)

# the module (opentrans.prune re-exports the function imp_stage under the same name)
imp_stage_mod = importlib.import_module("opentrans.prune.imp_stage")
RECOVERY = {"recovery_steps": 3, "distill_data": CAMVID_SPEC, "distill_limit": 6, "batch_size": 2}
#: a ViT has nothing to prune under the authors' targets (its only Conv2d is the excluded patch conv): ours
EXT = {"targets": "extended"}


def _run_rounds(seg, rounds: int, rate: float = 0.1, targets: str = "authors") -> list[float]:
    """Plain IMP rounds without recovery; returns the sparsity after each."""
    masks, out = current_masks(seg.visual, targets), []
    total = sum(m.numel() for m in masks.values())
    for _ in range(rounds):
        targets = attach_masks(seg.visual, masks)
        pruned = total - sum(int(m.sum()) for m in masks.values())
        global_magnitude_round(targets, round(rate * (total - pruned)))
        masks = bake_masks(targets)
        out.append(mask_sparsity(masks))
    return out


@pytest.mark.parametrize("arch", [TINY_VIT, TINY_RN])
def test_extended_targets_sparsity_follows_0_9_power_and_stem_untouched(arch):
    seg, _ = build_segmentor(arch, "none")
    v = seg.visual
    stem = ("conv1",) if arch == TINY_VIT else ("conv1", "conv2", "conv3")
    stem_before = {n: getattr(v, n).weight.clone() for n in stem}
    names = [t.name for t in imp_targets(v, "extended")]
    total = sum(t.module.get_parameter(t.param).numel() for t in imp_targets(v, "extended"))

    sparsities = _run_rounds(seg, 3, targets="extended")
    for k, s in enumerate(sparsities, 1):
        assert s == pytest.approx(1 - 0.9 ** k, abs=k / total)  # rounding: at most one weight per round
    for n in stem:  # the patch/stem conv is not a target and keeps every weight
        assert f"{n}.weight" not in names and torch.equal(getattr(v, n).weight, stem_before[n])
    if arch == TINY_VIT:
        last = v.transformer.resblocks[-1]
        assert "transformer.resblocks.2.attn.in_proj_weight" in names  # MHA's fused Q/K/V (a Parameter)
        assert (last.attn.in_proj_weight == 0).any() and (last.attn.out_proj.weight == 0).any()
        assert "proj" not in names
    else:
        assert {"attnpool.q_proj.weight", "attnpool.c_proj.weight", "layer1.0.downsample.0.weight"} <= set(names)
        assert (v.attnpool.q_proj.weight == 0).any()
    # The reparametrisation is gone: plain parameters, no *_orig / *_mask left behind.
    assert not any(k.endswith(("_orig", "_mask")) for k in seg.state_dict())


# The authors' IMP, transcribed independently from github.com/Xujxyang/OpenTrans at commit
# aea33ff3682403aec6d55a670030d6cb4b0623cd, pruning.py l. 95-112 (pruning_model), as plain_train_net_imp.py l. 518
# calls it every pruning round: pruning.pruning_model(model.module.backbone, 0.1, exclude_first=True). Their
# backbone is the whole CLIP; its text tower has no Conv2d, so the image tower's convs are the targets.
def _authors_pruning_model(model, px, exclude_first=False):
    parameters_to_prune = []
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            parameters_to_prune.append((m, "weight"))
    if exclude_first:
        parameters_to_prune = parameters_to_prune[1:]
    torch.nn.utils.prune.global_unstructured(tuple(parameters_to_prune),
                                             pruning_method=torch.nn.utils.prune.L1Unstructured, amount=px)


def test_default_targets_and_rounds_are_the_authors_imp():
    ours, _ = build_segmentor(TINY_RN, "none")
    theirs = copy.deepcopy(ours)
    names = [t.name for t in imp_targets(ours.visual)]  # the default: the authors' targets
    assert names[:2] == ["conv2.weight", "conv3.weight"]  # the stem's conv2 and conv3 are pruned, conv1 is not
    assert not any(n.startswith("attnpool.") for n in names)  # no Linear layer
    assert "layer1.0.downsample.0.weight" in names
    sparsities = _run_rounds(ours, 3)
    for _ in range(3):
        _authors_pruning_model(theirs.clip, 0.1, exclude_first=True)
    for name, p in ours.visual.named_parameters():
        module, _, attr = name.rpartition(".")
        mod = theirs.visual.get_submodule(module)
        want = getattr(mod, attr) if hasattr(mod, attr + "_orig") else mod.get_parameter(attr)
        assert torch.equal(p, want.detach()), name
    assert (ours.visual.conv1.weight != 0).all() and (ours.visual.attnpool.q_proj.weight != 0).all()
    assert sparsities[-1] == pytest.approx(1 - 0.9 ** 3, abs=3 / sum(p.numel() for n, p in ours.visual.named_parameters()
                                                                     if n in names))
    vit, _ = build_segmentor(TINY_VIT, "none")
    with pytest.raises(OpenTransError, match="nothing to prune in VisionTransformer; use --imp-targets extended"):
        imp_targets(vit.visual)
    with pytest.raises(OpenTransError, match="unknown IMP targets 'mlp'"):
        imp_targets(vit.visual, "mlp")


def test_schedule_stops_exactly_at_target():
    total = 10_000
    sched = sparsity_schedule(0.0, 0.3, 0.1, total)
    assert sched == [1000, 1900, 2710, 3000]
    assert sparsity_schedule(0.19, 0.271, 0.1, total) == [2710]
    assert sparsity_schedule(0.3, 0.3, 0.1, total) == []


def _equal_state(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class _Interrupt(Exception):
    pass


@real_data
def test_stage_rounds_recovery_resume_and_transfer(tmp_path, monkeypatch):
    full, broken = tmp_path / "full", tmp_path / "broken"
    figures = imp_stage(None, TINY_VIT, "none", full, 0.19, eval_data=CAMVID_SPEC, eval_limit=2, **RECOVERY, **EXT)

    # Two rounds (10 %, then 19 %), masks after each, final masks file, model with zeros baked in.
    assert figures["rounds"] == 2 and figures["sparsity"] == pytest.approx(0.19, abs=1e-5)
    assert (full / "masks" / "round_1.safetensors").is_file() and (full / "masks" / "round_2.safetensors").is_file()
    r1, meta = read_masks(full / "masks" / "round_1.safetensors")
    assert meta["model"] == TINY_VIT and meta["targets"] == "extended" and mask_sparsity(r1) == pytest.approx(0.1, abs=1e-5)
    final, _ = read_masks(full / "masks.safetensors")
    assert all((~final[k] | r1[k]).all() for k in final)  # round 2 only adds zeros
    seg, spec = load_segmentor(full)
    assert spec.lineage == ["prune-imp"] and not spec.shapes
    assert all(torch.equal(final[t.name], t.module.get_parameter(t.param) != 0)
               for t in imp_targets(seg.visual, "extended"))

    # Distillation recovery lowers the distillation loss every round (fixed probe batch) and while training.
    report = read_json(full / "prune_report.json")
    for row in report["rounds"]:
        assert row["loss_recovered"] < row["loss_pruned"]
    for losses in report["train_losses"].values():
        assert len(losses) == 3 and losses[-1] < losses[0]
    # Fidelity to the unpruned model on CamVid val; unstructured zeros compress but keep shapes and GMACs.
    fid = report["fidelity"]
    assert 0 < fid["teacher_miou"] <= 100 and 0.9 < fid["feature_cosine"] <= 1.0
    assert report["compressed_mb_after"] < report["compressed_mb_before"]
    assert report["params_m"] * 1e6 - report["nonzero_params_m_after"] * 1e6 == pytest.approx(
        sum(r["zeros"] for r in report["layers"]), abs=1)
    md = (full / "prune_report.md").read_text()
    assert "random-init weights" in md and "not dense-kernel latency" in md
    assert "| `transformer.resblocks.0.attn.in_proj_weight` | 192x64 | 12288 |" in md
    assert read_json(full / "manifest.json")["status"] == "complete"

    # Interrupted during round 2's recovery: round 1 is finished and recorded, no manifest.
    real_recover = imp_stage_mod.recover
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise _Interrupt
        return real_recover(*args, **kwargs)

    monkeypatch.setattr(imp_stage_mod, "recover", failing)
    with pytest.raises(_Interrupt):
        imp_stage(None, TINY_VIT, "none", broken, 0.19, **RECOVERY, **EXT)
    assert read_json(broken / "imp_state.json")["rounds_done"] == 1
    assert not (broken / "manifest.json").exists() and not (broken / "masks" / "round_2.safetensors").exists()

    # The rerun resumes at round 2 (one recovery only) and ends exactly where the uninterrupted run did.
    calls.clear()
    monkeypatch.setattr(imp_stage_mod, "recover", lambda *a, **k: (calls.append(1), real_recover(*a, **k))[1])
    imp_stage(None, TINY_VIT, "none", broken, 0.19, **RECOVERY, **EXT)
    assert len(calls) == 1
    resumed, _ = load_segmentor(broken)
    assert _equal_state(resumed, seg)
    assert load_file(str(broken / "masks.safetensors")).keys() == final.keys()
    assert all(torch.equal(load_file(str(broken / "masks.safetensors"))[k], final[k]) for k in final)

    # Other options into the same --out: refused, the finished run stays intact.
    manifest = (full / "manifest.json").read_bytes()
    with pytest.raises(OpenTransError, match="other options"):
        imp_stage(None, TINY_VIT, "none", full, 0.3, **RECOVERY, **EXT)
    assert (full / "manifest.json").read_bytes() == manifest

    # Transfer: a fresh model with other weights (as after reloading pretrained ones) takes the zero pattern.
    fresh, _ = build_segmentor(TINY_VIT, "none")
    with torch.no_grad():
        for p in fresh.visual.parameters():
            p.add_(0.01)  # no exact zeros anywhere
    result = apply_masks(fresh, full / "masks.safetensors")
    assert result["sparsity"] == pytest.approx(0.19, abs=1e-5) and result["model"] == TINY_VIT
    assert all(torch.equal(final[t.name], t.module.get_parameter(t.param) != 0)
               for t in imp_targets(fresh.visual, "extended"))
    assert (fresh.visual.conv1.weight != 0).all()

    # ... and through the stage (--masks), which composes with a later IMP run from the artifact.
    moved = tmp_path / "moved"
    figures = imp_stage(None, TINY_VIT, "none", moved, None, masks=full / "masks.safetensors")
    assert figures["sparsity"] == pytest.approx(0.19, abs=1e-5) and figures["rounds"] == 0
    assert torch.equal(load_file(str(moved / "masks.safetensors"))["transformer.resblocks.1.mlp.c_fc.weight"],
                       final["transformer.resblocks.1.mlp.c_fc.weight"])
    with pytest.raises(OpenTransError, match="pruned with --imp-targets extended"):
        imp_stage(moved, None, "none", tmp_path / "more", 0.271)  # the default (authors') set on a ViT artifact
    more = imp_stage(moved, None, "none", tmp_path / "more", 0.271, **EXT)
    assert more["rounds"] == 1 and more["sparsity_before"] == pytest.approx(0.19, abs=1e-5)
    assert more["sparsity"] == pytest.approx(1 - 0.9 ** 3, abs=1e-5)
    with pytest.raises(OpenTransError, match=r"already at 27\.1% sparsity"):
        imp_stage(tmp_path / "more", None, "none", tmp_path / "less", 0.2, **EXT)
    assert not (tmp_path / "less").exists()


@real_data
def test_resnet_stage_with_recovery(tmp_path):
    # one round of 50 %: 10 % of the tiny ResNet's convs barely moves its features (distillation loss ~3e-7), too
    # little for a recovery to show (the test pruned 10 % of the attention pool too before the authors' targets)
    figures = imp_stage(None, TINY_RN, "none", tmp_path / "rn", 0.5, rate=0.5, **{**RECOVERY, "distill_limit": 4})
    report = read_json(tmp_path / "rn" / "prune_report.json")
    assert figures["rounds"] == 1 and report["rounds"][0]["loss_recovered"] < report["rounds"][0]["loss_pruned"]
    assert report["targets"] == "authors" and "except the first conv" in (tmp_path / "rn" / "prune_report.md").read_text()
    seg, _ = load_segmentor(tmp_path / "rn")
    # the authors' targets (the default): convs only, the RGB conv1 kept; the attention pool stays dense
    assert (seg.visual.layer1[0].conv2.weight == 0).any() and (seg.visual.conv1.weight != 0).all()
    assert (seg.visual.attnpool.k_proj.weight != 0).all()
    # (before the authors' targets became the default, this test asserted zeros in attnpool.k_proj: ours)
    ext = imp_stage(None, TINY_RN, "none", tmp_path / "rn-ext", 0.1, **EXT)
    assert ext["rounds"] == 1
    seg, _ = load_segmentor(tmp_path / "rn-ext")
    assert (seg.visual.attnpool.k_proj.weight == 0).any() and (seg.visual.conv2.weight != 0).all()


def test_masks_for_another_architecture_are_refused(tmp_path):
    vit, _ = build_segmentor(TINY_VIT, "none")
    _run_rounds(vit, 1, targets="extended")
    from opentrans.prune.imp import save_masks

    # no "targets" metadata, as masks written before the target sets were an option: read from the keys
    path = save_masks(current_masks(vit.visual, "extended"), tmp_path / "vit_masks.safetensors", TINY_VIT)
    rn, _ = build_segmentor(TINY_RN, "none")
    before = {k: v.clone() for k, v in rn.state_dict().items()}
    with pytest.raises(OpenTransError, match="another architecture"):
        apply_masks(rn, path)
    assert _equal_state(rn, type("S", (), {"state_dict": lambda self: before})())
    narrow, _ = build_segmentor(TINY_VIT, "none")
    prune_structured(narrow, 0.5)
    with pytest.raises(OpenTransError, match=r"another architecture: .* is \[256, 64\] there, \[128, 64\]"):
        apply_masks(narrow, path)
    out = tmp_path / "out"
    with pytest.raises(OpenTransError, match="another architecture"):
        imp_stage(None, TINY_RN, "none", out, None, masks=path)
    assert not out.exists()
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(OpenTransError, match="not a safetensors"):
        imp_stage(None, TINY_VIT, "none", out, None, masks=tmp_path / "junk.safetensors")
    assert not out.exists()


@real_data
def test_image_folder_reader(tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    for src in sorted((CAMVID / "train").iterdir())[:2]:
        shutil.copy(src, images / src.name)
    (images / "notes.txt").write_text("not an image")
    ds = open_images(str(images), (64, 80), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert len(ds) == 2 and ds[0].shape == (3, 64, 80) and ds[0].dtype == torch.float32
    assert len(open_images(f"images:{images}", (64, 80), (0.5,) * 3, (0.25,) * 3, limit=1)) == 1
    assert len(open_images(CAMVID_SPEC, (64, 80), (0.5,) * 3, (0.25,) * 3, limit=3)) == 3


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"sparsity": 0.0}, "sparsity"), ({"sparsity": 1.0}, "sparsity"), ({"sparsity": 1.5}, "sparsity"),
    ({"sparsity": 0.5, "rate": 0.0}, "rate"), ({"sparsity": 0.5, "rate": 1.0}, "rate"),
    ({"sparsity": 0.5, "recovery_steps": 2}, "needs --distill-data"),
    ({"sparsity": 0.5, "recovery_steps": -1}, "recovery-steps"),
    ({"sparsity": 0.5, "recovery_steps": 1, "distill_data": "EMPTY", **EXT}, "no images"),
    ({"sparsity": 0.5, "recovery_steps": 1, "distill_data": "MISSING", **EXT}, "not a folder"),
    ({"sparsity": 0.5}, "nothing to prune in VisionTransformer"),
    ({"sparsity": 0.5, "targets": "mlp"}, "--imp-targets mlp"),
])
def test_bad_input_writes_nothing(tmp_path, kwargs, match):
    (tmp_path / "empty").mkdir()
    data = kwargs.get("distill_data")
    if data in ("EMPTY", "MISSING"):
        kwargs = {**kwargs, "distill_data": str(tmp_path / data.lower())}
    out = tmp_path / "out"
    with pytest.raises(OpenTransError, match=match):
        imp_stage(None, TINY_VIT, "none", out, **kwargs)
    assert not out.exists()


def test_cli_imp_and_one_line_errors(tmp_path):
    from click.testing import CliRunner

    from opentrans.cli import cli

    out = tmp_path / "cli"
    base = ["prune", "--method", "imp", "--model", TINY_VIT]
    default = CliRunner().invoke(cli, base + ["--sparsity", "0.1", "--out", str(tmp_path / "bad")])
    assert default.exit_code == 1 and "use --imp-targets extended" in default.output  # the authors' set: no ViT
    base += ["--imp-targets", "extended"]
    done = CliRunner().invoke(cli, base + ["--sparsity", "0.1", "--out", str(out)])
    assert done.exit_code == 0, done.output
    assert "sparsity: 0.1" in done.output and (out / "masks.safetensors").is_file()
    for extra, message in ((["--sparsity", "1.5"], "--sparsity 1.5"),
                           (["--sparsity", "0.5", "--masks", str(out / "masks.safetensors")], "not both"),
                           (["--sparsity", "0.5", "--recovery-steps", "2"], "needs --distill-data"),
                           (["--method", "structured", "--sparsity", "0.5", "--masks", "m.safetensors"], "imp only"),
                           (["--method", "structured", "--sparsity", "0.5"], "--imp-targets applies to --method imp")):
        bad = CliRunner().invoke(cli, base + extra + ["--out", str(tmp_path / "bad")])
        lines = [line for line in bad.output.splitlines() if line.strip()]
        assert bad.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error:") and message in lines[0], bad.output
    assert not (tmp_path / "bad").exists()


@real_data
def test_structured_prune_with_distillation_recovery_and_fidelity(tmp_path):
    out = tmp_path / "structured"
    figures = prune_stage(None, TINY_VIT, "none", out, 0.5, eval_data=CAMVID_SPEC, eval_limit=2, **RECOVERY)
    report = read_json(out / "prune_report.json")
    rec = report["recovery"]
    assert rec["steps"] == 3 and rec["loss_recovered"] < rec["loss_pruned"]
    assert figures["teacher_miou"] == report["fidelity"]["teacher_miou"] and 0 < figures["feature_cosine"] <= 1
    md = (out / "prune_report.md").read_text()
    assert "Recovery: 3 label-free distillation steps" in md and "teacher-agreement mIoU" in md
    seg, _ = load_segmentor(out)
    assert seg.visual.transformer.resblocks[0].mlp.c_fc.out_features == 128
    with pytest.raises(OpenTransError, match="needs --distill-data"):
        prune_stage(None, TINY_VIT, "none", tmp_path / "bad", 0.5, recovery_steps=2)
    assert not (tmp_path / "bad").exists()


@real_data
def test_recovery_under_torchrun_ddp_gloo_matches_single_process(tmp_path):
    """2 processes (gloo, CPU), one image each per step: DDP averages the gradients, so the recovered weights
    equal a single-process run on the same 2-image batches."""
    from pathlib import Path

    from safetensors import safe_open

    worker = Path(__file__).with_name("prune_ddp_worker.py")
    out = tmp_path / "ddp.safetensors"
    stage_dir = tmp_path / "stage"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker),
           CAMVID_SPEC, str(out), str(stage_dir)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    with safe_open(str(out), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["world"] == "2"
    # imp_stage under torchrun: rank 0 wrote a complete stage, both ranks got the same figures back
    assert read_json(stage_dir / "manifest.json")["status"] == "complete"
    assert (stage_dir / "masks.safetensors").is_file() and (stage_dir / "masks" / "round_1.safetensors").is_file()
    figs = [read_json(tmp_path / f"figures_rank{r}.json") for r in (0, 1)]
    assert figs[0] == figs[1] and figs[0]["rounds"] == 1
    sys.path.insert(0, str(worker.parent))
    try:
        from prune_ddp_worker import run
    finally:
        sys.path.remove(str(worker.parent))
    single, losses = run(CAMVID_SPEC)
    ddp = load_file(str(out))
    assert ddp.keys() == single.keys()
    for k in single:
        torch.testing.assert_close(ddp[k], single[k], rtol=1e-4, atol=1e-6)
    assert [float(x) for x in meta["losses"].split(",")] == pytest.approx(losses, rel=1e-4)
    fresh = build_segmentor(TINY_VIT, "none")[0].visual.state_dict()
    changed = [k for k in single if not torch.equal(single[k], fresh[k])]
    assert changed  # recovery did train
