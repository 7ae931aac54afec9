"""Typed options of the ``finetune`` stage: one dataclass for the CLI flags, the recipe's ``finetune`` section, the
API and the manifest record (every default written once, here)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import click

from opentrans.errors import OpenTransError
from opentrans.options import FiniteFloat, StageOptions, option


#: Freeze policies of a heavy-tail plan (:func:`opentrans.finetune.freeze.freeze_plan`).
POLICIES = ("median", "fraction", "inverse", "random")
#: ``--amp`` modes (:func:`opentrans.finetune.trainer.resolve_amp`).
AMP_MODES = ("off", "bf16", "auto")


def check_train_options(steps: int, batch_size: int, lr: float, grad_accum: int = 1,
                        checkpoint_every: int = 0) -> None:
    """Validate the training budget.

    Raises:
        OpenTransError: ``steps``, ``batch_size`` or ``grad_accum`` below 1, ``lr`` not a positive finite
            number, or a negative ``checkpoint_every``.
    """
    if grad_accum < 1:
        raise OpenTransError(f"--grad-accum {grad_accum}: must be at least 1")
    if checkpoint_every < 0:
        raise OpenTransError(f"--checkpoint-every {checkpoint_every}: must be 0 (off) or more")
    if steps < 1:
        raise OpenTransError(f"--steps {steps}: must be at least 1")
    if batch_size < 1:
        raise OpenTransError(f"--batch-size {batch_size}: must be at least 1")
    if not (lr > 0 and math.isfinite(lr)):
        raise OpenTransError(f"--lr {lr}: must be a positive number")


def _adapter_names() -> list[str]:
    from opentrans.finetune.adapters.common import adapter_names

    return adapter_names()


def _loss_names() -> list[str]:
    from opentrans.finetune.losses import loss_names

    return loss_names()


def _estimator_names() -> list[str]:
    from opentrans.analyze.spectral import estimator_names

    return estimator_names()


def _check_choice(flag: str, value, choices) -> None:
    if value not in choices:
        raise OpenTransError(f"{flag} {value}: choose one of {', '.join(choices)}")


def parse_json_object(flag: str, value: dict | str | None) -> dict | None:
    """A JSON object given as text (the CLI) or a dict (a recipe, the API) -> a dict; None stays None.

    Raises:
        OpenTransError: invalid JSON or not an object (the message names ``flag``).
    """
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise OpenTransError(f"{flag}: not valid JSON ({exc.msg}); e.g. '{{\"tokens\": 10}}'") from None
    if not isinstance(value, dict):
        raise OpenTransError(f"{flag}: expected a JSON object, got {type(value).__name__}")
    return dict(value)


def parse_class_names(value: list[str] | tuple[str, ...] | str | None) -> list[str] | None:
    """``"car, pedestrian"`` or ``[car, pedestrian]`` -> ``[car, pedestrian]`` (blanks dropped); None or nothing
    left -> None."""
    if value is None:
        return None
    names = [n.strip() for n in (value.split(",") if isinstance(value, str) else value)]
    return [n for n in names if n] or None


@dataclass
class FinetuneOptions(StageOptions):
    """Options of ``opentrans finetune`` (:func:`opentrans.finetune.stage.finetune_stage`; docs/finetune.md).

    ``adapter_options``, ``prompt_options`` and ``head_options`` accept a JSON object as text (the CLI) or a dict
    and ``unseen_classes`` a comma-separated string or a list; after construction they are dicts and a list (or
    None). ``train_limit`` is the CLI's ``--limit``. Values out of range, unknown names and bad combinations are
    refused by :meth:`check` with the messages the CLI has always given.
    """

    freeze_heavy_tail: bool = option(
        True, "Freeze image-encoder layers by their alpha (see --freeze-policy); train the rest and the head.",
        secondary="--no-freeze-heavy-tail")
    freeze_policy: str = option(
        "median", "median: freeze alpha < median (OpenTrans); fraction: freeze the --freeze-fraction smallest "
        "alphas; inverse: freeze alpha > median; random: a seeded control.", choices=POLICIES)
    freeze_fraction: float = option(0.5, "", type=FiniteFloat(0.0, 1.0))
    estimator: str = option(
        "opentrans", "Alphas of the plan: the OpenTrans authors' estimator and layer set, ours (opentrans-qkv: "
        "Q/K/V split), or weightwatcher's.", choices=_estimator_names)
    grad_accum: int = option(1, "Micro-batches per optimizer step.", type=click.IntRange(min=1))
    amp: str = option("off", "bf16 autocast (auto: where the CPU has native bf16).", choices=AMP_MODES)
    checkpoint_every: int = option(
        0, "Save the training state every N steps into OUT/checkpoints; rerun to resume after a kill.",
        type=click.IntRange(min=0))
    loss: str = option("ce", "focal-ssim: focal + (1 - SSIM) of class probability maps (SPT-SEG).",
                       choices=_loss_names)
    adapter: str = option(
        "none", "Train LoRA/OFT/H-CLIP adapters on the plan's trainable layers instead of the layers themselves "
        "(merged into plain weights before saving).", choices=_adapter_names)
    adapter_rank: int = option(4, "LoRA rank.", type=click.IntRange(min=1))
    oft_block: int = option(16, "OFT block size.", type=click.IntRange(min=2))
    adapter_options: dict | str | None = option(
        None, "Options of --adapter hclip, e.g. '{\"block_size\": 64}'.", metavar="JSON")
    prompts: str | None = option(
        None, "Learnable prompts to add and train: none (remove), vpt, spt-seg, ldvc, ...; default: keep the "
        "model's.", metavar="KIND")
    prompt_options: dict | str | None = option(None, "Options of --prompts, e.g. '{\"tokens\": 10}'.",
                                               metavar="JSON")
    head: str | None = option(
        None, "Replace the head before training: linear, none, spt-seg, ldvc, ...; default: keep the model's.",
        metavar="NAME")
    head_options: dict | str | None = option(None, "Options of --head (JSON object).", metavar="JSON")
    unseen_classes: list[str] | str | None = option(
        None, "Zero-shot split: these classes are never labelled in training; reports mIoU(S), mIoU(U) and hIoU "
        "(CamVid: car,pedestrian,bicyclist).", metavar="A,B,C")
    steps: int = option(40, "", type=click.IntRange(min=1))
    batch_size: int = option(4, "Images per step (all processes together under torchrun).",
                             type=click.IntRange(min=1))
    lr: float = option(1e-3, "", type=FiniteFloat())
    train_limit: int | None = option(None, "Use only the first N train images.", cli=False)
    val_limit: int | None = option(None, "Validate on the first N val images.", type=click.IntRange(min=1))
    seed: int = option(0, "")

    def __post_init__(self) -> None:
        self.adapter_options = parse_json_object("--adapter-options", self.adapter_options)
        self.prompt_options = parse_json_object("--prompt-options", self.prompt_options)
        self.head_options = parse_json_object("--head-options", self.head_options)
        self.unseen_classes = parse_class_names(self.unseen_classes)

    def check(self) -> None:
        """Raise :class:`OpenTransError` (one line, naming the flag) for a training budget out of range
        (:func:`~opentrans.finetune.trainer.check_train_options`), an unknown amp mode, loss, freeze policy,
        estimator, adapter, prompt kind or head (the message lists the valid ones), a freeze fraction outside
        [0, 1], an adapter that needs a heavy-tail plan without one, options without their kind, or an unseen
        class named twice."""
        check_train_options(self.steps, self.batch_size, self.lr, self.grad_accum, self.checkpoint_every)
        _check_choice("--amp", self.amp, AMP_MODES)
        _check_choice("--loss", self.loss, _loss_names())
        _check_choice("--freeze-policy", self.freeze_policy, POLICIES)
        if not 0.0 <= self.freeze_fraction <= 1.0:
            raise OpenTransError(f"--freeze-fraction {self.freeze_fraction}: must be between 0 and 1")
        self._check_adapter()
        self._check_prompts_and_head()
        if self.estimator not in _estimator_names():
            raise OpenTransError(f"--estimator {self.estimator}: finetune plans with "
                                 f"{', '.join(repr(n) for n in _estimator_names()[:-1])} or "
                                 f"{_estimator_names()[-1]!r}")
        if self.unseen_classes and len(set(self.unseen_classes)) != len(self.unseen_classes):
            raise OpenTransError("--unseen-classes: a class is named twice")
        super().check()

    def _check_adapter(self) -> None:
        from opentrans.finetune.adapters.common import ADAPTERS

        _check_choice("--adapter", self.adapter, _adapter_names())
        kind = ADAPTERS.get(self.adapter)
        if kind.needs_plan and not self.freeze_heavy_tail:
            raise OpenTransError(f"--adapter {self.adapter} adapts the layers a heavy-tail plan marks trainable; "
                                 "drop --no-freeze-heavy-tail")
        if self.adapter_options and not kind.takes_options:
            raise OpenTransError("--adapter-options is for --adapter hclip (LoRA/OFT take --adapter-rank/--oft-block)")

    def _check_prompts_and_head(self) -> None:
        if self.prompts is not None:
            from opentrans.models.prompts import prompt_kinds

            _check_choice("--prompts", self.prompts, ["none", *prompt_kinds()])
            if self.prompts == "none" and self.prompt_options:
                raise OpenTransError("--prompt-options given with --prompts none")
        elif self.prompt_options:
            raise OpenTransError("--prompt-options needs --prompts KIND")
        if self.head is not None:
            from opentrans.models.heads import head_names

            _check_choice("--head", self.head, head_names())
        elif self.head_options:
            raise OpenTransError("--head-options needs --head NAME")
