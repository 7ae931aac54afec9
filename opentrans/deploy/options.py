"""The options of ``opentrans deploy``: one typed dataclass that the CLI flags, the recipe's ``deploy`` section,
:func:`opentrans.api.deploy` and :func:`opentrans.deploy.stage.deploy_stage` all read (each default written once).

:class:`BuildSettings` holds what every build of a recipe shares (parity, calibration, quantisation, export);
:class:`DeployOptions` adds the one build's ``target``, ``precision`` and ``data``; a recipe's ``deploy`` section
is a :class:`DeployPlan`: ``builds`` (:class:`Build` target/precision pairs) and the shared settings.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import click

from opentrans.deploy.quantize.common import (
    DEFAULT_SMOOTH_QUANT_ALPHA,
    DROP_METRICS,
    check_ignore_patterns,
    check_smooth_quant_alpha,
)
from opentrans.deploy.auto import AUTO, auto_candidates
from opentrans.errors import OpenTransError
from opentrans.hardware import CPU_ISA_MODES
from opentrans.options import FiniteFloat, StageOptions, as_record, option

#: ONNX opset of the export unless asked otherwise (17 suits JetPack 5/6 TensorRT).
DEFAULT_OPSET = 17
#: TensorRT optimisation profile bounds (jetson, nvidia): largest batch, and fewest "most classes" (the profile
#: takes max(this, the dataset's classes)).
DEFAULT_MAX_BATCH = 4
DEFAULT_MAX_CLASSES = 64
#: Opsets the TorchScript exporter of torch 2.x writes (LayerNormalization is a single node from 17 on).
OPSETS = range(14, 21)
#: The quantisation settings: a recipe passes them to the builds that may be INT8 only.
INT8_SETTINGS = ("calib_data", "smooth_quant_alpha", "ignore_ops", "max_drop", "drop_metric", "sensitivity",
                 "sensitivity_images")


def check_opset(opset: int) -> int:
    """Return ``opset`` if the exporter supports it.

    Raises:
        OpenTransError: ``opset`` outside 14..20.
    """
    if int(opset) not in OPSETS:
        raise OpenTransError(f"--opset {opset}: choose {OPSETS.start}..{OPSETS.stop - 1} (17 for JetPack 5/6 TensorRT)")
    return int(opset)


def target_names() -> list[str]:
    """The deploy targets (the registry's names)."""
    from opentrans.deploy.targets.base import TARGETS

    return TARGETS.names()


def precision_names() -> list[str]:
    """Every precision some target builds, and ``auto``."""
    from opentrans.deploy.targets.base import TARGETS

    return sorted({p for _, t in TARGETS.items() for p in t.precisions}) + [AUTO]


@dataclass(kw_only=True)
class BuildSettings(StageOptions):
    """What every deploy build of a run shares (the recipe's ``deploy`` keys besides ``builds``)."""

    calib_size: int = option(32, "Number of INT8 calibration images.", type=click.IntRange(min=1))
    calib_data: str | None = option(None, "INT8 calibration images: any --data dataset (its train split) or a plain "
                                    "folder of images (images:DIR or DIR). Default: the --data train split.",
                                    metavar="FORMAT:PATH|DIR")
    smooth_quant_alpha: float = option(DEFAULT_SMOOTH_QUANT_ALPHA, "NNCF SmoothQuant alpha for ViT MatMuls (int8), "
                                       "in (0, 1]; -1 disables.", type=FiniteFloat())
    ignore_ops: list[str] = option(default_factory=list, help="Keep image-graph operations whose name matches in "
                                   "floating point (int8; repeatable), e.g. the top rows of --sensitivity.",
                                   metavar="REGEX")
    max_drop: float | None = option(None, "Accuracy-controlled INT8 (openvino): revert layers to float until the "
                                    "--drop-metric drop on the parity images is at most this many percentage points.",
                                    type=FiniteFloat())
    drop_metric: str = option("agreement", "agreement: argmax agreement with the fp32 PyTorch model; miou: on the "
                              "val labels.", choices=DROP_METRICS)
    sensitivity: bool = option(False, "Also write sensitivity.json/.md: each image-encoder layer quantised alone, "
                               "most costly first (int8).")
    sensitivity_images: int = option(4, "Val images the sensitivity report runs per layer.",
                                     type=click.IntRange(min=1))
    parity_limit: int = option(8, "Number of real val images the export is compared with PyTorch on.",
                               type=click.IntRange(min=1))
    opset: int = option(DEFAULT_OPSET, "", type=click.IntRange(min=14, max=20))
    cpu_isa: str | None = option(None, "CPU targets: the CPU the build is for (default native = this machine's). "
                                 "INT8 keeps every layer's weights within 7 bits where the CPU lacks VNNI (portable: "
                                 "always, safe on any x86).", choices=CPU_ISA_MODES)

    def check(self) -> None:
        """Raise :class:`OpenTransError` (one line, the CLI's messages) for a value out of range."""
        if self.drop_metric not in DROP_METRICS:
            raise OpenTransError(f"--drop-metric {self.drop_metric}: choose {', '.join(DROP_METRICS)}")
        if self.cpu_isa is not None and self.cpu_isa not in CPU_ISA_MODES:
            raise OpenTransError(f"--cpu-isa {self.cpu_isa}: choose one of {', '.join(CPU_ISA_MODES)}")
        super().check()
        self.opset = check_opset(self.opset)
        if self.parity_limit < 1:
            raise OpenTransError(f"--parity-limit {self.parity_limit}: must be at least 1")
        check_smooth_quant_alpha(self.smooth_quant_alpha)
        self.ignore_ops = check_ignore_patterns(self.ignore_ops)
        if self.max_drop is not None and self.max_drop < 0:
            raise OpenTransError(f"--max-drop {self.max_drop}: must be >= 0 (percentage points)")


#: The names of :class:`BuildSettings`' fields.
SETTINGS = tuple(f.name for f in fields(BuildSettings))


@dataclass(kw_only=True)
class DeployOptions(BuildSettings):
    """Options of one ``opentrans deploy`` build (see :func:`opentrans.deploy.stage.deploy_stage` for their effect).

    ``target``/``precision`` pick the build; ``data`` (``FORMAT:PATH``) gives the class names, the parity images
    (val) and the INT8 calibration images (train); ``max_batch``/``max_classes`` bound the TensorRT profile
    (jetson, nvidia; classes default to max(64, number of classes)); ``sensitivity_top`` rows in sensitivity.md;
    ``dynamic_hw`` exports a graph with dynamic height/width.
    """

    target: str | None = option(None, "Deploy target (required).", choices=target_names)
    precision: str = option("fp32", "fp32, fp16 or int8 (what the target supports), or auto (onnx, openvino): build "
                            "fp32, bf16 where the CPU has it natively, and int8, time them here side by side, keep the "
                            "fastest that passes parity.", choices=precision_names)
    data: str | None = option(None, "Dataset for the parity check (val images) and INT8 calibration (train images); "
                              "default: the dataset the --from artifact was finetuned on, as its manifest records it.",
                              metavar="FORMAT:PATH")
    dynamic_hw: bool = option(False, "Export the image graph with dynamic height/width (ViT position embeddings "
                              "resized in the graph).")
    max_batch: int = option(DEFAULT_MAX_BATCH, "TensorRT profile: largest batch (jetson, nvidia).", cli=False)
    max_classes: int | None = option(None, f"TensorRT profile: most classes (jetson, nvidia; default max("
                                     f"{DEFAULT_MAX_CLASSES}, the dataset's classes)).", cli=False)
    sensitivity_top: int | None = option(None, "rows of the sensitivity.md table", cli=False)

    @property
    def quantises(self) -> bool:
        """Whether the build may be INT8 (``int8`` or ``auto``)."""
        return self.precision in ("int8", AUTO)

    def check(self) -> None:
        """Raise :class:`OpenTransError` (one line, nothing written) for an unknown target, a precision the target
        does not build, a bad opset, data spec or limit, an INT8-only option with another precision, ``max_drop``
        off openvino, ``cpu_isa`` for a GPU target."""
        from opentrans.data import parse_data_spec
        from opentrans.deploy.targets.base import TARGETS, cpu_targets

        if self.target is None:
            raise OpenTransError(f"--target: required; choose one of {', '.join(TARGETS.names())}")
        target = TARGETS.get_target(self.target)
        if self.precision == AUTO:
            auto_candidates(self.target, native_bf16=False)  # refuses a GPU target
        elif self.precision not in target.precisions:
            raise OpenTransError(f"--precision {self.precision}: target {self.target} builds "
                                 f"{', '.join(target.precisions)}")
        super().check()
        if self.data is None:
            raise OpenTransError("--data: required")
        parse_data_spec(self.data)
        int8_only = {"--calib-data": self.calib_data is not None, "--ignore-ops": bool(self.ignore_ops),
                     "--max-drop": self.max_drop is not None, "--sensitivity": self.sensitivity}
        for flag, given in int8_only.items():
            if given and not self.quantises:
                raise OpenTransError(f"{flag}: applies to --precision int8 (or auto) only (asked: {self.precision})")
        if self.max_drop is not None and self.target != "openvino":
            raise OpenTransError(f"--max-drop: accuracy-controlled quantisation is built for --target openvino only "
                                 f"(asked: {self.target})")
        if self.sensitivity_images < 1 or (self.sensitivity_top is not None and self.sensitivity_top < 1):
            raise OpenTransError("--sensitivity-images and --sensitivity-top: must be at least 1")
        if self.cpu_isa is not None and not target.cpu:
            raise OpenTransError(f"--cpu-isa: applies to the CPU targets {', '.join(cpu_targets())} (asked: {self.target}, "
                                 f"whose INT8 accumulates in int32 on the GPU)")
        if self.max_batch < 1:
            raise OpenTransError(f"--max-batch {self.max_batch}: must be at least 1")
        if self.max_classes is not None and self.max_classes < 1:
            raise OpenTransError(f"--max-classes {self.max_classes}: must be at least 1")


@dataclass
class Build(StageOptions):
    """One deploy build of a recipe: a target and a precision."""

    target: str = option(help="deploy target", choices=target_names)
    precision: str = option("fp32", "fp32, fp16, int8 or auto", choices=precision_names)


@dataclass(kw_only=True)
class DeployPlan(BuildSettings):
    """A recipe's ``deploy`` section: the builds (target/precision pairs) and the settings they share.

    The quantisation settings reach the builds that may be INT8 only, ``max_drop`` the openvino ones only and
    ``cpu_isa`` the CPU targets only (:meth:`options_for`).
    """

    builds: list[Build] = option(default_factory=lambda: [Build("onnx", "fp32")], help="target/precision pairs",
                                 cli=False)

    @classmethod
    def parse(cls, raw, where: str) -> "DeployPlan":
        """A recipe's ``deploy`` section ``raw`` (a mapping; None = defaults), checked; ``where`` names it in
        messages (``deploy.builds`` for a build's).

        Raises:
            OpenTransError: as :func:`opentrans.options.from_mapping`, for the section and for each build.
        """
        from opentrans.options import from_mapping

        builds = None
        if isinstance(raw, dict):
            raw = dict(raw)
            builds = raw.pop("builds", None)
        plan = from_mapping(cls, raw, where)
        if builds is not None:
            if not isinstance(builds, list):
                raise OpenTransError(f"{where}: builds: expected a list of {{target, precision}}")
            plan.builds = [from_mapping(Build, b, f"{where}.builds") for b in builds]
        return plan

    def applicable(self, build: Build) -> tuple[str, ...]:
        """The settings that reach ``build``: the quantisation settings reach the builds that may be INT8 only,
        ``cpu_isa`` the CPU targets only."""
        from opentrans.deploy.targets.base import TARGETS

        names = ("parity_limit", "calib_size", "opset")
        if TARGETS.get_target(build.target).cpu:
            names += ("cpu_isa",)
        if build.precision in ("int8", AUTO):
            names += INT8_SETTINGS
        return names

    def options_for(self, build: Build, data: str) -> DeployOptions:
        """The :class:`DeployOptions` of one of the builds, on ``data`` (``max_drop`` reaches openvino only)."""
        shared = {name: getattr(self, name) for name in self.applicable(build)}
        if "max_drop" in shared and build.target != "openvino":
            shared["max_drop"] = None
        return DeployOptions(target=build.target, precision=build.precision, data=data, **shared)

    def record_for(self, build: Build, data: str) -> dict:
        """What a run records of one build's options (to tell a finished build from one to redo): the target,
        precision, data and the settings that reach it."""
        options = as_record(self.options_for(build, data))
        return {k: options[k] for k in ("target", "precision", "data", *self.applicable(build))}
