"""Jetson target: a self-contained bundle that builds and runs TensorRT engines on the device itself.

TensorRT engines are specific to one GPU and one TensorRT version, so the bundle ships ONNX graphs, a
``build_engine.sh`` that runs ``trtexec`` on the Jetson, and a PyTorch-free ``runner.py``. Nothing here needs a
GPU: the parity check runs the bundle's ONNX for the requested precision with ONNX Runtime on the CPU
(``model.onnx`` fp32, ``model_fp16.onnx``, or the Q/DQ ``model_int8_qdq.onnx``), and ``runner.py check`` compares
the device's engine outputs with the expected ones in ``bundle.json``.

Bundle contents:

==============================  ================================================================================
``model.onnx``                  image graph, fp32: ``images`` (B,3,H,W) + ``text_embeds`` (C,D) -> ``logits``
``model_fp16.onnx``             (fp16 bundles) fp16 weights/arithmetic, fp32 I/O, for TensorRT >= 11
``model_int8_qdq.onnx``         (int8 bundles) NNCF Q/DQ INT8 image encoder, text path fp32
``text_encoder.onnx``           text graph: ``input_ids`` int64 (N,77) -> ``text_embeds`` (N,D) L2-normalised
``tokenizer.py`` + BPE file     standalone CLIP tokenizer (numpy + standard library)
``runner.py``                   ``check`` / ``encode`` / ``segment`` with a TensorRT or ONNX Runtime back end
``build_engine.sh``             trtexec for JetPack 6 (TensorRT 10.3) and JetPack 7 (TensorRT 11)
``bundle.json``                 the runner's manifest: graphs, templates, sample files, tolerances
``sample_*.npy``                one real validation image, its PyTorch logits, the class prompts' token ids and
                                the class embeddings PyTorch computes
``README.md``                   the above for people
==============================  ================================================================================

Precision per TensorRT version follows :func:`opentrans.deploy.targets.tensorrt.plan_engine` (the script's
flags are generated from it): JetPack 6 (TensorRT 10.3) builds fp16 from the fp32 ONNX with ``--fp16`` and INT8
from the Q/DQ ONNX with ``--int8 --fp16``; JetPack 7 / TensorRT 11 has no precision flags, so it parses
``model_fp16.onnx`` or the Q/DQ ONNX and takes the precision from there. JetPack 5 (TensorRT 8.5) behaves like 10.
Opset 17 is what those parsers take. The text engine is always built fp32 (it runs once per class list).
"""

from __future__ import annotations

import shutil
import textwrap
import time
from pathlib import Path

import numpy as np

from opentrans.artifacts import write_json, write_text
from opentrans.deploy.graph import DTYPE, LOGITS, graph_io
from opentrans.deploy.parity import decided_margin, device_tolerances
from opentrans.deploy.options import DEFAULT_MAX_BATCH, DEFAULT_MAX_CLASSES
from opentrans.deploy.targets.base import TARGETS, BuildContext, BuildOutput, Target
from opentrans.deploy.targets.tensorrt import (
    DEFAULT_MAX_PROMPTS,
    ONNX_FILES,
    engine_profile,
    plan_engine,
    text_engine_profile,
    trtexec_shapes,
)

MODEL_FILE = "model.onnx"
SCRIPT_FILE = "build_engine.sh"
README_FILE = "README.md"
RUNNER_FILE = "runner.py"
MANIFEST_FILE = "bundle.json"
ENGINE_FILE = "model.engine"
TEXT_ENGINE_FILE = "text_encoder.engine"
SAMPLE_IMAGES = "sample_images.npy"
SAMPLE_LOGITS = "sample_logits.npy"
SAMPLE_IMAGES_BIN = "sample_images.bin"
SAMPLE_PROMPT_IDS = "sample_prompt_ids.npy"
SAMPLE_TEXT_EMBEDS = "sample_text_embeds.npy"
TEXT_EMBEDS_BIN = "text_embeds.bin"
#: ``runner.py check`` tolerances (``bundle.json``): the device check of :mod:`opentrans.deploy.parity`.
CHECK_TOLERANCES = device_tolerances()


def check_available() -> None:
    """The bundle needs nothing beyond the required dependencies (NNCF for int8): always available."""


