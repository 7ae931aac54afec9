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

from opentrans.analyze.options import AnalyzeOptions
from opentrans.finetune.options import FinetuneOptions
from opentrans.artifacts import read_text
from opentrans.bench.options import BenchOptions
from opentrans.deploy.options import Build, DeployPlan  # noqa: F401 - Build: a recipe's deploy builds
from opentrans.errors import OpenTransError
from opentrans.options import StageOptions, from_mapping
from opentrans.prune.options import StructuredOptions as PruneOptions


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
        if stage == "prune" and stage in raw:  # the options of structured pruning (opentrans.prune.options)
            recipe.prune = from_mapping(PruneOptions, PruneOptions.from_recipe(raw[stage]), f"{path}: {stage}")
        elif stage in raw:
            if stage == "deploy":
                opts = DeployPlan.parse(raw[stage], f"{path}: deploy")
            elif stage == "bench":
                opts = from_mapping(BenchOptions, raw[stage], f"{path}: bench")
            else:  # the typed stage options check themselves
                build = from_mapping if issubclass(cls, StageOptions) else _build
                opts = build(cls, raw[stage], f"{path}: {stage}")
            setattr(recipe, stage, opts)
    if recipe.image_size is not None:
        recipe.image_size = tuple(recipe.image_size)
    if not isinstance(recipe.allow_pickle, bool):
        raise OpenTransError(f"{path}: allow_pickle must be true or false")
    if not str(recipe.name).replace("-", "").replace("_", "").isalnum():
        raise OpenTransError(f"{path}: name '{recipe.name}' must be letters, digits, '-' or '_' (it names runs/NAME)")
    return recipe
