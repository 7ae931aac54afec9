"""Typed options of the ``analyze`` stage (one dataclass: CLI flags, recipe section, manifest record)."""

from __future__ import annotations

from dataclasses import dataclass

from opentrans.errors import OpenTransError
from opentrans.options import StageOptions, option


def _estimator_choices() -> list[str]:
    """``--estimator`` choices of ``analyze``: the registered estimators and ``both`` (imported when the CLI is
    built or the options checked, so that importing the options does not load the analysis code)."""
    from opentrans.analyze.spectral import estimator_names

    return estimator_names(with_both=True)


def split_names(value: str | list[str] | tuple[str, ...] | None) -> list[str] | None:
    """``"a, b,c"`` or ``[a, b, c]`` -> ``[a, b, c]`` (blank entries dropped); None stays None."""
    if value is None:
        return None
    parts = value.split(",") if isinstance(value, str) else list(value)
    return [p.strip() for p in parts if str(p).strip()]


@dataclass
class AnalyzeOptions(StageOptions):
    """Options of ``opentrans analyze`` (:func:`opentrans.analyze.stage.analyze_stage`).

    ``towers`` and ``esd_layers`` accept a comma-separated string (the CLI) or a list (a recipe, the API); they
    are lists after construction.
    """

    estimator: str = option(
        "opentrans", "opentrans: the OpenTrans authors' estimator and layer set; opentrans-qkv: ours (Q/K/V split, "
        "corrected xmin window); weightwatcher; or both (opentrans beside weightwatcher).",
        choices=_estimator_choices)
    towers: str | list[str] = option("image", "Comma-separated CLIP towers: image, text.")
    esd_layers: str | list[str] | None = option(
        None, "Comma-separated layer names for esd.png (default: smallest, median, largest alpha).")

    def __post_init__(self) -> None:
        self.towers = split_names(self.towers)
        self.esd_layers = split_names(self.esd_layers) or None

    def check(self) -> None:
        """Raises :class:`OpenTransError` for an unknown estimator or tower (the messages list the valid ones)."""
        from opentrans.analyze.spectral import TOWERS

        if self.estimator not in _estimator_choices():
            raise OpenTransError(f"unknown estimator '{self.estimator}'; choose one of "
                                 f"{', '.join(_estimator_choices())}")
        bad = [t for t in self.towers if t not in TOWERS]
        if bad or not self.towers:
            raise OpenTransError(f"unknown tower '{bad[0] if bad else ''}'; choose from {', '.join(TOWERS)}")
        super().check()
