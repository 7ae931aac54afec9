"""The CLIP text tower as its own graph, so a device can change its class list without PyTorch.

Every deploy build carries, beside the image graph:

* ``text_encoder.onnx`` (``openvino``: ``text_encoder.xml``/``.bin``): input ``input_ids`` int64 ``(N, L)``
  (N dynamic, L = the text tower's context length, 77 for CLIP), output ``text_embeds`` float32 ``(N, D)``,
  **L2-normalised per prompt**. It is open_clip's ``encode_text`` (token embedding, positional embedding, causal
  transformer, ``ln_final``, pooling at the end-of-text token, projection) followed by the normalisation; the
  end-of-text position is found with an ArgMax over the ids cast to float32 (exact below 2**24; TensorRT's TopK
  takes no int64).
* ``bpe_simple_vocab_16e6.txt.gz`` and ``tokenizer.py`` (:mod:`opentrans.deploy.clip_tokenizer`, standard
  library + numpy): CLIP's BPE tokenizer, bit-identical to ``open_clip.tokenize`` on the class names checked.
* ``build.json["text_encoder"]``: the files, the templates and the text parity figures.

**Template averaging stays on the host** (numpy, :func:`~opentrans.deploy.clip_tokenizer.average_templates`):
class c's embedding is the renormalised mean of its T per-prompt embeddings, exactly what
:meth:`OpenVocabSegmentor.encode_classes` computes. Keeping it outside the graph leaves the graph a plain
``(N, 77) -> (N, D)`` map (any number of templates, prompt sets of unequal size) at the cost of a (C*T, D) mean.

:class:`TextEncoder` runs the graph (ONNX Runtime, OpenVINO, or any callable back end) and provides
``encode_classes(names) -> (C, D)``; :func:`opentrans.deploy.targets.load_runner` attaches one to every build's
runner as ``runner.text_encoder`` / ``runner.encode_classes``.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from opentrans.deploy import clip_tokenizer
from opentrans.deploy.parity import TEXT_PARITY, missed_bounds
from opentrans.errors import OpenTransError

TEXT_ONNX = "text_encoder.onnx"
TEXT_XML = "text_encoder.xml"
TEXT_BIN = "text_encoder.bin"
TOKENIZER_FILE = "tokenizer.py"
BPE_FILE = clip_tokenizer.BPE_FILE
INPUT_NAME = "input_ids"
OUTPUT_NAME = "text_embeds"


def _text_module(clip):
    import torch
    import torch.nn.functional as F
    from torch import nn

    class TextGraph(nn.Module):
        """``input_ids`` int64 (N, L) -> L2-normalised text embeddings float32 (N, D)."""

        def __init__(self, clip):
            super().__init__()
            self.clip = clip

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            c = self.clip
            standard = (hasattr(c, "token_embedding") and hasattr(c, "transformer")
                        and getattr(c, "text_pool_type", "argmax") == "argmax")
            if not standard:  # CustomTextCLIP & co: open_clip's own code
                return F.normalize(c.encode_text(ids), dim=-1)
            x = c.token_embedding(ids) + c.positional_embedding
            x = c.ln_final(c.transformer(x, attn_mask=c.attn_mask))  # (N, L, W)
            # end-of-text is the largest id (49407); ArgMax over float32 (ids < 2**24 are exact), which every
            # back end's ArgMax/TopK takes (TensorRT's TopK has no int64)
            eot = ids.to(torch.float32).argmax(dim=-1)
            x = torch.gather(x, 1, eot[:, None, None].expand(-1, 1, x.shape[-1]))[:, 0]  # (N, W)
            proj = c.text_projection
            x = proj(x) if isinstance(proj, nn.Linear) else (x if proj is None else x @ proj)
            return F.normalize(x, dim=-1)

    return TextGraph(clip).eval()


def context_length(clip) -> int:
    """L, the text tower's sequence length (77 for CLIP)."""
    return int(getattr(clip, "context_length", None) or clip_tokenizer.CONTEXT_LENGTH)


