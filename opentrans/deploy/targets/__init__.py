"""Deploy targets: one back end per module, each registering itself in :data:`~opentrans.deploy.targets.base.TARGETS`
(:class:`~opentrans.deploy.targets.base.Target`: name, back end, precisions, CPU or not, ``build``,
``check_available``, ``open_runner``), and :func:`load_runner`.

A target module imports :mod:`opentrans.deploy.targets.base`, never this package. Its
``check_available() -> None`` raises :class:`OpenTransError` when its back end cannot run here and
``build(ctx: BuildContext) -> BuildOutput`` ``build`` turns the fp32 ONNX export in the
build directory into the target's artifact and returns a runner on that artifact, which the deploy stage checks
against PyTorch before anything reaches the output directory.

========  ==========================================  ===========  =========================================
target    artifact                                    precisions   parity checked here on
========  ==========================================  ===========  =========================================
onnx      ``model.onnx`` for ONNX Runtime (int8: Q/DQ)  fp32, fp16,  ONNX Runtime CPU
                                                      int8
openvino  ``model.xml``/``model.bin`` OpenVINO IR     fp32, fp16,  OpenVINO CPU, f32 inference precision
                                                      int8
jetson    bundle: ONNX + ``build_engine.sh`` +       fp32, fp16,  ONNX Runtime on the bundle's ONNX at its
          ``runner.py`` (see targets/jetson.py)       int8         precision (fp16 / Q/DQ INT8 file)
nvidia    ``model.engine`` (TensorRT, this GPU only)  fp32, fp16,  TensorRT (needs ``import tensorrt``)
                                                      int8
========  ==========================================  ===========  =========================================

Every build also holds the text graph (``text_encoder.onnx``; ``text_encoder.xml`` for openvino) and the CLIP
tokenizer files: see :mod:`opentrans.deploy.text_graph`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from opentrans import validate
from opentrans.artifacts import read_json, verify_outputs
from opentrans.deploy.targets.base import (  # noqa: F401 - re-exported
    BUILD_FILE,
    BUILD_FORMAT,
    CLASSES_FILE,
    PARITY_FILE,
    TARGETS,
    TEXT_EMBEDS_FILE,
    BuildContext,
    BuildOutput,
    Target,
    cpu_targets,
)
from opentrans.errors import OpenTransError


def check_target(target: str, precision: str) -> Target:
    """Validate a target/precision pair and that the target's back end can run here; writes nothing.

    Returns:
        the target's registry entry.

    Raises:
        OpenTransError: unknown target, a precision the target does not build, or a missing back end
            (``nvidia`` without TensorRT).
    """
    entry = TARGETS.get_target(target)
    if precision not in entry.precisions:
        raise OpenTransError(f"--precision {precision}: target {target} builds {', '.join(entry.precisions)}")
    entry.check_available()
    return entry


_BUILD_REQUIRED = ("format", "target", "backend", "precision", "file", "model_files", "image_size", "mean", "std",
                   "class_names", "model", "pretrained", "weights", "spec", "source")


def validate_build(build: Any, where: str) -> dict[str, Any]:
    """``build`` (a parsed ``build.json``) after checking every field a reader uses: types, ranges, a known
    target/back end/precision, file names inside the build directory, and the embedded model spec
    (:func:`~opentrans.models.artifact.spec_from_dict`). Keys no reader uses (target-specific information)
    are left as they are.

    Raises:
        OpenTransError: one line naming ``where`` and the field that is missing, of the wrong type or out of range.
    """
    from opentrans.models.artifact import spec_from_dict

    if not isinstance(build, dict) or build.get("format") != BUILD_FORMAT:
        raise OpenTransError(f"{where}: not an {BUILD_FORMAT} build description")
    validate.mapping(build, where, required=_BUILD_REQUIRED, optional=None)
    target = TARGETS.get(validate.string(build["target"], f"{where}: target", choices=TARGETS.names()))
    validate.string(build["backend"], f"{where}: backend", choices=(target.backend,))
    validate.string(build["precision"], f"{where}: precision", choices=target.precisions)
    validate.relative_file(build["file"], f"{where}: file")
    for i, name in enumerate(validate.sequence(build["model_files"], f"{where}: model_files", max_length=4096)):
        validate.relative_file(name, f"{where}: model_files[{i}]")
    validate.image_size(build["image_size"], f"{where}: image_size")
    validate.rgb_constants(build["mean"], f"{where}: mean")
    validate.rgb_constants(build["std"], f"{where}: std", positive=True)
    names = validate.sequence(build["class_names"], f"{where}: class_names", max_length=65536)
    for i, name in enumerate(names):
        validate.string(name, f"{where}: class_names[{i}]")
    for key in ("model", "weights"):
        validate.string(build[key], f"{where}: {key}")
    validate.string(build["pretrained"], f"{where}: pretrained", empty=True)
    spec_from_dict(build["spec"], where=f"{where}: spec")
    source = validate.mapping(build["source"], f"{where}: source", optional=None)
    for key in ("from_dir", "from_dir_relative", "model", "pretrained"):
        if source.get(key) is not None:
            validate.string(source[key], f"{where}: source.{key}", empty=True)
    if "text_embeds" in build:
        validate.relative_file(build["text_embeds"], f"{where}: text_embeds")
    for key, check in (("opset", lambda v, at: validate.integer(v, at, 1, 100)),
                       ("embed_dim", lambda v, at: validate.integer(v, at, 1, validate.MAX_IMAGE_SIDE * 4)),
                       ("dynamic_hw", validate.boolean)):
        if key in build:
            check(build[key], f"{where}: {key}")
    info = build.get("text_encoder")
    if info is not None:
        at = f"{where}: text_encoder"
        validate.mapping(info, at, required=("file", "templates"), optional=None)
        validate.relative_file(info["file"], f"{at}.file")
        for i, name in enumerate(validate.sequence(info.get("files", []), f"{at}.files", max_length=64)):
            validate.relative_file(name, f"{at}.files[{i}]")
        for key in ("bpe", "tokenizer_module"):
            if key in info:
                validate.relative_file(info[key], f"{at}.{key}")
        for i, template in enumerate(validate.sequence(info["templates"], f"{at}.templates", max_length=1024)):
            validate.string(template, f"{at}.templates[{i}]")
        if "context_length" in info:
            validate.integer(info["context_length"], f"{at}.context_length", 1, 4096)
    return build


def read_build(build_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``build.json`` of a deploy build directory, validated by :func:`validate_build`.

    Raises:
        OpenTransError: no ``build.json``, one of another format, or one that fails validation.
    """
    build_dir = Path(build_dir)
    if not (build_dir / BUILD_FILE).exists():
        raise OpenTransError(f"{build_dir}: no {BUILD_FILE}; expected a directory written by `opentrans deploy`")
    return validate_build(read_json(build_dir / BUILD_FILE), str(build_dir / BUILD_FILE))


