"""Segmentation heads (decoders) of :class:`~opentrans.models.segmentor.OpenVocabSegmentor`: a name registry.

Every head maps the dense CLIP features to refined features in the same joint space, so the segmentor's
classifier stays the cosine with the class text embeddings::

    head(feats (B, N, D), grid (h, w), text (C, D) or None) -> feats (B, N, D)

``N = h * w`` patch tokens (row-major), ``D`` the joint embedding width, ``text`` the class embeddings the
logits are taken against (a decoder that attends to the classes uses them; ``None`` where no class list exists,
e.g. label-free distillation, and a head that needs them raises). A head is built by name with JSON-able
options (:func:`build_head`), which :class:`~opentrans.models.artifact.SegmentorSpec` stores as ``head`` and
``head_options`` so :func:`~opentrans.models.artifact.load_segmentor` rebuilds it before loading weights.

Registered here: ``linear`` (:class:`LinearHead`, the default) and ``none`` (identity). The papers' decoders
(SPT-SEG's spectral-guided decoder, LDVC's local-consensus decoder) live in :mod:`opentrans.models.decoders`
and register themselves on import.
"""

from __future__ import annotations

import torch
from torch import nn

from opentrans.errors import OpenTransError
from opentrans.registry import Registry

#: name -> factory ``(embed_dim: int, **options) -> nn.Module`` with the head signature above; the papers' decoders
#: (every module of :mod:`opentrans.models.decoders`) are imported, and so registered, on the first lookup.
HEADS = Registry("head", plugins="opentrans.models.decoders")


def register_head(name: str):
    """Class/function decorator: register a head factory under ``name`` (``factory(embed_dim, **options)``)."""
    return HEADS.register(name)


def head_names() -> list[str]:
    """Every registered head name (the papers' decoders included), sorted."""
    return HEADS.names()


def build_head(name: str, embed_dim: int, options: dict | None = None) -> nn.Module:
    """A head by registry name.

    Args:
        name: a registered head (:func:`head_names`).
        embed_dim: D, the joint embedding width of the features it refines.
        options: keyword options of the head's factory (JSON-able; stored in the model spec).

    Raises:
        OpenTransError: an unknown name, or options the factory does not accept.
    """
    if name not in HEADS:
        raise OpenTransError(f"unknown head '{name}'; choose one of {', '.join(HEADS.names())}")
    try:
        return HEADS.get(name)(embed_dim, **(options or {}))
    except TypeError as exc:
        raise OpenTransError(f"head '{name}': bad options {options}: {exc}") from None


@register_head("linear")
class LinearHead(nn.Module):
    """Residual linear decoder on patch features: ``f + W f + b``, initialised to the identity.

    Shapes: ``(B, N, D) -> (B, N, D)``. Starting at the identity means an untrained head leaves the
    training-free segmentor unchanged; finetuning moves it away from there.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, feats: torch.Tensor, grid: tuple[int, int] | None = None,
                text: torch.Tensor | None = None) -> torch.Tensor:
        return feats + self.proj(feats)


@register_head("none")
class IdentityHead(nn.Module):
    """No head: the training-free dense features unchanged, ``(B, N, D) -> (B, N, D)``."""

    def __init__(self, dim: int):
        super().__init__()

    def forward(self, feats: torch.Tensor, grid: tuple[int, int] | None = None,
                text: torch.Tensor | None = None) -> torch.Tensor:
        return feats
