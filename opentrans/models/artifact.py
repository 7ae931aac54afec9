"""Model artifacts: weights as safetensors plus a JSON spec, so loading never unpickles code.

A model directory holds ``model.safetensors`` and ``model.json``. The spec names the open_clip
architecture, where the weights came from, the segmentor options and every parameter whose shape differs
from the fresh architecture (structured pruning), so :func:`load_segmentor` rebuilds the exact module.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from opentrans.artifacts import atomic_path, read_json, write_json
from opentrans.errors import OpenTransError
from opentrans.models.attention import PrunedMultiheadAttention, attention_structure, rebuild_attention
from opentrans.models.clip import create_architecture, load_clip
from opentrans.models.prompts import build_prompts
from opentrans.models.segmentor import OpenVocabSegmentor

WEIGHTS_FILE = "model.safetensors"
SPEC_FILE = "model.json"
FORMAT = "opentrans.segmentor/1"


@dataclass
class SegmentorSpec:
    """Everything needed to rebuild a segmentor besides its weights.

    Attributes:
        model: open_clip architecture name.
        pretrained: the ``--pretrained`` value the weights started from (``none``, a tag or a path).
        weights: provenance of the weights, written next to every figure (e.g. ``random-init weights``).
        image_size: network input (H, W) in pixels.
        mean, std: RGB normalisation constants.
        dense_mode, head, head_options: :class:`OpenVocabSegmentor` options (head name and its JSON-able options).
        prompts: ``{"kind": ..., **options}`` of the attached prompt module (:mod:`opentrans.models.prompts`),
            or None.
        shapes: ``{parameter name: shape}`` for parameters whose shape differs from the fresh architecture.
        lineage: the stages that produced this artifact, oldest first.
        modules: ``{module name: {"type", "num_heads", "head_dim"}}`` for attention modules replaced by their
            pruned-capable counterparts (:mod:`opentrans.models.attention`; head/width pruning). Absent in older
            files (= none replaced).
    """

    model: str
    pretrained: str
    weights: str
    image_size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    dense_mode: str = "maskclip"
    head: str = "linear"
    head_options: dict = field(default_factory=dict)
    prompts: dict | None = None
    shapes: dict[str, list[int]] = field(default_factory=dict)
    lineage: list[str] = field(default_factory=list)
    modules: dict[str, dict] = field(default_factory=dict)


def build_segmentor(model: str, pretrained: str, image_size: tuple[int, int] | None = None,
                    dense_mode: str = "maskclip", head: str = "linear", head_options: dict | None = None,
                    source_hw: tuple[int, int] = (360, 480)) -> tuple[OpenVocabSegmentor, SegmentorSpec]:
    """A fresh segmentor from open_clip weights (see :func:`opentrans.models.clip.load_clip`).

    ``image_size`` defaults to :func:`default_image_size` for images of ``source_hw`` (CamVid's 360x480).
    """
    from opentrans.models.segmentor import default_image_size

    loaded = load_clip(model, pretrained)
    size = tuple(image_size) if image_size else default_image_size(loaded.model, source_hw)
    seg = OpenVocabSegmentor(loaded.model, size, dense_mode=dense_mode, head=head, head_options=head_options).eval()
    spec = SegmentorSpec(model=model, pretrained=loaded.pretrained, weights=loaded.weights, image_size=size,
                         mean=loaded.mean, std=loaded.std, dense_mode=dense_mode, head=head,
                         head_options=dict(head_options or {}))
    return seg, spec


def changed_shapes(seg: OpenVocabSegmentor, model_name: str) -> dict[str, list[int]]:
    """Parameters/buffers of ``seg.clip`` whose shapes differ from a fresh ``model_name`` (prefixed ``clip.``)."""
    fresh = {k: v.shape for k, v in create_architecture(model_name).state_dict().items()}
    return {f"clip.{k}": list(v.shape) for k, v in seg.clip.state_dict().items() if fresh.get(k) != v.shape}


def save_segmentor(seg: OpenVocabSegmentor, spec: SegmentorSpec, out_dir: str | os.PathLike) -> Path:
    """Write ``model.safetensors`` and ``model.json`` into ``out_dir`` atomically; returns the weights path."""
    out_dir = Path(out_dir)
    spec.shapes = changed_shapes(seg, spec.model)
    spec.modules = attention_structure(seg)
    spec.head, spec.head_options = seg.head_type, dict(seg.head_options)
    spec.prompts = None if seg.prompts is None else {"kind": seg.prompts.kind, **seg.prompts.options()}
    state = {k: v.detach().contiguous() for k, v in seg.state_dict().items()}
    with atomic_path(out_dir / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp), metadata={"format": FORMAT, "weights": spec.weights})
    write_json(out_dir / SPEC_FILE, {"format": FORMAT, **asdict(spec)})
    return out_dir / WEIGHTS_FILE


def _resize_attributes(module: nn.Module) -> None:
    """Keep a module's size attributes consistent with its (possibly pruned) weight shapes."""
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.Conv2d):
        module.out_channels = module.weight.shape[0]
        module.in_channels = module.weight.shape[1] * module.groups
    elif isinstance(module, nn.LayerNorm) and module.weight is not None:
        module.normalized_shape = tuple(module.weight.shape)
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        module.num_features = module.weight.shape[0]
    elif isinstance(module, PrunedMultiheadAttention):  # head/width-pruned attention
        module.embed_dim = module.in_proj_weight.shape[1]


