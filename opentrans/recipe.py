"""Typed recipes: the YAML that ``opentrans run`` executes, stage by stage.

Example (``recipes/quickstart.yaml``)::

    name: quickstart
    model: ViT-B-32
    pretrained: none            # random-init weights; an open_clip tag or a checkpoint path otherwise
    data: camvid:../shared/data/camvid
    analyze: {}
    prune: {sparsity: 0.5}
    finetune: {steps: 40, batch_size: 4}
    deploy: {builds: [{target: onnx, precision: fp32}, {target: openvino, precision: int8}]}
    bench: {limit: 24}

A stage left out of the recipe is not run. Relative data paths are resolved against the current directory.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from opentrans.artifacts import read_text
from opentrans.bench.options import BenchOptions
from opentrans.deploy.options import Build, DeployPlan  # noqa: F401 - Build: a recipe's deploy builds
from opentrans.errors import OpenTransError
from opentrans.options import from_mapping


@dataclass
class AnalyzeOptions:
    """Options of ``opentrans analyze`` (none yet besides the model)."""


@dataclass
class PruneOptions:
    """Options of ``opentrans prune``: sparsity in (0, 1) of the prunable channels; what to prune
    (``structures``: comma-separated from channels, heads, width) and the head/width targets (default:
    ``sparsity``); see :func:`opentrans.prune.structured.prune_structured`."""

    sparsity: float = 0.5
    importance: str = "magnitude"
    round_to: int = 8
    structures: str = "channels"
    head_sparsity: float | None = None
    width_sparsity: float | None = None
    ranking: str | None = None


@dataclass
class FinetuneOptions:
    """Options of ``opentrans finetune`` (the keyword arguments of
    :func:`~opentrans.finetune.stage.finetune_stage`; see docs/finetune.md).

    ``adapter``: none, lora, oft or hclip; ``prompts``: None (keep the model's), none or a prompt kind (vpt,
    spt-seg, ldvc) with ``prompt_options``; ``head``: None (keep) or a head name (linear, none, spt-seg, ldvc)
    with ``head_options``; ``unseen_classes``: zero-shot split (e.g. ``[car, pedestrian, bicyclist]`` on CamVid).
    """

    steps: int = 40
    batch_size: int = 4
    lr: float = 1e-3
    freeze_heavy_tail: bool = True
    train_limit: int | None = None
    val_limit: int | None = None
    seed: int = 0
    freeze_policy: str = "median"
    freeze_fraction: float = 0.5
    estimator: str = "opentrans"
    grad_accum: int = 1
    amp: str = "off"
    checkpoint_every: int = 0
    loss: str = "ce"
    adapter: str = "none"
    adapter_rank: int = 4
    oft_block: int = 16
    adapter_options: dict | None = None
    prompts: str | None = None
    prompt_options: dict | None = None
    head: str | None = None
    head_options: dict | None = None
    unseen_classes: list[str] | None = None


@dataclass
class Recipe:
    """A whole pipeline: model, data and the options of each stage to run (``None`` = skip the stage)."""

    name: str
    model: str
    data: str
    pretrained: str = "none"
    image_size: tuple[int, int] | None = None
    #: let a ``pretrained`` checkpoint file be unpickled (runs any code the file names; the CLI's --allow-pickle)
    allow_pickle: bool = False
    analyze: AnalyzeOptions | None = None
    prune: PruneOptions | None = None
    finetune: FinetuneOptions | None = None
    deploy: DeployPlan | None = None
    bench: BenchOptions | None = None

    @property
    def stages(self) -> list[str]:
        """Names of the stages to run, in pipeline order."""
        return [s for s in ("analyze", "prune", "finetune", "deploy", "bench") if getattr(self, s) is not None]


def _build(cls, raw: Any, where: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise OpenTransError(f"{where}: expected a mapping, got {type(raw).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise OpenTransError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known)) or 'none'}")
    for key, value in raw.items():  # YAML reads .nan and .inf as floats; no option means either
        if isinstance(value, float) and not math.isfinite(value):
            raise OpenTransError(f"{where}: {key}: {value} is not a finite number")
    return cls(**raw)


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Parse and validate a recipe file.

    Raises:
        OpenTransError: missing file, invalid YAML, missing required keys, unknown keys, wrong types.
    """
    path = Path(path)
    if not path.is_file():
        raise OpenTransError(f"{path}: recipe not found")
    try:
        raw = yaml.safe_load(read_text(path, "the recipe"))
    except yaml.YAMLError as exc:
        raise OpenTransError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise OpenTransError(f"{path}: expected a mapping at the top level")
    for key in ("name", "model", "data"):
        if key not in raw:
            raise OpenTransError(f"{path}: missing required key '{key}'")
    stage_types = {"analyze": AnalyzeOptions, "prune": PruneOptions, "finetune": FinetuneOptions,
                   "deploy": DeployPlan, "bench": BenchOptions}
    top = {k: v for k, v in raw.items() if k not in stage_types}
    recipe = _build(Recipe, top, str(path))
    for stage, cls in stage_types.items():
        if stage in raw:
            if stage == "deploy":
                opts = DeployPlan.parse(raw[stage], f"{path}: deploy")
            elif stage == "bench":
                opts = from_mapping(BenchOptions, raw[stage], f"{path}: bench")
            else:
                opts = _build(cls, raw[stage], f"{path}: {stage}")
            setattr(recipe, stage, opts)
    if recipe.image_size is not None:
        recipe.image_size = tuple(recipe.image_size)
    if not isinstance(recipe.allow_pickle, bool):
        raise OpenTransError(f"{path}: allow_pickle must be true or false")
    if not str(recipe.name).replace("-", "").replace("_", "").isalnum():
        raise OpenTransError(f"{path}: name '{recipe.name}' must be letters, digits, '-' or '_' (it names runs/NAME)")
    return recipe
