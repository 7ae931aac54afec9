"""ONNX export of the image graph.

The exported graph is :class:`~opentrans.models.segmentor.OpenVocabSegmentor` itself:

* inputs ``images`` float32 ``(B, 3, H, W)`` (B dynamic; H and W fixed at the model's input size, or dynamic
  with ``dynamic_hw=True``) and ``text_embeds`` float32 ``(C, D)`` (C dynamic, so the class list can change
  without a re-export);
* output ``logits`` float32 ``(B, C, H, W)``: logit scale times cosine, bilinearly upsampled to (H, W).

The text tower is exported as its own graph by :mod:`opentrans.deploy.text_graph`.

**Dynamic height/width** (``dynamic_hw=True``, CLI ``--dynamic-hw``): the patch grid is traced as shapes, not
constants (:func:`opentrans.models.dense.symbolic_grid`), and the ViT positional embedding is resized inside the
graph from the pretraining grid to ``(H/patch, W/patch)`` the way the mode's authors resize it
(:data:`opentrans.models.dense.POS_RESIZE`: an ONNX ``Resize`` for the exact-size bicubic/bilinear ones, two
interpolation matrices for the DINO-style resize of SCLIP/ClearCLIP/NACLIP); self-attention is traced through :func:`traceable_attention` (PyTorch's MHA bakes the
token count into the legacy exporter's graph). Measured against eager PyTorch at sizes other than the trace's
(tiny ViT maskclip/sclip/naclip/cliper, tiny RN; 64x64, 96x128/96x160, 128x96): max |diff| 1.4e-6..1.1e-5.
Limits: H and W should be multiples of the stride (patch size, 32 for ResNets): the patch convolution floors
other sizes (the logits are still resized to (H, W), but the border is dropped); the resize is evaluated on
every run (a (1+gh*gw, W) tensor, negligible); TensorRT needs an H/W range in its optimisation profile
(:func:`opentrans.deploy.targets.tensorrt.engine_profile`: half to twice the export size by default); NACLIP's
neighbourhood bias is rebuilt from the traced grid (Range/Exp nodes).

**Merged weights**: LoRA/OFT adapters (``torch.nn.utils.parametrize``) and ``torch.nn.utils.prune`` masks
(``weight_orig * weight_mask`` in a forward pre-hook) would otherwise be traced as extra MatMuls/Muls or kept as
two tensors; :func:`export_onnx` folds them into plain weights on a copy (``merge=True``, the default; the
caller's module is untouched) or refuses (``merge=False``).

The TorchScript exporter (``dynamo=False``) is used because it can write any opset from 14 to 20, and opset 17
is what JetPack 5/6 TensorRT parses. open_clip's ``nn.MultiheadAttention`` takes PyTorch's fused fast path
under ``no_grad``, which that exporter cannot translate (``aten::_native_multi_head_attention``); the fast path
is switched off for the duration of the export and restored afterwards.
"""

from __future__ import annotations

import contextlib
import copy
import os
import warnings
from pathlib import Path

import onnx
import torch

from opentrans.artifacts import atomic_path
from opentrans.deploy.graph import DYNAMIC_AXES, DYNAMIC_HW_AXES, INPUT_NAMES, OUTPUT_NAME, dynamic_axes  # noqa: F401
from opentrans.deploy.options import DEFAULT_OPSET, OPSETS, check_opset  # noqa: F401 - re-exported
from opentrans.errors import OpenTransError



