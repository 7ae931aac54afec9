"""CamVid and plain-folder readers on the real CamVid files."""

import shutil

import numpy as np
import pytest
from PIL import Image

from opentrans.data import open_dataset, parse_data_spec
from opentrans.errors import OpenTransError
from conftest import CAMVID, CAMVID_SPEC, real_data

SIZE, MEAN, STD = (64, 80), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


@real_data
def test_camvid_split_files_as_shipped():
    ds = open_dataset(CAMVID_SPEC, "val", SIZE, MEAN, STD)
    assert len(ds) == 101
    assert ds.class_names[0] == "sky" and ds.class_names[-1] == "bicyclist" and len(ds.class_names) == 11
    assert ds.ignore_index == 11
    img_path, mask_path = ds.pairs[0]
    assert img_path.parent == CAMVID / "val" and mask_path.parent == CAMVID / "valannot"
    image, mask = ds[0]
    assert image.shape == (3, *SIZE) and image.dtype.is_floating_point
    assert mask.shape == (360, 480)
    raw = np.asarray(Image.open(mask_path))
    np.testing.assert_array_equal(mask.numpy(), raw)  # CamVid values 0..11 are kept as they are
    # normalisation: (x - mean) / std of pixels in [0, 1] lies in [-2, 2]
    assert image.min() >= -2.0 - 1e-6 and image.max() <= 2.0 + 1e-6


@real_data
def test_limit_and_split():
    assert len(open_dataset(CAMVID_SPEC, "train", SIZE, MEAN, STD, limit=5)) == 5
    with pytest.raises(OpenTransError, match="--split"):
        open_dataset(CAMVID_SPEC, "holdout", SIZE, MEAN, STD)


def test_bad_spec():
    with pytest.raises(OpenTransError, match="FORMAT:PATH"):
        parse_data_spec("voc2012")
    with pytest.raises(OpenTransError, match="not a folder"):
        parse_data_spec("camvid:/nonexistent/camvid")


def _copy_camvid_subset(tmp_path, n=2):
    root = tmp_path / "camvid"
    for sub in ("val", "valannot"):
        (root / sub).mkdir(parents=True)
    lines = (CAMVID / "val.txt").read_text().splitlines()[:n]
    for line in lines:
        for p in line.split():
            rel = p.replace("/SegNet/CamVid/", "")
            shutil.copy(CAMVID / rel, root / rel)
    (root / "val.txt").write_text("\n".join(lines) + "\n")
    shutil.copy(CAMVID / "classes.txt", root / "classes.txt")
    return root


@real_data
def test_missing_file_is_named(tmp_path):
    root = _copy_camvid_subset(tmp_path)
    victim = sorted((root / "valannot").iterdir())[0]
    victim.unlink()
    with pytest.raises(OpenTransError, match=victim.name):
        open_dataset(f"camvid:{root}", "val", SIZE, MEAN, STD)


@real_data
def test_unreadable_and_mismatched_files_are_named(tmp_path):
    root = _copy_camvid_subset(tmp_path)
    images = sorted((root / "val").iterdir())
    images[0].write_bytes(b"not a png")
    ds = open_dataset(f"camvid:{root}", "val", SIZE, MEAN, STD)
    with pytest.raises(OpenTransError, match=f"{images[0].name}: cannot read image"):
        ds[0]
    mask = sorted((root / "valannot").iterdir())[1]
    Image.open(mask).resize((240, 180)).save(mask)
    with pytest.raises(OpenTransError, match=f"{mask.name}: mask is 240x180"):
        ds[1]


def test_folder_layout(tmp_path):
    root = tmp_path / "mydata"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("background\nthing\n")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(root / "images" / f"{i}.jpg")
        m = np.zeros((40, 50), np.uint8)
        m[:10] = 1
        m[-5:] = 255
        m[20:22] = 7  # out of range -> ignore
        Image.fromarray(m).save(root / "masks" / f"{i}.png")
    ds = open_dataset(f"folder:{root}", "val", SIZE, MEAN, STD)
    assert len(ds) == 3 and ds.class_names == ("background", "thing") and ds.ignore_index == 255
    _, mask = ds[0]
    assert set(mask.unique().tolist()) == {0, 1, 255}
    assert int((mask == 255).sum()) == 5 * 50 + 2 * 50
