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
from opentrans.models.source import ModelSource


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
        """A :class:`~opentrans.inference.evaluate.TorchRunner` on the segmentor (numpy in, numpy logits out)."""
        from opentrans.inference.evaluate import TorchRunner

        return TorchRunner(self.segmentor)


@dataclass
class Build:
    """A deploy build: its directory, a runner on it and the figures of its parity check against PyTorch."""

    path: Path
    runner: Any
    figures: dict


def load_model(model: str | os.PathLike | ModelSource, pretrained: str = "none",
               image_size: tuple[int, int] | None = None, dense_mode: str | None = None,
               allow_pickle: bool = False) -> Model:
    """An open_clip architecture (``ViT-B-16``, ``RN50``, ...) with ``pretrained`` weights (``none``: random init,
    an open_clip tag, or a local file), or a model directory written by prune/finetune; or a ready
    :class:`~opentrans.models.source.ModelSource` (the other arguments are then ignored).

    Args:
        image_size: network input (H, W) in pixels for an architecture (a directory keeps its own).
        dense_mode: training-free dense mode (None: ``maskclip`` for an architecture, the stored one for a directory).
        allow_pickle: let a ``pretrained`` checkpoint holding pickled objects be unpickled (runs its code).

    Raises:
        OpenTransError: unknown architecture or dense mode, weights that cannot be loaded, or an incomplete model
            directory.
    """
    source = model if isinstance(model, ModelSource) else model_source(model, pretrained, image_size, dense_mode,
                                                                         allow_pickle)
    source.check()
    seg, spec, _ = source.resolve()
    return Model(seg, spec)


def model_source(model: str | os.PathLike, pretrained: str = "none", image_size: tuple[int, int] | None = None,
                 dense_mode: str | None = None, allow_pickle: bool = False) -> ModelSource:
    """The :class:`~opentrans.models.source.ModelSource` of ``model``: an existing directory is a model directory
    (``from_dir``; ``image_size`` does not apply), anything else an open_clip architecture name."""
    if Path(model).is_dir():
        return ModelSource(from_dir=Path(model), dense_mode=dense_mode, allow_pickle=allow_pickle)
    return ModelSource(model=str(model), pretrained=pretrained, image_size=image_size, dense_mode=dense_mode,
                       allow_pickle=allow_pickle)


def analyze(model: Model, **options) -> dict:
    """Heavy-tail spectral analysis: ``{estimator: SpectralReport}`` with each layer's power-law alpha
    (:func:`opentrans.analyze.spectral.analyze_model`); ``options`` are fields of
    :class:`~opentrans.analyze.options.AnalyzeOptions` (``towers``, default ``("image",)``; ``estimator``, default
    ``opentrans``).

    Raises:
        OpenTransError: an unknown option, estimator or tower.
    """
    from opentrans.analyze.options import AnalyzeOptions
    from opentrans.analyze.spectral import analyze_model

    opts = _options(AnalyzeOptions, options)
    return analyze_model(model.segmentor, opts.towers, opts.estimator)


def prune(model: Model, sparsity: float, structures: tuple[str, ...] = ("channels",), **options) -> dict:
    """Structured pruning of the image encoder, in place (:func:`opentrans.prune.structured.prune_structured`;
    ``options``: fields of :class:`~opentrans.prune.options.StructuredOptions`, e.g. ``head_sparsity``,
    ``width_sparsity``, ``importance``, ``round_to``, ``ranking``).

    Returns:
        The pruning report (widths, params and GMACs before/after, sparsity).

    Raises:
        OpenTransError: options that :meth:`StructuredOptions.check` refuses (checked before the model changes).
    """
    from opentrans.prune.options import StructuredOptions
    from opentrans.prune.structured import prune_structured

    names = structures if isinstance(structures, str) else ",".join(structures)
    opts = StructuredOptions(sparsity=sparsity, structures=names, **options)
    opts.check()
    report = prune_structured(model.segmentor, opts.sparsity, opts.importance, opts.round_to,
                              structures=opts.parsed_structures, model_name=model.spec.model,
                              head_sparsity=opts.head_sparsity, width_sparsity=opts.width_sparsity,
                              ranking=opts.ranking, seed=opts.seed)
    model.spec.lineage = [*model.spec.lineage, "prune"]
    return report


