"""Inference wrappers used by training-free segmentation: sliding windows, short-side resize, prompt sets and
background handling. Each wrapper is itself a runner (:class:`opentrans.inference.evaluate.Runner`), so
:func:`opentrans.inference.evaluate.evaluate` and ``bench`` take it unchanged.

* :class:`ShortSideDataset`: a dataset whose images are resized so their *short side* is ``short_side`` pixels
  (aspect kept), as the training-free papers evaluate (e.g. 336 for ViT-B/16 in NACLIP/SCLIP/ClearCLIP);
  images then differ in size, so evaluate it with ``batch_size=1``.
* :class:`SlidingWindowRunner`: runs a fixed-size runner over overlapping ``window`` crops taken every
  ``stride`` pixels and averages the logits where crops overlap (mmseg's ``slide`` inference, which the
  papers use with window 224 and stride 112 for ViT-B/16). Images smaller than the window are zero-padded.
* :class:`PromptSetRunner`: several prompts (names) per class, e.g. a ``background`` class described by
  ``sky, wall, tree, ...``; a class's probability is the maximum over its prompts, and an optional probability
  threshold sends low-confidence pixels to the background class (COCO-Object protocol, see docs).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from opentrans.artifacts import atomic_path, read_text
from opentrans.data.datasets import SegDataset, preprocess_image
from opentrans.errors import OpenTransError


@dataclass(frozen=True)
class ShortSideDataset(SegDataset):
    """A :class:`SegDataset` whose images are resized to a short side of ``short_side`` pixels, aspect kept.

    ``dataset[i] -> (image float32 (3, H_i, W_i), mask int64 (h0, w0))`` with ``min(H_i, W_i) == short_side``
    and the long side rounded to the nearest pixel. Masks stay at label resolution.
    """

    short_side: int = 336

    @classmethod
    def wrap(cls, dataset: SegDataset, short_side: int) -> "ShortSideDataset":
        """The same pairs and classes as ``dataset``, resized by short side.

        Raises:
            OpenTransError: ``short_side`` below 1.
        """
        if short_side < 1:
            raise OpenTransError(f"--short-side {short_side}: must be at least 1 pixel")
        base = {f.name: getattr(dataset, f.name) for f in fields(SegDataset)}
        return cls(**base, short_side=int(short_side))

    def preprocess(self, rgb: np.ndarray) -> torch.Tensor:
        """Resize RGB uint8 ``(h, w, 3)`` (bicubic) to short side :attr:`short_side`, normalise -> ``(3, H, W)``."""
        h, w = rgb.shape[:2]
        scale = self.short_side / min(h, w)
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        return preprocess_image(rgb, size, self.mean, self.std)


def _pair(value, name: str) -> tuple[int, int]:
    h, w = (value, value) if isinstance(value, int) else tuple(value)
    if h < 1 or w < 1:
        raise OpenTransError(f"--{name} {h}x{w}: must be positive")
    return int(h), int(w)


def window_origins(size: int, window: int, stride: int) -> list[int]:
    """Top (or left) offsets of the crops along one axis of ``size`` pixels: every ``stride`` pixels, the last
    crop flush with the border (mmseg's ``slide`` grid). One crop at 0 when ``size <= window``."""
    n = max(size - window + stride - 1, 0) // stride + 1
    return [max(min(i * stride, size - window), 0) for i in range(n)]


class SlidingWindowRunner:
    """Sliding-window inference over any runner that takes a fixed ``window`` input.

    ``runner(images float32 (B, 3, H, W), text_embeds (C, D)) -> logits float32 (B, C, H, W)`` for any H, W:
    crops of ``window`` pixels every ``stride`` pixels (the last one flush with the border) are run one batch
    at a time and their logits averaged where they overlap. H or W below the window: the image is zero-padded
    (bottom/right) to the window and the logits cropped back.

    Args:
        runner: the wrapped runner; its input size must be ``window`` (an ONNX/OpenVINO build's ``image_size``).
        window, stride: ``(h, w)`` or one int, pixels. ``stride`` must not exceed ``window`` (no gaps).

    Raises:
        OpenTransError: a non-positive size or a stride larger than the window.
    """

    def __init__(self, runner, window, stride):
        self.runner = runner
        self.window = _pair(window, "window")
        self.stride = _pair(stride, "stride")
        if self.stride[0] > self.window[0] or self.stride[1] > self.window[1]:
            raise OpenTransError(f"--stride {self.stride[0]}x{self.stride[1]} is larger than --window "
                                 f"{self.window[0]}x{self.window[1]}: parts of the image would be skipped")
        self.name = f"{runner.name}+slide{self.window[0]}x{self.window[1]}s{self.stride[0]}x{self.stride[1]}"

    def __call__(self, images: np.ndarray, text_embeds: np.ndarray) -> np.ndarray:
        images = np.asarray(images, dtype=np.float32)
        b, _, h, w = images.shape
        wh, ww = self.window
        ph, pw = max(h, wh), max(w, ww)
        if (ph, pw) != (h, w):
            images = np.pad(images, ((0, 0), (0, 0), (0, ph - h), (0, pw - w)))
        total, count = None, np.zeros((1, 1, ph, pw), dtype=np.float32)
        for y in window_origins(ph, wh, self.stride[0]):
            for x in window_origins(pw, ww, self.stride[1]):
                out = np.asarray(self.runner(np.ascontiguousarray(images[:, :, y:y + wh, x:x + ww]), text_embeds),
                                 dtype=np.float32)
                if total is None:
                    total = np.zeros((b, out.shape[1], ph, pw), dtype=np.float32)
                total[:, :, y:y + wh, x:x + ww] += out
                count[:, :, y:y + wh, x:x + ww] += 1
        return (total / count)[:, :, :h, :w]


#: Shipped prompt sets (``--prompt-sets NAME``): a background class described by stuff names (sky, wall,
#: tree, ...) and several person prompts, in the label order of the ``coco-object`` and ``voc`` formats.
BUILTIN_PROMPT_SETS = {name: Path(__file__).resolve().parents[1] / "data" / "prompts" / f"{name}.txt"
                       for name in ("coco-object", "voc")}


def read_prompt_sets(path: str | os.PathLike) -> list[list[str]]:
    """Prompt sets, one line per class in label-index order, names separated by commas
    (``sky, wall, tree`` for a background class); the format of the SCLIP/ClearCLIP/NACLIP ``cls_*.txt`` files.
    ``path`` may also name a shipped set (:data:`BUILTIN_PROMPT_SETS`: ``coco-object``, ``voc``).

    Raises:
        OpenTransError: a missing file, or a line without a name.
    """
    if str(path) in BUILTIN_PROMPT_SETS and not Path(path).exists():
        path = BUILTIN_PROMPT_SETS[str(path)]
    path = Path(path)
    if not path.is_file():
        raise OpenTransError(f"{path}: file not found (one line per class, comma-separated names)")
    sets = []
    for lineno, line in enumerate(read_text(path, "the prompt set").splitlines(), 1):
        if not line.strip():
            continue
        names = [n.strip() for n in line.split(",") if n.strip()]
        if not names:
            raise OpenTransError(f"{path}:{lineno}: no class name on this line")
        sets.append(names)
    return sets


def flatten_prompt_sets(sets: list[list[str]]) -> tuple[list[str], list[int]]:
    """``(names, class index of each name)`` in file order."""
    names, index = [], []
    for i, names_i in enumerate(sets):
        names += names_i
        index += [i] * len(names_i)
    return names, index


class PromptSetRunner:
    """Several prompts per class and optional background thresholding, around a runner.

    ``runner(images, query_embeds (Q, D)) -> (B, C, H, W)``: the wrapped runner scores the Q prompts; the
    probabilities ``softmax_q(logits)`` (the logits already carry the model's logit scale) are reduced to C
    classes by taking, per class, the maximum over its prompts (ClearCLIP/NACLIP's ``query_idx``). With
    ``threshold``, pixels whose highest class probability is below it are assigned ``background_index``.
    The output is the log of those class probabilities (so argmax and softmax are meaningful), with the
    background channel raised above every other channel at thresholded pixels.

    Args:
        runner: any runner.
        query_index: class index of each of the Q prompts, ``0 <= index < num_classes``, every class covered.
        num_classes: C.
        threshold: probability in [0, 1), or None for no thresholding.
        background_index: the class that thresholded pixels get (0 in COCO-Object, PASCAL VOC).

    Raises:
        OpenTransError: a class without a prompt, an index out of range, or a threshold outside [0, 1).
    """

    def __init__(self, runner, query_index: list[int], num_classes: int, threshold: float | None = None,
                 background_index: int = 0):
        idx = np.asarray(query_index, dtype=np.int64)
        if idx.size == 0 or idx.min() < 0 or idx.max() >= num_classes:
            raise OpenTransError(f"prompt sets name classes outside 0..{num_classes - 1}")
        missing = sorted(set(range(num_classes)) - set(idx.tolist()))
        if missing:
            raise OpenTransError(f"prompt sets have no prompt for class index(es) {missing[:5]}: one line per class")
        if threshold is not None and not 0.0 <= threshold < 1.0:
            raise OpenTransError(f"--bg-threshold {threshold}: expected a probability in [0, 1)")
        if not 0 <= background_index < num_classes:
            raise OpenTransError(f"background index {background_index} is not a class index")
        self.runner = runner
        self.query_index = torch.from_numpy(idx)
        self.num_classes = int(num_classes)
        self.threshold = threshold
        self.background_index = int(background_index)
        suffix = f"+bg<{threshold:g}" if threshold is not None else ""
        self.name = f"{runner.name}+prompt-sets{suffix}"

    def class_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """``(B, Q, H, W)`` prompt logits -> ``(B, C, H, W)`` class probabilities (max over each class's prompts)."""
        probs = torch.softmax(logits, dim=1)
        b, _, h, w = probs.shape
        out = torch.zeros(b, self.num_classes, h, w, dtype=probs.dtype)
        index = self.query_index.view(1, -1, 1, 1).expand_as(probs)
        return out.scatter_reduce(1, index, probs, reduce="amax", include_self=True)

    def __call__(self, images: np.ndarray, text_embeds: np.ndarray) -> np.ndarray:
        if len(text_embeds) != len(self.query_index):
            raise OpenTransError(f"{len(text_embeds)} text embeddings for {len(self.query_index)} prompts")
        probs = self.class_probabilities(torch.as_tensor(np.asarray(self.runner(images, text_embeds))))
        logits = torch.log(probs.clamp_min(1e-12))
        if self.threshold is not None:
            low = probs.amax(dim=1) < self.threshold  # (B, H, W)
            top = logits.amax(dim=1) + 1.0
            bg = logits[:, self.background_index]
            logits[:, self.background_index] = torch.where(low, top, bg)
        return logits.numpy()


class LogitScaleRunner:
    """A runner at another softmax temperature and, for CLIPer, another keep threshold.

    ``runner(images, text_embeds) -> logits (B, C, H, W)`` of the wrapped runner, computed with
    ``logit_scale`` as the temperature (e.g. a paper's ``logit_scale``) and ``cliper_keep`` as CLIPer's
    last-layer threshold (None: unchanged).

    * A PyTorch runner (one with a ``segmentor``): the segmentor's ``logit_temperature``/``cliper_keep`` are set
      for the duration of each call and restored afterwards.
    * A deploy build (a fixed graph): for every mode but ``cliper`` the logits are ``scale * cos`` followed by
      linear resampling, so they are multiplied by ``logit_scale / scale`` (``scale``: what ``segmentor``, the
      build's source model, carried at export); a ``cliper`` build has its temperature and threshold in the graph.

    Args:
        runner: the wrapped runner; segmentor: the PyTorch segmentor of the same weights and dense mode.

    Raises:
        OpenTransError: a ``cliper`` deploy build asked for another temperature or threshold than its graph's,
            or a non-positive ``logit_scale``.
    """

    def __init__(self, runner, segmentor, logit_scale: float | None = None, cliper_keep: float | None = None):
        from opentrans.models import dense

        if logit_scale is not None and not logit_scale > 0:
            raise OpenTransError(f"--logit-scale {logit_scale}: must be positive")
        self.runner, self.logit_scale, self.cliper_keep = runner, logit_scale, cliper_keep
        self.factor = None
        if getattr(runner, "segmentor", None) is None and logit_scale is not None:
            baked = float(segmentor.logit_scale().detach())
            if segmentor.dense_mode == "cliper":
                if logit_scale != baked or cliper_keep not in (None, dense.CLIPER_KEEP):
                    raise OpenTransError(f"this cliper build has logit scale {baked:g} and keep {dense.CLIPER_KEEP:g} in "
                                         "its graph; evaluate the PyTorch model (--from its model directory) to change them")
            else:
                self.factor = logit_scale / baked
        elif getattr(runner, "segmentor", None) is None and cliper_keep not in (None, dense.CLIPER_KEEP):
            raise OpenTransError("a deploy build has CLIPer's keep threshold in its graph; evaluate the PyTorch model "
                                 "(--from its model directory) to change it")
        suffix = "" if logit_scale is None else f"+T{logit_scale:g}"
        self.name = f"{runner.name}{suffix}" + ("" if cliper_keep is None else f"+keep{cliper_keep:g}")

    def __call__(self, images: np.ndarray, text_embeds: np.ndarray) -> np.ndarray:
        seg = getattr(self.runner, "segmentor", None)
        if seg is None:
            out = np.asarray(self.runner(images, text_embeds), dtype=np.float32)
            return out if self.factor is None else out * np.float32(self.factor)
        saved = seg.logit_temperature, seg.cliper_keep
        if self.logit_scale is not None:
            seg.logit_temperature = float(self.logit_scale)
        if self.cliper_keep is not None:
            seg.cliper_keep = float(self.cliper_keep)
        try:
            return self.runner(images, text_embeds)
        finally:
            seg.logit_temperature, seg.cliper_keep = saved


def encode_prompt_sets(segmentor, sets: list[list[str]], model_name: str | None = None,
                       cache_dir: str | os.PathLike | None = None, templates=None) -> tuple[np.ndarray, list[int]]:
    """Text embeddings ``(Q, D)`` of every prompt (template ensemble, cached: :func:`cached_text_embeddings`)
    and the class index of each."""
    names, index = flatten_prompt_sets(sets)
    return cached_text_embeddings(segmentor, names, model_name, cache_dir, templates), index


#: Built-in template set names for ``--templates``: ``imagenet80`` is CLIP's 80 ImageNet templates, which
#: SCLIP, ClearCLIP and NACLIP average (``prompts/imagenet_template.py`` ``openai_imagenet_template`` in each
#: repository, the same 80 strings in the same order as open_clip's ``OPENAI_IMAGENET_TEMPLATES``).
BUILTIN_TEMPLATES = ("imagenet80",)


def read_templates(path: str | os.PathLike) -> tuple[str, ...]:
    """Prompt templates, one per line, each with one ``{}`` for the class name, or a built-in set
    (:data:`BUILTIN_TEMPLATES`; a file of that name takes precedence).

    Raises:
        OpenTransError: a missing file, no template, or a line without exactly one ``{}``.
    """
    if str(path) == "imagenet80" and not Path(path).exists():
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

        return tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)
    path = Path(path)
    if not path.is_file():
        raise OpenTransError(f"{path}: file not found (one template per line, with {{}} for the class name)")
    lines = [line.strip() for line in read_text(path, "the template file").splitlines() if line.strip()]
    bad = [i for i, line in enumerate(lines, 1) if line.count("{}") != 1]
    if not lines or bad:
        raise OpenTransError(f"{path}: every template needs exactly one {{}} (line {bad[0] if bad else 1})")
    return tuple(lines)