def build_script(precision: str, image_shapes: dict[str, str], text_shapes: dict[str, str]) -> str:
    """The text of ``build_engine.sh``: trtexec builds ``model.engine`` (``PRECISION``, default the bundle's) and
    ``text_encoder.engine`` (fp32).

    The TensorRT major version is read from ``trtexec --help`` (override with ``TRT_MAJOR``); per major version
    the ONNX file and precision flags are those of :func:`plan_engine` (TensorRT 10 for majors 8-10, 11 for >= 11).
    ``PRECISION`` may be ``fp32`` or the bundle's precision (the ONNX for other precisions is not shipped).
    ``TRTEXEC`` overrides the trtexec found; ``EXTRA_FLAGS`` is appended to both commands (e.g. ``--noTF32``).
    Exit status 2: trtexec or its version not found, or a precision this bundle cannot build.
    """
    allowed = sorted({"fp32", precision})
    cases = []
    for p in allowed:
        old, new = plan_engine("10.3.0", p), plan_engine("11.0.0", p)
        cases.append(f"  {p})\n"
                     f"    if [ \"$TRT_MAJOR\" -ge 11 ]; then ONNX={new.onnx_file}; FLAGS=({' '.join(new.trtexec_flags)})\n"
                     f"    else ONNX={old.onnx_file}; FLAGS=({' '.join(old.trtexec_flags)}); fi ;;")
    case_block = "\n".join(cases)
    return textwrap.dedent("""\
        #!/usr/bin/env bash
        # Build the TensorRT engines of this OpenTrans bundle on the device (engines are specific to one GPU and one
        # TensorRT version). JetPack 6 = TensorRT 10.3: precision from trtexec flags (--fp16, --int8 on a Q/DQ ONNX).
        # JetPack 7 / TensorRT 11: no precision flags; the precision comes from the ONNX (fp16 or Q/DQ INT8 file).
        set -euo pipefail
        cd "$(dirname "$0")"

        PRECISION="${PRECISION:-@PRECISION@}"   # @ALLOWED@
        TRTEXEC="${TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}"
        if [ ! -x "$TRTEXEC" ]; then
          echo "trtexec not found (looked on PATH and in /usr/src/tensorrt/bin); set TRTEXEC=/path/to/trtexec" >&2
          exit 2
        fi
        if [ -z "${TRT_MAJOR:-}" ]; then
          # trtexec prints its version as [TensorRT v100300] (10.3.0), [TensorRT v110000] or [TensorRT v8502] (8.5.2).
          TRT_TAG="$("$TRTEXEC" --help 2>&1 | grep -o 'TensorRT v[0-9]*' | head -n 1 | tr -dc '0-9' || true)"
          if [ ${#TRT_TAG} -ge 6 ]; then TRT_MAJOR="${TRT_TAG:0:2}"; elif [ -n "$TRT_TAG" ]; then TRT_MAJOR="${TRT_TAG:0:1}"; else
            echo "cannot read the TensorRT version from $TRTEXEC --help; set TRT_MAJOR (e.g. TRT_MAJOR=10)" >&2
            exit 2
          fi
        fi

        case "$PRECISION" in
          @CASES@
          *) echo "PRECISION=$PRECISION: this bundle builds @ALLOWED@ (re-run opentrans deploy for another precision)" >&2; exit 2 ;;
        esac
        read -r -a EXTRA <<< "${EXTRA_FLAGS:-}"

        "$TRTEXEC" --onnx="$ONNX" --saveEngine=@ENGINE@ \\
          --minShapes=@IMIN@ \\
          --optShapes=@IOPT@ \\
          --maxShapes=@IMAX@ \\
          ${FLAGS[@]+"${FLAGS[@]}"} ${EXTRA[@]+"${EXTRA[@]}"}
        echo "wrote @ENGINE@ ($PRECISION from $ONNX, TensorRT $TRT_MAJOR)"

        "$TRTEXEC" --onnx=text_encoder.onnx --saveEngine=@TENGINE@ \\
          --minShapes=@TMIN@ \\
          --optShapes=@TOPT@ \\
          --maxShapes=@TMAX@ \\
          ${EXTRA[@]+"${EXTRA[@]}"}
        echo "wrote @TENGINE@ (fp32, TensorRT $TRT_MAJOR); check with: python3 runner.py check"
        """).replace("  @CASES@", case_block).replace("@PRECISION@", precision).replace(
        "@ALLOWED@", "|".join(allowed)).replace("@ENGINE@", ENGINE_FILE).replace("@TENGINE@", TEXT_ENGINE_FILE).replace(
        "@IMIN@", image_shapes["min"]).replace("@IOPT@", image_shapes["opt"]).replace("@IMAX@", image_shapes["max"]).replace(
        "@TMIN@", text_shapes["min"]).replace("@TOPT@", text_shapes["opt"]).replace("@TMAX@", text_shapes["max"])


