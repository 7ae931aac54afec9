"""Model artifacts: weights as safetensors plus a JSON spec, so loading never unpickles code.

A model directory holds ``model.safetensors`` and ``model.json``. The spec names the open_clip
architecture, where the weights came from, the segmentor options and every parameter whose shape differs
from the fresh architecture (structured pruning), so :func:`load_segmentor` rebuilds the exact module.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from opentrans import validate
from opentrans.artifacts import read_json, save_safetensors, verify_outputs, write_json
from opentrans.errors import OpenTransError
from opentrans.models.attention import (
    MHA_TYPE,
    POOL_TYPE,
    PrunedMultiheadAttention,
    attention_structure,
    rebuild_attention,
)
from opentrans.models.clip import available_models, create_architecture, load_clip
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
    save_safetensors(state, out_dir / WEIGHTS_FILE, metadata={"format": FORMAT, "weights": spec.weights})
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

    A shape may only shrink what ``root`` has (pruning removes, never adds): same number of dimensions, each in
    ``[1, current size]``, so a spec cannot make this allocate more than the unpruned model.

    Raises:
        OpenTransError: a name that does not exist in ``root`` (a spec for another architecture), or a shape of
            another rank or larger than the unpruned one.
    """
    touched = set()
    for name, shape in shapes.items():
        mod_name, _, attr = name.rpartition(".")
        try:
            module = root.get_submodule(mod_name)
        except AttributeError:
            raise OpenTransError(f"shape spec names '{name}', which this architecture does not have") from None
        current = module._parameters.get(attr) if attr in module._parameters else module._buffers.get(attr)
        if current is None:
            raise OpenTransError(f"shape spec names '{name}', which this architecture does not have")
        if len(shape) != current.ndim or any(not 1 <= int(d) <= c for d, c in zip(shape, current.shape)):
            raise OpenTransError(f"shape spec: '{name}' {list(shape)} does not fit its unpruned shape "
                                 f"{list(current.shape)} (pruning only shrinks, every size at least 1)")
        if attr in module._parameters:
            old = module._parameters[attr]
            module._parameters[attr] = nn.Parameter(torch.empty(shape, dtype=old.dtype), old.requires_grad)
        else:
            module._buffers[attr] = torch.empty(shape, dtype=module._buffers[attr].dtype)
        touched.add(module)
    for module in touched:
        _resize_attributes(module)


def read_spec(model_dir: str | os.PathLike) -> SegmentorSpec:
    """The :class:`SegmentorSpec` of a model directory, validated by :func:`spec_from_dict`.

    Raises:
        OpenTransError: no ``model.json``, one of another format, or one that fails validation.
    """
    model_dir = Path(model_dir)
    if not (model_dir / SPEC_FILE).exists():
        raise OpenTransError(f"{model_dir}: no {SPEC_FILE}; expected a model directory written by opentrans")
    raw = read_json(model_dir / SPEC_FILE)
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise OpenTransError(f"{model_dir / SPEC_FILE}: not an {FORMAT} spec")
    return spec_from_dict(raw, where=str(model_dir / SPEC_FILE))


_SPEC_REQUIRED = ("model", "pretrained", "weights", "image_size", "mean", "std")
_SPEC_OPTIONAL = ("format", "dense_mode", "head", "head_options", "prompts", "shapes", "lineage", "modules")
#: Bounds on values in a spec's head/prompt options: the largest width of a supported architecture and a
#: generous list length (layer indices, grids).
MAX_OPTION_INT = 8192
MAX_OPTION_ITEMS = 1024


