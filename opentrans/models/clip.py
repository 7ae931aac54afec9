"""Loading open_clip models by architecture name and weights source.

``pretrained`` is one of:

* ``"none"``: random initialisation (seeded, so two loads are identical). Every report made from such a
  model says ``random-init weights`` next to its figures.
* an open_clip tag (``openai``, ``laion2b_s34b_b79k``, ...): downloaded by open_clip where a network exists.
* a path to a local checkpoint file. Loading it never unpickles Python objects unless the caller allows it
  (:func:`pickle_allowed`, the CLI's ``--allow-pickle``): ``.safetensors`` files are read as they are, OpenAI
  TorchScript archives with ``torch.jit.load`` (which rebuilds only torch's own types), every other file with
  ``torch.load(weights_only=True)`` (tensors and plain containers only). A pickle that needs more is refused with
  a one-line error: unpickling a file runs whatever code it names.

There is no silent fallback: a tag that cannot be downloaded raises :class:`OpenTransError`.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from torch import nn

from opentrans.errors import OpenTransError

RANDOM_INIT = "random-init weights"
_CONFIG_DIR = Path(__file__).parent / "configs"
open_clip.add_model_config(_CONFIG_DIR)

_ALLOW_PICKLE: list[bool] = []


@contextlib.contextmanager
def pickle_allowed(allow: bool):
    """Within the block, :func:`load_clip` may unpickle a ``--pretrained`` checkpoint file (``torch.load`` with
    ``weights_only=False``) when ``allow`` is true: how the CLI's ``--allow-pickle`` reaches every stage. Unpickling
    runs any code the file names; only allow it for files from a source you trust."""
    _ALLOW_PICKLE.append(bool(allow))
    try:
        yield
    finally:
        _ALLOW_PICKLE.pop()


def _pickle_is_allowed() -> bool:
    return bool(_ALLOW_PICKLE and _ALLOW_PICKLE[-1])


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


def _is_torchscript(path: Path) -> bool:
    """True for a TorchScript archive (a zip holding ``constants.pkl``, e.g. OpenAI's released CLIP ``.pt``)."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n == "constants.pkl" or n.endswith("/constants.pkl") for n in zf.namelist())
    except zipfile.BadZipFile:
        return False


def read_checkpoint(path: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The state dict in a local checkpoint file, without unpickling Python objects unless ``allow_pickle``.

    * ``.safetensors``: read as it is;
    * a TorchScript archive (OpenAI's ``.pt``): ``torch.jit.load``, its ``state_dict()``;
    * anything else: ``torch.load(weights_only=True)`` (``weights_only=False`` with ``allow_pickle``); a
      ``{"state_dict": ...}`` wrapper and a DistributedDataParallel ``module.`` prefix are removed.

    Raises:
        OpenTransError: a file that is not a checkpoint (truncated, another format), one holding pickled Python
            objects beyond tensors (unless ``allow_pickle``), or one that holds no tensor dict.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if path.suffix == ".safetensors":
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise OpenTransError(f"--pretrained {path}: not a readable safetensors file ({exc})") from None
    elif _is_torchscript(path):
        try:
            with warnings.catch_warnings():  # torch.jit.load's deprecation notice is noise to a user
                warnings.simplefilter("ignore", FutureWarning)
                state = torch.jit.load(str(path), map_location="cpu").state_dict()
        except RuntimeError as exc:
            raise OpenTransError(f"--pretrained {path}: not a loadable TorchScript archive "
                                 f"({str(exc).strip().splitlines()[0]})") from None
        for key in ("input_resolution", "context_length", "vocab_size"):
            state.pop(key, None)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
        except pickle.UnpicklingError as exc:
            if allow_pickle:
                raise OpenTransError(f"--pretrained {path}: not a readable checkpoint ({str(exc).splitlines()[0]})") from None
            raise OpenTransError(
                f"--pretrained {path}: the file holds pickled Python objects beyond tensors, and unpickling it would "
                f"run whatever code it names; convert it to .safetensors, or pass --allow-pickle if you trust its "
                f"source") from None
        except (RuntimeError, EOFError, OSError, ValueError) as exc:
            text = str(exc).strip().splitlines()
            raise OpenTransError(f"--pretrained {path}: not a readable checkpoint "
                                 f"({text[0] if text else exc.__class__.__name__})") from None
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise OpenTransError(f"--pretrained {path}: holds no state dict (a mapping of parameter names to tensors)")
    if next(iter(state)).startswith("module."):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _load_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a checkpoint's state dict into a fresh open_clip model, with open_clip's conversions (third-party
    layouts, the old text layout, scalar logit scale, position embeddings resized; non-persistent buffers that a
    TorchScript archive carries are dropped); what ``open_clip.load_checkpoint`` does after reading the file.

    Raises:
        RuntimeError: the state dict does not fit the model (missing/unexpected keys, shapes).
    """
    from open_clip.factory import convert_state_dict, convert_to_custom_text_state_dict, resize_pos_embed, \
        resize_text_pos_embed

    state = convert_state_dict(model, state)
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)
    for key in ("logit_scale", "logit_bias"):
        own = getattr(model, key, None)
        if key in state and own is not None and own.ndim != state[key].ndim:
            state[key] = state[key].reshape(own.shape)
    if "logit_bias" not in state and getattr(model, "logit_bias", None) is not None and "logit_scale" in state:
        state["logit_bias"] = torch.zeros_like(state["logit_scale"])
    position_id_key = "text.transformer.embeddings.position_ids"
    if position_id_key in state and not hasattr(model, position_id_key):
        del state[position_id_key]
    resize_pos_embed(state, model)
    resize_text_pos_embed(state, model)
    for mod_name, module in model.named_modules():  # buffers the model rebuilds itself (e.g. a traced attn_mask)
        for buffer in module._non_persistent_buffers_set:
            state.pop(f"{mod_name}.{buffer}" if mod_name else buffer, None)
    model.load_state_dict(state, strict=True)


def load_clip(name: str, pretrained: str = "none") -> LoadedClip:
    """Load an open_clip model with the requested weights.

    Args:
        name: open_clip architecture (``ViT-B-16``, ``ViT-B-32``, ``RN50``, ``opentrans-tiny-vit`` ...).
        pretrained: ``none`` (random init), an open_clip tag, or a local checkpoint path (read by
            :func:`read_checkpoint`; unpickled only inside :func:`pickle_allowed`). OpenAI TorchScript files need a
            ``-quickgelu`` architecture name.

    Raises:
        OpenTransError: unknown architecture, unknown tag, a missing or unreadable file, a pickled checkpoint
            without :func:`pickle_allowed`, weights that do not fit ``name``, or a tag whose download failed.
    """
    from opentrans.artifacts import sha256

    if pretrained in ("none", "", None):
        model, weights = create_architecture(name), RANDOM_INIT
    else:
        if name not in open_clip.list_models():
            create_architecture(name)  # raises the unknown-model error
        path = Path(pretrained)
        if path.is_file():
            weights = f"file {path} (sha256 {sha256(path)[:16]})"
            model = create_architecture(name)
            try:
                if path.suffix in (".npz", ".npy"):  # big_vision (SigLIP) weights; np.load refuses pickles
                    open_clip.load_checkpoint(model, str(path))
                else:
                    _load_state(model, read_checkpoint(path, allow_pickle=_pickle_is_allowed()))
            except (RuntimeError, KeyError, ValueError, OSError) as exc:
                text = str(exc).strip().splitlines()
                raise OpenTransError(f"--pretrained {path}: cannot load it into {name}: "
                                     f"{text[0] if text else exc.__class__.__name__}") from None
        elif path.exists():
            raise OpenTransError(f"--pretrained {path}: not a file")
        elif pretrained in open_clip.list_pretrained_tags_by_model(name):
            try:
                with _quiet_logging():  # open_clip and the hub log every retry; the failure is re-raised below
                    model = open_clip.create_model(name, pretrained=pretrained, weights_only=True)
            except RuntimeError:
                raise OpenTransError(
                    f"cannot download open_clip weights '{pretrained}' for {name} (no network or hub access?); "
                    f"download the checkpoint elsewhere and pass its path: --pretrained /path/to/{name}.bin"
                ) from None
            weights = f"open_clip tag '{pretrained}'"
        elif any(sep in pretrained for sep in ("/", "\\", ".")):
            raise OpenTransError(f"--pretrained {pretrained}: no such file")
        else:
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none known"
            raise OpenTransError(f"--pretrained {pretrained}: not a tag of {name} (tags: {tags}) nor a file")
        model = model.eval()
    cfg = getattr(model.visual, "preprocess_cfg", None) or {}
    mean = tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD))
    return LoadedClip(model=model, name=name, pretrained=str(pretrained), weights=weights, mean=mean, std=std)