def finetune(model: Model, data: str, **options) -> list[float]:
    """Finetune in place on ``data``'s train split: with ``freeze_heavy_tail`` (default) the layers the freeze
    policy picks are frozen (default ``median``: alpha below the median, the OpenTrans plan,
    :func:`opentrans.finetune.freeze.freeze_plan`), the rest and the head train; otherwise the head alone. Returns
    the loss of every step (nats).

    ``options`` are fields of :class:`~opentrans.finetune.options.FinetuneOptions`, with its defaults (``steps``
    40, ``batch_size`` 4, ``lr`` 1e-3, ``freeze_heavy_tail``, ``estimator``, ``seed``, ``train_limit``, ``loss``,
    ``grad_accum``, ``amp``, ...); adapters, prompts, heads and zero-shot splits are the stage's
    (:func:`opentrans.finetune.stage.finetune_stage`).

    Raises:
        OpenTransError: a bad data spec or training option.
    """
    from opentrans.data import open_dataset
    from opentrans.finetune.freeze import apply_freeze_plan
    from opentrans.finetune.options import FinetuneOptions
    from opentrans.finetune.stage import make_freeze_plan
    from opentrans.finetune.trainer import train_segmentor

    opts = _options(FinetuneOptions, options)
    seg, spec = model.segmentor, model.spec
    train = open_dataset(data, "train", spec.image_size, spec.mean, spec.std, opts.train_limit)
    apply_freeze_plan(seg, make_freeze_plan(seg, opts)[0])
    text = seg.encode_classes(list(train.class_names), model_name=spec.model)
    losses = train_segmentor(seg, train, text, steps=opts.steps, batch_size=opts.batch_size, lr=opts.lr,
                             seed=opts.seed, progress=False, grad_accum=opts.grad_accum, amp=opts.amp, loss=opts.loss)
    seg.eval()
    spec.lineage = [*spec.lineage, "finetune"]
    return losses


def _options(cls, values: dict):
    """``cls(**values)``, checked.

    Raises:
        OpenTransError: a name that is not a field of ``cls``, or a value its check refuses.
    """
    from dataclasses import fields

    unknown = sorted(set(values) - {f.name for f in fields(cls)})
    if unknown:
        raise OpenTransError(f"unknown option(s) {', '.join(unknown)}; known: "
                             f"{', '.join(sorted(f.name for f in fields(cls)))}")
    opts = cls(**values)
    opts.check()
    return opts


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


def _opened(model: Model | Build | ModelSource) -> Model | Build:
    """A model or build as is; a :class:`~opentrans.models.source.ModelSource` loaded (:func:`load_model`).

    Raises:
        OpenTransError: anything else (a bare name or path: wrap it with :func:`model_source` or :func:`load_model`).
    """
    if isinstance(model, ModelSource):
        return load_model(model)
    if not isinstance(model, (Model, Build)):
        raise OpenTransError(f"expected an api.Model or api.Build, got {type(model).__name__}")
    return model


def _input(model: Model | Build) -> tuple[tuple[int, int], tuple, tuple]:
    """``(input (H, W), mean, std)`` of a model or build."""
    if isinstance(model, Model):
        return tuple(model.spec.image_size), model.spec.mean, model.spec.std
    from opentrans.deploy.targets import read_build

    build = read_build(model.path)
    return tuple(build["image_size"]), tuple(build["mean"]), tuple(build["std"])


def evaluate(model: Model | Build | ModelSource, data: str, split: str = "val", limit: int | None = None) -> dict:
    """mIoU, pixel accuracy (%) and per-class IoU of a model, build or model source on ``data``
    (:func:`opentrans.inference.evaluate.evaluate`); class names are encoded by the build's own text graph where it
    has one.

    Raises:
        OpenTransError: something other than a model, build or source; a bad data spec.
    """
    from opentrans.data import open_dataset
    from opentrans.inference.evaluate import evaluate as run_eval

    model = _opened(model)
    size, mean, std = _input(model)
    dataset = open_dataset(data, split, size, mean, std, limit=limit)
    return run_eval(model.runner, dataset, _encode(model, list(dataset.class_names)))


def _encode(model: Model | Build, names: list[str]) -> np.ndarray:
    if isinstance(model, Model):
        return model.segmentor.encode_classes(names, model_name=model.spec.model).numpy()
    return np.asarray(model.runner.encode_classes(names), dtype=np.float32)


def segment(model: Model | Build | ModelSource, image: str | os.PathLike, classes: list[str]) -> np.ndarray:
    """Class index per pixel, int64 ``(h, w)`` at the image's own size, for free-form ``classes``, by a model, build
    or model source.

    Raises:
        OpenTransError: a missing or unreadable image, duplicate class names, or something other than a model,
            build or source.
    """
    from opentrans.data.datasets import _read, preprocess_image
    from opentrans.inference.evaluate import predict_labels

    if len(set(classes)) != len(classes):
        raise OpenTransError("segment: duplicate class names")
    model = _opened(model)
    size, mean, std = _input(model)
    rgb, original = _read(Path(image), "RGB")
    logits = model.runner(preprocess_image(rgb, size, mean, std).numpy()[None], _encode(model, list(classes)))
    return predict_labels(logits, original)[0].numpy()