def export_text_onnx(segmentor, path: str | os.PathLike, opset: int = 17) -> Path:
    """Export the text tower of ``segmentor`` (an :class:`OpenVocabSegmentor`, or an ``open_clip.CLIP``) to one
    self-contained ONNX file: ``input_ids`` int64 ``(N, L)`` -> ``text_embeds`` float32 ``(N, D)`` L2-normalised,
    N dynamic (traced with N=2). Text prompt hooks attached to the text tower are traced into the graph.

    Returns:
        ``path``.

    Raises:
        OpenTransError: an unsupported opset (see :func:`opentrans.deploy.export.check_opset`).
    """
    import onnx
    import torch

    from opentrans.artifacts import atomic_path
    from opentrans.deploy.export import check_opset

    opset = check_opset(opset)
    clip = getattr(segmentor, "clip", segmentor)
    module = _text_module(clip)
    ids = torch.from_numpy(clip_tokenizer.ClipTokenizer(clip_tokenizer.default_bpe_path(), context_length(clip))(
        ["a photo of a road.", "there is a sky in the scene."]))
    path = Path(path)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            torch.onnx.export(module, (ids,), str(tmp), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "prompts"}, OUTPUT_NAME: {0: "prompts"}},
                              opset_version=opset, do_constant_folding=True, dynamo=False)
            onnx.checker.check_model(str(tmp))
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return path


def tokenizer_kind(model_name: str) -> str | None:
    """``"clip-bpe"`` when open_clip tokenizes ``model_name`` with its plain CLIP BPE tokenizer (which
    :mod:`~opentrans.deploy.clip_tokenizer` reproduces), else None (SigLIP, Hugging Face tokenizers: the device
    then needs ``open_clip.get_tokenizer``)."""
    import open_clip
    from open_clip.tokenizer import SimpleTokenizer

    tok = open_clip.get_tokenizer(model_name)
    if isinstance(tok, SimpleTokenizer) and getattr(tok, "reduction_fn", None) is None:
        clean = getattr(tok.clean_fn, "__name__", "_clean_lower")
        if clean == "_clean_lower":
            return "clip-bpe"
    return None


