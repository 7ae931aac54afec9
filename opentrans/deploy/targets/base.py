"""What a deploy target is: its registry entry (:class:`Target`), what it gets (:class:`BuildContext`) and what
it returns (:class:`BuildOutput`).

Target modules import this module, never the package ``opentrans.deploy.targets`` (which lists and loads builds);
each registers itself in its own file::

    TARGETS.add("onnx", Target(name="onnx", backend="onnxruntime", precisions=("fp32", "fp16", "int8"), cpu=True,
                               build=build, check_available=check_available, open_runner=open_runner))

so adding a target is one new file in ``opentrans/deploy/targets/`` (and its test): the CLI's ``--target`` and
``--precision`` choices, the recipe's check and ``build.json`` validation read this registry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from opentrans.errors import OpenTransError
from opentrans.registry import Registry

#: The files every build holds besides the target's model files.
BUILD_FILE = "build.json"
PARITY_FILE = "parity.json"
BUILD_FORMAT = "opentrans.deploy/1"
TEXT_EMBEDS_FILE = "text_embeds.npy"
CLASSES_FILE = "classes.json"


@dataclass(frozen=True)
class Target:
    """A deploy target's registry entry.

    Attributes:
        name: the ``--target`` name.
        backend: the back end recorded in ``build.json`` (``onnxruntime``, ``openvino``, ``jetson``, ``tensorrt``).
        precisions: the precisions it builds.
        cpu: whether it runs on the CPU of the machine it is deployed to (``--cpu-isa`` and ``--precision auto``
            apply to it).
        build: ``build(ctx: BuildContext) -> BuildOutput``.
        check_available: raises :class:`OpenTransError` when the back end cannot run here.
        open_runner: ``open_runner(model_file: Path, build: dict, openvino_precision: str | None) -> runner`` on a
            finished build's model file.
    """

    name: str
    backend: str
    precisions: tuple[str, ...]
    cpu: bool
    build: Callable[["BuildContext"], "BuildOutput"]
    check_available: Callable[[], None]
    open_runner: Callable[[Path, dict, str | None], Any]


class TargetRegistry(Registry[Target]):
    """The deploy targets; :meth:`get_target` keeps the CLI's ``--target X: choose one of ...`` message."""

    def get_target(self, name: str) -> Target:
        """The target ``name``.

        Raises:
            OpenTransError: an unknown target (the message lists the known ones).
        """
        if name not in self:
            raise OpenTransError(f"--target {name}: choose one of {', '.join(self.names())}")
        return self.get(name)

    def backend_of(self, backend: str) -> Target:
        """The target whose ``build.json`` back end is ``backend``.

        Raises:
            OpenTransError: no target has that back end.
        """
        for _, target in self.items():
            if target.backend == backend:
                return target
        raise OpenTransError(f"unknown back end {backend!r}")


class GraphRunner:
    """Base of the deploy runners (:class:`opentrans.runtime.Runner`): a subclass sets ``name`` and ``image_shape``
    (the image input's (3, H, W), a non-integer for a dynamic axis) and implements ``__call__``;
    :func:`opentrans.deploy.targets.load_runner` sets ``text_encoder`` to the build's text graph.

    Attributes:
        text_encoder: :class:`opentrans.deploy.text_graph.TextEncoder` on the build's text graph, or None (a bare
            graph, or a build made before builds carried one).
    """

    name: str = "graph"
    image_shape: tuple = ()
    text_encoder: Any = None
    text_source = "the build's text-encoder graph"

    @property
    def input_size(self) -> tuple[int, int] | None:
        """(H, W) in pixels of the image graph, or None for a graph exported with dynamic height/width."""
        from opentrans.runtime import static_size

        return static_size(self.image_shape) if len(self.image_shape) >= 2 else None

    def encode_classes(self, names) -> np.ndarray:
        """Class names -> float32 (C, D) L2-normalised embeddings from the build's text graph (no PyTorch).

        Raises:
            OpenTransError: the runner has no text graph (see :attr:`text_encoder`), or no class names.
        """
        if self.text_encoder is None:
            raise OpenTransError(f"{self.name}: this build has no text-encoder graph; encode the class names with "
                                 f"the PyTorch model it was made from")
        return self.text_encoder.encode_classes(names)


#: Every deploy target, each registered by its own module of :mod:`opentrans.deploy.targets`.
TARGETS = TargetRegistry("deploy target", plugins="opentrans.deploy.targets")


def cpu_targets() -> list[str]:
    """The targets that run on the CPU of the machine they are deployed to."""
    return [name for name, target in TARGETS.items() if target.cpu]


@dataclass
class BuildContext:
    """What a target needs to build its artifact.

    Attributes:
        segmentor: the PyTorch :class:`OpenVocabSegmentor` (fp32, eval) the artifact must reproduce.
        spec: its :class:`~opentrans.models.artifact.SegmentorSpec`.
        precision: one of the target's precisions (:attr:`Target.precisions`).
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

    segmentor: Any
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


