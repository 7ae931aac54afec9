"""Dataset readers.

Every dataset yields ``(image, mask)``: ``image`` float32 ``(3, H, W)`` resized to the model's input size
and normalised with CLIP's mean/std, ``mask`` int64 ``(h0, w0)`` at the label's own resolution, with every
unlabelled pixel set to the dataset's ignore index (metrics are computed at label resolution).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from opentrans.errors import OpenTransError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SegDataset(torch.utils.data.Dataset):
    """Pairs of image and index-mask files with class names and an ignore index.

    Attributes:
        name: dataset format and root, for reports.
        pairs: ``(image path, mask path)``, in split-file order.
        class_names: names in label-index order (index i = class i).
        ignore_index: label value excluded from losses and metrics; mask values ``>= len(class_names)``
            are mapped to it too.
        image_size: network input (H, W) in pixels.
        mean, std: RGB normalisation constants for images scaled to [0, 1].
    """

    name: str
    pairs: tuple[tuple[Path, Path], ...]
    class_names: tuple[str, ...]
    ignore_index: int
    image_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __len__(self) -> int:
        return len(self.pairs)

    def load_image(self, idx: int) -> tuple[np.ndarray, tuple[int, int]]:
        """RGB uint8 ``(h0, w0, 3)`` of pair ``idx`` and its original size.

        Raises:
            OpenTransError: the file is missing or not a readable image.
        """
        return _read(self.pairs[idx][0], "RGB")

    def load_mask(self, idx: int) -> np.ndarray:
        """int64 ``(h0, w0)`` labels of pair ``idx`` with out-of-range values set to the ignore index.

        Raises:
            OpenTransError: the file is missing or unreadable.
        """
        mask, _ = _read(self.pairs[idx][1], "L")
        mask = mask.astype(np.int64)
        mask[mask >= len(self.class_names)] = self.ignore_index
        return mask

    def preprocess(self, rgb: np.ndarray) -> torch.Tensor:
        """Resize RGB uint8 ``(h, w, 3)`` to :attr:`image_size` (bicubic) and normalise -> float32 ``(3, H, W)``."""
        img = Image.fromarray(rgb).resize((self.image_size[1], self.image_size[0]), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (x - mean) / std

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        rgb, size = self.load_image(idx)
        mask = self.load_mask(idx)
        if mask.shape != size:
            img_path, mask_path = self.pairs[idx]
            raise OpenTransError(f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but image {img_path} "
                                 f"is {size[1]}x{size[0]}")
        return self.preprocess(rgb), torch.from_numpy(mask)


def _read(path: Path, mode: str) -> tuple[np.ndarray, tuple[int, int]]:
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert(mode))
    except FileNotFoundError:
        raise OpenTransError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise OpenTransError(f"{path}: cannot read image ({exc.__class__.__name__})") from None
    return arr, arr.shape[:2]


def collate(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Stack images ``(B, 3, H, W)``; keep masks as a list (their sizes may differ)."""
    return torch.stack([b[0] for b in batch]), [b[1] for b in batch]


def _read_classes(path: Path) -> tuple[str, ...]:
    if not path.exists():
        raise OpenTransError(f"{path}: file not found (one class name per line, in label-index order)")
    names = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    if not names:
        raise OpenTransError(f"{path}: no class names")
    return names


def _camvid_pairs(root: Path, split: str) -> list[tuple[Path, Path]]:
    """Pairs from CamVid's ``{split}.txt`` (``image mask`` per line, with the SegNet ``/SegNet/CamVid/`` prefix)."""
    listing = root / f"{split}.txt"
    if not listing.exists():
        raise OpenTransError(f"{listing}: file not found; is {root} a CamVid (SegNet) folder?")
    pairs = []
    for lineno, line in enumerate(listing.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise OpenTransError(f"{listing}:{lineno}: expected 'image mask', got {line!r}")
        pairs.append(tuple(root / p.replace("/SegNet/CamVid/", "", 1).lstrip("/") for p in parts))
    return pairs


def _folder_pairs(root: Path, split: str) -> list[tuple[Path, Path]]:
    """Pairs from ``[split/]images/*`` and ``[split/]masks/<same stem>.png``."""
    base = root / split if (root / split / "images").is_dir() else root
    images_dir, masks_dir = base / "images", base / "masks"
    if not images_dir.is_dir():
        raise OpenTransError(f"{images_dir}: no such folder (layout: images/, masks/, classes.txt)")
    images = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return [(p, masks_dir / f"{p.stem}.png") for p in images]


DATA_FORMATS = {
    "camvid": (_camvid_pairs, 11),
    "folder": (_folder_pairs, 255),
}


def parse_data_spec(spec: str) -> tuple[str, Path]:
    """Split ``FORMAT:PATH`` into its parts.

    Raises:
        OpenTransError: no colon, an unknown format, or a path that is not a folder.
    """
    fmt, sep, path = spec.partition(":")
    if not sep or fmt not in DATA_FORMATS:
        raise OpenTransError(f"--data {spec}: expected FORMAT:PATH with FORMAT one of {', '.join(DATA_FORMATS)}")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise OpenTransError(f"--data {spec}: {root} is not a folder")
    return fmt, root


def open_dataset(spec: str, split: str, image_size: tuple[int, int], mean, std, limit: int | None = None) -> SegDataset:
    """Open ``FORMAT:PATH`` at ``split``; keep the first ``limit`` pairs.

    Every listed file is checked to exist here, so a broken dataset fails before any work starts.

    Raises:
        OpenTransError: a bad spec or split, a missing ``classes.txt`` or listed file, or no pairs at all.
    """
    if split not in SPLITS:
        raise OpenTransError(f"--split {split}: choose one of {', '.join(SPLITS)}")
    if limit is not None and limit < 1:
        raise OpenTransError(f"--limit {limit}: must be at least 1")
    fmt, root = parse_data_spec(spec)
    list_pairs, ignore_index = DATA_FORMATS[fmt]
    pairs = list_pairs(root, split)[:limit]
    if not pairs:
        raise OpenTransError(f"--data {spec}: no images in split '{split}'")
    for img, mask in pairs:
        for p in (img, mask):
            if not p.is_file():
                raise OpenTransError(f"{p}: file not found")
    return SegDataset(name=f"{fmt}:{os.fspath(root)}", pairs=tuple(pairs), class_names=_read_classes(root / "classes.txt"),
                      ignore_index=ignore_index, image_size=tuple(image_size), mean=tuple(mean), std=tuple(std))
