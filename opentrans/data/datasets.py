"""Dataset readers for the layouts users bring.

Formats (``--data FORMAT:PATH``; label conventions as the usual toolboxes, e.g. mmsegmentation, read them):

============== ========================================================================== ======= ==========
format         layout under PATH                                                          classes ignore
============== ========================================================================== ======= ==========
camvid         SegNet CamVid: ``{split}.txt`` listing ``image mask`` pairs, ``classes.txt``      11      11
folder         ``[split/]images/*``, ``[split/]masks/<stem>.png``, ``classes.txt``            file     255
coco-object    ``images/*.jpg`` + ``masks/<stem>.png`` (the shared mini), or mmseg's              81     255
               ``images/{split}2017/`` + ``annotations/{split}2017/<stem>_instanceTrainIds.png``;
               0 = background, 1..80 = COCO things
voc            PASCAL VOC 2012: ``JPEGImages/``, ``SegmentationClass/`` (palette PNGs),            21     255
               ``ImageSets/Segmentation/{split}.txt``; 0 = background (PATH may also be the
               folder holding ``VOCdevkit/VOC2012``)
ade20k         ADEChallengeData2016: ``images/{training,validation}/*.jpg``,                     150     255
               ``annotations/{training,validation}/*.png``; raw 0 = "other" -> ignored,
               raw 1..150 -> 0..149 (``reduce_zero_label``)
cityscapes     ``leftImg8bit/{split}/<city>/*_leftImg8bit.png``,                                  19     255
               ``gtFine/{split}/<city>/*_gtFine_labelTrainIds.png`` (train ids, from
               cityscapesscripts' ``createTrainIdLabelImgs``)
pascal-context mmseg's PASCAL-Context 59: ``JPEGImages/``, ``SegmentationClassContext/*.png``,        59     255
               ``ImageSets/SegmentationContext/{split}.txt`` (PATH = ``VOC2010`` or its
               ``VOCdevkit`` parent); raw 0 = background -> ignored, 1..59 -> 0..58
============== ========================================================================== ======= ==========

``train``/``val`` map to each layout's own split names (``training``/``validation`` for ADE20K). A
``classes.txt`` in PATH (one name per line, label-index order) overrides the built-in class names.

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

from opentrans.artifacts import read_text
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
        reduce_zero_label: raw label 0 is unlabelled and every other label is shifted down by one (ADE20K,
            PASCAL-Context 59).
        background_index: the class index meaning "background" (0 for VOC and COCO-Object), or None when the
            dataset has no background class.
    """

    name: str
    pairs: tuple[tuple[Path, Path], ...]
    class_names: tuple[str, ...]
    ignore_index: int
    image_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    reduce_zero_label: bool = False
    background_index: int | None = None

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
        if self.reduce_zero_label:
            mask = np.where(mask == 0, self.ignore_index, mask - 1)
        mask[(mask >= len(self.class_names)) | (mask < 0)] = self.ignore_index
        return mask

    def unknown_labels(self, idx: int) -> tuple[int, int, list[int]]:
        """Pixels of mask ``idx`` whose value is neither a class nor the ignore index (what :meth:`load_mask`
        silently maps to the ignore index): ``(count, all pixels, up to 5 such values)``.

        Raises:
            OpenTransError: the file is missing or unreadable.
        """
        raw, _ = _read(self.pairs[idx][1], "L")
        raw = raw.astype(np.int64)
        n = len(self.class_names)
        if self.reduce_zero_label:
            known = (raw >= 0) & (raw <= n)
        else:
            known = ((raw >= 0) & (raw < n)) | (raw == self.ignore_index)
        unknown = raw[~known]
        return int(unknown.size), int(raw.size), [int(v) for v in np.unique(unknown)[:5]]

    def preprocess(self, rgb: np.ndarray) -> torch.Tensor:
        """Resize RGB uint8 ``(h, w, 3)`` to :attr:`image_size` (bicubic) and normalise -> float32 ``(3, H, W)``."""
        return preprocess_image(rgb, self.image_size, self.mean, self.std)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        rgb, size = self.load_image(idx)
        mask = self.load_mask(idx)
        if mask.shape != size:
            img_path, mask_path = self.pairs[idx]
            raise OpenTransError(f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but image {img_path} "
                                 f"is {size[1]}x{size[0]}")
        return self.preprocess(rgb), torch.from_numpy(mask)