def apply_shapes(root: nn.Module, shapes: dict[str, list[int]]) -> None:
    """Replace each named parameter/buffer of ``root`` with an empty tensor of the given shape.

    Raises:
        OpenTransError: a name that does not exist in ``root`` (a spec for another architecture).
    """
    touched = set()
    for name, shape in shapes.items():
        mod_name, _, attr = name.rpartition(".")
        try:
            module = root.get_submodule(mod_name)
        except AttributeError:
            raise OpenTransError(f"shape spec names '{name}', which this architecture does not have") from None
        if attr in module._parameters:
            old = module._parameters[attr]
            module._parameters[attr] = nn.Parameter(torch.empty(shape, dtype=old.dtype), old.requires_grad)
        elif attr in module._buffers:
            module._buffers[attr] = torch.empty(shape, dtype=module._buffers[attr].dtype)
        else:
            raise OpenTransError(f"shape spec names '{name}', which this architecture does not have")
        touched.add(module)
    for module in touched:
        _resize_attributes(module)


def read_spec(model_dir: str | os.PathLike) -> SegmentorSpec:
    """The :class:`SegmentorSpec` of a model directory.

    Raises:
        OpenTransError: no ``model.json``, or one of another format.
    """
    model_dir = Path(model_dir)
    if not (model_dir / SPEC_FILE).exists():
        raise OpenTransError(f"{model_dir}: no {SPEC_FILE}; expected a model directory written by opentrans")
    raw = read_json(model_dir / SPEC_FILE)
    if raw.pop("format", None) != FORMAT:
        raise OpenTransError(f"{model_dir / SPEC_FILE}: not an {FORMAT} spec")
    return spec_from_dict(raw)


def spec_from_dict(raw: dict) -> SegmentorSpec:
    """A :class:`SegmentorSpec` from its JSON form (lists back to tuples), e.g. ``model.json`` or the ``spec``
    of a deploy build's ``build.json``."""
    raw = {k: v for k, v in raw.items() if k != "format"}
    raw.update(image_size=tuple(raw["image_size"]), mean=tuple(raw["mean"]), std=tuple(raw["std"]))
    return SegmentorSpec(**raw)


def segmentor_from_spec(spec: SegmentorSpec) -> OpenVocabSegmentor:
    """The segmentor a spec describes, with uninitialised weights: fresh architecture, pruned shapes applied,
    head and prompt modules rebuilt (load the weights next).

    Raises:
        OpenTransError: shapes for another architecture, an unknown head or prompt kind.
    """
    seg = OpenVocabSegmentor(create_architecture(spec.model), spec.image_size, spec.dense_mode, spec.head,
                             spec.head_options)
    if spec.modules:
        try:
            rebuild_attention(seg, spec.modules)
        except (AttributeError, KeyError) as exc:
            raise OpenTransError(f"model spec: its attention modules do not fit {spec.model} ({exc})") from None
    apply_shapes(seg, spec.shapes)
    if spec.prompts:
        options = {k: v for k, v in spec.prompts.items() if k != "kind"}
        seg.set_prompts(build_prompts(spec.prompts["kind"], seg.clip, options))
    return seg


