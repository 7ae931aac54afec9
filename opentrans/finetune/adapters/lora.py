"""LoRA: low-rank updates of frozen weights (Hu et al., ICLR 2022).

``W = W0 + (alpha / r) * B @ A`` on the adapted rows (Hu et al., eq. 3 and Sec. 4.1), with ``A`` ``(r, in)``
Kaiming-uniform initialised (as in the reference code) and ``B`` ``(rows, r)`` zero, so the adapted model starts
equal to the base model. Trainable elements per target: ``r * (in + rows)``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from opentrans.errors import OpenTransError
from opentrans.finetune.adapters.common import ADAPTERS, AdapterKind, AdapterReport, adapter_module, register


@adapter_module
class LoRA(nn.Module):
    """Parametrization ``W (out, in) -> W + scale * pad(B @ A)`` on rows ``[start, stop)`` of ``W``.

    Args:
        out_features, in_features: shape of the full weight ``W``.
        rows: ``(start, stop)``: the rows the update touches (a Q/K/V block of a fused projection).
        rank: ``r >= 1``, at most ``min(stop - start, in_features)``.
        alpha: LoRA scale numerator; the update is multiplied by ``alpha / rank``.
        generator: seeds ``A``'s init.

    Raises:
        OpenTransError: a rank outside ``[1, min(rows, in)]`` or ``alpha <= 0``.
    """

    def __init__(self, out_features: int, in_features: int, rows: tuple[int, int], rank: int = 4,
                 alpha: float = 8.0, generator: torch.Generator | None = None):
        super().__init__()
        n_rows = rows[1] - rows[0]
        if not 1 <= rank <= min(n_rows, in_features):
            raise OpenTransError(f"LoRA rank {rank}: must be between 1 and {min(n_rows, in_features)}")
        if not alpha > 0:
            raise OpenTransError(f"LoRA alpha {alpha}: must be positive")
        self.rows = rows
        self.scale = alpha / rank
        bound = 1.0 / math.sqrt(in_features)  # Kaiming-uniform(a=sqrt(5)) as in Hu et al.'s reference code
        self.A = nn.Parameter((torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound)
        self.B = nn.Parameter(torch.zeros(n_rows, rank))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        delta = (self.B @ self.A) * self.scale
        start, stop = self.rows
        if start == 0 and stop == weight.shape[0]:
            return weight + delta.to(weight.dtype)
        pad = torch.zeros_like(weight)
        pad[start:stop] = delta.to(weight.dtype)
        return weight + pad


def add_lora(model: nn.Module, targets: list[str], rank: int = 4, alpha: float = 8.0, seed: int = 0) -> AdapterReport:
    """Register LoRA on each target (a Linear name or ``<mha>.in_proj_weight[q|k|v]``).

    The targets' original weights are frozen; set the rest of the model's ``requires_grad`` yourself
    (e.g. ``for p in model.parameters(): p.requires_grad_(False)`` before calling).

    Returns:
        :class:`~opentrans.finetune.adapters.common.AdapterReport` (``trainable_params = sum r*(in+rows)``).

    Raises:
        OpenTransError: a bad target, rank or alpha; nothing is registered then.
    """
    generator = torch.Generator().manual_seed(seed)
    adapters = register(model, list(targets),
                        lambda w, rows: LoRA(w.shape[0], w.shape[1], rows, rank, alpha, generator))
    return AdapterReport("lora", tuple(targets), sum(p.numel() for a in adapters for p in a.parameters()),
                         sum((a.rows[1] - a.rows[0]) * a.A.shape[1] for a in adapters))


ADAPTERS.add("lora", AdapterKind(
    "lora", lambda seg, targets, options: add_lora(seg, targets, rank=options.adapter_rank, seed=options.seed),
    needs_plan=True, settings=lambda options: {"rank": options.adapter_rank}, order=1))