def check_labels(dataset: SegDataset, max_fraction: float = 0.5) -> int:
    """Count the mask pixels of ``dataset`` whose value is neither a class nor the ignore index (they are ignored
    by the metrics) and refuse a mask where they are more than ``max_fraction`` of the pixels: a colour-coded
    mask, a 0/255 mask, or a dataset with more classes than its class list.

    Returns:
        The number of such pixels over the whole dataset.

    Raises:
        OpenTransError: a mask that is mostly unknown values (naming the file and the values).
    """
    total = 0
    for i in range(len(dataset)):
        unknown, size, values = dataset.unknown_labels(i)
        if unknown > max_fraction * size:
            raise OpenTransError(
                f"{dataset.pairs[i][1]}: {100.0 * unknown / size:.0f} % of its pixels have label values that are "
                f"neither one of the {len(dataset.class_names)} classes nor the ignore index "
                f"{dataset.ignore_index} (e.g. {', '.join(map(str, values))}); a colour or 0/255 mask, or a class "
                f"list that does not fit the masks?")
        total += unknown
    return total


def preprocess_image(rgb: np.ndarray, size: tuple[int, int], mean, std) -> torch.Tensor:
    """Resize RGB uint8 ``(h, w, 3)`` to ``size`` = (H, W) pixels (bicubic), scale to [0, 1] and normalise with
    the per-channel ``mean``/``std`` -> float32 ``(3, H, W)``."""
    img = Image.fromarray(rgb).resize((int(size[1]), int(size[0])), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)) / torch.tensor(std, dtype=torch.float32).view(3, 1, 1)


#: Environment variable that raises (or lowers) the largest image, in pixels, opentrans decodes.
MAX_PIXELS_ENV = "OPENTRANS_MAX_IMAGE_PIXELS"
#: Default limit: Pillow's own decompression-bomb threshold (89.5 megapixels, e.g. 9459x9459).
DEFAULT_MAX_PIXELS = 89_478_485


def max_image_pixels() -> int:
    """The largest image (width x height) :func:`_read` decodes: ``$OPENTRANS_MAX_IMAGE_PIXELS`` or
    :data:`DEFAULT_MAX_PIXELS`.

    Raises:
        OpenTransError: the variable is not a positive integer.
    """
    raw = os.environ.get(MAX_PIXELS_ENV)
    if raw is None:
        return DEFAULT_MAX_PIXELS
    if not raw.strip().isdigit() or int(raw) < 1:
        raise OpenTransError(f"{MAX_PIXELS_ENV}={raw}: expected a positive number of pixels")
    return int(raw)


