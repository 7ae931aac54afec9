"""OFT: orthogonal finetuning (Qiu et al., NeurIPS 2023).

``W' = W0 R^T`` for a Linear weight ``W0`` ``(out, in)``: every neuron's weight vector ``w_i`` (a row, in
``R^in``) is rotated by the same orthogonal ``R`` ``(in, in)``, so all pairwise angles between neurons and their
norms are kept, and with them the hyperspherical energy (Qiu et al., eq. 2; Liu et al., "Learning towards
Minimum Hyperspherical Energy", NeurIPS 2018). ``R`` is block-diagonal with ``in / b`` blocks of size ``b``
(eq. 4), each from the Cayley transform ``R_k = (I + Q_k)(I - Q_k)^-1`` of a skew-symmetric ``Q_k``
(eq. 3), which is orthogonal for every ``Q_k`` and the identity at ``Q_k = 0`` (the init). Only the strict
upper triangle of each ``Q_k`` is stored: ``(in / b) * b (b - 1) / 2`` trainable elements per target.
"""

from __future__ import annotations

import torch
from torch import nn

from opentrans.errors import OpenTransError
from opentrans.finetune.adapters.common import (
    ADAPTERS,
    AdapterKind,
    AdapterReport,
    adapter_module,
    cayley,
    register,
)


@adapter_module
class OFT(nn.Module):
    """Parametrization ``W (out, in) -> W`` with rows ``[start, stop)`` replaced by ``W[rows] @ R^T``.

    Args:
        in_features: input width; must be a multiple of ``block_size``.
        rows: ``(start, stop)`` rows (neurons) to rotate; the rest of ``W`` is returned unchanged.
        block_size: ``b``, the size of each orthogonal block.

    Raises:
        OpenTransError: ``in_features`` not a multiple of ``block_size``, or ``block_size < 2``.
    """

    def __init__(self, in_features: int, rows: tuple[int, int], block_size: int = 16):
        super().__init__()
        if block_size < 2 or in_features % block_size:
            raise OpenTransError(f"OFT block size {block_size}: must be >= 2 and divide the input width {in_features}")
        self.rows = rows
        self.block_size = block_size
        self.blocks = in_features // block_size
        iu = torch.triu_indices(block_size, block_size, offset=1)
        self.register_buffer("_iu", iu, persistent=False)
        self.skew = nn.Parameter(torch.zeros(self.blocks, iu.shape[1]))

    def rotation(self) -> torch.Tensor:
        """The block-diagonal orthogonal ``R`` ``(in, in)`` (float32)."""
        b = self.block_size
        q = torch.zeros(self.blocks, b, b, dtype=self.skew.dtype, device=self.skew.device)
        q[:, self._iu[0], self._iu[1]] = self.skew
        return torch.block_diag(*cayley(q - q.transpose(1, 2)).unbind(0))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        r = self.rotation().to(weight.dtype)
        start, stop = self.rows
        if start == 0 and stop == weight.shape[0]:
            return weight @ r.T
        return torch.cat([weight[:start], weight[start:stop] @ r.T, weight[stop:]], dim=0)


def add_oft(model: nn.Module, targets: list[str], block_size: int = 16) -> AdapterReport:
    """Register OFT on each target (a Linear name or ``<mha>.in_proj_weight[q|k|v]``); originals frozen.

    Returns:
        :class:`~opentrans.finetune.adapters.common.AdapterReport`.

    Raises:
        OpenTransError: a bad target or block size; nothing is registered then.
    """
    adapters = register(model, list(targets), lambda w, rows: OFT(w.shape[1], rows, block_size))
    return AdapterReport("oft", tuple(targets), sum(a.skew.numel() for a in adapters),
                         sum((a.rows[1] - a.rows[0]) * a.blocks * a.block_size for a in adapters))


def hyperspherical_energy(weight: torch.Tensor, eps: float = 1e-12) -> float:
    """Hyperspherical energy of the neurons (rows) of ``weight`` ``(out, in)``:
    ``sum_{i != j} 1 / ||w_i/|w_i| - w_j/|w_j|||`` (Liu et al. 2018, with s = 1; Qiu et al. eq. 2), float64."""
    w = weight.detach().double()
    w = w / w.norm(dim=1, keepdim=True).clamp_min(eps)
    d = torch.cdist(w, w)
    off = ~torch.eye(w.shape[0], dtype=torch.bool)
    return float((1.0 / d[off].clamp_min(eps)).sum())


ADAPTERS.add("oft", AdapterKind(
    "oft", lambda seg, targets, options: add_oft(seg, targets, block_size=options.oft_block),
    needs_plan=True, settings=lambda options: {"block": options.oft_block}, order=2))
