"""Zero-shot protocol: seen/unseen split, mIoU(S) / mIoU(U) / hIoU, and training that never sees an unseen label."""

from __future__ import annotations

import json

import pytest
import torch

from opentrans.errors import OpenTransError
from opentrans.metrics import ConfusionMatrix, harmonic_iou, zero_shot_summary
from conftest import CAMVID_SPEC, TINY_VIT, real_data

UNSEEN = ["car", "pedestrian", "bicyclist"]  # the CamVid split of docs/finetune.md


def test_zero_shot_metrics_on_a_hand_worked_confusion_matrix():
    # rows = ground truth, columns = prediction
    #   [[3, 1, 0],      IoU0 = 3 / (4 + 4 - 3) = 0.6
    #    [1, 2, 1],      IoU1 = 2 / (4 + 3 - 2) = 0.4
    #    [0, 0, 2]]      IoU2 = 2 / (2 + 3 - 2) = 2/3
    # unseen = {c2}: S = (0.6 + 0.4) / 2 = 0.5, U = 2/3, hIoU = 2 S U / (S + U) = (2/3) / (7/6) = 4/7
    cells = {(0, 0): 3, (0, 1): 1, (1, 0): 1, (1, 1): 2, (1, 2): 1, (2, 2): 2}
    gt = torch.tensor([g for (g, _), n in cells.items() for _ in range(n)])
    pred = torch.tensor([p for (_, p), n in cells.items() for _ in range(n)])
    cm = ConfusionMatrix(3, ignore_index=255)
    cm.update(pred, gt)
    cm.update(torch.tensor([0, 1]), torch.tensor([255, 255]))  # ignored pixels change nothing
    assert cm.matrix.tolist() == [[3, 1, 0], [1, 2, 1], [0, 0, 2]]
    summary = cm.summary(["a", "b", "c"])
    assert summary["per_class_iou"] == {"a": 60.0, "b": 40.0, "c": 66.67}
    zs = zero_shot_summary(summary["per_class_iou"], ["c"])
    assert zs["seen"] == ["a", "b"] and zs["unseen"] == ["c"]
    assert zs["miou_seen"] == pytest.approx(50.0)
    assert zs["miou_unseen"] == pytest.approx(66.67)
    assert zs["hiou"] == pytest.approx(100 * 4 / 7, abs=1e-2)
    # a class absent from labels and predictions (None) is left out of its group's mean
    zs = zero_shot_summary({"a": 60.0, "b": None, "c": 20.0, "d": 40.0}, ["c", "d"])
    assert zs["miou_seen"] == 60.0 and zs["miou_unseen"] == 30.0 and zs["hiou"] == pytest.approx(40.0)
    assert harmonic_iou(0.0, 0.0) == 0.0 and harmonic_iou(50.0, 0.0) == 0.0 and harmonic_iou(None, 3.0) is None
    with pytest.raises(ValueError, match="'zebra'"):
        zero_shot_summary({"a": 1.0}, ["zebra"])


@real_data
def test_seen_classes_dataset_renumbers_and_hides_unseen(tiny_vit):
    from opentrans.data import open_dataset
    from opentrans.finetune.trainer import SeenClassesDataset

    _, spec = tiny_vit
    full = open_dataset(CAMVID_SPEC, "train", spec.image_size, spec.mean, spec.std, limit=1)
    seen = SeenClassesDataset(full, UNSEEN)
    assert seen.class_names == tuple(n for n in full.class_names if n not in UNSEEN) and len(seen) == 1
    image, mask = full[0]
    image2, mask2 = seen[0]
    assert torch.equal(image, image2)
    assert bool((mask == full.class_names.index("car")).any())  # the image has unseen pixels to hide
    for new, name in enumerate(seen.class_names):
        assert torch.equal(mask2 == new, mask == full.class_names.index(name))
    hidden = torch.isin(mask, torch.tensor([full.class_names.index(n) for n in UNSEEN]))
    assert bool((mask2[hidden] == full.ignore_index).all())
    with pytest.raises(OpenTransError, match="'zebra' is not a class"):
        SeenClassesDataset(full, ["zebra"])


@real_data
def test_zero_shot_finetune_never_trains_on_unseen_labels(tmp_path, monkeypatch):
    import opentrans.finetune.trainer as trainer
    from opentrans.artifacts import load_manifest
    from opentrans.finetune.options import FinetuneOptions
    from opentrans.finetune.stage import finetune_stage
    from opentrans.models.source import ModelSource

    received = []
    real_loss = trainer.segmentation_loss

    def spy(logits, target, ignore_index, loss="ce", **kw):
        received.append((logits.shape[1], set(target.unique().tolist()), ignore_index))
        return real_loss(logits, target, ignore_index, loss, **kw)

    monkeypatch.setattr(trainer, "segmentation_loss", spy)
    out = tmp_path / "zs"
    figures = finetune_stage(ModelSource(model=TINY_VIT),
                             FinetuneOptions(steps=2, batch_size=2, lr=1e-3, train_limit=2, val_limit=2,
                                             freeze_heavy_tail=False, unseen_classes=",".join(UNSEEN)),
                             out, CAMVID_SPEC, progress=False)
    assert len(received) == 2
    for classes, labels, ignore in received:
        assert classes == 8  # logits only against the 8 seen classes' text embeddings
        assert labels <= set(range(8)) | {ignore}  # no unseen (or out-of-range) label reaches the loss
        assert labels & set(range(8))
    report = json.loads((out / "finetune_report.json").read_text())
    zs = report["zero_shot"]
    assert zs["unseen"] == UNSEEN and len(zs["seen"]) == 8
    assert set(zs["after"]) == {"miou_seen", "miou_unseen", "hiou"}
    assert len(report["per_class_iou_after"]) == 11  # evaluated on every class
    after = zero_shot_summary(report["per_class_iou_after"], UNSEEN)
    assert zs["after"]["miou_seen"] == after["miou_seen"] and zs["after"]["hiou"] == after["hiou"]
    assert {"miou_seen", "miou_unseen", "hiou"} <= set(figures) and load_manifest(out)["figures"] == figures
    assert "hIoU after" in (out / "finetune_report.md").read_text()
    assert load_manifest(out)["options"]["unseen_classes"] == UNSEEN


@real_data
@pytest.mark.parametrize("unseen, match", [("car,zebra", "'zebra' is not a class"),
                                           ("car,car", "named twice")])
def test_bad_unseen_classes_fail_before_writing(tmp_path, unseen, match):
    from opentrans.finetune.options import FinetuneOptions
    from opentrans.finetune.stage import finetune_stage
    from opentrans.models.source import ModelSource

    out = tmp_path / "bad"
    with pytest.raises(OpenTransError, match=match) as info:
        finetune_stage(ModelSource(model=TINY_VIT), FinetuneOptions(steps=1, train_limit=1, val_limit=1,
                                                                    unseen_classes=unseen),
                       out, CAMVID_SPEC, progress=False)
    assert "\n" not in str(info.value) and not out.exists()


def test_camvid_zero_shot_recipe_uses_the_documented_split():
    from pathlib import Path

    from opentrans.finetune.stage import CAMVID_UNSEEN
    from opentrans.recipe import load_recipe

    recipe = load_recipe(Path(__file__).resolve().parents[2] / "recipes" / "camvid-zero-shot.yaml")
    assert recipe.finetune.unseen_classes == list(CAMVID_UNSEEN) == UNSEEN
    assert "car, pedestrian, bicyclist" in (Path(__file__).resolve().parents[2] / "docs" / "finetune.md").read_text()