def _read(path: Path, mode: str) -> tuple[np.ndarray, tuple[int, int]]:
    """Pixels of an image file; for ``mode="L"`` (label maps) palette (``P``) and 16-bit images keep their raw
    index values instead of being converted to grey levels (PASCAL VOC masks are palette PNGs).

    An image larger than :func:`max_image_pixels` is refused from its header, before it is decoded (a small file
    can declare gigapixels: a decompression bomb).

    Raises:
        OpenTransError: a missing, unreadable or too large image.
    """
    limit = max_image_pixels()
    pillow_limit = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = None  # checked here instead, against our limit, before decoding
        with Image.open(path) as im:
            if im.width * im.height > limit:
                raise OpenTransError(
                    f"{path}: {im.width}x{im.height} is {im.width * im.height:,} pixels, above the limit of "
                    f"{limit:,} (a decompression bomb?); set {MAX_PIXELS_ENV}=N to raise it")
            if mode == "L" and im.mode in ("P", "L", "I", "I;16"):
                arr = np.asarray(im)
            else:
                arr = np.asarray(im.convert(mode))
    except FileNotFoundError:
        raise OpenTransError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise OpenTransError(f"{path}: cannot read image ({exc.__class__.__name__})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = pillow_limit
    return arr, arr.shape[:2]


def collate(batch: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Stack images ``(B, 3, H, W)``; keep masks as a list (their sizes may differ)."""
    return torch.stack([b[0] for b in batch]), [b[1] for b in batch]


def check_unique_classes(names, where: str) -> None:
    """Refuse a class list naming a class twice (two label indices, one text embedding: the second would never be
    predicted and its IoU would be meaningless).

    Raises:
        OpenTransError: naming the first repeated class and its positions.
    """
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            raise OpenTransError(f"{where}: class '{name}' appears twice (positions {seen[name] + 1} and {i + 1}); "
                                 f"every class needs its own name")
        seen[name] = i


def _read_classes(path: Path) -> tuple[str, ...]:
    if not path.exists():
        raise OpenTransError(f"{path}: file not found (one class name per line, in label-index order)")
    names = tuple(line.strip() for line in read_text(path, "the class list").splitlines() if line.strip())
    if not names:
        raise OpenTransError(f"{path}: no class names")
    check_unique_classes(names, str(path))
    return names


def _camvid_pairs(root: Path, split: str) -> list[tuple[Path, Path]]:
    """Pairs from CamVid's ``{split}.txt`` (``image mask`` per line, with the SegNet ``/SegNet/CamVid/`` prefix)."""
    listing = root / f"{split}.txt"
    if not listing.exists():
        raise OpenTransError(f"{listing}: file not found; is {root} a CamVid (SegNet) folder?")
    pairs = []
    for lineno, line in enumerate(read_text(listing, "the split list").splitlines(), 1):
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


def _split_listing(listing: Path, image_dir: Path, mask_dir: Path, image_ext: str, what: str):
    if not listing.exists():
        raise OpenTransError(f"{listing}: file not found; is this a {what} folder?")
    stems = [line.split()[0] for line in read_text(listing, "the split list").splitlines() if line.strip()]
    return [(image_dir / f"{s}{image_ext}", mask_dir / f"{s}.png") for s in stems]


def _descend(root: Path, marker: str, *candidates: str) -> Path:
    """``root`` if it holds ``marker``, else the first ``root/candidate`` that does (e.g. ``VOCdevkit/VOC2012``)."""
    if (root / marker).exists():
        return root
    for cand in candidates:
        if (root / cand / marker).exists():
            return root / cand
    return root


def _voc_pairs(root: Path, split: str) -> list[tuple[Path, Path]]:
    """PASCAL VOC 2012: ``ImageSets/Segmentation/{split}.txt`` stems, ``JPEGImages/<stem>.jpg``,
    ``SegmentationClass/<stem>.png``."""
    base = _descend(root, "JPEGImages", "VOC2012", "VOCdevkit/VOC2012")
    return _split_listing(base / "ImageSets" / "Segmentation" / f"{split}.txt", base / "JPEGImages",
                          base / "SegmentationClass", ".jpg", "PASCAL VOC 2012 (VOCdevkit/VOC2012)")


def _context_pairs(root: Path, split: str) -> list[tuple[Path, Path]]:
    """mmseg PASCAL-Context: ``ImageSets/SegmentationContext/{split}.txt``, ``JPEGImages/``,
    ``SegmentationClassContext/``."""
    base = _descend(root, "JPEGImages", "VOC2010", "VOCdevkit/VOC2010")
    return _split_listing(base / "ImageSets" / "SegmentationContext" / f"{split}.txt", base / "JPEGImages",
                          base / "SegmentationClassContext", ".jpg", "PASCAL-Context (VOCdevkit/VOC2010)")


def _ade_pairs(root: Path, split: str) -> list[tuple[Path, Path]]:
    """ADEChallengeData2016: ``images/{training,validation}/*.jpg`` and ``annotations/.../<stem>.png``."""
    base = _descend(root, "images", "ADEChallengeData2016")
    sub = {"train": "training", "val": "validation", "test": "testing"}[split]
    images_dir = base / "images" / sub
    if not images_dir.is_dir():
        raise OpenTransError(f"{images_dir}: no such folder; is {root} ADEChallengeData2016?")
    images = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return [(p, base / "annotations" / sub / f"{p.stem}.png") for p in images]


def _cityscapes_pairs(root: Path, split: str) -> list[tuple[Path, Path]]:
    """Cityscapes: ``leftImg8bit/{split}/<city>/<name>_leftImg8bit.png`` with
    ``gtFine/{split}/<city>/<name>_gtFine_labelTrainIds.png``."""
    images_dir = root / "leftImg8bit" / split
    if not images_dir.is_dir():
        raise OpenTransError(f"{images_dir}: no such folder; is {root} a Cityscapes folder?")
    pairs = []
    for img in sorted(images_dir.glob("*/*_leftImg8bit.png")):
        stem = img.name[: -len("_leftImg8bit.png")]
        pairs.append((img, root / "gtFine" / split / img.parent.name / f"{stem}_gtFine_labelTrainIds.png"))
    return pairs


def _coco_object_pairs(root: Path, split: str) -> list[tuple[Path, Path]]:
    """COCO-Object: the shared mini layout (``images/``, ``masks/<stem>.png``) or mmseg's converted layout
    (``images/{split}2017/``, ``annotations/{split}2017/<stem>_instanceTrainIds.png``)."""
    mm_images = root / "images" / f"{split}2017"
    if mm_images.is_dir():
        images = sorted(p for p in mm_images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        return [(p, root / "annotations" / f"{split}2017" / f"{p.stem}_instanceTrainIds.png") for p in images]
    return _folder_pairs(root, split)


COCO_OBJECT_CLASSES = (
    "background", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep",
    "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "dining table", "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train", "tv monitor",
)
CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)
CONTEXT59_CLASSES = (
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle", "building",
    "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow", "cup", "curtain", "dog",
    "door", "fence", "floor", "flower", "food", "grass", "ground", "horse", "keyboard", "light", "motorbike",
    "mountain", "mouse", "person", "plate", "platform", "potted plant", "road", "rock", "sheep", "shelves",
    "sidewalk", "sign", "sky", "snow", "sofa", "table", "track", "train", "tree", "truck", "tv monitor", "wall",
    "water", "window", "wood",
)
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel",
    "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool",
    "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step",
    "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket",
    "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen",
    "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)


@dataclass(frozen=True)
class DataFormat:
    """How one ``--data FORMAT:PATH`` layout is read.

    Attributes:
        pairs: ``(root, split) -> [(image path, mask path)]``.
        ignore_index: label value excluded from metrics.
        classes: built-in class names, or None when ``classes.txt`` in the root is required.
        reduce_zero_label: see :attr:`SegDataset.reduce_zero_label`.
        background_index: see :attr:`SegDataset.background_index`.
    """

    pairs: object
    ignore_index: int
    classes: tuple[str, ...] | None = None
    reduce_zero_label: bool = False
    background_index: int | None = None

    def __iter__(self):  # backwards compatible ``pairs, ignore_index = DATA_FORMATS[fmt]``
        return iter((self.pairs, self.ignore_index))


DATA_FORMATS = {
    "camvid": DataFormat(_camvid_pairs, 11),
    "folder": DataFormat(_folder_pairs, 255),
    "coco-object": DataFormat(_coco_object_pairs, 255, COCO_OBJECT_CLASSES, background_index=0),
    "voc": DataFormat(_voc_pairs, 255, VOC_CLASSES, background_index=0),
    # VOC-20, the training-free papers' protocol (ClearCLIP, NACLIP, SCLIP): the 20 object classes, background ignored
    "voc20": DataFormat(_voc_pairs, 255, VOC_CLASSES[1:], reduce_zero_label=True),
    "ade20k": DataFormat(_ade_pairs, 255, ADE20K_CLASSES, reduce_zero_label=True),
    "cityscapes": DataFormat(_cityscapes_pairs, 255, CITYSCAPES_CLASSES),
    "pascal-context": DataFormat(_context_pairs, 255, CONTEXT59_CLASSES, reduce_zero_label=True),
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
    layout = DATA_FORMATS[fmt]
    pairs = layout.pairs(root, split)[:limit]
    if not pairs:
        raise OpenTransError(f"--data {spec}: no images in split '{split}'")
    for img, mask in pairs:
        for p in (img, mask):
            if not p.is_file():
                raise OpenTransError(f"{p}: file not found")
    if layout.classes is None or (root / "classes.txt").is_file():
        names = _read_classes(root / "classes.txt")
    else:
        names = layout.classes
    return SegDataset(name=f"{fmt}:{os.fspath(root)}", pairs=tuple(pairs), class_names=names,
                      ignore_index=layout.ignore_index, image_size=tuple(image_size), mean=tuple(mean), std=tuple(std),
                      reduce_zero_label=layout.reduce_zero_label, background_index=layout.background_index)
