"""Calibration images for INT8 quantisation, from a dataset or from any folder of images.

``--calib-data`` accepts:

* ``FORMAT:PATH``, any format of :func:`opentrans.data.open_dataset` (``camvid:``, ``folder:``, ``voc:``, ...):
  the images of its ``train`` split (masks are not read);
* ``images:PATH`` or a bare ``PATH``: every image file (``.png``, ``.jpg``, ...) under ``PATH``, recursively,
  in sorted order; no masks and no ``classes.txt`` needed (unlabelled pictures from the deployment site are the
  best calibration data);
* ``folder:PATH`` where ``PATH`` has no ``images/`` sub-folder: treated as ``images:PATH``.

Images are resized and normalised exactly as the model's input (:func:`opentrans.data.datasets.preprocess_image`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from opentrans.errors import OpenTransError

IMAGES_PREFIX = "images"


def _image_files(root: Path) -> list[Path]:
    from opentrans.data.datasets import IMAGE_SUFFIXES

    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def calibration_source(spec: str) -> tuple[str, Path]:
    """Classify a ``--calib-data`` value without reading images: ``("dataset", root)`` for a ``FORMAT:PATH``
    dataset spec, ``("images", folder)`` for a plain folder of images.

    Raises:
        OpenTransError: an unknown format or a path that is not a folder.
    """
    from opentrans.data import DATA_FORMATS, parse_data_spec

    fmt, sep, rest = str(spec).partition(":")
    if sep and fmt == IMAGES_PREFIX:
        root = Path(rest).expanduser()
    elif sep and fmt in DATA_FORMATS:
        _, root = parse_data_spec(spec)
        if fmt == "folder" and not (root / "images").is_dir() and not (root / "train" / "images").is_dir():
            return "images", root
        return "dataset", root
    elif sep and len(fmt) > 1 and not Path(spec).expanduser().is_dir():
        raise OpenTransError(f"--calib-data {spec}: expected FORMAT:PATH with FORMAT one of "
                             f"{', '.join(DATA_FORMATS)}, images:PATH, or a folder of images")
    else:
        root = Path(spec).expanduser()
    if not root.is_dir():
        raise OpenTransError(f"--calib-data {spec}: {root} is not a folder")
    return "images", root


def calibration_images(spec: str, image_size: tuple[int, int], mean, std, limit: int) -> list[np.ndarray]:
    """Up to ``limit`` calibration images from ``spec`` (see the module docstring), each float32 (1,3,H,W)
    with (H, W) = ``image_size``, normalised with ``mean``/``std``.

    Raises:
        OpenTransError: ``limit`` < 1, a bad spec, a folder without images, or an unreadable image.
    """
    from opentrans.data import open_dataset
    from opentrans.data.datasets import _read, preprocess_image

    if limit < 1:
        raise OpenTransError(f"--calib-size {limit}: must be at least 1")
    kind, root = calibration_source(spec)
    if kind == "dataset":
        ds = open_dataset(spec, "train", image_size, mean, std, limit=limit)
        return [ds.preprocess(ds.load_image(i)[0])[None].numpy() for i in range(len(ds))]
    files = _image_files(root)[:limit]
    if not files:
        raise OpenTransError(f"--calib-data {spec}: no images (.png, .jpg, ...) in {os.fspath(root)}")
    return [preprocess_image(_read(f, "RGB")[0], image_size, mean, std)[None].numpy() for f in files]
