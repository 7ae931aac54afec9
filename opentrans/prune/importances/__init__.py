"""Importance criteria of structured pruning: one file per criterion, each registering an :class:`Importance` in
:data:`IMPORTANCES` (``--importance``'s choices and the recipe's check come from its names).

Adding a criterion is one new module here::

    from opentrans.prune.importances import IMPORTANCES, Importance

    def _score(seg, structures, calibration, probes, seed): ...   # {structure: {layer: scores (units,)}}

    IMPORTANCES.add("mine", Importance(score=_score, default_ranking="global"))

A plug-in module imports nothing heavy at its top (the CLI lists the names when it starts); its functions import
torch and the pruning code when they run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from opentrans.registry import Registry


@dataclass(frozen=True)
class Importance:
    """One importance criterion.

    Attributes:
        score: ``score(seg, structures, calibration, probes, seed) -> {structure: {layer name: scores (units,)}}``,
            float32 tensors, higher = more important, computed on ``seg`` as it is (nothing changed).
            ``calibration``: images ``(B, 3, H, W)`` or None; ``probes``/``seed``: for stochastic criteria.
        default_ranking: ``per-layer`` or ``global`` when the user names none.
        needs_calibration: ``score`` needs calibration images (``--distill-data``).
        normalise: for a global ranking of heads/width, maps one layer's scores to a scale comparable across
            layers (None: already comparable). Channel scores arrive normalised by torch-pruning.
    """

    score: Callable[..., dict[str, dict[str, Any]]]
    default_ranking: str = "global"
    needs_calibration: bool = False
    normalise: Callable[[Any], Any] | None = None


#: Name -> :class:`Importance`; plug-ins in this package register themselves.
IMPORTANCES: Registry[Importance] = Registry("importance", plugins="opentrans.prune.importances")
