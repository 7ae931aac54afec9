"""Loading open_clip models by architecture name and weights source.

``pretrained`` is one of:

* ``"none"``: random initialisation (seeded, so two loads are identical). Every report made from such a
  model says ``random-init weights`` next to its figures.
* an open_clip tag (``openai``, ``laion2b_s34b_b79k``, ...): downloaded by open_clip where a network exists.
* a path to a local checkpoint file.

There is no silent fallback: a tag that cannot be downloaded raises :class:`OpenTransError`.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from torch import nn

from opentrans.errors import OpenTransError

RANDOM_INIT = "random-init weights"
_CONFIG_DIR = Path(__file__).parent / "configs"
open_clip.add_model_config(_CONFIG_DIR)

#: Small random-initialised architectures shipped for tests and quick experiments.
TINY_MODELS = ("opentrans-tiny-vit", "opentrans-tiny-rn")


@dataclass(frozen=True)
class LoadedClip:
    """An open_clip model and where its weights came from.

    Attributes:
        model: the ``open_clip.CLIP`` module in eval mode, fp32, on CPU.
        name: open_clip architecture name, e.g. ``ViT-B-16``.
        pretrained: what the user asked for (``none``, a tag or a path).
        weights: human-readable provenance written next to every figure (``random-init weights``,
            ``open_clip tag 'openai'`` or ``file /path (sha256 ...)``).
        mean, std: per-channel normalisation constants of the model's preprocessing, RGB in [0, 1].
    """

    model: nn.Module
    name: str
    pretrained: str
    weights: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@contextlib.contextmanager
def _quiet_logging():
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def available_models() -> list[str]:
    """open_clip architecture names, plus the tiny OpenTrans test configs."""
    return open_clip.list_models()


def create_architecture(name: str, seed: int = 0) -> nn.Module:
    """Build an open_clip model with random weights (deterministic for a given ``seed``).

    Raises:
        OpenTransError: ``name`` is not an open_clip architecture.
    """
    if name not in open_clip.list_models():
        raise OpenTransError(
            f"unknown model '{name}'; choose an open_clip architecture such as ViT-B-16, ViT-B-32 or RN50 "
            f"(see `python -c 'import open_clip; print(open_clip.list_models())'`)"
        )
    with torch.random.fork_rng(), _quiet_logging():
        torch.manual_seed(seed)
        model = open_clip.create_model(name, pretrained=None)
    return model.eval()


def load_clip(name: str, pretrained: str = "none") -> LoadedClip:
    """Load an open_clip model with the requested weights.

    Args:
        name: open_clip architecture (``ViT-B-16``, ``ViT-B-32``, ``RN50``, ``opentrans-tiny-vit`` ...).
        pretrained: ``none`` (random init), an open_clip tag, or a local checkpoint path. OpenAI TorchScript
            files need a ``-quickgelu`` architecture name.

    Raises:
        OpenTransError: unknown architecture, unknown tag, a missing file, or a tag whose download failed.
    """
    from opentrans.artifacts import sha256

    if pretrained in ("none", "", None):
        model, weights = create_architecture(name), RANDOM_INIT
    else:
        if name not in open_clip.list_models():
            create_architecture(name)  # raises the unknown-model error
        path = Path(pretrained)
        if path.exists():
            weights = f"file {path} (sha256 {sha256(path)[:16]})"
            source = str(path)
        elif pretrained in open_clip.list_pretrained_tags_by_model(name):
            weights, source = f"open_clip tag '{pretrained}'", pretrained
        elif any(sep in pretrained for sep in ("/", "\\", ".")):
            raise OpenTransError(f"--pretrained {pretrained}: no such file")
        else:
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none known"
            raise OpenTransError(f"--pretrained {pretrained}: not a tag of {name} (tags: {tags}) nor a file")
        try:
            with _quiet_logging():  # open_clip and the hub log every retry; the failure is re-raised below
                model = open_clip.create_model(name, pretrained=source, weights_only=path.suffix != ".pt")
        except RuntimeError as exc:
            if path.exists():
                raise OpenTransError(f"--pretrained {path}: cannot load it into {name}: {str(exc).splitlines()[0]}") from None
            raise OpenTransError(
                f"cannot download open_clip weights '{pretrained}' for {name} (no network or hub access?); "
                f"download the checkpoint elsewhere and pass its path: --pretrained /path/to/{name}.bin"
            ) from None
        model = model.eval()
    cfg = getattr(model.visual, "preprocess_cfg", None) or {}
    mean = tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD))
    return LoadedClip(model=model, name=name, pretrained=str(pretrained), weights=weights, mean=mean, std=std)
