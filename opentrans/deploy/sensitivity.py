"""Per-layer INT8 sensitivity: how much each quantisable layer of the image encoder costs on its own.

The image graph is quantised once with NNCF (ONNX Q/DQ, float32 weights behind Q/DQ pairs so that every
quantiser can be bypassed exactly, SmoothQuant included). Then, for each quantisable layer (a MatMul/Gemm/Conv of
the image encoder with at least one Q/DQ input), a copy of the graph is run with ONNX Runtime in which

* ``mode="only"`` (default): only that layer's inputs stay quantised (every other Q/DQ pair is bypassed): the
  layer's own cost;
* ``mode="all-but"``: every layer stays quantised except that one (what NNCF's accuracy control reverts): the
  gain of keeping it in floating point.

Each variant is compared with the float32 graph on a few real images: argmax agreement (%) and the cosine of the
flattened logits. ``sensitivity.json`` and ``sensitivity.md`` list the layers most costly first; the names are
the ONNX node names, which OpenVINO keeps, so the top rows can be passed to ``--ignore-ops``.

Cost: one NNCF calibration and one ONNX Runtime session (every quantiser behind a run-time switch, see
:func:`_switchable`), then ``len(images)`` inferences per layer; limit the images and, for big models, the layers
(``layers``; ``top_n`` only shortens the Markdown table). The float reference is the same session with every
switch off (the fp32 graph, SmoothQuant scales folded in: equal up to rounding).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from opentrans.errors import OpenTransError

SENSITIVITY_JSON = "sensitivity.json"
SENSITIVITY_MD = "sensitivity.md"
MODES = ("only", "all-but")


OTHER = "__other__"


def _switchable(model, layers: Sequence[str]):
    """A copy of Q/DQ ``model`` in which every quantiser can be switched off at run time: each input fed by a
    DequantizeLinear(QuantizeLinear(x)) pair reads ``Where(flag, dq, x)``, with one boolean scalar graph input
    per layer in ``layers`` (``qflag:<layer>``, for that layer's inputs) and one (``qflag:__other__``) for every
    other consumer. One ONNX Runtime session then serves every variant: flags all True = the Q/DQ graph, all
    False = the float graph. Returns ``(model, {layer or OTHER: input name})``."""
    import onnx
    from onnx import TensorProto, helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    producers = {o: n for n in graph.node for o in n.output}

    def source(name: str) -> str | None:
        dq = producers.get(name)
        if dq is None or dq.op_type != "DequantizeLinear":
            return None
        q = producers.get(dq.input[0])
        return q.input[0] if q is not None and q.op_type == "QuantizeLinear" else None

    wanted = set(layers)
    flags = {name: f"qflag:{name}" for name in [*layers, OTHER]}
    nodes = []
    for node in graph.node:
        key = node.name if node.name in wanted else OTHER
        for i, name in enumerate(node.input):
            src = source(name)
            if src is not None:
                switched = f"{name}__switch__{node.name}__{i}"
                nodes.append(helper.make_node("Where", [flags[key], name, src], [switched],
                                              name=f"{node.name}/qswitch_{i}"))
                node.input[i] = switched
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.input.extend(helper.make_tensor_value_info(f, TensorProto.BOOL, []) for f in flags.values())
    return out, flags


def _session(model):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _run(session, images: np.ndarray, text: np.ndarray, flags: dict[str, bool] | None = None) -> np.ndarray:
    feeds = {k: np.array(v, dtype=bool) for k, v in (flags or {}).items()}
    return np.concatenate([session.run(["logits"], {"images": images[i:i + 1], "text_embeds": text, **feeds})[0]
                           for i in range(len(images))])


def _compare(ref: np.ndarray, out: np.ndarray) -> dict[str, float]:
    r, o = ref.reshape(len(ref), -1).astype(np.float64), out.reshape(len(out), -1).astype(np.float64)
    cos = (r * o).sum(1) / (np.linalg.norm(r, axis=1) * np.linalg.norm(o, axis=1) + 1e-12)
    return {"agreement": 100.0 * float((ref.argmax(1) == out.argmax(1)).mean()), "cosine": float(cos.mean()),
            "max_abs_diff": float(np.abs(ref - out).max())}


def quantizable_layers(qdq_model) -> list[tuple[str, str]]:
    """``(name, op_type)`` of every MatMul/Gemm/Conv node of a Q/DQ ONNX graph with at least one input from a
    DequantizeLinear, in graph order."""
    producers = {o: n.op_type for n in qdq_model.graph.node for o in n.output}
    return [(n.name, n.op_type) for n in qdq_model.graph.node if n.op_type in ("MatMul", "Gemm", "Conv")
            and any(producers.get(i) == "DequantizeLinear" for i in n.input)]


def layer_sensitivity(onnx_path: str | os.PathLike, calib_images: Sequence[np.ndarray], images: np.ndarray,
                      text_embeds: np.ndarray, *, mode: str = "only", model_type_transformer: bool = True,
                      smooth_quant_alpha: float | None = None, ignore_patterns: Sequence[str] = (),
                      layers: Sequence[str] | None = None, overflow_fix: str = "enable") -> dict[str, Any]:
    """Measure the INT8 cost of each quantisable layer of an fp32 ONNX image graph (see the module docstring).

    Args:
        onnx_path: fp32 ONNX image graph (inputs ``images`` (B,3,H,W), ``text_embeds`` (C,D)).
        calib_images: float32 (1,3,H,W) normalised calibration images.
        images: float32 (N,3,H,W) normalised evaluation images (a few: every layer runs them all).
        text_embeds: float32 (C,D).
        mode: ``only`` or ``all-but``.
        model_type_transformer, smooth_quant_alpha, ignore_patterns, overflow_fix: as
            :func:`opentrans.deploy.quantize.quantize_onnx_qdq` (the same settings as the build being analysed).
        layers: measure only these layer names (default: every quantisable layer).

    Returns:
        ``{"mode", "images", "reference", "full_int8": {agreement %, cosine, max_abs_diff}, "quantizable_layers":
        names in graph order, "layers": rows, "seconds"}``;
        one row per measured layer, sorted most costly first by (``agreement_drop``, ``cosine_drop``): ``layer``,
        ``op_type``, ``agreement`` (% pixels whose argmax matches fp32), ``cosine`` (mean over images),
        ``max_abs_diff`` (logits), ``agreement_drop`` (percentage points) and ``cosine_drop`` (1 - cosine for
        ``only``; for ``all-but`` the gain over the fully quantised graph, so positive = keeping the layer in
        float helps).

    Raises:
        OpenTransError: an unknown mode, no images, a layer name that is not quantisable, or errors of
            :func:`~opentrans.deploy.quantize.quantize_onnx_model`.
    """
    import onnx

    from opentrans.deploy.quantize import DEFAULT_SMOOTH_QUANT_ALPHA, quantize_onnx_model

    if mode not in MODES:
        raise OpenTransError(f"sensitivity mode {mode!r}: choose {', '.join(MODES)}")
    images = np.ascontiguousarray(images, dtype=np.float32)
    if images.ndim != 4 or len(images) == 0:
        raise OpenTransError(f"sensitivity: expected images (N,3,H,W) with N >= 1, got {images.shape}")
    text = np.ascontiguousarray(text_embeds, dtype=np.float32)
    started = time.perf_counter()
    fp32 = onnx.load(str(onnx_path))
    qdq = quantize_onnx_model(fp32, calib_images, text, model_type_transformer=model_type_transformer,
                              smooth_quant_alpha=DEFAULT_SMOOTH_QUANT_ALPHA if smooth_quant_alpha is None
                              else smooth_quant_alpha, ignore_patterns=ignore_patterns, compress_weights=False,
                              overflow_fix=overflow_fix)
    candidates = quantizable_layers(qdq)
    if layers is not None:
        known = dict(candidates)
        unknown = [n for n in layers if n not in known]
        if unknown:
            raise OpenTransError(f"sensitivity: {', '.join(unknown)} not quantisable layers of the image graph")
        candidates = [(n, known[n]) for n in layers]
    names = [n for n, _ in quantizable_layers(qdq)]
    switchable, flags = _switchable(qdq, names)
    session = _session(switchable)

    def variant(on: set[str], other: bool) -> dict[str, bool]:
        return {flag: (other if key == OTHER else key in on) for key, flag in flags.items()}

    ref = _run(session, images, text, variant(set(), False))
    full = _compare(ref, _run(session, images, text, variant(set(names), True)))
    rows = []
    for name, op_type in candidates:
        on = {name} if mode == "only" else set(names) - {name}
        figures = _compare(ref, _run(session, images, text, variant(on, mode != "only")))
        if mode == "only":
            drops = (100.0 - figures["agreement"], 1.0 - figures["cosine"])
        else:
            drops = (figures["agreement"] - full["agreement"], figures["cosine"] - full["cosine"])
        rows.append({"layer": name, "op_type": op_type, **figures, "agreement_drop": drops[0],
                     "cosine_drop": drops[1]})
    rows.sort(key=lambda r: (r["agreement_drop"], r["cosine_drop"]), reverse=True)
    return {"mode": mode, "images": int(len(images)), "reference": "onnxruntime fp32 (same graph, quantisers off)",
            "full_int8": full, "quantizable_layers": names, "layers": rows, "seconds": time.perf_counter() - started}


def write_sensitivity_report(report: dict[str, Any], out_dir: str | os.PathLike,
                             top_n: int | None = None) -> list[Path]:
    """Write ``sensitivity.json`` (every row) and ``sensitivity.md`` (a table of the first ``top_n`` rows, all by
    default) into ``out_dir``; returns both paths."""
    from opentrans.artifacts import write_json, write_text

    out_dir = Path(out_dir)
    rows = report["layers"] if top_n is None else report["layers"][:top_n]
    full = report["full_int8"]
    what = ("only this layer INT8" if report["mode"] == "only" else "every layer INT8 except this one")
    lines = [
        "# INT8 sensitivity per layer",
        "",
        f"{report['images']} images; reference: {report['reference']}; each row: {what}. "
        f"Whole image encoder INT8: agreement {full['agreement']:.2f} %, cosine {full['cosine']:.6f}.",
        "Most costly first; pass the top names to `--ignore-ops` to keep them in floating point.",
        "",
        "| # | layer | op | agreement % | agreement drop (pp) | cosine | cosine drop |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(rows, 1):
        lines.append(f"| {i} | `{r['layer']}` | {r['op_type']} | {r['agreement']:.2f} | {r['agreement_drop']:.3f} | "
                     f"{r['cosine']:.6f} | {r['cosine_drop']:.2e} |")
    if top_n is not None and len(report["layers"]) > top_n:
        lines.append(f"\n{len(report['layers']) - top_n} more layers in {SENSITIVITY_JSON}.")
    return [write_json(out_dir / SENSITIVITY_JSON, report),
            write_text(out_dir / SENSITIVITY_MD, "\n".join(lines) + "\n")]
