"""NVIDIA target: build TensorRT engines here, with the ``tensorrt`` Python API, for the GPU of this machine.

Where precision comes from depends on the TensorRT major version (read from ``tensorrt.__version__``):

==========  ==============================  ==========================  ============================================
TensorRT    fp32                            fp16                        int8
==========  ==============================  ==========================  ============================================
8.x / 9.x   fp32 ONNX, EXPLICIT_BATCH       fp32 ONNX + BuilderFlag     Q/DQ ONNX + BuilderFlag INT8, FP16
                                            FP16
10.x        fp32 ONNX (explicit batch is    fp32 ONNX + BuilderFlag     Q/DQ ONNX + BuilderFlag INT8, FP16
            the only mode, no flag)         FP16 (weakly typed)         (weakly typed; non-Q/DQ layers may run fp16)
>= 11       fp32 ONNX, strongly typed       **fp16 ONNX** (weights and  **Q/DQ ONNX**, strongly typed: INT8 exactly
            (STRONGLY_TYPED where the       arithmetic fp16, fp32 I/O)  where the ONNX has Q/DQ, fp32 elsewhere
            enum still has it)              strongly typed, no flags
==========  ==============================  ==========================  ============================================

TensorRT 11 removed the weakly typed builder flags (``BuilderFlag.FP16/INT8``, trtexec ``--fp16/--int8/--best``):
the network's types are the ONNX's. The fp16 ONNX comes from :func:`opentrans.deploy.quantize.convert_onnx_fp16`
and the Q/DQ ONNX from :func:`opentrans.deploy.quantize.quantize_onnx_qdq` (NNCF, text-embedding path kept fp32).

Everything up to the engine build is pure and tested on CPU with fake version strings: :func:`plan_engine`
(flags, which ONNX), :func:`engine_profile` (optimisation-profile shapes), :func:`trtexec_command`.
:func:`build_engine`, :class:`TensorRTRunner` and :func:`build` need TensorRT and a CUDA GPU and are UNTESTED here
(no GPU on this project's machines); without TensorRT the target fails with one line before writing anything.

The text graph (``text_encoder.onnx``) is shipped beside the engine and run with ONNX Runtime on the host by
``runner.encode_classes`` (it runs once per class list); :func:`text_engine_profile` gives the profile to build
it as an fp32 engine as well (the Jetson bundle does).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from opentrans.deploy.graph import IMAGES
from opentrans.deploy.options import DEFAULT_MAX_BATCH, DEFAULT_MAX_CLASSES
from opentrans.deploy.targets.base import TARGETS, BuildContext, BuildOutput, GraphRunner, Target
from opentrans.errors import OpenTransError

#: TensorRT major version -> the key of :data:`opentrans.deploy.tensorrt_support.VERSIONS` its graphs are checked with.
TENSORRT_SUPPORT_VERSION = {10: "10.3", 11: "11"}

MODEL_FILE = "model.engine"
ONNX_FILE = "model.onnx"
FP16_ONNX_FILE = "model_fp16.onnx"
QDQ_ONNX_FILE = "model_int8_qdq.onnx"
DEFAULT_MAX_PROMPTS = 512
PRECISIONS = ("fp32", "fp16", "int8")
#: ONNX flavour -> file name in a build / bundle.
ONNX_FILES = {"fp32": ONNX_FILE, "fp16": FP16_ONNX_FILE, "int8-qdq": QDQ_ONNX_FILE}


@dataclass(frozen=True)
class EnginePlan:
    """How to build one engine with one TensorRT version (what :func:`plan_engine` decides).

    Attributes:
        tensorrt: the version string planned for, e.g. ``10.3.0``; major: its major version.
        precision: ``fp32``, ``fp16`` or ``int8``.
        onnx: which ONNX to parse: ``fp32`` (the export), ``fp16`` (fp16 weights/arithmetic, fp32 I/O) or
            ``int8-qdq`` (explicit Quantize/DequantizeLinear nodes).
        network_flags: ``trt.NetworkDefinitionCreationFlag`` member names for ``builder.create_network``.
        builder_flags: ``trt.BuilderFlag`` member names to set on the builder config.
        trtexec_flags: the equivalent trtexec precision options.
        strongly_typed: the network's types come from the ONNX (TensorRT >= 11).
    """

    tensorrt: str
    major: int
    precision: str
    onnx: str
    network_flags: tuple[str, ...] = ()
    builder_flags: tuple[str, ...] = ()
    trtexec_flags: tuple[str, ...] = ()
    strongly_typed: bool = False
    notes: str = ""

    @property
    def onnx_file(self) -> str:
        """File name of :attr:`onnx` in a build (``model.onnx``, ``model_fp16.onnx``, ``model_int8_qdq.onnx``)."""
        return ONNX_FILES[self.onnx]

    def to_json(self) -> dict:
        return asdict(self)


def trt_major(version: str) -> int:
    """Major version of a TensorRT version string (``"10.3.0.30"`` -> 10).

    Raises:
        OpenTransError: not a version string.
    """
    head = str(version).strip().split(".")[0]
    if not head.isdigit():
        raise OpenTransError(f"TensorRT version {version!r}: expected MAJOR.MINOR[.PATCH]")
    return int(head)


def plan_engine(version: str, precision: str) -> EnginePlan:
    """The build plan for ``precision`` under TensorRT ``version`` (see the module table). Pure: no TensorRT needed.

    Raises:
        OpenTransError: an unknown precision, an unparsable version, or TensorRT < 8 (no ONNX Q/DQ or explicit
            batch support worth targeting).
    """
    if precision not in PRECISIONS:
        raise OpenTransError(f"--precision {precision}: TensorRT engines are built as {', '.join(PRECISIONS)}")
    major = trt_major(version)
    if major < 8:
        raise OpenTransError(f"TensorRT {version}: too old; OpenTrans builds engines with TensorRT 8.5 or later")
    onnx = {"fp32": "fp32", "fp16": "fp16", "int8": "int8-qdq"}[precision]
    if major >= 11:
        return EnginePlan(version, major, precision, onnx, network_flags=("STRONGLY_TYPED",), strongly_typed=True,
                          notes="TensorRT >= 11: strongly typed, precision from the ONNX, no precision flags")
    network = ("EXPLICIT_BATCH",) if major < 10 else ()
    if precision == "fp32":
        return EnginePlan(version, major, precision, "fp32", network_flags=network,
                          notes="fp32 ONNX; Ampere+ GPUs run fp32 layers in TF32 unless TF32 is cleared")
    if precision == "fp16":
        return EnginePlan(version, major, precision, "fp32", network_flags=network, builder_flags=("FP16",),
                          trtexec_flags=("--fp16",), notes="weakly typed: fp32 ONNX, FP16 builder flag")
    return EnginePlan(version, major, precision, "int8-qdq", network_flags=network, builder_flags=("INT8", "FP16"),
                      trtexec_flags=("--int8", "--fp16"),
                      notes="explicit quantisation: Q/DQ ONNX, INT8 where Q/DQ are, FP16 allowed elsewhere")


def hw_bounds(image_size: tuple[int, int], stride: int, dynamic_hw: bool,
              hw_range: tuple[tuple[int, int], tuple[int, int]] | None = None) -> tuple[tuple[int, int], ...]:
    """(min, opt, max) input (H, W) of the image profile: the export size three times for a fixed-size graph;
    for a dynamic one ``hw_range`` = ((h_min, w_min), (h_max, w_max)) or by default half to twice the export
    size, rounded to the stride (at least one stride).

    Raises:
        OpenTransError: a range that does not contain the export size or is not made of stride multiples.
    """
    h, w = image_size
    if not dynamic_hw:
        return (h, w), (h, w), (h, w)
    if hw_range is None:
        lo = (max(stride, h // 2 // stride * stride), max(stride, w // 2 // stride * stride))
        hw_range = (lo, (2 * h, 2 * w))
    (h0, w0), (h1, w1) = hw_range
    if any(v % stride for v in (h0, w0, h1, w1)) or not (h0 <= h <= h1 and w0 <= w <= w1):
        raise OpenTransError(f"H/W range {h0}x{w0}..{h1}x{w1}: must contain {h}x{w} and be multiples of {stride}")
    return (h0, w0), (h, w), (h1, w1)


def engine_profile(image_size: tuple[int, int], embed_dim: int, classes: int, max_batch: int, max_classes: int,
                   dynamic_hw: bool = False, stride: int = 16,
                   hw_range: tuple[tuple[int, int], tuple[int, int]] | None = None) -> dict[str, tuple[tuple[int, ...], ...]]:
    """Optimisation-profile shapes of the image graph: ``{input: (min, opt, max)}``, each a shape tuple.

    ``images`` batch 1..``max_batch`` (opt 1), ``text_embeds`` classes 1..``max_classes`` (opt ``classes``);
    H/W from :func:`hw_bounds`.

    Raises:
        OpenTransError: ``max_batch`` < 1 or ``max_classes`` < ``classes``.
    """
    if max_batch < 1 or max_classes < classes:
        raise OpenTransError(f"TensorRT profile: max batch {max_batch} must be >= 1 and max classes {max_classes} "
                             f">= the {classes} classes")
    (h0, w0), (h, w), (h1, w1) = hw_bounds(image_size, stride, dynamic_hw, hw_range)
    return {
        "images": ((1, 3, h0, w0), (1, 3, h, w), (max_batch, 3, h1, w1)),
        "text_embeds": ((1, embed_dim), (classes, embed_dim), (max_classes, embed_dim)),
    }


def text_engine_profile(prompts: int, context_length: int = 77,
                        max_prompts: int = DEFAULT_MAX_PROMPTS) -> dict[str, tuple[tuple[int, ...], ...]]:
    """Profile of the text graph: ``input_ids`` (1..``max_prompts``, L), opt = ``prompts`` (classes x templates)."""
    max_prompts = max(max_prompts, prompts)
    return {"input_ids": ((1, context_length), (prompts, context_length), (max_prompts, context_length))}


def trtexec_shapes(profile: dict[str, tuple[tuple[int, ...], ...]]) -> dict[str, str]:
    """trtexec ``--minShapes/--optShapes/--maxShapes`` values, e.g. ``images:1x3x224x224,text_embeds:1x512``."""
    return {key: ",".join(f"{name}:{'x'.join(map(str, shapes[i]))}" for name, shapes in profile.items())
            for i, key in enumerate(("min", "opt", "max"))}


def trtexec_command(plan: EnginePlan, profile: dict, engine: str = MODEL_FILE, onnx: str | None = None) -> list[str]:
    """The trtexec argument list that builds ``engine`` according to ``plan`` (pure; for logs and bundles)."""
    shapes = trtexec_shapes(profile)
    return ["trtexec", f"--onnx={onnx or plan.onnx_file}", f"--saveEngine={engine}",
            f"--minShapes={shapes['min']}", f"--optShapes={shapes['opt']}", f"--maxShapes={shapes['max']}",
            *plan.trtexec_flags]


def _import_tensorrt():
    try:
        import tensorrt
    except (ImportError, OSError) as exc:  # OSError: the wheel is there but libnvinfer/CUDA is not
        raise OpenTransError(
            f"TensorRT is not installed here: import tensorrt failed ({exc.__class__.__name__}); "
            "use --target jetson to get a bundle to build on the device, or install TensorRT on a machine with an NVIDIA GPU"
        ) from None
    return tensorrt


def check_available() -> None:
    """Raises OpenTransError (before anything is written) when ``import tensorrt`` fails or no CUDA GPU is visible."""
    _import_tensorrt()
    import torch

    if not torch.cuda.is_available():
        raise OpenTransError("TensorRT is installed but no CUDA GPU is visible; use --target jetson for a device bundle")


def network_flags_value(trt, plan: EnginePlan) -> int:
    """The ``create_network`` bit mask of ``plan.network_flags`` (flags the installed enum lacks are skipped: TensorRT
    11 may make strong typing implicit)."""
    value = 0
    for name in plan.network_flags:
        member = getattr(trt.NetworkDefinitionCreationFlag, name, None)
        if member is not None:
            value |= 1 << int(member)
    return value


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, plan: EnginePlan,
                 profile: dict[str, tuple[tuple[int, ...], ...]]) -> Path:
    """Parse ``onnx_path`` (the ONNX ``plan.onnx`` names) and write a serialized engine for ``profile``.

    UNTESTED here (no TensorRT).

    Raises:
        OpenTransError: TensorRT missing, a plan for another TensorRT major version, a builder flag this
            TensorRT lacks, a parser error or a failed build.
    """
    from opentrans.artifacts import atomic_path

    trt = _import_tensorrt()
    if trt_major(trt.__version__) != plan.major:
        raise OpenTransError(f"engine plan made for TensorRT {plan.tensorrt}, installed {trt.__version__}")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags_value(trt, plan))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise OpenTransError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    opt_profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile.items():
        opt_profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(opt_profile)
    for name in plan.builder_flags:
        member = getattr(trt.BuilderFlag, name, None)
        if member is None:
            raise OpenTransError(f"TensorRT {trt.__version__} has no BuilderFlag.{name}; precision must come from the ONNX")
        config.set_flag(member)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise OpenTransError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
    with atomic_path(engine_path) as tmp:
        Path(tmp).write_bytes(bytes(serialized))
    return Path(engine_path)


def prepare_onnx(plan: EnginePlan, build_dir: Path, fp32_onnx: Path, calibration=None, text_embeds=None,
                 is_vit: bool = True, smooth_quant_alpha: float | None = None, ignore_ops=(),
                 overflow_fix: str = "first_layer_only") -> Path:
    """Write (if needed) the ONNX ``plan`` parses into ``build_dir`` and return its path: the fp32 export, an fp16
    copy (:func:`opentrans.deploy.quantize.convert_onnx_fp16`) or a Q/DQ INT8 copy
    (:func:`opentrans.deploy.quantize.quantize_onnx_qdq`, calibrated on ``calibration()`` images float32 (1,3,H,W)
    with ``text_embeds`` (C,D)). TensorRT accumulates INT8 in int32, so ``overflow_fix`` defaults to NNCF's
    ``first_layer_only``: full 8-bit weights elsewhere. The fp32 export's constant subgraphs are folded first, in place
    (:func:`opentrans.deploy.export.fold_constants`): TensorRT parses no bicubic Resize, which the
    positional-embedding resize of a fixed-size export is.

    Raises:
        OpenTransError: int8 without calibration images; errors of the quantiser.
    """
    from opentrans.deploy import quantize as q
    from opentrans.deploy.export import fold_constants

    fold_constants(fp32_onnx)
    if plan.onnx == "fp32":
        return fp32_onnx
    out = build_dir / plan.onnx_file
    if plan.onnx == "fp16":
        return q.convert_onnx_fp16(fp32_onnx, out)
    images = calibration() if calibration is not None else []
    if not images:
        raise OpenTransError("TensorRT int8: no calibration images for the Q/DQ ONNX")
    alpha = q.DEFAULT_SMOOTH_QUANT_ALPHA if smooth_quant_alpha is None else smooth_quant_alpha
    return q.quantize_onnx_qdq(fp32_onnx, images, text_embeds, out, model_type_transformer=is_vit,
                               subset_size=len(images), smooth_quant_alpha=alpha, ignore_patterns=list(ignore_ops),
                               overflow_fix=overflow_fix)


class TensorRTRunner(GraphRunner):
    """Runs a serialized TensorRT engine of the image graph on the current CUDA device.

    ``runner(images float32 (B,3,H,W), text_embeds float32 (C,D)) -> logits float32 (B,C,H,W)`` (host numpy in and
    out; device buffers are torch CUDA tensors). UNTESTED here (no GPU, no TensorRT).

    Raises:
        OpenTransError: TensorRT missing, a missing file, or an engine TensorRT cannot deserialize (another GPU or
            TensorRT version).
    """

    def __init__(self, path: str | os.PathLike, name: str = "tensorrt-fp32"):
        trt = _import_tensorrt()
        self.path = Path(path)
        if not self.path.exists():
            raise OpenTransError(f"{self.path}: file not found")
        self.name = name
        self._logger = trt.Logger(trt.Logger.WARNING)
        self.engine = trt.Runtime(self._logger).deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise OpenTransError(f"{self.path}: TensorRT cannot load this engine (built for another GPU or TensorRT version?)")
        self.context = self.engine.create_execution_context()
        self.image_shape = tuple(self.engine.get_tensor_shape(IMAGES))[1:]  # (3, H, W); -1 where dynamic

    def __call__(self, images: np.ndarray, text_embeds: np.ndarray) -> np.ndarray:
        import torch

        inputs = {"images": torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).cuda(),
                  "text_embeds": torch.from_numpy(np.ascontiguousarray(text_embeds, dtype=np.float32)).cuda()}
        for name, tensor in inputs.items():
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        out = torch.empty(tuple(self.context.get_tensor_shape("logits")), dtype=torch.float32, device="cuda")
        self.context.set_tensor_address("logits", out.data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise OpenTransError(f"{self.path}: TensorRT execution failed")
        stream.synchronize()
        return out.cpu().numpy()


def build(ctx: BuildContext) -> BuildOutput:
    """Build ``model.engine`` in ``ctx.build_dir`` from the ONNX :func:`plan_engine` picks for the installed
    TensorRT and ``ctx.precision`` (the fp32 ``model.onnx`` and, where made, the fp16/Q/DQ ONNX are kept beside it).

    UNTESTED here (no TensorRT).

    Raises:
        OpenTransError: TensorRT missing; errors of :func:`prepare_onnx` and :func:`build_engine`.
    """
    from opentrans.deploy.tensorrt_support import check_tensorrt_parsable

    trt = _import_tensorrt()
    plan = plan_engine(trt.__version__, ctx.precision)
    classes, dim = ctx.text_embeds.shape
    max_batch = int(ctx.options.setdefault("max_batch", DEFAULT_MAX_BATCH))
    max_classes = int(ctx.options.setdefault("max_classes", max(DEFAULT_MAX_CLASSES, classes)))
    profile = engine_profile(ctx.spec.image_size, dim, classes, max_batch, max_classes,
                             dynamic_hw=bool(ctx.options.get("dynamic_hw")), stride=ctx.segmentor.stride)
    start = time.perf_counter()
    onnx_path = prepare_onnx(plan, ctx.build_dir, ctx.onnx_path, ctx.calibration, ctx.text_embeds,
                             is_vit=ctx.segmentor.is_vit, smooth_quant_alpha=ctx.options.get("smooth_quant_alpha"),
                             ignore_ops=ctx.options.get("ignore_ops") or ())
    prepare_s = time.perf_counter() - start
    parse_check = check_tensorrt_parsable(onnx_path, versions=(TENSORRT_SUPPORT_VERSION[plan.major],))
    start = time.perf_counter()
    build_engine(onnx_path, ctx.build_dir / MODEL_FILE, plan, profile)
    return BuildOutput(file=MODEL_FILE, model_files=[MODEL_FILE],
                       runner=TensorRTRunner(ctx.build_dir / MODEL_FILE, name=f"tensorrt-{ctx.precision}"),
                       checked_precision=ctx.precision,
                       info={"tensorrt": trt.__version__, "engine_plan": plan.to_json(), "max_batch": max_batch,
                             "tensorrt_parse_check": parse_check,
                             "max_classes": max_classes, "onnx": onnx_path.name,
                             "profile": {k: [list(s) for s in v] for k, v in profile.items()}},
                       timings={"prepare_onnx_s": prepare_s, "engine_build_s": time.perf_counter() - start})


def open_runner(model_file: Path, build: dict, openvino_precision: str | None = None) -> TensorRTRunner:
    """A TensorRT runner on a finished nvidia build's engine.

    Raises:
        OpenTransError: TensorRT is not installed here.
    """
    check_available()
    return TensorRTRunner(model_file, name=f"tensorrt-{build['precision']}")


TARGETS.add("nvidia", Target(name="nvidia", backend="tensorrt", precisions=PRECISIONS, cpu=False,
                             build=build, check_available=check_available, open_runner=open_runner))
