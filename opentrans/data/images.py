"""Unlabelled images for calibration (deploy ``--calib-data``) and distillation (prune ``--distill-data``): one
parser for every way of naming them.

A source is

* ``FORMAT:PATH``, any format of :func:`opentrans.data.open_dataset` (``camvid:``, ``folder:``, ``voc:``, ...):
  the images of its ``train`` split (masks are not read);
* ``images:PATH`` or a bare ``PATH``: every image file (:data:`~opentrans.data.datasets.IMAGE_SUFFIXES`) under
  ``PATH``, recursively, in sorted order, hidden files and folders skipped; no masks and no ``classes.txt``;
* ``folder:PATH`` where ``PATH`` has no ``images/`` sub-folder: treated as ``images:PATH``.

Images are resized and normalised exactly as the model's input (:func:`opentrans.data.datasets.preprocess_image`):
float32 ``(3, H, W)``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from opentrans.data.datasets import IMAGE_SUFFIXES, _read, preprocess_image
from opentrans.errors import OpenTransError

IMAGES_PREFIX = "images"


def image_files(root: Path) -> list[Path]:
    """Every image file under ``root``, recursively, sorted; hidden files and folders skipped."""
    root = Path(root)
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def parse_image_source(spec: str, flag: str = "--data") -> tuple[str, Path]:
    """Classify an image source without reading images: ``("dataset", root)`` for a ``FORMAT:PATH`` dataset
    spec, ``("images", folder)`` for a plain folder of images.

    Raises:
        OpenTransError: (naming ``flag``) an unknown format or a path that is not a folder.
    """
    from opentrans.data import DATA_FORMATS, parse_data_spec

    fmt, sep, rest = str(spec).partition(":")
    if sep and fmt == IMAGES_PREFIX:
        root = Path(rest).expanduser()
    elif sep and fmt in DATA_FORMATS:
        _, root = parse_data_spec(spec)
        if fmt == "folder" and not (root / "images").is_dir() and not (root / "train" / "images").is_dir():
            return IMAGES_PREFIX, root
        return "dataset", root
    elif sep and len(fmt) > 1 and not Path(spec).expanduser().is_dir():
        raise OpenTransError(f"{flag} {spec}: expected FORMAT:PATH with FORMAT one of "
                             f"{', '.join(DATA_FORMATS)}, images:PATH, or a folder of images")
    else:
        root = Path(spec).expanduser()
    if not root.is_dir():
        raise OpenTransError(f"{flag} {spec}: {root} is not a folder")
    return IMAGES_PREFIX, root


class ImageFolder(torch.utils.data.Dataset):
    """The image files of a folder (:func:`image_files`), preprocessed like the segmentation datasets -> float32
    ``(3, H, W)``.

    Raises:
        OpenTransError: (naming ``flag``) no images in the folder.
    """

    def __init__(self, root: Path, image_size: tuple[int, int], mean, std, limit: int | None = None,
                 flag: str = "--data"):
        self.name = f"{IMAGES_PREFIX}:{root}"
        self.paths = image_files(root)[:limit]
        if not self.paths:
            raise OpenTransError(f"{flag} {root}: no images (.png, .jpg, ...) in {os.fspath(root)}")
        self.image_size = tuple(image_size)
        self.mean, self.std = tuple(mean), tuple(std)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, idx: int) -> torch.Tensor:
        rgb, _ = _read(self.paths[idx], "RGB")
        return preprocess_image(rgb, self.image_size, self.mean, self.std)


class ImagesOnly(torch.utils.data.Dataset):
    """The images of a segmentation dataset (its masks are not read) -> float32 ``(3, H, W)``."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.name = dataset.name

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: int) -> torch.Tensor:
        rgb, _ = self.dataset.load_image(idx)
        return self.dataset.preprocess(rgb)


def open_images(spec: str, image_size: tuple[int, int], mean, std, limit: int | None = None,
                flag: str = "--data"):
    """The images of a source (see the module docstring), at most ``limit``.

    Returns:
        A dataset of float32 ``(3, H, W)`` tensors with ``name`` and ``len``.

    Raises:
        OpenTransError: (naming ``flag``) a bad spec, a path that is not a folder, no images there, a bad dataset.
    """
    from opentrans.data import open_dataset

    kind, root = parse_image_source(spec, flag)
    if kind == "dataset":
        return ImagesOnly(open_dataset(spec, "train", image_size, mean, std, limit=limit))
    return ImageFolder(root, image_size, mean, std, limit=limit, flag=flag)