def load_segmentor(model_dir: str | os.PathLike) -> tuple[OpenVocabSegmentor, SegmentorSpec]:
    """Rebuild a segmentor from ``model.json`` + ``model.safetensors`` (no pickle involved).

    Raises:
        OpenTransError: missing or mismatched files (weights that do not fit the spec's shapes).
    """
    model_dir = Path(model_dir)
    spec = read_spec(model_dir)
    weights = model_dir / WEIGHTS_FILE
    if not weights.exists():
        raise OpenTransError(f"{weights}: file not found")
    seg = segmentor_from_spec(spec)
    try:
        seg.load_state_dict(load_file(str(weights)), strict=True)
    except RuntimeError as exc:
        raise OpenTransError(f"{weights}: does not match {model_dir / SPEC_FILE}: {str(exc).splitlines()[1].strip()}") from None
    return seg.eval(), spec


_DENSE_MODE_OVERRIDE: list[str] = []


@contextlib.contextmanager
def dense_mode_override(dense_mode: str | None):
    """Within the block, :func:`resolve_model` uses ``dense_mode`` when its caller gives none (how the CLI's
    ``--dense-mode`` reaches every stage). ``None``: no override."""
    if dense_mode is None:
        yield
        return
    _DENSE_MODE_OVERRIDE.append(dense_mode)
    try:
        yield
    finally:
        _DENSE_MODE_OVERRIDE.pop()


def current_dense_mode_override() -> str | None:
    """The mode of the innermost :func:`dense_mode_override`, or None."""
    return _DENSE_MODE_OVERRIDE[-1] if _DENSE_MODE_OVERRIDE else None


def resolve_model(from_dir: str | os.PathLike | None, model: str | None, pretrained: str = "none",
                  image_size: tuple[int, int] | None = None, head: str = "linear", dense_mode: str | None = None,
                  ) -> tuple[OpenVocabSegmentor, SegmentorSpec, list[Path]]:
    """The segmentor a stage starts from: the model of an earlier stage (``--from DIR``) or a fresh one
    (``--model NAME --pretrained TAG|PATH|none``).

    ``dense_mode`` (or, when None, the innermost :func:`dense_mode_override`): with ``--model`` the mode the
    segmentor is built with (default ``maskclip``); with ``--from`` it replaces the mode stored in the
    artifact's spec (default: keep the stored mode). Every mode shares the same weights.

    Returns:
        ``(segmentor, spec, input files)``; the input files are what the stage's manifest should hash.

    Raises:
        OpenTransError: neither or both sources given, or a ``--from`` directory without a model.
    """
    if from_dir is not None and model is not None:
        raise OpenTransError("give either --from RUN_DIR or --model NAME, not both")
    if dense_mode is None and _DENSE_MODE_OVERRIDE:
        dense_mode = _DENSE_MODE_OVERRIDE[-1]
    if from_dir is not None:
        from_dir = Path(from_dir)
        if not (from_dir / SPEC_FILE).exists():
            raise OpenTransError(f"--from {from_dir}: no {SPEC_FILE} there; point it at the output of prune or finetune")
        seg, spec = load_segmentor(from_dir)
        if dense_mode is not None and dense_mode != spec.dense_mode:
            seg.set_dense_mode(dense_mode)
            spec.dense_mode = dense_mode
        return seg, spec, [from_dir / SPEC_FILE, from_dir / WEIGHTS_FILE]
    if model is None:
        raise OpenTransError("no model: give --model NAME (an open_clip architecture) or --from RUN_DIR")
    seg, spec = build_segmentor(model, pretrained, image_size=image_size, head=head,
                                dense_mode=dense_mode or "maskclip")
    return seg, spec, []