def build_files(build: dict[str, Any]) -> list[str]:
    """The files of a build (relative names) that loading it reads: ``build.json``, the model file(s), the text
    embeddings and the text graph with its tokenizer files."""
    names = [BUILD_FILE, build["file"], *build["model_files"]]
    if "text_embeds" in build:
        names.append(build["text_embeds"])
    info = build.get("text_encoder")
    if info:
        names += [info["file"], *info.get("files", []), *(info[k] for k in ("bpe", "tokenizer_module") if k in info)]
    return list(dict.fromkeys(names))


def source_model_dir(build_dir: str | os.PathLike) -> Path:
    """The model directory (``model.json``) a deploy build was made from, e.g. to encode other class names with
    its text tower.

    ``build.json`` records it relative to the build (so a run directory can move as a whole) and absolute.

    Raises:
        OpenTransError: not a deploy build, a build made from ``--model NAME`` (no model directory: pass
            ``--model``/``--pretrained`` again), or a source directory that no longer exists.
    """
    from opentrans.models.artifact import SPEC_FILE

    build_dir = Path(build_dir)
    source = read_build(build_dir).get("source", {})
    if not source.get("from_dir"):
        raise OpenTransError(f"{build_dir} was built from --model {source.get('model')} --pretrained "
                             f"{source.get('pretrained')}, not from a model directory; pass those options instead")
    for candidate in (build_dir / source["from_dir_relative"], Path(source["from_dir"])):
        if (candidate / SPEC_FILE).exists():
            return candidate.resolve()
    raise OpenTransError(f"{build_dir}: its source model directory {source['from_dir']} no longer exists")


def load_runner(path: str | os.PathLike, openvino_precision: str | None = "f32"):
    """A runner for a deploy build directory or a model directory.

    * a deploy build (``build.json``): the runner of its back end on its model file: ONNX Runtime for
      ``onnx`` and ``jetson`` bundles (the bundle's ONNX at its precision, ``build.json["file"]``; a bundle's Q/DQ
      graph run as written, see :class:`~opentrans.deploy.targets.onnx.OnnxRuntimeRunner` ``reference_qdq``),
      OpenVINO for ``openvino`` (compiled
      with ``openvino_precision``: ``f32`` by default, ``None`` for the device default, which is bf16 on CPUs
      with avx512_bf16; a bf16 build of ``--precision auto`` always with its recorded ``inference_precision``),
      TensorRT for ``nvidia``;
    * a model directory (``model.json`` from prune/finetune): :class:`opentrans.inference.evaluate.TorchRunner`.

    The runner maps images float32 (B,3,H,W) and text_embeds float32 (C,D) to logits float32 (B,C,H,W). A deploy
    build's runner also has ``runner.text_encoder`` (:class:`opentrans.deploy.text_graph.TextEncoder` on the build's
    text graph, no PyTorch; None for builds without one). Every runner meets :class:`opentrans.runtime.Runner`
    (``name``, ``input_size``, ``encode_classes(names) -> float32 (C, D)``, the call).

    Either kind of directory must be the output of a finished stage whose files still have the sha256 its
    manifest recorded (:func:`opentrans.artifacts.verify_outputs`): a directory from anyone is checked before any
    of its files is parsed by a back end.

    Raises:
        OpenTransError: ``path`` is neither kind of directory, a ``build.json`` that fails validation, no complete
            manifest, a missing or damaged file, a build of an unknown back end, or a back end that is not
            installed here.
    """
    path = Path(path)
    if (path / BUILD_FILE).exists():
        verify_outputs(path, build_files(read_build(path)))
        runner = _build_runner(path, openvino_precision)
        from opentrans.deploy.text_graph import open_text_encoder

        runner.text_encoder = open_text_encoder(path, read_build(path), openvino_precision)
        return runner
    if (path / "model.json").exists():
        from opentrans.inference.evaluate import TorchRunner
        from opentrans.models.artifact import open_model_dir

        seg, spec = open_model_dir(path)
        return TorchRunner(seg, model_name=spec.model)
    raise OpenTransError(f"{path}: neither a deploy build ({BUILD_FILE}) nor a model directory (model.json)")


def _build_runner(path: Path, openvino_precision: str | None):
    """The image-graph runner of the deploy build ``path`` (see :func:`load_runner`)."""
    build = read_build(path)
    model_file = path / build["file"]
    if not model_file.exists():
        raise OpenTransError(f"{model_file}: file not found (named in {path / BUILD_FILE})")
    return TARGETS.get(build["target"]).open_runner(model_file, build, openvino_precision)
