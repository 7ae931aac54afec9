"""Python API: the pipeline's verbs as functions on in-memory objects, for notebooks and other tools.

    from opentrans import api
    model = api.load_model("ViT-B-32", image_size=(224, 288))          # random init here; a tag or file elsewhere
    report = api.prune(model, 0.5, structures=("channels", "heads"), head_sparsity=0.25)
    losses = api.finetune(model, "camvid:../shared/data/camvid", steps=40)
    build = api.deploy(model, "openvino", "auto", "camvid:../shared/data/camvid", "runs/nb/openvino-auto")
    print(api.evaluate(build, "camvid:../shared/data/camvid")["miou"])

A :class:`Model` is a segmentor and its spec; functions that change a model (``prune``, ``finetune``) change it in
place and return their report. ``deploy`` writes a build directory (builds are files: ONNX, IR, bundle) and
returns a :class:`Build` whose runner is ready to use. The stage functions (directory in, directory out, with
manifests) and the CLI remain the way to run the pipeline reproducibly; these functions call the same code.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from opentrans.errors import OpenTransError


@dataclass
class Model:
    """An open-vocabulary segmentor in memory.

    Attributes:
        segmentor: :class:`~opentrans.models.segmentor.OpenVocabSegmentor` (``images (B,3,H,W), text (C,D) ->
            logits (B,C,H,W)``).
        spec: its :class:`~opentrans.models.artifact.SegmentorSpec` (architecture, input size, weights provenance).
    """

    segmentor: Any
    spec: Any

    @property
    def runner(self):
        """A :class:`~opentrans.evaluate.TorchRunner` on the segmentor (numpy in, numpy logits out)."""
        from opentrans.evaluate import TorchRunner

        return TorchRunner(self.segmentor)


@dataclass
class Build:
    """A deploy build: its directory, a runner on it and the figures of its parity check against PyTorch."""

    path: Path
    runner: Any
    figures: dict


def load_model(model: str | os.PathLike, pretrained: str = "none",
               image_size: tuple[int, int] | None = None) -> Model:
    """An open_clip architecture (``ViT-B-16``, ``RN50``, ...) with ``pretrained`` weights (``none``: random init,
    an open_clip tag, or a local file), or a model directory written by prune/finetune.

    Raises:
        OpenTransError: unknown architecture, weights that cannot be loaded, or an incomplete model directory.
    """
    from opentrans.models.artifact import resolve_model

    is_dir = Path(model).is_dir()
    seg, spec, _ = resolve_model(model if is_dir else None, None if is_dir else str(model), pretrained,
                                 image_size=None if is_dir else image_size)
    return Model(seg, spec)


def analyze(model: Model, towers: tuple[str, ...] = ("image",), estimator: str = "opentrans") -> dict:
    """Heavy-tail spectral analysis: ``{estimator: SpectralReport}`` with each layer's power-law alpha
    (:func:`opentrans.finetune.spectral.analyze_model`)."""
    from opentrans.finetune.spectral import analyze_model

    return analyze_model(model.segmentor, towers, estimator)


def prune(model: Model, sparsity: float, structures: tuple[str, ...] = ("channels",), **options) -> dict:
    """Structured pruning of the image encoder, in place (:func:`opentrans.prune.structured.prune_structured`;
    ``options``: ``head_sparsity``, ``width_sparsity``, ``importance``, ``round_to``, ``ranking``).

    Returns:
        The pruning report (widths, params and GMACs before/after, sparsity).
    """
    from opentrans.prune.structured import prune_structured

    report = prune_structured(model.segmentor, sparsity, structures=structures, model_name=model.spec.model,
                              **options)
    model.spec.lineage = [*model.spec.lineage, "prune"]
    return report


def finetune(model: Model, data: str, steps: int = 40, batch_size: int = 4, lr: float = 1e-3,
             freeze_heavy_tail: bool = True, estimator: str = "opentrans", seed: int = 0,
             train_limit: int | None = None) -> list[float]:
    """Finetune in place on ``data``'s train split: with ``freeze_heavy_tail`` the layers whose alpha is below the
    median are frozen (the OpenTrans plan, :func:`opentrans.finetune.freeze.freeze_plan`), the rest and the head
    train; otherwise the head alone. Returns the loss of every step.

    Raises:
        OpenTransError: a bad data spec or training option.
    """
    from opentrans.data import open_dataset
    from opentrans.finetune.freeze import apply_freeze_plan, freeze_plan, head_only_plan
    from opentrans.finetune.spectral import analyze_model
    from opentrans.finetune.trainer import train_segmentor

    seg, spec = model.segmentor, model.spec
    train = open_dataset(data, "train", spec.image_size, spec.mean, spec.std, train_limit)
    if freeze_heavy_tail:
        plan = freeze_plan(analyze_model(seg, ("image",), estimator)[estimator].layers, "median", seed=seed)
    else:
        plan = head_only_plan()
    apply_freeze_plan(seg, plan)
    text = seg.encode_classes(list(train.class_names), model_name=spec.model)
    losses = train_segmentor(seg, train, text, steps=steps, batch_size=batch_size, lr=lr, seed=seed, progress=False)
    seg.eval()
    spec.lineage = [*spec.lineage, "finetune"]
    return losses


def deploy(model: Model, target: str, precision: str, data: str, out_dir: str | os.PathLike, **options) -> Build:
    """Export ``model`` for ``target`` at ``precision`` (``auto`` for the CPU targets), check it against PyTorch on
    ``data``'s val images and write it to ``out_dir`` (:func:`opentrans.deploy.stage.deploy_stage`; ``options``
    are fields of :class:`~opentrans.deploy.options.DeployOptions`, e.g. ``calib_size``, ``parity_limit``,
    ``cpu_isa``).

    Raises:
        OpenTransError: every refusal of the deploy stage (unknown target or option, parity check failed, ...).
    """
    from dataclasses import fields

    from opentrans.artifacts import StageRecord
    from opentrans.deploy.options import DeployOptions
    from opentrans.deploy.stage import deploy_stage
    from opentrans.deploy.targets import load_runner
    from opentrans.models.artifact import save_segmentor
    from opentrans.models.source import ModelSource

    unknown = sorted(set(options) - {f.name for f in fields(DeployOptions)})
    if unknown:
        raise OpenTransError(f"api.deploy: unknown option(s) {', '.join(unknown)}")
    deploy_options = DeployOptions(target=target, precision=precision, data=data, **options)

    with tempfile.TemporaryDirectory(prefix="opentrans-api-") as tmp:
        src = Path(tmp) / "model"
        with StageRecord("api", src, {"model": model.spec.model}) as rec:
            rec.weights = model.spec.weights
            rec.add_output(save_segmentor(model.segmentor, model.spec, src))
            rec.add_output(src / "model.json")
        figures = deploy_stage(ModelSource(from_dir=src), deploy_options, out_dir)
    return Build(Path(out_dir), load_runner(out_dir), figures)


def _input(model: Model | Build) -> tuple[tuple[int, int], tuple, tuple]:
    """``(input (H, W), mean, std)`` of a model or build.

    Raises:
        OpenTransError: anything else.
    """
    if not isinstance(model, (Model, Build)):
        raise OpenTransError(f"expected an api.Model or api.Build, got {type(model).__name__}")
    if isinstance(model, Model):
        return tuple(model.spec.image_size), model.spec.mean, model.spec.std
    from opentrans.deploy.targets import read_build

    build = read_build(model.path)
    return tuple(build["image_size"]), tuple(build["mean"]), tuple(build["std"])


def evaluate(model: Model | Build, data: str, split: str = "val", limit: int | None = None) -> dict:
    """mIoU, pixel accuracy (%) and per-class IoU of a model or build on ``data`` (:func:`opentrans.evaluate.
    evaluate`); class names are encoded by the build's own text graph where it has one."""
    from opentrans.data import open_dataset
    from opentrans.evaluate import evaluate as run_eval

    size, mean, std = _input(model)
    dataset = open_dataset(data, split, size, mean, std, limit=limit)
    return run_eval(model.runner, dataset, _encode(model, list(dataset.class_names)))


def _encode(model: Model | Build, names: list[str]) -> np.ndarray:
    if isinstance(model, Model):
        return model.segmentor.encode_classes(names, model_name=model.spec.model).numpy()
    return np.asarray(model.runner.encode_classes(names), dtype=np.float32)


def segment(model: Model | Build, image: str | os.PathLike, classes: list[str]) -> np.ndarray:
    """Class index per pixel, int64 ``(h, w)`` at the image's own size, for free-form ``classes``.

    Raises:
        OpenTransError: a missing or unreadable image, or duplicate class names.
    """
    from opentrans.data.datasets import _read, preprocess_image
    from opentrans.evaluate import predict_labels

    if len(set(classes)) != len(classes):
        raise OpenTransError("segment: duplicate class names")
    size, mean, std = _input(model)
    rgb, original = _read(Path(image), "RGB")
    logits = model.runner(preprocess_image(rgb, size, mean, std).numpy()[None], _encode(model, list(classes)))
    return predict_labels(logits, original)[0].numpy()
