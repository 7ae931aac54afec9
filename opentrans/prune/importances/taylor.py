"""``taylor``: a Gauss-Newton / squared first-order Taylor estimate of the distillation loss increase when a unit
is removed (Molchanov et al., CVPR 2019, arXiv:1906.10771), on calibration images; see
:func:`opentrans.prune.structured.taylor_scores`. Ranked globally by default (scores are in the loss's units)."""

from __future__ import annotations

from opentrans.prune.importances import IMPORTANCES, Importance


def _score(seg, structures, calibration=None, probes=8, seed=0):
    """``{structure: {layer: Taylor scores (units,)}}`` on ``calibration`` images ``(B, 3, H, W)``."""
    from opentrans.prune.structured import taylor_scores

    return taylor_scores(seg, calibration, structures, probes, seed)


IMPORTANCES.add("taylor", Importance(score=_score, default_ranking="global", needs_calibration=True))