def _options(value, where: str) -> dict:
    """A head's or prompt module's options: a JSON object of strings, booleans, finite numbers (integers within
    +-:data:`MAX_OPTION_INT`), null, and lists/objects of those."""
    def check(v, at):
        if isinstance(v, dict):
            for k, item in v.items():
                check(item, f"{at}.{k}")
        elif isinstance(v, list):
            validate.sequence(v, at, max_length=MAX_OPTION_ITEMS)
            for i, item in enumerate(v):
                check(item, f"{at}[{i}]")
        elif isinstance(v, bool) or v is None or isinstance(v, str):
            return
        elif isinstance(v, int):
            validate.integer(v, at, -MAX_OPTION_INT, MAX_OPTION_INT)
        else:
            validate.number(v, at)
    check(validate.mapping(value, where, optional=None), where)
    return dict(value)


def spec_from_dict(raw: dict, where: str = "model spec") -> SegmentorSpec:
    """A :class:`SegmentorSpec` from its JSON form (lists back to tuples), e.g. ``model.json`` or the ``spec``
    of a deploy build's ``build.json``, after checking every field: known keys only, types, ranges (input size
    at most :data:`~opentrans.validate.MAX_IMAGE_SIDE`, positive std, shapes of positive integers, known
    architecture, dense mode and head), so nothing is built from a damaged or hand-made file.

    Raises:
        OpenTransError: one line naming ``where`` and the field that is missing, unknown, of the wrong type or out
            of range.
    """
    from opentrans.models.heads import head_names
    from opentrans.models.segmentor import DENSE_MODES

    validate.mapping(raw, where, required=_SPEC_REQUIRED, optional=_SPEC_OPTIONAL)
    model = validate.string(raw["model"], f"{where}: model")
    if model not in available_models():
        raise OpenTransError(f"{where}: model: unknown architecture {model!r}")
    prompts = raw.get("prompts")
    if prompts is not None:
        validate.mapping(prompts, f"{where}: prompts", required=("kind",), optional=None)
        validate.string(prompts["kind"], f"{where}: prompts.kind")
        prompts = {"kind": prompts["kind"], **_options({k: v for k, v in prompts.items() if k != "kind"},
                                                       f"{where}: prompts")}
    shapes = validate.mapping(raw.get("shapes", {}), f"{where}: shapes", optional=None)
    for name, shape in shapes.items():
        validate.string(name, f"{where}: shapes key")
        for i, d in enumerate(validate.sequence(shape, f"{where}: shapes.{name}", max_length=8)):
            validate.integer(d, f"{where}: shapes.{name}[{i}]", 1)
    modules = validate.mapping(raw.get("modules", {}), f"{where}: modules", optional=None)
    for name, info in modules.items():
        at = f"{where}: modules.{name}"
        validate.mapping(info, at, required=("type", "num_heads", "head_dim"), optional=())
        validate.string(info["type"], f"{at}.type", choices=(MHA_TYPE, POOL_TYPE))
        validate.integer(info["num_heads"], f"{at}.num_heads", 1, MAX_OPTION_INT)
        validate.integer(info["head_dim"], f"{at}.head_dim", 1, MAX_OPTION_INT)
    lineage = validate.sequence(raw.get("lineage", []), f"{where}: lineage", max_length=MAX_OPTION_ITEMS)
    for i, item in enumerate(lineage):
        validate.string(item, f"{where}: lineage[{i}]", empty=True)
    return SegmentorSpec(
        model=model, pretrained=validate.string(raw["pretrained"], f"{where}: pretrained", empty=True),
        weights=validate.string(raw["weights"], f"{where}: weights", empty=True),
        image_size=validate.image_size(raw["image_size"], f"{where}: image_size"),
        mean=validate.rgb_constants(raw["mean"], f"{where}: mean"),
        std=validate.rgb_constants(raw["std"], f"{where}: std", positive=True),
        dense_mode=validate.string(raw.get("dense_mode", "maskclip"), f"{where}: dense_mode", choices=DENSE_MODES),
        head=validate.string(raw.get("head", "linear"), f"{where}: head", choices=head_names()),
        head_options=_options(raw.get("head_options", {}), f"{where}: head_options"),
        prompts=prompts, shapes={k: list(v) for k, v in shapes.items()}, lineage=list(lineage),
        modules={k: dict(v) for k, v in modules.items()})


