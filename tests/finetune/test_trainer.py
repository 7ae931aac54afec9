"""The finetune trainer at stage level: progress bar, kill + resume of a whole ``finetune`` run, torchrun DDP."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from opentrans.data import open_dataset
from opentrans.finetune.freeze import apply_freeze_plan, head_only_plan
from opentrans.finetune.trainer import train_segmentor
from conftest import CAMVID_SPEC, TINY_VIT, real_data


@real_data
def test_progress_bar_shows_loss_and_learning_rate(tiny_vit, capsys):
    seg, spec = tiny_vit
    ds = open_dataset(CAMVID_SPEC, "train", spec.image_size, spec.mean, spec.std, limit=1)
    apply_freeze_plan(seg, head_only_plan())
    text = seg.encode_classes(list(ds.class_names), model_name=spec.model)
    losses = train_segmentor(seg, ds, text, steps=2, batch_size=1, lr=2e-3, progress=True)
    err = capsys.readouterr().err
    assert "finetune" in err and f"loss={losses[0]:.4f}" in err and "lr=2.00e-03" in err


@real_data
def test_killed_finetune_stage_reruns_to_the_same_weights(tmp_path, monkeypatch):
    """A ``finetune`` run killed after step 3 (checkpoint at step 2) and run again with the same options ends
    with exactly the weights of an uninterrupted run."""
    import opentrans.finetune.stage as stage
    from opentrans.finetune.options import FinetuneOptions
    from opentrans.models.source import ModelSource

    kwargs = {"steps": 4, "batch_size": 1, "lr": 1e-3, "train_limit": 2, "val_limit": 1,
              "checkpoint_every": 2, "seed": 5, "freeze_policy": "fraction", "freeze_fraction": 0.75}
    full = tmp_path / "full"
    stage.finetune_stage(ModelSource(model=TINY_VIT), FinetuneOptions(**kwargs), full, CAMVID_SPEC, progress=False)

    class Killed(Exception):
        pass

    def kill(step, loss):
        if step == 3:
            raise Killed

    out = tmp_path / "killed"
    real = stage.train_segmentor
    monkeypatch.setattr(stage, "train_segmentor", functools.partial(real, on_step=kill))
    with pytest.raises(Killed):
        stage.finetune_stage(ModelSource(model=TINY_VIT), FinetuneOptions(**kwargs), out, CAMVID_SPEC, progress=False)
    assert json.loads((out / "checkpoints" / "trainer_state.json").read_text())["step"] == 2
    assert not (out / "model.safetensors").exists() and not (out / "manifest.json").exists()

    seen = []
    monkeypatch.setattr(stage, "train_segmentor", functools.partial(real, on_step=lambda s, _: seen.append(s)))
    stage.finetune_stage(ModelSource(model=TINY_VIT), FinetuneOptions(**kwargs), out, CAMVID_SPEC, progress=False)
    assert seen == [3, 4]  # steps 1-2 came from the checkpoint
    a, b = load_file(str(full / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((d / "finetune_report.json").read_text()) for d in (full, out))
    assert ra["loss"]["curve"] == rb["loss"]["curve"] and ra["trainable_layers"]  # CLIP layers trained too


@real_data
def test_finetune_under_torchrun_ddp_gloo_matches_single_process(tmp_path):
    """2 processes (gloo, CPU), one image each of a global batch of 2: the finetuned weights and losses equal a
    single-process run on the same batches, and only rank 0 writes files."""
    worker = Path(__file__).with_name("finetune_ddp_worker.py")
    ddp_out, logs = tmp_path / "ddp", tmp_path / "logs"
    logs.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker),
           CAMVID_SPEC, str(ddp_out), str(logs)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(worker.parents[2])}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0 = json.loads((logs / "writes-rank0.json").read_text())
    rank1 = json.loads((logs / "writes-rank1.json").read_text())
    assert rank0["world"] == rank1["world"] == "2"
    assert rank1["written"] == [] and rank1["figures"] == {}  # one writer
    names = {Path(p).name for p in rank0["written"]}
    assert {"model.safetensors", "finetune_report.json", "manifest.json", "trainer_state.json"} <= names

    sys.path.insert(0, str(worker.parent))
    try:
        from finetune_ddp_worker import SETTINGS, run
    finally:
        sys.path.remove(str(worker.parent))
    single_out = tmp_path / "single"
    run(CAMVID_SPEC, str(single_out))
    ddp, single = load_file(str(ddp_out / "model.safetensors")), load_file(str(single_out / "model.safetensors"))
    assert ddp.keys() == single.keys()
    lr, steps = SETTINGS["lr"], SETTINGS["steps"]
    for k in single:
        if k.endswith("attn.in_proj_bias"):
            # the key bias adds q.b_k to every logit of a query: softmax ignores it, its exact gradient is 0 and
            # Adam's g / (|g| + eps) turns the float noise left in it into arbitrary steps (at most lr each)
            e = single[k].shape[0] // 3
            torch.testing.assert_close(ddp[k][e:2 * e], single[k][e:2 * e], rtol=0, atol=lr * steps)
            ddp[k], single[k] = torch.cat([ddp[k][:e], ddp[k][2 * e:]]), torch.cat([single[k][:e], single[k][2 * e:]])
        torch.testing.assert_close(ddp[k], single[k], rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    rd, rs = (json.loads((d / "finetune_report.json").read_text()) for d in (ddp_out, single_out))
    assert rd["world_size"] == 2 and rs["world_size"] == 1
    assert rd["loss"]["curve"] == pytest.approx(rs["loss"]["curve"], rel=1e-5)
    assert rs["trainable_layers"] and rs["trainable_by_component"]["clip_layers"] > 0
