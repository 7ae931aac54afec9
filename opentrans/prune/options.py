"""The typed options of the ``prune`` stage: structured pruning (:class:`StructuredOptions`) and OpenTrans IMP
(:class:`ImpOptions`), which share the label-free distillation recovery and the fidelity evaluation
(:class:`RecoveryOptions`).

Each default is written once, here: the ``prune`` command's flags (:func:`opentrans.options.cli_options`), the
recipe's ``prune:`` section (:func:`opentrans.options.from_mapping`), :func:`opentrans.api.prune` and the stages
read it from these classes. This module imports neither torch nor the pruning code, so building the CLI stays
cheap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import click

from opentrans.errors import OpenTransError
from opentrans.options import FiniteFloat, StageOptions, option, options_from_kwargs
from opentrans.prune.importances import IMPORTANCES

#: Prunable structures, in the order they are pruned and reported.
STRUCTURES = ("channels", "heads", "width")
#: How units are ranked: every layer keeps the same fraction, or one ranking across all layers of a structure.
RANKINGS = ("per-layer", "global")
#: ``--latency-backends`` choices: the image encoder's dense path in eager torch, and the whole segmentor graph
#: converted to an OpenVINO model (f32 inference precision).
LATENCY_BACKENDS = ("torch", "openvino")
#: IMP target sets (see :func:`opentrans.prune.imp.imp_targets`).
IMP_TARGETS = ("authors", "extended")
#: Other accepted structure names: ``mlp`` for ``channels`` (ViT MLP hidden channels; Bottleneck channels of a ResNet).
_ALIASES = {"mlp": "channels"}
#: The recipe's ``prune:`` section prunes this fraction when it names neither ``sparsity`` nor ``transfer_from``
#: (the CLI has no default: it asks for --sparsity or --transfer-from).
RECIPE_SPARSITY = 0.5


def check_fraction(value: Any, flag: str) -> None:
    """Raises :class:`OpenTransError` unless ``value`` is a number strictly between 0 and 1 (nan, bools and
    strings refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise OpenTransError(f"{flag} {value}: must be a fraction strictly between 0 and 1 (e.g. 0.5)")


def check_recovery_options(steps: int, batch_size: int, lr: float) -> None:
    """Raises OpenTransError: ``steps`` < 0, ``batch_size`` < 1 or ``lr`` not a positive finite number."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise OpenTransError(f"--recovery-steps {steps}: must be an integer >= 0")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise OpenTransError(f"--batch-size {batch_size}: must be an integer >= 1")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not math.isfinite(lr) or lr <= 0:
        raise OpenTransError(f"--lr {lr}: must be a positive number")


def parse_structures(structures: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``"channels,heads"`` (or a sequence of names; ``mlp`` = ``channels``) -> the structures in canonical order
    (:data:`STRUCTURES`).

    Raises:
        OpenTransError: an empty selection or an unknown name.
    """
    names = [s.strip() for s in structures.split(",")] if isinstance(structures, str) else list(structures)
    names = [_ALIASES.get(s, s) for s in names if s]
    unknown = [s for s in names if s not in STRUCTURES]
    if unknown or not names:
        raise OpenTransError(f"unknown structure '{unknown[0] if unknown else ''}'; choose from "
                             f"{', '.join(STRUCTURES)} (comma-separated, e.g. channels,heads,width)")
    return tuple(s for s in STRUCTURES if s in names)


def check_structured(sparsity: Any, importance: str, round_to: Any, structures: str | tuple[str, ...],
                     head_sparsity: Any = None, width_sparsity: Any = None, ranking: str | None = None) -> tuple[str, ...]:
    """Check structured-pruning options without touching any model; returns the parsed structures.

    Raises:
        OpenTransError: ``sparsity`` (or ``head_sparsity``/``width_sparsity`` when given) not a number strictly
            between 0 and 1, an ``importance`` that is not registered (:data:`~opentrans.prune.importances.
            IMPORTANCES`), a ``round_to`` that is not a positive integer or None, an unknown structure
            (:func:`parse_structures`), a ``ranking`` not in :data:`RANKINGS`.
    """
    check_fraction(sparsity, "--sparsity")
    for value, flag in ((head_sparsity, "--head-sparsity"), (width_sparsity, "--width-sparsity")):
        if value is not None:
            check_fraction(value, flag)
    if importance not in IMPORTANCES:
        raise OpenTransError(f"unknown importance '{importance}'; choose one of {', '.join(IMPORTANCES.names())}")
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise OpenTransError(f"--round-to {round_to}: must be a positive integer (1 = no rounding)")
    if ranking is not None and ranking not in RANKINGS:
        raise OpenTransError(f"unknown ranking '{ranking}'; choose one of {', '.join(RANKINGS)}")
    return parse_structures(structures)


@dataclass
class RecoveryOptions(StageOptions):
    """What both pruning methods share: the target sparsity, the optional label-free distillation recovery from
    the unpruned model (:func:`opentrans.prune.distill.recover`) and the fidelity evaluation against it.

    Attributes:
        sparsity: target fraction in (0, 1); structured: of the prunable channels (relative to the original
            architecture), imp: of the IMP target weights zeroed.
        recovery_steps: distillation steps after pruning (imp: after every round); 0 = none.
        distill_data: ``FORMAT:PATH`` (train split, images only), ``images:PATH`` or a folder of images.
        distill_limit, batch_size, lr, seed: recovery images used, images per step, Adam learning rate, data order.
        eval_data, eval_limit: val dataset (first ``eval_limit`` images) for fidelity to the unpruned model.
    """

    #: Flags that only this method takes: another method refuses them when they differ from their default.
    METHOD_ONLY: ClassVar[tuple[str, ...]] = ()

    sparsity: float | None = option(
        None, "structured: fraction of prunable channels to remove; imp: fraction of weights zeroed; in (0, 1).",
        type=FiniteFloat())
    recovery_steps: int = option(
        0, "Distillation steps from the unpruned model after pruning (imp: after every round); needs --distill-data.",
        type=click.INT)
    distill_data: str | None = option(
        None, "Images for label-free distillation: camvid:PATH, folder:PATH (train split) or a folder of images.",
        metavar="FORMAT:PATH|FOLDER")
    distill_limit: int | None = option(None, "Use only the first N distillation images.", type=click.IntRange(min=1))
    batch_size: int = option(4, "Images per recovery step.", type=click.IntRange(min=1))
    lr: float = option(1e-5, "Adam learning rate of the recovery.")
    seed: int = option(0, "Recovery data-order seed.", type=click.INT)
    eval_data: str | None = option(
        None, "Val dataset for fidelity to the unpruned model (teacher-agreement mIoU, feature cosine).",
        metavar="FORMAT:PATH")
    eval_limit: int | None = option(8, "", type=click.IntRange(min=1))

    def check(self) -> None:
        """The recovery checks (see :func:`check_recovery_options`), and recovery steps need ``distill_data``.

        Raises:
            OpenTransError: one line naming the flag.
        """
        check_recovery_options(self.recovery_steps, self.batch_size, self.lr)
        if self.recovery_steps > 0 and self.distill_data is None:
            raise OpenTransError(f"--recovery-steps {self.recovery_steps} needs --distill-data (a folder of images); "
                                 f"or pass --recovery-steps 0")
        super().check()


@dataclass
class StructuredOptions(RecoveryOptions):
    """Options of structured pruning (``opentrans prune``, the recipe's ``prune:`` section): see
    :func:`opentrans.prune.structured.prune_structured` and :func:`opentrans.prune.stage.prune_stage`.

    Attributes:
        importance: a registered importance (:data:`~opentrans.prune.importances.IMPORTANCES`).
        structures: comma-separated from channels, heads, width.
        head_sparsity, width_sparsity: targets of heads and width (None: ``sparsity``).
        ranking: ``per-layer`` or ``global`` (None: the importance's default).
        transfer_from: a structured prune output (or its ``kept_indices.json``) whose shapes are re-applied
            instead of scoring; excludes ``sparsity``.
        latency_repeats: rounds of the before/after latency measurement (0: none).
        latency_backends: comma-separated from :data:`LATENCY_BACKENDS`.
        round_to: kept widths rounded to a multiple of this (None or 1: no rounding).
    """

    METHOD_ONLY: ClassVar[tuple[str, ...]] = ("importance", "structures", "head_sparsity", "width_sparsity",
                                              "ranking", "transfer_from")

    importance: str = option(
        "magnitude", "structured only. taylor: Gauss-Newton Taylor estimate of the distillation loss increase, on the "
        "first --distill-data images (needs --distill-data).", choices=IMPORTANCES.names)
    structures: str | list[str] = option(
        "channels", "structured only: what to prune, comma-separated from channels (ViT MLP hidden / ResNet "
        "bottleneck), heads (ViT attention heads / ResNet attention-pool heads), width (residual width / "
        "ResNet residual channels of every stage, layer4 through the attention pool).", metavar="LIST")
    head_sparsity: float | None = option(None, "structured: fraction of heads to remove (default: --sparsity).",
                                         type=FiniteFloat())
    width_sparsity: float | None = option(
        None, "structured: fraction of residual width to remove (default: --sparsity).", type=FiniteFloat())
    ranking: str | None = option(
        None, "structured: same fraction per layer, or one ranking across layers (default: per-layer for "
        "magnitude, global for lamp/taylor).", choices=RANKINGS)
    transfer_from: Path | None = option(
        None, "structured: re-apply the kept channels/heads/width of this prune output (kept_indices.json) to "
        "the unpruned --model/--pretrained (or --from) model, instead of scoring.", type=click.Path(path_type=Path))
    latency_repeats: int = option(3, "structured: rounds of the before/after latency measurement (0: skip).",
                                  type=click.IntRange(min=0))
    latency_backends: str = option(
        ",".join(LATENCY_BACKENDS), "structured: where latency is measured before/after: torch (eager dense path) "
        "and/or openvino (whole segmentor as an f32 IR).", metavar="LIST")
    round_to: int | None = option(8, "structured only: round kept widths to a multiple of this.",
                                  type=click.IntRange(min=1))

    def check(self) -> None:
        """Everything :func:`check_structured` checks (unless ``transfer_from`` fixes the shapes), the latency
        options and the recovery options; ``taylor`` needs ``distill_data``.

        Raises:
            OpenTransError: a one-line message naming the flag, e.g. "give either --sparsity or --transfer-from".
        """
        if self.transfer_from is None:
            if self.sparsity is None:
                raise OpenTransError("--sparsity is required (a fraction in (0, 1), e.g. 0.5), or --transfer-from DIR")
            check_structured(self.sparsity, self.importance, self.round_to, self.structures, self.head_sparsity,
                             self.width_sparsity, self.ranking)
        elif self.sparsity is not None:
            raise OpenTransError("give either --sparsity or --transfer-from, not both (the kept indices fix the shapes)")
        super().check()
        if isinstance(self.latency_repeats, bool) or not isinstance(self.latency_repeats, int) or self.latency_repeats < 0:
            raise OpenTransError(f"--latency-repeats {self.latency_repeats}: must be an integer >= 0")
        backends = self.backends
        if not backends or any(b not in LATENCY_BACKENDS for b in backends):
            raise OpenTransError(f"--latency-backends {','.join(backends)}: choose from {', '.join(LATENCY_BACKENDS)}")
        if self.uses_taylor and self.distill_data is None:
            raise OpenTransError("--importance taylor needs --distill-data (unlabeled calibration images)")

    @property
    def backends(self) -> tuple[str, ...]:
        """``latency_backends`` as a tuple (a recipe or the API may give a list)."""
        raw = self.latency_backends
        names = raw.split(",") if isinstance(raw, str) else list(raw)
        return tuple(b.strip() for b in names if b.strip())

    @property
    def parsed_structures(self) -> tuple[str, ...]:
        """The selected structures in canonical order (:func:`parse_structures`)."""
        return parse_structures(self.structures)

    @property
    def uses_taylor(self) -> bool:
        """Whether the units are scored by the Taylor importance (which needs calibration images)."""
        return self.importance == "taylor" and self.transfer_from is None

    @property
    def targets(self) -> dict[str, float]:
        """Target sparsity of each selected structure (heads and width default to ``sparsity``)."""
        every = {"channels": self.sparsity, "heads": self.head_sparsity or self.sparsity,
                 "width": self.width_sparsity or self.sparsity}
        return {s: every[s] for s in self.parsed_structures}

    @classmethod
    def from_recipe(cls, raw: Any) -> Any:
        """A recipe's ``prune:`` section with :data:`RECIPE_SPARSITY` filled in when it names neither ``sparsity``
        nor ``transfer_from`` (anything but a mapping is returned as it is, for :func:`from_mapping` to refuse)."""
        if raw is None:
            raw = {}
        if isinstance(raw, dict) and "sparsity" not in raw and raw.get("transfer_from") is None:
            return {"sparsity": RECIPE_SPARSITY, **raw}
        return raw


@dataclass
class ImpOptions(RecoveryOptions):
    """Options of OpenTrans IMP (``opentrans prune --method imp``): see :func:`opentrans.prune.imp_stage.imp_stage`.

    Attributes:
        rate: fraction in (0, 1) of the remaining weights removed per round (paper: 0.1).
        masks: a ``masks.safetensors`` of an earlier IMP run to re-apply instead of pruning (excludes ``sparsity``).
        imp_targets: the IMP target set, ``authors`` or ``extended`` (:func:`opentrans.prune.imp.imp_targets`).
        pooled_weight: weight of the pooled-embedding term of the distillation loss (API only).
    """

    METHOD_ONLY: ClassVar[tuple[str, ...]] = ("rate", "masks", "imp_targets")

    rate: float = option(0.1, "imp: fraction of the remaining weights removed per round, in (0, 1).")
    masks: Path | None = option(
        None, "imp: re-apply this masks.safetensors (from an earlier imp run) instead of pruning anew.",
        type=click.Path(dir_okay=False, path_type=Path))
    imp_targets: str = option(
        "authors", "imp: authors = every Conv2d but the first (the OpenTrans code; nothing to prune in a ViT); "
        "extended = ours (ViT Linears + fused Q/K/V; ResNet layer1-4 convs + attention pool).", choices=IMP_TARGETS)
    pooled_weight: float = option(1.0, "Weight of the pooled-embedding term of the distillation loss.", cli=False)

    def check(self) -> None:
        """``sparsity`` or ``masks`` (not both), ``rate`` in (0, 1), a known target set, the recovery options.

        Raises:
            OpenTransError: a one-line message naming the flag.
        """
        if self.sparsity is None and self.masks is None:
            raise OpenTransError("--method imp needs --sparsity (a fraction in (0, 1)) or --masks FILE")
        if self.sparsity is not None and self.masks is not None:
            raise OpenTransError("give either --sparsity or --masks, not both (the masks fix the sparsity)")
        if self.masks is None:
            check_fraction(self.sparsity, "--sparsity")
        check_fraction(self.rate, "--rate")
        if self.imp_targets not in IMP_TARGETS:
            raise OpenTransError(f"--imp-targets {self.imp_targets}: choose one of {', '.join(IMP_TARGETS)}")
        super().check()


#: ``--method`` -> its options class.
METHODS: dict[str, type[RecoveryOptions]] = {"structured": StructuredOptions, "imp": ImpOptions}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def method_options(method: str, values: dict[str, Any]) -> RecoveryOptions:
    """The checked options of ``method`` from a ``prune`` command's keyword arguments (popped from ``values``).

    Raises:
        OpenTransError: an unknown method; a flag of another method given a value other than its default
            ("--rate applies to --method imp only"); or what the method's ``check`` refuses.
    """
    if method not in METHODS:
        raise OpenTransError(f"unknown prune method '{method}'; choose one of {', '.join(METHODS)}")
    cls = METHODS[method]
    own = {f.name for f in fields(cls)}
    for other_method, other in METHODS.items():
        defaults = {f.name: f.default for f in fields(other)}
        for name in other.METHOD_ONLY:
            if other is not cls and name not in own and values.get(name, defaults[name]) != defaults[name]:
                raise OpenTransError(f"{_flag(name)} applies to --method {other_method} only")
    for name in [k for k in values if k not in own and any(k in {f.name for f in fields(c)} for c in METHODS.values())]:
        values.pop(name)
    return options_from_kwargs(cls, values)
