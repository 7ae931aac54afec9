"""``lamp``: squared L2 group norms with LAMP normalisation (Lee et al., "Layer-adaptive Sparsity for the
Magnitude-based Pruning", ICLR 2021, arXiv:2010.07611); ``torch_pruning.importance.LAMPImportance`` for channels.
Ranked globally by default."""

from __future__ import annotations

from opentrans.prune.importances import IMPORTANCES, Importance


def _score(seg, structures, calibration=None, probes=0, seed=0):
    """``{structure: {layer: squared L2 group norms (units,)}}`` of ``seg``'s image tower (channels LAMP-scaled)."""
    import torch_pruning as tp

    from opentrans.prune.structured import group_norm_scores

    return group_norm_scores(seg.visual, structures, tp.importance.LAMPImportance(p=2), p=2)


def lamp(scores):
    """LAMP normalisation (arXiv:2010.07611, Eq. 2) of one layer's squared-norm ``scores`` ``(units,)``: each score
    divided by the sum of the scores at least as large, so the values are comparable across layers."""
    import torch

    order = torch.argsort(scores, stable=True)
    sorted_scores = scores[order]
    tail = torch.flip(torch.cumsum(torch.flip(sorted_scores, [0]), 0), [0])
    out = torch.empty_like(scores)
    out[order] = sorted_scores / tail.clamp_min(1e-9)
    return out


IMPORTANCES.add("lamp", Importance(score=_score, default_ranking="global", normalise=lamp))