def unmerged_reparametrizations(module: torch.nn.Module) -> list[str]:
    """Names of every reparametrised weight in ``module``: ``torch.nn.utils.parametrize`` parametrizations
    (LoRA, OFT, any other) as ``"NAME (parametrization: Kind)"`` and ``torch.nn.utils.prune`` masks as
    ``"NAME (prune mask: Method)"``; empty when every weight is a plain tensor."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.prune import BasePruningMethod

    found = []
    for name, sub in module.named_modules():
        prefix = f"{name}." if name else ""
        if parametrize.is_parametrized(sub):
            for pname, plist in sub.parametrizations.items():
                kinds = ", ".join(type(p).__name__ for p in plist)
                found.append(f"{prefix}{pname} (parametrization: {kinds})")
        for hook in sub._forward_pre_hooks.values():
            if isinstance(hook, BasePruningMethod):
                found.append(f"{prefix}{hook._tensor_name} (prune mask: {type(hook).__name__})")
    return found


def merge_reparametrizations(module: torch.nn.Module) -> int:
    """Fold every parametrization and prune mask of ``module`` into plain weights, in place; returns how many
    weights were folded. Forward results are unchanged (the folded weight is the one the forward used).

    Parametrized modules get their plain class back by assignment (``type(m).__bases__[0]``) instead of
    ``parametrize.remove_parametrizations``, which deletes the weight property from the *class*: a class that a
    ``copy.deepcopy`` of the module shares with the original, which would break the original.
    """
    from torch.nn.utils import parametrize, prune
    from torch.nn.utils.prune import BasePruningMethod

    merged = 0
    with torch.no_grad():
        for sub in list(module.modules()):
            if parametrize.is_parametrized(sub):
                values = {name: getattr(sub, name).detach().clone() for name in sub.parametrizations}
                grads = {name: plist.original.requires_grad for name, plist in sub.parametrizations.items()}
                del sub._modules["parametrizations"]
                sub.__class__ = type(sub).__bases__[0]
                for name, value in values.items():
                    sub._parameters[name] = torch.nn.Parameter(value, requires_grad=grads[name])
                merged += len(values)
            for hook in [h for h in sub._forward_pre_hooks.values() if isinstance(h, BasePruningMethod)]:
                prune.remove(sub, hook._tensor_name)
                merged += 1
    return merged


@contextlib.contextmanager
def traceable_attention(module: torch.nn.Module):
    """Within the block, every self-attention ``nn.MultiheadAttention`` of ``module`` (batch-first, no key padding
    mask, eval mode) runs an equivalent reshape-based forward (:func:`opentrans.models.dense.qkv`/``attend``) whose
    token count stays symbolic when traced.

    Why: PyTorch's ``F.multi_head_attention_forward`` records the sequence length as a constant in the
    TorchScript-based ONNX exporter (``q.view(tgt_len, ...)``), so a graph traced at one image size fails at any
    other (measured: ``Reshape`` requested ``{21,4,32}`` for 17 tokens). Other calls (cross-attention, masks by
    key, training) fall through to the original forward. The weights are the module's own; results agree with
    the original to float rounding (checked by the dynamic-size parity tests).
    """
    from opentrans.models.dense import attend, qkv

    patched = []

    def make(attn, original):
        def forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                    average_attn_weights=True, is_causal=False):
            plain = (attn.batch_first and query is key and key is value and key_padding_mask is None and not is_causal
                     and attn._qkv_same_embed_dim and attn.bias_k is None and not attn.add_zero_attn
                     and not attn.training and query.dim() == 3)
            if not plain:
                return original(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
            q, k, v = qkv(attn, query)
            logits = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, heads, N, N)
            if attn_mask is not None:
                logits = (logits.masked_fill(attn_mask, float("-inf")) if attn_mask.dtype == torch.bool
                          else logits + attn_mask)
            return attend(attn, torch.softmax(logits, dim=-1), v), None

        return forward

    try:
        for sub in module.modules():
            if isinstance(sub, torch.nn.MultiheadAttention) and "forward" not in sub.__dict__:
                sub.forward = make(sub, sub.forward)
                patched.append(sub)
        yield
    finally:
        for sub in patched:
            del sub.forward


def export_onnx(segmentor: torch.nn.Module, path: str | os.PathLike, opset: int = DEFAULT_OPSET, *,
                dynamic_hw: bool = False, merge: bool = True) -> Path:
    """Export ``segmentor`` (an :class:`OpenVocabSegmentor`, fp32, CPU) to one self-contained ONNX file.

    Inputs ``images`` (B,3,H,W) float32 with B dynamic and (H, W) = ``segmentor.image_size`` (or dynamic
    ``height``/``width`` axes with ``dynamic_hw``), ``text_embeds`` (C,D) float32 with C dynamic; output ``logits``
    (B,C,H,W) float32. The file is traced with B=2 and C=3 (not 1, so no dimension is specialised to a
    broadcastable size) at ``segmentor.image_size``, checked with ``onnx.checker`` and written atomically (weights
    inside the file, no ``.onnx.data``).

    Args:
        segmentor: the model; adapters/prune masks on it are merged on a copy (``merge``), never on it.
        path: the ``.onnx`` file to write.
        opset: ONNX opset, 14..20 (17 for JetPack 5/6 TensorRT).
        dynamic_hw: export H and W as dynamic axes (see the module docstring for the limits).
        merge: fold LoRA/OFT parametrizations and prune masks into plain weights before tracing; False refuses
            a model that has any.

    Returns:
        ``path``.

    Raises:
        OpenTransError: an unsupported opset; with ``merge=False``, a model with unmerged parametrizations or
            prune masks (their names in the message). Nothing is written then.
    """
    from opentrans.models.dense import symbolic_grid

    opset = check_opset(opset)
    path = Path(path)
    pending = unmerged_reparametrizations(segmentor)
    if pending:
        if not merge:
            raise OpenTransError(f"{len(pending)} weights are still reparametrised ({', '.join(pending[:3])}"
                                 f"{', ...' if len(pending) > 3 else ''}); merge them first "
                                 "(opentrans.finetune.adapters.merge_adapters, torch.nn.utils.prune.remove) or export "
                                 "with merge=True")
        # prune hooks keep the masked weight as a plain (non-leaf) attribute, which deepcopy refuses: copy it detached
        memo = {id(v): v.detach().clone() for sub in segmentor.modules() for v in vars(sub).values()
                if isinstance(v, torch.Tensor) and not v.is_leaf}
        segmentor = copy.deepcopy(segmentor, memo)
        merge_reparametrizations(segmentor)
    seg = segmentor.eval()
    h, w = seg.image_size
    images = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0))
    text = torch.randn(3, seg.embed_dim, generator=torch.Generator().manual_seed(1))
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    grid = symbolic_grid() if dynamic_hw else contextlib.nullcontext()
    attention = traceable_attention(seg) if dynamic_hw else contextlib.nullcontext()
    try:
        with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings(), grid, attention:
            # Fixed H and W: the trace-time comparison of the patch grid with the positional-embedding grid
            # (dense._interpolate_pos_embed) is a constant by design.
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            # The legacy exporter is chosen on purpose (see the module docstring).
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            torch.onnx.export(
                seg, (images, text), str(tmp), input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
                dynamic_axes=dynamic_axes(dynamic_hw), opset_version=opset,
                do_constant_folding=True, dynamo=False,
            )
            onnx.checker.check_model(str(tmp))
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return path


#: Largest tensor (elements) :func:`fold_constants` evaluates: a ViT-L/14 positional embedding at 1024x1024 is 5.4 M.
_FOLD_LIMIT = 1 << 24


def onnx_opset(path: str | os.PathLike) -> int:
    """The default-domain opset an ONNX file was written at."""
    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def fold_constants(path: str | os.PathLike) -> Path:
    """Fold every constant subgraph of the ONNX file ``path`` in place (onnxscript's constant folder, then unused
    nodes and initializers removed) and return the path.

    For fixed-size exports this removes the positional-embedding resize (a bicubic ``Resize`` of a weight, constant by
    design, which TensorRT's parser does not take: it resizes ``nearest``/``linear`` only), so TensorRT graphs parse;
    outputs stay equal to the unfolded graph's within float32 rounding (tiny ViT: max |diff| 2e-6).
    """
    import onnx_ir as ir
    import onnxscript.optimizer
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    path = Path(path)
    model = ir.serde.deserialize_model(onnx.load(str(path)))
    onnxscript.optimizer.fold_constants(model, input_size_limit=_FOLD_LIMIT, output_size_limit=_FOLD_LIMIT)
    RemoveUnusedNodesPass()(model)
    with atomic_path(path) as tmp:
        onnx.save(ir.serde.serialize_model(model), str(tmp))
    return path
