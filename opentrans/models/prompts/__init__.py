"""Learnable prompt tokens inside CLIP's towers (VPT, SPT-SEG, LDVC): a name registry and the shared plumbing.

The papers' prompt modules are the other modules of this package; each registers itself with
:func:`register_prompts` when imported.

A prompt module is an ``nn.Module`` attached to :class:`~opentrans.models.segmentor.OpenVocabSegmentor` as
``seg.prompts`` (so its parameters are saved under ``prompts.*``, outside ``seg.clip``). It changes the towers
through forward pre-hooks on their residual blocks (``clip.visual.transformer.resblocks`` /
``clip.transformer.resblocks``), so open_clip's code, the training-free dense modes of
:mod:`opentrans.models.dense` and the ONNX export run unchanged with prompts inside.

Conventions every prompt module follows:

* Visual prompt tokens go at the **end** of the token sequence ``(B, 1 + h*w + P, W)``: CLS stays at index 0,
  patches at ``1 .. h*w``, so the dense modes read the patches as ``x[:, 1:1 + h*w]`` and CLIP's pooled
  embedding (CLS) is unchanged in shape. Deep prompts replace the previous block's ``P`` tokens
  (:func:`append_tokens`).
* Text prompts keep the sequence length (77): they overwrite token positions (e.g. those of "a photo of a"),
  so the causal mask and the EOT pooling of open_clip's text tower stay valid. A module whose text prompts
  assume a template sets :attr:`PromptModule.templates`, which ``encode_classes`` then uses.
* The module never holds the CLIP model as an attribute (it would be saved twice); it registers hooks in
  :meth:`PromptModule.attach` and keeps only their handles.
* :meth:`PromptModule.options` returns the JSON-able constructor keywords;
  :class:`~opentrans.models.artifact.SegmentorSpec` stores ``{"kind": ..., **options}`` as ``prompts`` and
  :func:`~opentrans.models.artifact.load_segmentor` rebuilds the module (:func:`build_prompts`) before loading
  the weights.
"""

from __future__ import annotations

import torch
from torch import nn

from opentrans.errors import OpenTransError
from opentrans.registry import Registry

#: kind -> PromptModule subclass, constructed as ``cls(clip, **options)``; every module of this package is imported,
#: and so registered, on the first lookup.
PROMPTS = Registry("prompts", plugins=__name__)


def register_prompts(kind: str):
    """Class decorator: register a :class:`PromptModule` subclass under ``kind`` (and set its ``kind``)."""

    def deco(cls):
        cls.kind = kind
        return PROMPTS.register(kind)(cls)

    return deco


class PromptModule(nn.Module):
    """Base class of prompt modules (see the module notes for the conventions).

    Subclasses implement ``__init__(clip, **options)`` (create parameters only), :meth:`options` and
    :meth:`_install` (register hooks with :meth:`_hook`).

    Attributes:
        kind: registry name (set by :func:`register_prompts`).
        templates: text templates ``encode_classes`` must use with these prompts, or None (any).
        grid: ``(h, w)`` patch grid of the last image seen by the visual tower (tracked from ``conv1``), or None.
    """

    kind: str = ""
    templates: tuple[str, ...] | None = None

    def __init__(self):
        super().__init__()
        self._handles: list = []
        self.grid: tuple[int, int] | None = None

    def options(self) -> dict:
        """JSON-able keyword arguments that rebuild this module with ``cls(clip, **options)``."""
        raise NotImplementedError

    def _install(self, clip: nn.Module) -> None:
        raise NotImplementedError

    def _hook(self, module: nn.Module, fn) -> None:
        """Register ``fn(module, args) -> args | None`` as a forward pre-hook on ``module``, removed by :meth:`detach`."""
        self._handles.append(module.register_forward_pre_hook(fn))

    def _track_grid(self, visual: nn.Module) -> None:
        """Keep :attr:`grid` up to date from the output of the ViT's patch-embedding ``conv1`` ``(B, W, h, w)``."""

        def record(_module, _args, out):
            self.grid = (out.shape[-2], out.shape[-1])

        self._handles.append(visual.conv1.register_forward_hook(record))

    def attach(self, clip: nn.Module) -> None:
        """Install the hooks on ``clip`` (an ``open_clip.CLIP``); a second call first removes the old ones."""
        self.detach()
        self._install(clip)

    def detach(self) -> None:
        """Remove every hook this module installed."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


def append_tokens(x: torch.Tensor, tokens: torch.Tensor, replace: int = 0) -> torch.Tensor:
    """Drop the last ``replace`` tokens of ``x`` and append ``tokens``.

    Args:
        x: token sequence ``(B, T, W)``.
        tokens: prompt tokens ``(P, W)`` (shared by the batch) or ``(B, P, W)``.
        replace: how many trailing tokens of ``x`` are the previous block's prompts (0 for the first block).

    Returns:
        ``(B, T - replace + P, W)``.
    """
    if tokens.dim() == 2:
        tokens = tokens.unsqueeze(0).expand(x.shape[0], -1, -1)
    kept = x[:, : x.shape[1] - replace] if replace else x
    return torch.cat([kept, tokens.to(x.dtype)], dim=1)


def prompt_kinds() -> list[str]:
    """Every registered prompt kind, sorted."""
    return PROMPTS.names()


def build_prompts(kind: str, clip: nn.Module, options: dict | None = None) -> PromptModule:
    """A prompt module by kind, created for ``clip`` and not yet attached (the segmentor attaches it).

    Raises:
        OpenTransError: an unknown kind, or options its constructor does not accept.
    """
    if kind not in PROMPTS:
        raise OpenTransError(f"unknown prompts '{kind}'; choose one of {', '.join(PROMPTS.names()) or 'none'}")
    try:
        return PROMPTS.get(kind)(clip, **(options or {}))
    except TypeError as exc:
        raise OpenTransError(f"prompts '{kind}': bad options {options}: {exc}") from None
