"""ONNX export of the image graph.

The exported graph is :class:`~opentrans.models.segmentor.OpenVocabSegmentor` itself:

* inputs ``images`` float32 ``(B, 3, H, W)`` (B dynamic, H and W fixed at the model's input size) and
  ``text_embeds`` float32 ``(C, D)`` (C dynamic, so the class list can change without a re-export);
* output ``logits`` float32 ``(B, C, H, W)``: logit scale times cosine, bilinearly upsampled to (H, W).

The TorchScript exporter (``dynamo=False``) is used because it can write any opset from 14 to 20, and opset 17
is what JetPack 5/6 TensorRT parses. open_clip's ``nn.MultiheadAttention`` takes PyTorch's fused fast path
under ``no_grad``, which that exporter cannot translate (``aten::_native_multi_head_attention``); the fast path
is switched off for the duration of the export and restored afterwards.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import onnx
import torch

from opentrans.artifacts import atomic_path
from opentrans.errors import OpenTransError

INPUT_NAMES = ("images", "text_embeds")
OUTPUT_NAME = "logits"
DEFAULT_OPSET = 17
#: Opsets the TorchScript exporter of torch 2.x writes (LayerNormalization is a single node from 17 on).
OPSETS = range(14, 21)
DYNAMIC_AXES = {
    "images": {0: "batch"},
    "text_embeds": {0: "classes"},
    "logits": {0: "batch", 1: "classes"},
}


def check_opset(opset: int) -> int:
    """Return ``opset`` if the exporter supports it.

    Raises:
        OpenTransError: ``opset`` outside 14..20.
    """
    if int(opset) not in OPSETS:
        raise OpenTransError(f"--opset {opset}: choose {OPSETS.start}..{OPSETS.stop - 1} (17 for JetPack 5/6 TensorRT)")
    return int(opset)


def export_onnx(segmentor: torch.nn.Module, path: str | os.PathLike, opset: int = DEFAULT_OPSET) -> Path:
    """Export ``segmentor`` (an :class:`OpenVocabSegmentor`, fp32, CPU) to one self-contained ONNX file.

    Inputs ``images`` (B,3,H,W) float32 with B dynamic and (H, W) = ``segmentor.image_size``, ``text_embeds``
    (C,D) float32 with C dynamic; output ``logits`` (B,C,H,W) float32. The file is traced with B=2 and C=3
    (not 1, so no dimension is specialised to a broadcastable size), checked with ``onnx.checker`` and written
    atomically (weights inside the file, no ``.onnx.data``).

    Returns:
        ``path``.

    Raises:
        OpenTransError: an unsupported opset.
    """
    opset = check_opset(opset)
    path = Path(path)
    seg = segmentor.eval()
    h, w = seg.image_size
    images = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0))
    text = torch.randn(3, seg.embed_dim, generator=torch.Generator().manual_seed(1))
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
            # H and W are fixed in the exported graph: the trace-time comparison of the patch grid with the
            # positional-embedding grid (segmentor._interpolate_pos_embed) is a constant by design.
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            # The legacy exporter is chosen on purpose (see the module docstring).
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            torch.onnx.export(
                seg, (images, text), str(tmp), input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
                dynamic_axes=DYNAMIC_AXES, opset_version=opset, do_constant_folding=True, dynamo=False,
            )
            onnx.checker.check_model(str(tmp))
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return path


def onnx_opset(path: str | os.PathLike) -> int:
    """The default-domain opset an ONNX file was written at."""
    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
