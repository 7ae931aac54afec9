"""Dataset layouts users bring (VOC, ADE20K, Cityscapes, PASCAL-Context, COCO-Object): tiny fixtures written
in each layout, read back with the layout's label conventions; and the real COCO-Object mini."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import COCO_OBJECT, real_data
from opentrans.data import open_dataset
from opentrans.data.datasets import CITYSCAPES_CLASSES, CONTEXT59_CLASSES, VOC_CLASSES
from opentrans.errors import OpenTransError

SIZE, MEAN, STD = (32, 48), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
RAW = np.array([[0, 1, 2, 255], [3, 0, 1, 2]], dtype=np.uint8).repeat(5, 0).repeat(6, 1)  # 10x24 labels


def _image(path, h=10, w=24):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


def _mask(path, arr=RAW, palette=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr, mode="L")
    if palette:  # VOC masks are palette PNGs whose colours are not the indices
        im = Image.fromarray(arr).convert("P")
        im.putpalette([(i * 37) % 256 for i in range(256 * 3)])
    im.save(path)


def _check(ds, expected, n=1):
    assert len(ds) == n
    image, mask = ds[0]
    assert image.shape == (3, *SIZE)
    np.testing.assert_array_equal(mask.numpy(), expected)


def test_voc_layout_palette_masks(tmp_path):
    base = tmp_path / "VOCdevkit" / "VOC2012"
    for stem in ("2007_000032", "2007_000039"):
        _image(base / "JPEGImages" / f"{stem}.jpg")
        _mask(base / "SegmentationClass" / f"{stem}.png", palette=True)
    (base / "ImageSets" / "Segmentation").mkdir(parents=True)
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000039\n")
    ds = open_dataset(f"voc:{tmp_path}", "val", SIZE, MEAN, STD)  # the VOCdevkit parent is accepted
    assert ds.pairs[0][0].name == "2007_000039.jpg"
    assert ds.class_names == VOC_CLASSES and ds.background_index == 0 and ds.ignore_index == 255
    _check(ds, RAW.astype(np.int64))  # palette indices, not grey levels; 255 stays ignore


def test_voc20_ignores_background_and_shifts_labels(tmp_path):
    base = tmp_path / "VOC2012"
    _image(base / "JPEGImages" / "a.jpg")
    _mask(base / "SegmentationClass" / "a.png", palette=True)
    (base / "ImageSets" / "Segmentation").mkdir(parents=True)
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text("a\n")
    ds = open_dataset(f"voc20:{base}", "val", SIZE, MEAN, STD)
    # PASCAL VOC 2012's 20 object classes in label order (written out, not the loader's own constant)
    assert tuple(ds.class_names[:3]) == ("aeroplane", "bicycle", "bird") and ds.class_names[-1] == "tv monitor"
    assert len(ds.class_names) == 20 and ds.background_index is None
    expected = np.where(RAW == 0, 255, RAW.astype(np.int64) - 1)
    expected[RAW == 255] = 255
    _check(ds, expected)  # background -> ignore, aeroplane (1) -> 0, ..., 255 stays ignore


def test_ade20k_layout_reduces_zero_label(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    _image(root / "images" / "validation" / "ADE_val_00000001.jpg")
    _mask(root / "annotations" / "validation" / "ADE_val_00000001.png")
    _image(root / "images" / "training" / "ADE_train_00000001.jpg")
    _mask(root / "annotations" / "training" / "ADE_train_00000001.png")
    ds = open_dataset(f"ade20k:{root}", "val", SIZE, MEAN, STD)
    # ADE20K (SceneParsing 150) label order, written out: 1 wall, 2 building, 3 sky, ..., 150 flag
    assert tuple(ds.class_names[:3]) == ("wall", "building", "sky") and ds.class_names[-1] == "flag"
    assert len(ds.class_names) == 150 and ds.background_index is None
    expected = np.where(RAW == 0, 255, RAW.astype(np.int64) - 1)
    expected[RAW == 255] = 255
    _check(ds, expected)
    assert open_dataset(f"ade20k:{root}", "train", SIZE, MEAN, STD).pairs[0][0].parent.name == "training"


def test_cityscapes_layout_train_ids(tmp_path):
    for city, name in (("frankfurt", "frankfurt_000000_000294"), ("lindau", "lindau_000000_000019")):
        _image(tmp_path / "leftImg8bit" / "val" / city / f"{name}_leftImg8bit.png")
        arr = RAW.copy()
        arr[0, 0] = 18  # bicycle, the last train id; 19+ would be out of range -> ignore
        arr[0, 1] = 33
        _mask(tmp_path / "gtFine" / "val" / city / f"{name}_gtFine_labelTrainIds.png", arr)
    ds = open_dataset(f"cityscapes:{tmp_path}", "val", SIZE, MEAN, STD)
    assert ds.class_names == CITYSCAPES_CLASSES and len(ds) == 2
    expected = RAW.astype(np.int64)
    expected[0, 0], expected[0, 1] = 18, 255
    np.testing.assert_array_equal(ds[0][1].numpy(), expected)
    assert ds.pairs[1][1].name == "lindau_000000_000019_gtFine_labelTrainIds.png"


def test_pascal_context_59_layout(tmp_path):
    base = tmp_path / "VOCdevkit" / "VOC2010"
    _image(base / "JPEGImages" / "2008_000002.jpg")
    arr = RAW.copy()
    arr[0, 0] = 59  # the last of the 59 classes -> index 58
    _mask(base / "SegmentationClassContext" / "2008_000002.png", arr)
    (base / "ImageSets" / "SegmentationContext").mkdir(parents=True)
    (base / "ImageSets" / "SegmentationContext" / "val.txt").write_text("2008_000002\n")
    ds = open_dataset(f"pascal-context:{base}", "val", SIZE, MEAN, STD)
    assert ds.class_names == CONTEXT59_CLASSES
    expected = np.where(arr == 0, 255, arr.astype(np.int64) - 1)
    expected[arr == 255] = 255
    _check(ds, expected)


def test_coco_object_mmseg_layout_and_errors(tmp_path):
    _image(tmp_path / "images" / "val2017" / "000000000139.jpg")
    arr = RAW.copy()
    arr[0, 0] = 80
    _mask(tmp_path / "annotations" / "val2017" / "000000000139_instanceTrainIds.png", arr)
    ds = open_dataset(f"coco-object:{tmp_path}", "val", SIZE, MEAN, STD)
    assert len(ds.class_names) == 81 and ds.class_names[0] == "background" and ds.background_index == 0
    expected = arr.astype(np.int64)
    _check(ds, expected)
    with pytest.raises(OpenTransError, match="PASCAL VOC"):
        open_dataset(f"voc:{tmp_path}", "val", SIZE, MEAN, STD)
    with pytest.raises(OpenTransError, match="Cityscapes"):
        open_dataset(f"cityscapes:{tmp_path}", "val", SIZE, MEAN, STD)


@real_data
def test_shared_coco_object_mini():
    ds = open_dataset(f"coco-object:{COCO_OBJECT}", "val", SIZE, MEAN, STD, limit=3)
    assert len(ds.class_names) == 81 and ds.class_names[1] == "person" and ds.background_index == 0
    image, mask = ds[0]
    values = set(np.unique(mask.numpy()).tolist())
    assert 0 in values and values <= set(range(81)) | {255}