def _check_modules(seg: OpenVocabSegmentor, modules: dict[str, dict]) -> None:
    """Each replaced attention module of a spec names an attention module of the fresh ``seg`` of the matching kind,
    with at most its inner width (``num_heads * head_dim``)."""
    for name, info in modules.items():
        try:
            old = seg.get_submodule(name)
        except AttributeError:
            raise OpenTransError(f"model spec: modules names '{name}', which {type(seg.clip).__name__} does not "
                                 f"have") from None
        if info["type"] == MHA_TYPE and hasattr(old, "in_proj_weight"):
            inner = old.in_proj_weight.shape[0] // 3
        elif info["type"] == POOL_TYPE and hasattr(old, "q_proj"):
            inner = old.q_proj.weight.shape[0]
        else:
            raise OpenTransError(f"model spec: modules.{name} is a {info['type']}, which '{name}' is not")
        if info["num_heads"] * info["head_dim"] > inner:
            raise OpenTransError(f"model spec: modules.{name}: {info['num_heads']} heads x {info['head_dim']} exceed "
                                 f"the unpruned width {inner}")


def _check_head_size(seg: OpenVocabSegmentor, spec: SegmentorSpec) -> None:
    """Build the spec's head on the meta device (no memory) and refuse one with more parameters than the CLIP
    model itself: options that would allocate far beyond any head opentrans writes."""
    from opentrans.models.heads import build_head

    try:
        with torch.device("meta"):
            probe = build_head(spec.head, seg.embed_dim, spec.head_options)
    except (RuntimeError, ValueError, ZeroDivisionError) as exc:
        text = str(exc).strip().splitlines()
        raise OpenTransError(f"model spec: head '{spec.head}' cannot be built with options {spec.head_options} "
                             f"({text[0] if text else exc.__class__.__name__})") from None
    head_params = sum(t.numel() for t in probe.state_dict().values())
    clip_params = sum(t.numel() for t in seg.clip.state_dict().values())
    if head_params > clip_params:
        raise OpenTransError(f"model spec: head '{spec.head}' with options {spec.head_options} would have "
                             f"{head_params:,} parameters, more than the whole {spec.model} ({clip_params:,})")


def segmentor_from_spec(spec: SegmentorSpec) -> OpenVocabSegmentor:
    """The segmentor a spec describes, with uninitialised weights: fresh architecture, pruned shapes applied,
    head and prompt modules rebuilt (load the weights next).

    Raises:
        OpenTransError: shapes for another architecture, an unknown head or prompt kind.
    """
    seg = OpenVocabSegmentor(create_architecture(spec.model), spec.image_size, spec.dense_mode, "none")
    _check_head_size(seg, spec)
    seg.set_head(spec.head, spec.head_options)
    if spec.modules:
        _check_modules(seg, spec.modules)
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
    if not weights.is_file():
        raise OpenTransError(f"{weights}: file not found")
    try:
        with safe_open(str(weights), "pt") as fh:  # the header only: names and shapes, no tensor read yet
            stored = {k: list(fh.get_slice(k).get_shape()) for k in fh.keys()}
    except (SafetensorError, OSError) as exc:
        raise OpenTransError(f"{weights}: not a readable safetensors file ({exc})") from None
    try:
        seg = segmentor_from_spec(spec)
    except OpenTransError as exc:  # name the file the spec came from
        raise OpenTransError(f"{model_dir / SPEC_FILE}: {exc}") from None
    expected = {k: list(v.shape) for k, v in seg.state_dict().items()}
    if stored != expected:
        missing, extra = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
        wrong = sorted(k for k in set(expected) & set(stored) if expected[k] != stored[k])
        detail = (f"missing {missing[0]}" if missing else f"unexpected {extra[0]}" if extra else
                  f"{wrong[0]} is {stored[wrong[0]]}, the spec makes it {expected[wrong[0]]}")
        raise OpenTransError(f"{weights}: does not match {model_dir / SPEC_FILE}: {detail}")
    try:
        seg.load_state_dict(load_file(str(weights)), strict=True)
    except (SafetensorError, OSError) as exc:
        raise OpenTransError(f"{weights}: not a readable safetensors file ({exc})") from None
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise OpenTransError(f"{weights}: does not match {model_dir / SPEC_FILE}: {lines[-1] if lines else exc}") from None
    return seg.eval(), spec


