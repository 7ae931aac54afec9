"""Jetson target: a bundle to build the TensorRT engine on the device itself.

TensorRT engines are specific to one GPU and one TensorRT version, so the bundle ships the ONNX graph and a
``build_engine.sh`` that runs ``trtexec`` on the Jetson. Nothing here needs a GPU; the parity check runs the
bundle's fp32 ``model.onnx`` with ONNX Runtime. An fp16 engine's accuracy can only be measured on the device:
the bundle carries a real sample image (``sample_images.npy``/``.bin``) and the logits PyTorch computes for it
(``sample_logits.npy``) for that.

TensorRT versions:

* JetPack 6.x ships TensorRT 10.3 (JetPack 5: 8.5): ``trtexec --fp16`` builds an fp16 engine from the fp32
  ONNX. Opset 17 is what those parsers take.
* TensorRT 11 (JetPack >= 7.2, x86) removed ``--fp16/--int8/--best``: precision must already be in the ONNX
  (fp16 weights or Q/DQ nodes). This bundle's ONNX is fp32, so under TensorRT 11 the script builds fp32 only
  and refuses an fp16 request instead of silently building fp32.
"""

from __future__ import annotations

import textwrap

import numpy as np

from opentrans.artifacts import write_text

MODEL_FILE = "model.onnx"
SCRIPT_FILE = "build_engine.sh"
README_FILE = "README.md"
ENGINE_FILE = "model.engine"
SAMPLE_IMAGES = "sample_images.npy"
SAMPLE_LOGITS = "sample_logits.npy"
SAMPLE_IMAGES_BIN = "sample_images.bin"
TEXT_EMBEDS_BIN = "text_embeds.bin"
DEFAULT_MAX_BATCH = 4
DEFAULT_MAX_CLASSES = 64


def check_available() -> None:
    """The bundle needs nothing beyond the required dependencies: always available."""


def trtexec_shapes(image_size: tuple[int, int], embed_dim: int, classes: int, max_batch: int,
                   max_classes: int) -> dict[str, str]:
    """trtexec ``--minShapes/--optShapes/--maxShapes`` values for the two dynamic axes (batch, classes)."""
    h, w = image_size
    return {
        "min": f"images:1x3x{h}x{w},text_embeds:1x{embed_dim}",
        "opt": f"images:1x3x{h}x{w},text_embeds:{classes}x{embed_dim}",
        "max": f"images:{max_batch}x3x{h}x{w},text_embeds:{max_classes}x{embed_dim}",
    }


def build_script(precision: str, shapes: dict[str, str]) -> str:
    """The text of ``build_engine.sh``: trtexec from ``model.onnx`` to ``model.engine`` with the given shapes.

    ``PRECISION`` (fp32|fp16) defaults to the build's precision; ``TRTEXEC`` and ``TRT_MAJOR`` can be set to
    override the detected trtexec and its major version.
    """
    return textwrap.dedent(f"""\
        #!/usr/bin/env bash
        # Build a TensorRT engine for this device from {MODEL_FILE} (written by `opentrans deploy --target jetson`).
        # Run it on the Jetson itself: engines are specific to one GPU and one TensorRT version.
        set -euo pipefail
        cd "$(dirname "$0")"

        PRECISION="${{PRECISION:-{precision}}}"   # fp32 | fp16
        TRTEXEC="${{TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}}"
        if [ ! -x "$TRTEXEC" ]; then
          echo "trtexec not found (looked on PATH and in /usr/src/tensorrt/bin); set TRTEXEC=/path/to/trtexec" >&2
          exit 2
        fi
        if [ -z "${{TRT_MAJOR:-}}" ]; then
          # trtexec prints its version as [TensorRT v100300] (10.3.0) or [TensorRT v8502] (8.5.2).
          TRT_TAG="$("$TRTEXEC" --help 2>&1 | grep -o 'TensorRT v[0-9]*' | head -n 1 | tr -dc '0-9' || true)"
          if [ ${{#TRT_TAG}} -ge 6 ]; then TRT_MAJOR="${{TRT_TAG:0:2}}"; elif [ -n "$TRT_TAG" ]; then TRT_MAJOR="${{TRT_TAG:0:1}}"; else
            echo "cannot read the TensorRT version from $TRTEXEC --help; set TRT_MAJOR (e.g. TRT_MAJOR=10)" >&2
            exit 2
          fi
        fi

        PRECISION_FLAGS=()
        case "$PRECISION" in
          fp32) ;;
          fp16)
            if [ "$TRT_MAJOR" -ge 11 ]; then
              echo "TensorRT $TRT_MAJOR removed --fp16: precision must come from the ONNX, and {MODEL_FILE} is fp32." >&2
              echo "Build fp32 (PRECISION=fp32 $0) or convert {MODEL_FILE} to fp16 weights first." >&2
              exit 3
            fi
            PRECISION_FLAGS=(--fp16) ;;
          *) echo "PRECISION=$PRECISION: choose fp32 or fp16" >&2; exit 2 ;;
        esac

        "$TRTEXEC" --onnx={MODEL_FILE} --saveEngine={ENGINE_FILE} \\
          --minShapes={shapes["min"]} \\
          --optShapes={shapes["opt"]} \\
          --maxShapes={shapes["max"]} \\
          ${{PRECISION_FLAGS[@]+"${{PRECISION_FLAGS[@]}}"}}
        echo "wrote {ENGINE_FILE} ($PRECISION, TensorRT $TRT_MAJOR)"
        """)


