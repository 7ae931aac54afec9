"""``magnitude``: group L1 norm (channels: ``torch_pruning.importance.MagnitudeImportance(p=1)`` over ``c_fc`` rows +
``c_proj`` columns, or conv filters + BN + next conv's input slices; heads/width: per-unit L1 norms, see
:func:`opentrans.prune.structured.group_norm_scores`). Ranked per layer by default."""

from __future__ import annotations

from opentrans.prune.importances import IMPORTANCES, Importance


def _score(seg, structures, calibration=None, probes=0, seed=0):
    """``{structure: {layer: L1 group norms (units,)}}`` of ``seg``'s image tower."""
    import torch_pruning as tp

    from opentrans.prune.structured import group_norm_scores

    return group_norm_scores(seg.visual, structures, tp.importance.MagnitudeImportance(p=1), p=1)


def _normalise(scores):
    """One layer's scores divided by their mean, so layers of different scales rank alike."""
    return scores / scores.mean().clamp_min(1e-9)


IMPORTANCES.add("magnitude", Importance(score=_score, default_ranking="per-layer", normalise=_normalise))
