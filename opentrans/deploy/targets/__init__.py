"""Deploy targets: one back end per module, a string-keyed registry, and :func:`load_runner`.

Every target module exposes ``check_available() -> None`` (raises :class:`OpenTransError` when its back end
cannot run here) and ``build(ctx: BuildContext) -> BuildOutput``. ``build`` turns the fp32 ONNX export in the
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

import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from opentrans import validate
from opentrans.artifacts import read_json, verify_outputs
from opentrans.errors import OpenTransError

BUILD_FILE = "build.json"
PARITY_FILE = "parity.json"
BUILD_FORMAT = "opentrans.deploy/1"
TEXT_EMBEDS_FILE = "text_embeds.npy"
CLASSES_FILE = "classes.json"

#: target -> (module under opentrans.deploy.targets, back end recorded in build.json)
TARGETS: dict[str, tuple[str, str]] = {
    "onnx": ("onnx", "onnxruntime"),
    "openvino": ("openvino", "openvino"),
    "jetson": ("jetson", "jetson"),
    "nvidia": ("tensorrt", "tensorrt"),
}
#: Targets that run on the CPU of the machine they are deployed to (``--cpu-isa`` applies to them).
CPU_TARGETS = ("onnx", "openvino")
#: Precisions each target can build.
PRECISIONS: dict[str, tuple[str, ...]] = {
    "onnx": ("fp32", "fp16", "int8"),
    "openvino": ("fp32", "fp16", "int8"),
    "jetson": ("fp32", "fp16", "int8"),
    "nvidia": ("fp32", "fp16", "int8"),
}


@dataclass
class BuildContext:
    """What a target needs to build its artifact.

    Attributes:
        segmentor: the PyTorch :class:`OpenVocabSegmentor` (fp32, eval) the artifact must reproduce.
        spec: its :class:`~opentrans.models.artifact.SegmentorSpec`.
        precision: one of :data:`PRECISIONS` of the target.
        build_dir: the (temporary) build directory; everything the target writes goes here.
        onnx_path: the fp32 ONNX export inside ``build_dir`` (``model.onnx``), opset :attr:`opset`.
        opset: ONNX opset of ``onnx_path``.
        class_names: the dataset's class names, in label order.
        text_embeds: float32 (C, D) L2-normalised class embeddings for ``class_names``.
        calibration: returns the calibration images, float32 (1, 3, H, W) each, from the training split
            (only called by targets that quantise).
        sample_images: float32 (1, 3, H, W): one real validation image (for bundles that ship a sample).
        options: target-specific options (``smooth_quant_alpha``, ``max_batch``, ``max_classes``; for int8
            ``ignore_ops``, ``max_drop``, ``drop_metric``, ``calib_data``, ``ignore_index``, ``overflow_fix``
            (see :data:`opentrans.deploy.quantize.OVERFLOW_FIXES`)).
    """

    segmentor: torch.nn.Module
    spec: Any
    precision: str
    build_dir: Path
    onnx_path: Path
    opset: int
    class_names: list[str]
    text_embeds: np.ndarray
    calibration: Callable[[], list[np.ndarray]]
    sample_images: np.ndarray
    options: dict[str, Any] = field(default_factory=dict)
    #: returns ``(image float32 (1,3,H,W), mask int64 (h0,w0))`` validation pairs (the parity images), for
    #: accuracy-controlled quantisation; None when the stage provides none.
    validation: Callable[[], list[tuple[np.ndarray, np.ndarray]]] | None = None


@dataclass
class BuildOutput:
    """What a target built.

    Attributes:
        file: the model file the runner loads, relative to the build directory.
        model_files: every file that makes up the model (for the size in MB), relative to the build directory.
        runner: a runner on the built artifact, used for the parity check.
        checked_precision: the precision the parity check actually exercises here (``fp32`` for a Jetson
            fp16 bundle: the fp16 engine is only built on the device).
        info: extra fields for ``build.json`` (e.g. quantisation settings, OpenVINO inference precision).
        timings: seconds spent in the target's own steps (conversion, quantisation, engine build).
    """

    file: str
    model_files: list[str]
    runner: Any
    checked_precision: str
    info: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


def target_module(target: str):
    """The module implementing ``target``.

    Raises:
        OpenTransError: an unknown target.
    """
    if target not in TARGETS:
        raise OpenTransError(f"--target {target}: choose one of {', '.join(TARGETS)}")
    return importlib.import_module(f"opentrans.deploy.targets.{TARGETS[target][0]}")


def check_target(target: str, precision: str) -> None:
    """Validate a target/precision pair and that the target's back end can run here; writes nothing.

    Raises:
        OpenTransError: unknown target, a precision the target does not build, or a missing back end
            (``nvidia`` without TensorRT).
    """
    module = target_module(target)
    if precision not in PRECISIONS[target]:
        raise OpenTransError(f"--precision {precision}: target {target} builds {', '.join(PRECISIONS[target])}")
    module.check_available()


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
    target = validate.string(build["target"], f"{where}: target", choices=TARGETS)
    validate.string(build["backend"], f"{where}: backend", choices=(TARGETS[target][1],))
    validate.string(build["precision"], f"{where}: precision", choices=PRECISIONS[target])
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
    text graph, no PyTorch; None for builds without one) and ``runner.encode_classes(names) -> float32 (C, D)``.

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
        if runner.text_encoder is not None:
            runner.encode_classes = runner.text_encoder.encode_classes
        return runner
    if (path / "model.json").exists():
        from opentrans.inference.evaluate import TorchRunner
        from opentrans.models.artifact import open_model_dir

        return TorchRunner(open_model_dir(path)[0])
    raise OpenTransError(f"{path}: neither a deploy build ({BUILD_FILE}) nor a model directory (model.json)")


def _build_runner(path: Path, openvino_precision: str | None):
    """The image-graph runner of the deploy build ``path`` (see :func:`load_runner`)."""
    build = read_build(path)
    backend, precision = build.get("backend"), build.get("precision")
    model_file = path / build["file"]
    if not model_file.exists():
        raise OpenTransError(f"{model_file}: file not found (named in {path / BUILD_FILE})")
    if backend in ("onnxruntime", "jetson"):
        from opentrans.deploy.targets.onnx import OnnxRuntimeRunner

        name = f"onnxruntime-{precision}" + ("" if backend == "onnxruntime" else " (jetson bundle)")
        return OnnxRuntimeRunner(model_file, name=name, reference_qdq=backend == "jetson")
    if backend == "openvino":
        from opentrans.deploy.targets.openvino import OpenVINORunner

        # a bf16 build (``--precision auto``) is the fp32 IR run at the bf16 hint it was checked with
        hint = build.get("inference_precision") or openvino_precision
        return OpenVINORunner(model_file, name=f"openvino-{precision}", inference_precision=hint)
    if backend == "tensorrt":
        from opentrans.deploy.targets.tensorrt import TensorRTRunner, check_available

        check_available()
        return TensorRTRunner(model_file, name=f"tensorrt-{precision}")
    raise OpenTransError(f"{path / BUILD_FILE}: unknown back end {backend!r}")
