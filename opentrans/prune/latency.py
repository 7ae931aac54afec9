"""Before/after latency of a pruned model, measured side by side in the prune stage.

Back ends (:data:`~opentrans.prune.options.LATENCY_BACKENDS`): ``torch``, the image encoder's dense path in eager
PyTorch; ``openvino``, the whole segmentor exported with ``torch.onnx`` (legacy TorchScript exporter, opset 17,
fixed shapes) into a work folder and compiled by the ``openvino`` library directly with the f32 inference
precision hint (prune does not depend on the deploy stage).
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from opentrans.errors import OpenTransError
from opentrans.prune.options import LATENCY_BACKENDS  # noqa: F401 (re-exported)
from opentrans.timing import interleaved_ms

#: Class embeddings fed to the OpenVINO graph (CamVid's 11 classes).
OPENVINO_CLASSES = 11


def check_openvino() -> None:
    """Raises OpenTransError when the ``openvino`` package is not installed."""
    if importlib.util.find_spec("openvino") is None:
        raise OpenTransError("openvino not installed: pip install 'opentrans[openvino]'")


def _openvino_request(seg: torch.nn.Module, images: torch.Tensor, text: torch.Tensor, path: Path, threads: int):
    """An OpenVINO infer request for ``seg`` (exported to ONNX at ``path`` with inputs ``images`` (1,3,H,W) and
    ``text_embeds`` (C,D), output ``logits``), compiled for the CPU at f32 with ``threads`` threads."""
    import openvino as ov

    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            torch.onnx.export(seg.eval(), (images, text), str(path), input_names=["images", "text_embeds"],
                              output_names=["logits"], opset_version=17, do_constant_folding=True, dynamo=False)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    compiled = ov.Core().compile_model(ov.convert_model(str(path)), "CPU",
                                       {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads})
    return compiled.create_infer_request()


def measure_latency(models: dict[str, torch.nn.Module], images: torch.Tensor, repeats: int = 3,
                    threads: int | None = None, backends: tuple[str, ...] = ("torch",),
                    work_dir: str | os.PathLike | None = None) -> dict[str, dict[str, float]]:
    """Median latency in milliseconds of each model on each back end, measured interleaved (round-robin over the
    models, :func:`opentrans.timing.interleaved_ms`) with a fixed number of threads, so every model sees the
    same machine load and the before/after ratio is a side-by-side measurement.

    * ``torch``: ``model.dense_features(images)`` (the image encoder's dense path), eager, ``threads`` threads.
    * ``openvino``: the whole segmentor (``images`` and 11 random class embeddings in, logits out), exported to
      ONNX in ``work_dir`` and compiled by OpenVINO with the f32 inference-precision hint and ``threads``
      inference threads.

    Args:
        models: ``{name: OpenVocabSegmentor}``; images: ``(1, 3, H, W)`` float32.
        repeats: timed rounds (one warm-up call per model first).
        backends: a subset of :data:`LATENCY_BACKENDS`.
        work_dir: folder for the ONNX files of the ``openvino`` back end (required with it).

    Returns:
        ``{backend: {name: median ms}}``.

    Raises:
        OpenTransError: ``openvino`` without the openvino package or without ``work_dir``.
    """
    threads = threads or torch.get_num_threads()
    out: dict[str, dict[str, float]] = {}
    if "torch" in backends:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with torch.no_grad():
                calls = {name: (lambda m=m: m.eval().dense_features(images)) for name, m in models.items()}
                out["torch"] = interleaved_ms(calls, repeats)
        finally:
            torch.set_num_threads(previous)
    if "openvino" in backends:
        if work_dir is None:
            raise OpenTransError("OpenVINO latency needs a work folder for the exported models")
        check_openvino()
        dim = next(iter(models.values())).embed_dim
        text = np.random.default_rng(0).standard_normal((OPENVINO_CLASSES, dim)).astype(np.float32)
        x = images.numpy().astype(np.float32)
        calls = {}
        for name, m in models.items():
            request = _openvino_request(m, images, torch.from_numpy(text), Path(work_dir) / f"latency_{name}.onnx",
                                        threads)
            calls[name] = lambda r=request: r.infer({"images": x, "text_embeds": text})
        out["openvino"] = interleaved_ms(calls, repeats)
    return out