def _readme(ctx, shapes: dict[str, str], classes: int) -> str:
    h, w = ctx.spec.image_size
    return textwrap.dedent(f"""\
        # OpenTrans Jetson bundle: {ctx.spec.model} ({ctx.spec.weights}), {ctx.precision}

        Open-vocabulary segmentation image graph, ONNX opset {ctx.opset}, to be built into a TensorRT engine on the device.

        | file | what |
        | --- | --- |
        | `{MODEL_FILE}` | image graph, fp32: `images` float32 (B,3,{h},{w}) + `text_embeds` float32 (C,{ctx.text_embeds.shape[1]}) -> `logits` float32 (B,C,{h},{w}) |
        | `{SCRIPT_FILE}` | builds `{ENGINE_FILE}` with trtexec (batch 1..{ctx.options['max_batch']}, classes 1..{ctx.options['max_classes']}) |
        | `text_embeds.npy`, `classes.json` | the {classes} class embeddings (L2-normalised) and their names, in label order |
        | `{SAMPLE_IMAGES}` / `{SAMPLE_IMAGES_BIN}` | one real validation image, normalised, (1,3,{h},{w}) float32 (raw little-endian in `.bin`) |
        | `{TEXT_EMBEDS_BIN}` | `text_embeds.npy` as raw float32, for `trtexec --loadInputs` |
        | `{SAMPLE_LOGITS}` | the logits PyTorch fp32 computes for the sample, (1,{classes},{h},{w}) |

        ## Build

        ```
        ./{SCRIPT_FILE}                  # {ctx.precision}; PRECISION=fp32 ./{SCRIPT_FILE} for fp32
        ```

        JetPack 6.x (TensorRT 10.3) and JetPack 5 (TensorRT 8.5) take `--fp16`. TensorRT 11 (JetPack >= 7.2) removed
        trtexec's precision flags (precision must come from the ONNX); as this ONNX is fp32, the script refuses
        fp16 there rather than silently building fp32. Change the batch/class bounds by editing the `--maxShapes` line.

        ## Check the engine on the device

        ```
        trtexec --loadEngine={ENGINE_FILE} --shapes=images:1x3x{h}x{w},text_embeds:{classes}x{ctx.text_embeds.shape[1]} \\
          --loadInputs=images:{SAMPLE_IMAGES_BIN},text_embeds:{TEXT_EMBEDS_BIN} --exportOutput=sample_out.json
        ```

        and compare `logits` in `sample_out.json` with `{SAMPLE_LOGITS}` (PyTorch fp32). TensorRT runs fp32 layers in
        TF32 by default on Ampere/Orin GPUs (add `--noTF32` to the script for strict fp32); for fp16 engines compare
        the argmax per pixel as well as the values. The parity figures in `parity.json` were measured with ONNX Runtime
        on `{MODEL_FILE}` in fp32 on the build machine, not on this device.
        """)


def build(ctx) -> "BuildOutput":  # noqa: F821 - see opentrans.deploy.targets.BuildOutput
    """Write the bundle into ``ctx.build_dir`` beside the fp32 ``model.onnx`` export.

    Files: ``model.onnx``, ``build_engine.sh`` (executable), ``README.md``, ``sample_images.npy`` + ``.bin``,
    ``text_embeds.bin``, ``sample_logits.npy`` (PyTorch fp32). ``text_embeds.npy`` and ``classes.json`` are
    written by the deploy stage for every target.

    Raises:
        OpenTransError: ``max_batch`` or ``max_classes`` below 1, or ``max_classes`` below the class count.
    """
    import torch

    from opentrans.artifacts import atomic_path
    from opentrans.deploy.targets import BuildOutput
    from opentrans.deploy.targets.onnx import OnnxRuntimeRunner
    from opentrans.errors import OpenTransError

    classes, dim = ctx.text_embeds.shape
    max_batch = int(ctx.options.setdefault("max_batch", DEFAULT_MAX_BATCH))
    max_classes = int(ctx.options.setdefault("max_classes", max(DEFAULT_MAX_CLASSES, classes)))
    if max_batch < 1 or max_classes < classes:
        raise OpenTransError(f"jetson bundle: max batch {max_batch} must be >= 1 and max classes {max_classes} "
                             f">= the {classes} classes")
    shapes = trtexec_shapes(ctx.spec.image_size, dim, classes, max_batch, max_classes)
    script = ctx.build_dir / SCRIPT_FILE
    write_text(script, build_script(ctx.precision, shapes))
    script.chmod(0o755)
    write_text(ctx.build_dir / README_FILE, _readme(ctx, shapes, classes))

    sample = np.ascontiguousarray(ctx.sample_images, dtype=np.float32)
    with torch.inference_mode():
        logits = ctx.segmentor(torch.from_numpy(sample), torch.from_numpy(ctx.text_embeds)).numpy()
    for name, array in ((SAMPLE_IMAGES, sample), (SAMPLE_LOGITS, logits)):
        with atomic_path(ctx.build_dir / name) as tmp, open(tmp, "wb") as fh:
            np.save(fh, array)
    for name, array in ((SAMPLE_IMAGES_BIN, sample), (TEXT_EMBEDS_BIN, ctx.text_embeds)):
        with atomic_path(ctx.build_dir / name) as tmp:
            np.ascontiguousarray(array, dtype="<f4").tofile(tmp)
    info = {"opset": ctx.opset, "engine_precision": ctx.precision, "trtexec_shapes": shapes,
            "engine_built": False, "parity_checked_with": "onnxruntime fp32 on model.onnx (no GPU here)",
            "sample": {"images": SAMPLE_IMAGES, "logits": SAMPLE_LOGITS, "logits_from": "torch fp32"}}
    return BuildOutput(file=MODEL_FILE, model_files=[MODEL_FILE], runner=OnnxRuntimeRunner(ctx.onnx_path),
                       checked_precision="fp32", info=info)
