"""Calibration images for INT8 quantisation, from a dataset or from any folder of images (``--calib-data``: any
source :mod:`opentrans.data.images` parses, the same parser as prune's ``--distill-data``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from opentrans.data.images import open_images, parse_image_source
from opentrans.errors import OpenTransError


def calibration_source(spec: str) -> tuple[str, Path]:
    """Classify a ``--calib-data`` value without reading images (:func:`opentrans.data.images.parse_image_source`).

    Raises:
        OpenTransError: an unknown format or a path that is not a folder.
    """
    return parse_image_source(spec, "--calib-data")


def calibration_images(spec: str, image_size: tuple[int, int], mean, std, limit: int) -> list[np.ndarray]:
    """Up to ``limit`` calibration images from ``spec`` (:mod:`opentrans.data.images`), each float32 (1,3,H,W)
    with (H, W) = ``image_size``, normalised with ``mean``/``std``.

    Raises:
        OpenTransError: ``limit`` < 1, a bad spec, a folder without images, or an unreadable image.
    """
    if limit < 1:
        raise OpenTransError(f"--calib-size {limit}: must be at least 1")
    images = open_images(spec, image_size, mean, std, limit=limit, flag="--calib-data")
    return [images[i][None].numpy() for i in range(len(images))]