def _onnxruntime_backend(path: Path, threads: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
    from opentrans.deploy.targets.onnx import open_session

    session = open_session(path, opts)
    return lambda ids: session.run([OUTPUT_NAME], {INPUT_NAME: ids})[0]


def _openvino_backend(path: Path, inference_precision: str | None = "f32") -> Callable[[np.ndarray], np.ndarray]:
    import openvino as ov

    config = {} if inference_precision is None else {"INFERENCE_PRECISION_HINT": inference_precision}
    try:
        compiled = ov.Core().compile_model(str(path), "CPU", config)
    except RuntimeError as exc:
        text = str(exc).strip().splitlines()
        raise OpenTransError(f"{path}: OpenVINO cannot read it ({text[0][:200] if text else 'RuntimeError'})") from None
    return lambda ids: np.array(compiled({INPUT_NAME: ids})[0], dtype=np.float32, copy=True)


class TextEncoder:
    """Class names -> class embeddings with the exported text graph, no PyTorch.

    Args:
        path: ``text_encoder.onnx`` (run with ONNX Runtime) or ``text_encoder.xml`` (OpenVINO, f32 hint).
        templates: prompt templates with ``{}`` for the class name, averaged per class.
        bpe_path: the BPE merges file (default: the one beside ``path``, else open_clip's).
        context_length: L of the graph's input.
        backend: optional callable ``ids int64 (N, L) -> embeddings float32 (N, D)`` replacing the default
            back end (e.g. a TensorRT engine).
        batch: prompts per graph call.

    Raises:
        OpenTransError: a missing file or an unknown file type.
    """

    def __init__(self, path: str | os.PathLike, templates: list[str] | tuple[str, ...],
                 bpe_path: str | os.PathLike | None = None, context_length: int = clip_tokenizer.CONTEXT_LENGTH,
                 backend: Callable[[np.ndarray], np.ndarray] | None = None, batch: int = 256):
        self.path = Path(path)
        if backend is None and not self.path.exists():
            raise OpenTransError(f"{self.path}: text graph not found")
        if not templates or any("{}" not in t for t in templates):
            raise OpenTransError(f"text templates {list(templates)!r}: each needs a '{{}}' for the class name")
        self.templates = tuple(templates)
        if bpe_path is None:
            beside = self.path.parent / BPE_FILE
            bpe_path = beside if beside.exists() else clip_tokenizer.default_bpe_path()
        self.tokenizer = clip_tokenizer.ClipTokenizer(bpe_path, context_length)
        self.batch = int(batch)
        if backend is None:
            if self.path.suffix == ".onnx":
                backend = _onnxruntime_backend(self.path)
            elif self.path.suffix == ".xml":
                backend = _openvino_backend(self.path)
            else:
                raise OpenTransError(f"{self.path}: expected a .onnx or OpenVINO .xml text graph")
        self.backend = backend

    def encode_tokens(self, ids: np.ndarray) -> np.ndarray:
        """Per-prompt embeddings float32 ``(N, D)``, L2-normalised, for token ids int64 ``(N, L)``."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        outs = [np.asarray(self.backend(ids[i:i + self.batch]), dtype=np.float32)
                for i in range(0, len(ids), self.batch)]
        return np.concatenate(outs)

    def encode_classes(self, class_names: list[str], templates: list[str] | tuple[str, ...] | None = None) -> np.ndarray:
        """Class embeddings float32 ``(C, D)``, L2-normalised: the renormalised mean over the templates of the
        per-prompt embeddings (what the image graph's ``text_embeds`` input takes).

        Raises:
            OpenTransError: an empty class list.
        """
        if not class_names:
            raise OpenTransError("no class names given")
        templates = tuple(templates or self.templates)
        prompts = clip_tokenizer.prompts_for(list(class_names), templates)
        return clip_tokenizer.average_templates(self.encode_tokens(self.tokenizer(prompts)), len(class_names))


def templates_of(segmentor) -> tuple[str, ...]:
    """The templates ``segmentor.encode_classes`` uses (those of attached text prompts, else the defaults)."""
    from opentrans.models.segmentor import TEMPLATES

    prompts = getattr(segmentor, "prompts", None)
    return tuple(prompts.templates) if prompts is not None and getattr(prompts, "templates", None) else TEMPLATES


def text_parity(segmentor, encoder: TextEncoder, class_names: list[str], model_name: str | None = None) -> dict[str, Any]:
    """Compare ``encoder`` (tokenizer + text graph) with PyTorch ``segmentor.encode_classes`` on ``class_names``.

    Returns:
        ``max_abs_diff`` and ``cosine`` (min over classes) of the (C, D) class embeddings, ``prompt_max_abs_diff``
        of the (C*T, D) per-prompt embeddings, ``tokens_equal`` (the standalone tokenizer's ids equal
        open_clip's), ``classes`` and ``templates`` counts.
    """
    import open_clip
    import torch
    import torch.nn.functional as F

    templates = encoder.templates
    ref = segmentor.encode_classes(list(class_names), templates=templates, model_name=model_name).numpy()
    out = encoder.encode_classes(list(class_names))
    prompts = clip_tokenizer.prompts_for(list(class_names), templates)
    ids = encoder.tokenizer(prompts)
    ref_tok = (open_clip.get_tokenizer(model_name) if model_name else open_clip.tokenize)(prompts).numpy()
    with torch.no_grad():
        ref_prompt = F.normalize(segmentor.clip.encode_text(torch.from_numpy(ref_tok)), dim=-1).numpy()
    cos = (ref * out).sum(-1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(out, axis=-1) + 1e-12)
    return {"max_abs_diff": float(np.abs(ref - out).max()), "cosine": float(cos.min()),
            "prompt_max_abs_diff": float(np.abs(ref_prompt - encoder.encode_tokens(ids)).max()),
            "tokens_equal": bool(np.array_equal(ids, ref_tok)), "classes": len(class_names),
            "templates": len(templates)}


def check_text_parity(figures: dict[str, Any]) -> list[str]:
    """The :data:`TEXT_PARITY` bounds ``figures`` miss (and unequal tokens), as strings; empty when all pass."""
    failures = [] if figures.get("tokens_equal", True) else ["tokens differ from open_clip's tokenizer"]
    return failures + missed_bounds(figures, TEXT_PARITY, prefix="text ")


def build_text_graph(build_dir: str | os.PathLike, target: str, segmentor, spec, class_names: list[str],
                     onnx_path: str | os.PathLike | None = None, opset: int = 17) -> dict[str, Any]:
    """Write the text graph and tokenizer files into ``build_dir`` for ``target`` and check them against PyTorch.

    ``onnx_path`` is an already exported ``text_encoder.onnx`` in ``build_dir`` (exported here when None).
    ``openvino`` converts it to ``text_encoder.xml``/``.bin`` (fp32 weights) and removes the ONNX; every other
    target keeps the ONNX. The BPE file and ``tokenizer.py`` are copied beside it.

    Returns:
        the ``text_encoder`` entry of ``build.json``: ``file``, ``files``, ``input``, ``output``, ``templates``,
        ``template_averaging``, ``tokenizer``, ``context_length``, ``size_mb`` and ``parity`` (see
        :func:`text_parity`).

    Raises:
        OpenTransError: the graph misses :data:`TEXT_PARITY` (figures in the message).
    """
    build_dir = Path(build_dir)
    clip = segmentor.clip
    length = context_length(clip)
    onnx_path = Path(onnx_path) if onnx_path else export_text_onnx(segmentor, build_dir / TEXT_ONNX, opset=opset)
    files = [TEXT_ONNX]
    if target == "openvino":
        import openvino as ov

        from opentrans.artifacts import atomic_path

        model = ov.convert_model(str(onnx_path))
        with atomic_path(build_dir / TEXT_XML) as tmp:
            ov.save_model(model, str(tmp), compress_to_fp16=False)
            os.replace(tmp.with_suffix(".bin"), build_dir / TEXT_BIN)
        onnx_path.unlink()
        files = [TEXT_XML, TEXT_BIN]
    kind = tokenizer_kind(spec.model)
    shutil.copyfile(clip_tokenizer.default_bpe_path(), build_dir / BPE_FILE)
    shutil.copyfile(clip_tokenizer.__file__, build_dir / TOKENIZER_FILE)
    templates = templates_of(segmentor)
    encoder = TextEncoder(build_dir / files[0], templates, bpe_path=build_dir / BPE_FILE, context_length=length)
    figures = text_parity(segmentor, encoder, class_names, model_name=spec.model if kind is None else None)
    if kind is None:
        figures["tokens_equal"] = None  # not comparable: the device must tokenize with open_clip
    failures = check_text_parity({**figures, "tokens_equal": figures["tokens_equal"] is not False})
    if failures:
        raise OpenTransError(f"text graph ({files[0]}) parity check against PyTorch encode_text failed on "
                             f"{len(class_names)} class names: {'; '.join(failures)}")
    return {
        "file": files[0], "files": files, "bpe": BPE_FILE, "tokenizer_module": TOKENIZER_FILE,
        "input": f"{INPUT_NAME} int64 (N,{length})", "output": f"{OUTPUT_NAME} float32 (N,{encoder_dim(encoder)}) L2-normalised",
        "context_length": length, "templates": list(templates),
        "template_averaging": "host: mean of the per-prompt embeddings of a class, renormalised",
        "tokenizer": kind or f"open_clip.get_tokenizer({spec.model!r}) (not reproduced standalone)",
        "size_mb": sum((build_dir / f).stat().st_size for f in files) / 1e6, "parity": figures,
    }


def encoder_dim(encoder: TextEncoder) -> int:
    """D of the embeddings ``encoder`` returns (runs one prompt)."""
    return int(encoder.encode_tokens(encoder.tokenizer(["a photo of a road."])).shape[-1])


def open_text_encoder(build_dir: str | os.PathLike, build: dict[str, Any], openvino_precision: str | None = "f32",
                      backend: Callable[[np.ndarray], np.ndarray] | None = None) -> TextEncoder | None:
    """The :class:`TextEncoder` of a deploy build (``build`` = its ``build.json``), or None for builds made
    before text graphs were exported.

    Raises:
        OpenTransError: a text graph named in ``build.json`` that is missing.
    """
    info = build.get("text_encoder")
    if not info:
        return None
    build_dir = Path(build_dir)
    path = build_dir / info["file"]
    if backend is None and path.suffix == ".xml":
        if not path.exists():
            raise OpenTransError(f"{path}: text graph not found")
        backend = _openvino_backend(path, openvino_precision)
    return TextEncoder(path, info["templates"], bpe_path=build_dir / info.get("bpe", BPE_FILE),
                       context_length=int(info.get("context_length", clip_tokenizer.CONTEXT_LENGTH)), backend=backend)
