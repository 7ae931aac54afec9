"""The options of ``opentrans eval``'s inference (:class:`InferenceOptions`), kept free of torch so the CLI builds
its flags from them without importing the models."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import click

from opentrans.options import FiniteFloat, StageOptions, option


class ImageSize(click.ParamType):
    """A click type for ``HxW`` in pixels (``224x288``) -> ``(H, W)`` (positive integers)."""

    name = "HxW"

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, tuple):
            return value
        h, sep, w = str(value).lower().partition("x")
        if not sep or not h.isdigit() or not w.isdigit() or int(h) < 1 or int(w) < 1:
            self.fail("expected HxW in pixels, e.g. 224x288", param, ctx)
        return int(h), int(w)


@dataclass
class InferenceOptions(StageOptions):
    """How eval turns a runner into per-image predictions (all optional; defaults reproduce plain eval). The fields
    are ``opentrans eval``'s flags (:func:`opentrans.options.cli_options`).

    Attributes:
        short_side: resize images to this short side (pixels, aspect kept) instead of the model's input size;
            needs ``window`` unless the runner accepts any size (a PyTorch model does).
        window, stride: sliding-window crop and step ``(h, w)`` in pixels (default stride: half the window).
        prompt_sets: file with one line per class, comma-separated prompts (e.g. a background set).
        bg_threshold: probability below which a pixel goes to the dataset's background class.
        templates: file of prompt templates, or ``imagenet80`` for CLIP's 80 ImageNet templates (default: the
            six of :data:`~opentrans.models.segmentor.TEMPLATES`).
        cache_dir: text-embedding cache folder (default ``~/.cache/opentrans/text``).
        logit_scale: softmax temperature of the logits (a paper's ``logit_scale``; default: the model's own, see
            :meth:`~opentrans.models.segmentor.OpenVocabSegmentor.logit_scale`). It changes only what a softmax
            sees (prompt-set maxima, ``bg_threshold``) and, for ``cliper``, its per-layer probabilities.
        cliper_keep: CLIPer's last-layer keep threshold (default :data:`~opentrans.models.dense.CLIPER_KEEP`).
        notes: what a paper protocol (:func:`~opentrans.inference.training_free.protocol_options`) could not reproduce, reported with the results.
    """

    short_side: int | None = option(None, "Resize images to this short side (px, aspect kept).",
                                    type=click.IntRange(min=1))
    window: tuple[int, int] | None = option(None, "Sliding-window crop size (px).", type=ImageSize(), metavar="HxW")
    stride: tuple[int, int] | None = option(None, "Sliding-window step (px); default half the window.",
                                            type=ImageSize(), metavar="HxW")
    prompt_sets: str | os.PathLike | None = option(
        None, "One line per class, comma-separated prompts (e.g. a background set); built in: coco-object, voc.",
        metavar="FILE|NAME")
    bg_threshold: float | None = option(
        None, "Pixels whose top class probability is below this go to the dataset's background class.",
        type=FiniteFloat(0, 1, max_open=True))
    templates: str | os.PathLike | None = option(
        None, "Prompt templates, one per line with {} for the class, or imagenet80 (CLIP's 80 ImageNet templates; "
              "default: 6 built-in templates).", type=click.Path(dir_okay=False, path_type=Path))
    cache_dir: str | os.PathLike | None = option(None, "Text-embedding cache folder.", cli=False)
    logit_scale: float | None = option(None, "Softmax temperature of the logits (default: the model's own; matters "
                                             "for --prompt-sets, --bg-threshold and cliper).", type=float)
    cliper_keep: float | None = option(None, "CLIPer's last-layer keep threshold.", cli=False)
    notes: tuple[str, ...] = option((), "What a paper protocol could not reproduce.", cli=False)

    def describe(self) -> str:
        """One line naming every option that is set (what a report prints as its ``input``)."""
        parts = []
        if self.short_side:
            parts.append(f"short side {self.short_side} px")
        if self.window:
            s = self.stride or (self.window[0] // 2, self.window[1] // 2)
            parts.append(f"sliding window {self.window[0]}x{self.window[1]} stride {s[0]}x{s[1]}")
        if self.prompt_sets:
            parts.append(f"prompt sets {Path(self.prompt_sets).name}")
        if self.bg_threshold is not None:
            parts.append(f"background below p={self.bg_threshold:g}")
        if self.templates:
            parts.append(f"templates {Path(self.templates).name}")
        if self.logit_scale is not None:
            parts.append(f"logit scale {self.logit_scale:g}")
        if self.cliper_keep is not None:
            parts.append(f"CLIPer keep {self.cliper_keep:g}")
        return ", ".join(parts) or "whole image at the model's input size"