def open_model_dir(model_dir: str | os.PathLike) -> tuple[OpenVocabSegmentor, SegmentorSpec]:
    """:func:`load_segmentor` on the output directory of a finished stage, for directories from anyone (``--from``,
    bench's reference): its ``manifest.json`` must be complete and ``model.json``/``model.safetensors`` must still
    have the sha256 the stage recorded (:func:`opentrans.artifacts.verify_outputs`).

    Raises:
        OpenTransError: no ``model.json``, an unfinished or foreign directory (no complete manifest), a damaged or
            edited file, or anything :func:`load_segmentor` refuses.
    """
    model_dir = Path(model_dir)
    if not (model_dir / SPEC_FILE).exists():
        raise OpenTransError(f"{model_dir}: no {SPEC_FILE} there; point it at the output of prune or finetune")
    verify_outputs(model_dir, [SPEC_FILE, WEIGHTS_FILE])
    return load_segmentor(model_dir)


def resolve_model(from_dir: str | os.PathLike | None, model: str | None, pretrained: str = "none",
                  image_size: tuple[int, int] | None = None, head: str = "linear", dense_mode: str | None = None,
                  ) -> tuple[OpenVocabSegmentor, SegmentorSpec, list[Path]]:
    """The segmentor a stage starts from: the model of an earlier stage (``--from DIR``) or a fresh one
    (``--model NAME --pretrained TAG|PATH|none``).

    ``dense_mode``: with ``--model`` the mode the segmentor is built with (None: ``maskclip``); with ``--from`` it
    replaces the mode stored in the artifact's spec (None: keep the stored mode). Every mode shares the same
    weights. Stages reach this through :meth:`opentrans.models.source.ModelSource.resolve`, which passes the
    CLI's ``--dense-mode``.

    Returns:
        ``(segmentor, spec, input files)``; the input files are what the stage's manifest should hash.

    Raises:
        OpenTransError: neither or both sources given, or a ``--from`` directory without a model, of a stage that
            did not finish, or with files changed since (see :func:`open_model_dir`); an ``image_size`` whose
            forward pass needs more memory than is available.
    """
    if from_dir is not None and model is not None:
        raise OpenTransError("give either --from RUN_DIR or --model NAME, not both")
    if from_dir is not None:
        from_dir = Path(from_dir)
        if not (from_dir / SPEC_FILE).exists():
            raise OpenTransError(f"--from {from_dir}: no {SPEC_FILE} there; point it at the output of prune or finetune")
        seg, spec = open_model_dir(from_dir)
        if dense_mode is not None and dense_mode != spec.dense_mode:
            seg.set_dense_mode(dense_mode)
            spec.dense_mode = dense_mode
        return seg, spec, [from_dir / SPEC_FILE, from_dir / WEIGHTS_FILE]
    if model is None:
        raise OpenTransError("no model: give --model NAME (an open_clip architecture) or --from RUN_DIR")
    seg, spec = build_segmentor(model, pretrained, image_size=image_size, head=head,
                                dense_mode=dense_mode or "maskclip")
    if image_size is not None:
        from opentrans.models.segmentor import check_inference_memory

        check_inference_memory(seg, spec.image_size, f"--image-size {image_size[0]}x{image_size[1]}")
    return seg, spec, []