def _readme(ctx, precision: str, image_shapes: dict[str, str], classes: int, dim: int, files: list[str]) -> str:
    h, w = ctx.spec.image_size
    return textwrap.dedent(f"""\
        # OpenTrans Jetson bundle: {ctx.spec.model} ({ctx.spec.weights}), {precision}

        Open-vocabulary segmentation: an image graph and a text graph (ONNX opset {ctx.opset}), built into TensorRT
        engines on the device; `runner.py` runs them without PyTorch.

        | file | what |
        | --- | --- |
        | `{MODEL_FILE}` | image graph, fp32: `images` float32 (B,3,{h},{w}) + `text_embeds` float32 (C,{dim}) -> `logits` float32 (B,C,{h},{w}) |
        | {', '.join(f'`{f}`' for f in files if f not in (MODEL_FILE, 'text_encoder.onnx')) or '-'} | the image graph at {precision} for TensorRT 11 (precision inside the ONNX) |
        | `text_encoder.onnx` | text graph: `input_ids` int64 (N,77) -> `text_embeds` float32 (N,{dim}), L2-normalised per prompt |
        | `tokenizer.py`, `bpe_simple_vocab_16e6.txt.gz` | CLIP's BPE tokenizer, standalone (numpy; `regex`/`ftfy` used if installed) |
        | `{RUNNER_FILE}` | `check`, `encode`, `segment` (TensorRT engines; `--backend onnxruntime` runs the ONNX instead) |
        | `{SCRIPT_FILE}` | builds `{ENGINE_FILE}` (batch 1..{ctx.options['max_batch']}, classes 1..{ctx.options['max_classes']}) and `{TEXT_ENGINE_FILE}` |
        | `{MANIFEST_FILE}` | what `runner.py` reads: graphs per back end, templates, sample files, check tolerances |
        | `text_embeds.npy`, `classes.json` | the {classes} class embeddings (L2-normalised) and their names, in label order |
        | `{SAMPLE_IMAGES}` / `{SAMPLE_IMAGES_BIN}` | one real validation image, normalised, (1,3,{h},{w}) float32 (raw little-endian in `.bin`) |
        | `{SAMPLE_LOGITS}` | the logits PyTorch fp32 computes for the sample, (1,{classes},{h},{w}) |
        | `{SAMPLE_PROMPT_IDS}`, `{SAMPLE_TEXT_EMBEDS}` | token ids of the class prompts and the PyTorch class embeddings |

        ## Build (on the Jetson)

        ```
        ./{SCRIPT_FILE}                         # {precision}; PRECISION=fp32 ./{SCRIPT_FILE} for fp32
        EXTRA_FLAGS=--noTF32 ./{SCRIPT_FILE}    # strict fp32 layers (TensorRT uses TF32 on Orin by default)
        ```

        * JetPack 6.x (TensorRT 10.3) and JetPack 5 (TensorRT 8.5): fp16 = `{MODEL_FILE}` + `--fp16`; int8 = the Q/DQ
          ONNX + `--int8 --fp16` (explicit quantisation, no calibrator).
        * JetPack 7 / TensorRT 11: no `--fp16/--int8`; the script parses the ONNX whose types carry the precision
          (`model_fp16.onnx` or the Q/DQ ONNX) into a strongly typed engine.
        * The text engine is fp32 in both. Change the batch/class bounds by editing the `--maxShapes` lines.

        ## Run

        ```
        python3 {RUNNER_FILE} check                                   # engines vs {MANIFEST_FILE}'s expected outputs
        python3 {RUNNER_FILE} encode "road,car,sky" --out embeds.npy   # new class list -> (C,{dim}) embeddings
        python3 {RUNNER_FILE} segment images.npy --classes "road,car,sky" --out labels.npy
        ```

        Needs numpy, TensorRT's Python bindings (JetPack) and `cuda-python` (`pip install cuda-python`; PyTorch also
        works). Class embeddings are the renormalised mean over {len(ctx.options.get('templates', [])) or 'the'}
        templates in `{MANIFEST_FILE}` of the text graph's per-prompt embeddings. `check` compares the image engine's
        logits on the sample with PyTorch's within the tolerances in `{MANIFEST_FILE}` (fp32 engines run TF32 by
        default, hence looser than fp32), and the text engine's class embeddings with PyTorch's. The parity figures
        in `parity.json` were measured with ONNX Runtime on the build machine, not on this device.

        Image input: RGB, resized to {h}x{w}, scaled to [0, 1], normalised with mean {list(ctx.spec.mean)} and std
        {list(ctx.spec.std)}, NCHW float32.
        """)