def _text_fingerprint(segmentor, model_name: str | None, templates, names) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([model_name, list(templates), list(names)]).encode())
    for key, tensor in sorted(segmentor.clip.state_dict().items()):
        if not key.startswith("visual."):  # the text tower, token embedding, projections, logit scale
            h.update(key.encode())
            h.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def cached_text_embeddings(segmentor, names: list[str], model_name: str | None = None,
                           cache_dir: str | os.PathLike | None = None, templates=None) -> np.ndarray:
    """Template-ensemble text embeddings ``(len(names), D)`` float32, cached on disk.

    The cache key is the sha256 of the architecture name, the templates, the names and every text-tower
    weight (so a different checkpoint never reuses stale embeddings). Files are ``<key>.npy`` in
    ``cache_dir`` (default ``$OPENTRANS_CACHE/text`` or ``~/.cache/opentrans/text``), written atomically.
    """
    from opentrans.models.segmentor import TEMPLATES

    templates = tuple(templates or TEMPLATES)
    root = Path(cache_dir) if cache_dir else Path(os.environ.get("OPENTRANS_CACHE", Path.home() / ".cache" / "opentrans")) / "text"
    path = root / f"{_text_fingerprint(segmentor, model_name, templates, names)}.npy"
    if path.is_file():
        return np.load(path)
    embeds = segmentor.encode_classes(list(names), templates=templates, model_name=model_name).numpy().astype(np.float32)
    root.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, embeds)
    return embeds