def _save(path: Path, array: np.ndarray) -> None:
    from opentrans.artifacts import atomic_path

    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array)


def build(ctx: BuildContext) -> BuildOutput:
    """Write the bundle into ``ctx.build_dir`` beside the fp32 ``model.onnx`` export (see the module docstring).

    The parity runner is ONNX Runtime on the ONNX of ``ctx.precision`` (fp16: ``model_fp16.onnx``, int8: the Q/DQ
    ONNX calibrated on ``ctx.calibration()``), so ``checked_precision`` is ``ctx.precision``.

    Raises:
        OpenTransError: ``max_batch`` or ``max_classes`` below 1 or below the class count; quantiser errors.
    """
    import torch

    from opentrans.deploy import clip_tokenizer
    from opentrans.deploy.targets.onnx import OnnxRuntimeRunner
    from opentrans.deploy.targets.tensorrt import prepare_onnx
    from opentrans.deploy.tensorrt_support import check_tensorrt_parsable
    from opentrans.deploy.text_graph import (
        TEXT_ONNX,
        context_length,
        export_text_onnx,
        templates_of,
    )

    timings: dict[str, float] = {}
    classes, dim = ctx.text_embeds.shape
    max_batch = int(ctx.options.setdefault("max_batch", DEFAULT_MAX_BATCH))
    max_classes = int(ctx.options.setdefault("max_classes", max(DEFAULT_MAX_CLASSES, classes)))
    dynamic_hw = bool(ctx.options.get("dynamic_hw"))
    profile = engine_profile(ctx.spec.image_size, dim, classes, max_batch, max_classes, dynamic_hw=dynamic_hw,
                             stride=ctx.segmentor.stride)
    image_shapes = trtexec_shapes(profile)
    templates = list(templates_of(ctx.segmentor))
    ctx.options["templates"] = templates
    length = context_length(ctx.segmentor.clip)
    text_shapes = trtexec_shapes(text_engine_profile(classes * len(templates), length))

    # the image graph at the bundle's precision, for TensorRT 11 (and the parity check)
    start = time.perf_counter()
    plan = plan_engine("11.0.0", ctx.precision)
    graph = prepare_onnx(plan, ctx.build_dir, ctx.onnx_path, ctx.calibration, ctx.text_embeds,
                         is_vit=ctx.segmentor.is_vit, smooth_quant_alpha=ctx.options.get("smooth_quant_alpha"),
                         ignore_ops=ctx.options.get("ignore_ops") or ())
    if ctx.precision != "fp32":
        timings["prepare_onnx_s"] = time.perf_counter() - start
    if not (ctx.build_dir / TEXT_ONNX).exists():
        export_text_onnx(ctx.segmentor, ctx.build_dir / TEXT_ONNX, opset=ctx.opset)
    # every graph build_engine.sh hands to TensorRT must parse there: checked here, before anything is published
    parse_check = {name: check_tensorrt_parsable(ctx.build_dir / name)
                   for name in sorted({MODEL_FILE, graph.name, TEXT_ONNX})}

    script = ctx.build_dir / SCRIPT_FILE
    write_text(script, build_script(ctx.precision, image_shapes, text_shapes))
    script.chmod(0o755)
    runner_src = Path(__file__).with_name("jetson_runner.py")
    shutil.copyfile(runner_src, ctx.build_dir / RUNNER_FILE)
    (ctx.build_dir / RUNNER_FILE).chmod(0o755)
    shutil.copyfile(clip_tokenizer.__file__, ctx.build_dir / "tokenizer.py")
    shutil.copyfile(clip_tokenizer.default_bpe_path(), ctx.build_dir / clip_tokenizer.BPE_FILE)

    sample = np.ascontiguousarray(ctx.sample_images, dtype=np.float32)
    prompts = clip_tokenizer.prompts_for(ctx.class_names, templates)
    ids = clip_tokenizer.ClipTokenizer(ctx.build_dir / clip_tokenizer.BPE_FILE, length)(prompts)
    with torch.inference_mode():
        logits = ctx.segmentor(torch.from_numpy(sample), torch.from_numpy(ctx.text_embeds)).numpy()
    for name, array in ((SAMPLE_IMAGES, sample), (SAMPLE_LOGITS, logits), (SAMPLE_PROMPT_IDS, ids),
                        (SAMPLE_TEXT_EMBEDS, np.ascontiguousarray(ctx.text_embeds, dtype=np.float32))):
        _save(ctx.build_dir / name, array)
    for name, array in ((SAMPLE_IMAGES_BIN, sample), (TEXT_EMBEDS_BIN, ctx.text_embeds)):
        np.ascontiguousarray(array, dtype="<f4").tofile(ctx.build_dir / name)

    model_files = sorted({MODEL_FILE, graph.name})
    files = [*model_files, TEXT_ONNX]
    h, w = ctx.spec.image_size
    write_json(ctx.build_dir / MANIFEST_FILE, {
        "format": "opentrans.jetson-bundle/1", "precision": ctx.precision, "model": ctx.spec.model,
        "weights": ctx.spec.weights, "opset": ctx.opset, "dynamic_hw": dynamic_hw,
        "image_graph": {"tensorrt": Path(ENGINE_FILE).stem, "onnxruntime": graph.stem,
                        "inputs": graph_io((h, w), dim, dynamic_hw)["inputs"],
                        "output": f"{LOGITS} {DTYPE} (B,C,H,W)", "mean": list(ctx.spec.mean), "std": list(ctx.spec.std),
                        "image_size": [h, w], "profile": {k: [list(s) for s in v] for k, v in profile.items()}},
        "text_encoder": {"tensorrt": Path(TEXT_ENGINE_FILE).stem, "onnxruntime": Path(TEXT_ONNX).stem,
                         "input": f"input_ids int64 (N,{length})", "output": f"text_embeds float32 (N,{dim})",
                         "context_length": length, "templates": templates, "bpe": clip_tokenizer.BPE_FILE,
                         "tokenizer": "tokenizer.py", "max_prompts": DEFAULT_MAX_PROMPTS,
                         "template_averaging": "host: mean over templates, renormalised"},
        "sample": {"images": SAMPLE_IMAGES, "logits": SAMPLE_LOGITS, "prompt_ids": SAMPLE_PROMPT_IDS,
                   "text_embeds": SAMPLE_TEXT_EMBEDS, "class_names": list(ctx.class_names),
                   "expected_from": "torch fp32", "decided_margin": decided_margin(ctx.segmentor)},
        "tolerances": CHECK_TOLERANCES,
        "engine_plans": {p: {"tensorrt_10": plan_engine("10.3.0", p).to_json(),
                             "tensorrt_11": plan_engine("11.0.0", p).to_json()} for p in sorted({"fp32", ctx.precision})},
    })
    write_text(ctx.build_dir / README_FILE, _readme(ctx, ctx.precision, image_shapes, classes, dim, files))
    info = {"opset": ctx.opset, "engine_precision": ctx.precision, "trtexec_shapes": image_shapes,
            "text_trtexec_shapes": text_shapes, "engine_built": False, "dynamic_hw": dynamic_hw,
            "tensorrt_parse_check": parse_check,
            "parity_checked_with": f"onnxruntime CPU on {graph.name}, graph optimisations off so Q/DQ runs as "
                                   f"written (int32-accumulation semantics, as TensorRT; no GPU here)",
            "onnx_files": {p: ONNX_FILES[plan_engine("11.0.0", p).onnx] for p in sorted({"fp32", ctx.precision})},
            "sample": {"images": SAMPLE_IMAGES, "logits": SAMPLE_LOGITS, "logits_from": "torch fp32"},
            "runner": RUNNER_FILE, "manifest": MANIFEST_FILE}
    return BuildOutput(file=graph.name, model_files=model_files,
                       runner=OnnxRuntimeRunner(graph, name=f"onnxruntime-{ctx.precision} (jetson bundle)",
                                                reference_qdq=True),
                       checked_precision=ctx.precision, info=info, timings=timings)


def open_runner(model_file: Path, build: dict, openvino_precision: str | None = None):
    """ONNX Runtime on a Jetson bundle's ONNX at its precision, its Q/DQ graph run as written (see
    :class:`~opentrans.deploy.targets.onnx.OnnxRuntimeRunner` ``reference_qdq``)."""
    from opentrans.deploy.targets.onnx import OnnxRuntimeRunner

    return OnnxRuntimeRunner(model_file, name=f"onnxruntime-{build['precision']} (jetson bundle)", reference_qdq=True)


TARGETS.add("jetson", Target(name="jetson", backend="jetson", precisions=("fp32", "fp16", "int8"), cpu=False,
                             build=build, check_available=check_available, open_runner=open_runner))
