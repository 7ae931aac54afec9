"""The ``opentrans`` command line: one verb per pipeline stage, each a thin layer over the stage API."""

from __future__ import annotations

import functools
import logging
import sys
import warnings
from dataclasses import fields
from pathlib import Path

import click

from opentrans import __version__
from opentrans.errors import OpenTransError, OpenTransWarning
from opentrans.analyze.options import AnalyzeOptions
from opentrans.bench.options import BENCH_BATCH_HELP, BenchOptions
from opentrans.deploy.options import SETTINGS, DeployOptions
from opentrans.finetune.options import FinetuneOptions
from opentrans.inference.options import InferenceOptions
from opentrans.options import cli_options, options_from_kwargs
from opentrans.prune.options import METHODS, ImpOptions, RecoveryOptions, StructuredOptions, method_options


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """:class:`OpenTransWarning` as one ``Warning: ...`` line on stderr; other warnings as Python prints them."""
    if issubclass(category, OpenTransWarning):
        click.echo(f"Warning: {message}", err=True)
    else:
        _PYTHON_SHOWWARNING(message, category, filename, lineno, file, line)


_PYTHON_SHOWWARNING = warnings.showwarning


class _NoCudaRuntimeNotice(logging.Filter):
    """Drops torch's ``No CUDA runtime is found, using CUDA_HOME=...`` warning, which importing
    ``torch.utils.cpp_extension`` (NNCF does, in deploy) logs on every CPU-only machine with a CUDA toolkit."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No CUDA runtime is found")


logging.getLogger("torch.utils.cpp_extension").addFilter(_NoCudaRuntimeNotice())


class _Error(click.ClickException):
    """``Error: ...`` on a line of its own (open progress bars are closed first, and after a bar a new line is
    started: a bar's line never ends, so in a log the error would follow it), exit status 1."""

    def show(self, file=None) -> None:
        from opentrans.progress import end_progress_bars

        if end_progress_bars():
            click.echo("", file=file, err=True)
        super().show(file)


class _Group(click.Group):
    """Turns :class:`OpenTransError`, and an OSError of a write that failed (no space, no permission, a path
    through a file: :data:`opentrans.artifacts.WRITE_ERRNOS`), into a one-line ``Error: ...`` and exit status 1
    (bad input; a usage error, e.g. an option value of the wrong type, is click's exit status 2), and prints each
    :class:`OpenTransWarning` once as a ``Warning: ...`` line."""

    def invoke(self, ctx):
        from opentrans.artifacts import os_error_message

        with warnings.catch_warnings():
            warnings.simplefilter("once", OpenTransWarning)
            warnings.showwarning = _show_warning
            try:
                return super().invoke(ctx)
            except OpenTransError as exc:
                raise _Error(str(exc)) from None
            except OSError as exc:  # a write that failed: full disk, read-only or foreign location, path through a file
                message = os_error_message(exc)
                if message is None:
                    raise
                raise _Error(message) from None


def _image_size(ctx, param, value):
    if value is None:
        return None
    h, sep, w = value.lower().partition("x")
    if not sep or not h.isdigit() or not w.isdigit() or int(h) < 1 or int(w) < 1:
        raise click.BadParameter("expected HxW in pixels, e.g. 224x288")
    return int(h), int(w)


class _DenseModeOption(click.Option):
    """``--dense-mode``: its help starts with the registered dense modes (:mod:`opentrans.models.dense`), read only
    when the help is shown, so the CLI starts without importing torch."""

    def get_help_record(self, ctx):
        from opentrans.models.dense import RN_MODES, VIT_MODES

        if not getattr(self, "_modes_listed", False):
            default, *others = VIT_MODES
            vit_only = [m for m in others if m not in RN_MODES]
            self.help = (f"Training-free dense mode: {default} (default), {', '.join(vit_only[:-1])} or {vit_only[-1]} "
                         f"(ViT only){self.help}")
            self._modes_listed = True
        return super().get_help_record(ctx)


def model_options(f):
    """--from / --model / --pretrained / --allow-pickle / --image-size / --dense-mode, handed to the command as one
    ``source`` (:class:`opentrans.models.source.ModelSource`).

    ``--allow-pickle`` reaches :func:`opentrans.models.clip.load_clip` through
    :func:`opentrans.models.clip.pickle_allowed`: without it a ``--pretrained`` file is never unpickled.

    ``--dense-mode`` is ``source.dense_mode``, which :meth:`~opentrans.models.source.ModelSource.resolve` passes on:
    with ``--model`` it is the mode the segmentor is built with (default ``maskclip``), with ``--from`` it replaces
    the mode stored in the artifact (default: keep it). A command whose function takes ``dense_modes`` (``eval``)
    also receives the parsed list and may accept ``all`` or a comma-separated list (``source.dense_mode`` is then
    the mode when exactly one is given, else None).
    """
    import inspect

    takes_list = "dense_modes" in inspect.signature(f).parameters

    @click.option("--from", "from_dir", type=click.Path(file_okay=False, path_type=Path),
                  help="Artifact of an earlier stage (a directory written by prune or finetune).")
    @click.option("--model", help="open_clip architecture, e.g. ViT-B-16, ViT-B-32, RN50, opentrans-tiny-vit.")
    @click.option("--pretrained", default="none", show_default=True,
                  help="open_clip tag (needs a network), a local checkpoint path, or 'none' for random init.")
    @click.option("--allow-pickle", is_flag=True,
                  help="Let a --pretrained checkpoint that holds pickled Python objects be unpickled. RISK: "
                       "unpickling runs any code the file names (it can delete or steal files); use only for files "
                       "from a source you trust. Without it, .safetensors, TorchScript and plain tensor "
                       "checkpoints load and anything else is refused.")
    @click.option("--image-size", callback=_image_size, metavar="HxW",
                  help="Network input size; default: short side = the model's native size.")
    @click.option("--dense-mode", "dense_mode", metavar="MODE", cls=_DenseModeOption,
                  help="; with --from, replaces the artifact's mode." +
                       (" eval also takes 'all' or a comma-separated list." if takes_list else ""))
    @functools.wraps(f)
    def wrapper(*args, from_dir=None, model=None, pretrained="none", image_size=None, dense_mode=None,
                allow_pickle=False, **kwargs):
        from opentrans.models.clip import pickle_allowed
        from opentrans.models.source import ModelSource
        from opentrans.inference.training_free import parse_modes

        modes = parse_modes(dense_mode)
        if modes is not None and len(modes) > 1 and not takes_list:
            raise OpenTransError(f"--dense-mode {dense_mode}: this command takes one mode (only eval compares several)")
        one = modes[0] if modes is not None and len(modes) == 1 else None
        source = ModelSource(from_dir, model, pretrained, image_size, one, allow_pickle)
        with pickle_allowed(allow_pickle):
            if takes_list:
                return f(*args, source=source, dense_modes=modes, **kwargs)
            return f(*args, source=source, **kwargs)

    return wrapper


def data_options(required: bool = True, split: str = "val"):
    """--data / --split / --limit."""

    def deco(f):
        @click.option("--data", required=required, metavar="FORMAT:PATH",
                      help="Dataset, e.g. camvid:../shared/data/camvid or folder:PATH (images/, masks/, classes.txt).")
        @click.option("--split", type=click.Choice(["train", "val", "test"]), default=split, show_default=True)
        @click.option("--limit", type=click.IntRange(min=1), help="Use only the first N images.")
        @functools.wraps(f)
        def wrapper(*args, **kwargs):
            return f(*args, **kwargs)

        return wrapper

    return deco


def _out_option(required: bool = True):
    return click.option("--out", type=click.Path(path_type=Path), required=required, help="Output directory.")


def _print_figures(title: str, figures: dict, out: Path | None = None) -> None:
    click.echo(f"{title}:")
    for k, v in figures.items():
        if not isinstance(v, (dict, list)):
            click.echo(f"  {k}: {v}")
    if out is not None:
        click.echo(f"report and manifest: {out}")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="opentrans")
def cli():
    """OpenTrans: compress CLIP open-vocabulary segmentation models and ship them to edge devices.

    Pipeline: analyze -> prune -> finetune -> deploy -> bench, or all at once with `opentrans run RECIPE`.
    """


@cli.command(epilog="Example: opentrans analyze --model ViT-B-16 --pretrained none --estimator both "
                    "--towers image,text --out runs/x/analyze")
@model_options
@cli_options(AnalyzeOptions)
@_out_option()
def analyze(source, out, **kwargs):
    """Heavy-tail spectral analysis: power-law alpha of every analysed layer of the chosen towers."""
    from opentrans.analyze.stage import analyze_stage

    figures = analyze_stage(source, options_from_kwargs(AnalyzeOptions, kwargs), out)
    _print_figures("analyze", figures, out)


@cli.command(epilog="Examples: opentrans prune --model ViT-B-16 --pretrained none --sparsity 0.5 --out runs/x/prune; "
                    "opentrans prune --method imp --model RN50 --sparsity 0.5 --recovery-steps 20 "
                    "--distill-data camvid:../shared/data/camvid --eval-data camvid:../shared/data/camvid --out runs/x/imp; "
                    "opentrans prune --method imp --imp-targets extended --model ViT-B-16 --sparsity 0.5 --out runs/v/imp; "
                    "opentrans prune --method imp --masks runs/x/imp/masks.safetensors --model RN50 "
                    "--pretrained /path/ckpt.bin --out runs/y/imp; "
                    "opentrans prune --model ViT-B-16 --structures channels,heads,width --sparsity 0.5 "
                    "--width-sparsity 0.25 --out runs/x/prune; "
                    "opentrans prune --transfer-from runs/x/prune --model ViT-B-16 --pretrained /path/ckpt.bin "
                    "--out runs/y/prune")
@model_options
@click.option("--method", type=click.Choice(list(METHODS)), default="structured", show_default=True,
              help="structured: remove channels (faster model). imp: OpenTrans iterative global magnitude pruning "
                   "(unstructured zeros; smaller compressed size, same dense latency).")
@cli_options(StructuredOptions)
@cli_options(ImpOptions, exclude=[f.name for f in fields(RecoveryOptions)])
@_out_option()
def prune(source, method, out, **values):
    """Prune the CLIP image encoder: structured channels (torch-pruning) or OpenTrans IMP (global magnitude)."""
    options = method_options(method, values)
    if method == "structured":
        from opentrans.prune.stage import prune_stage

        figures = prune_stage(source, options, out)
    else:
        from opentrans.prune.imp_stage import imp_stage

        figures = imp_stage(source, options, out)
    _print_figures("prune", figures, out)


@cli.command(epilog="Example: opentrans finetune --from runs/x/prune --freeze-heavy-tail "
                    "--data camvid:../shared/data/camvid --steps 40 --out runs/x/finetune")
@model_options
@data_options(split="train")
@cli_options(FinetuneOptions, exclude=("train_limit",))
@_out_option()
def finetune(source, data, split, limit, out, **kwargs):
    """Selective finetuning on a labelled dataset, with heavy-tail freezing; reports val mIoU before/after.

    Under torchrun (e.g. torchrun --standalone --nproc_per_node 2 --no-python opentrans finetune ...) training
    runs with DistributedDataParallel (gloo) and only rank 0 writes.
    """
    from opentrans.finetune.stage import finetune_stage

    if split != "train":
        raise OpenTransError("finetune trains on --split train and validates on val")
    options = options_from_kwargs(FinetuneOptions, {**kwargs, "train_limit": limit})
    figures = finetune_stage(source, options, out, data)
    if figures:  # {} on torchrun ranks other than 0
        _print_figures("finetune", figures, out)


@cli.command(epilog="Example: opentrans deploy --from runs/x/finetune --target openvino --precision int8 "
                    "--data camvid:../shared/data/camvid --out runs/x/deploy/openvino-int8")
@model_options
@cli_options(DeployOptions, exclude=(*SETTINGS, "dynamic_hw"))  # --target, --precision, --data first
@cli_options(DeployOptions, exclude=("target", "precision", "data"))
@_out_option()
def deploy(source, out, **kwargs):
    """Export and verify: ONNX (fp32 / fp16 / INT8 Q/DQ), OpenVINO IR (fp32 / fp16 / NNCF INT8), Jetson bundle,
    TensorRT engine."""
    from opentrans.deploy.stage import deploy_stage, recorded_data

    if kwargs["data"] is None:
        kwargs["data"] = recorded_data(source.from_dir)
        click.echo(f"--data: {kwargs['data']} (recorded in {source.from_dir}/manifest.json)", err=True)
    figures = deploy_stage(source, options_from_kwargs(DeployOptions, kwargs), out)
    _print_figures("deploy", figures, out)


@cli.command(epilog="Example: opentrans bench runs/quickstart --data camvid:../shared/data/camvid --out runs/quickstart/bench")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@data_options()  # --data, --split, --limit (a recipe's limit defaults to 24, the CLI's to every image)
@cli_options(BenchOptions, exclude=("split", "limit"))
@click.option("--batch-sizes", default=",".join(map(str, BenchOptions().batch_sizes)), show_default=True,
              metavar="B[,B...]", help=BENCH_BATCH_HELP)
@click.option("--reference", type=click.Path(file_okay=False, path_type=Path),
              help="PyTorch model directory whose argmax is the agreement reference (default: the first found).")
@_out_option()
def bench(paths, data, batch_sizes, reference, out, **kwargs):
    """Latency (median, p90, p99, images/s), memory, roofline fraction and mIoU of every model and build under
    PATHS, each measured in its own process; markdown/JSON/CSV tables, model cards and a Pareto plot."""
    from opentrans.bench.options import parse_batch_sizes
    from opentrans.bench.stage import bench_stage

    options = options_from_kwargs(BenchOptions, {**kwargs, "batch_sizes": parse_batch_sizes(batch_sizes)})
    result = bench_stage(list(paths), options, out, data, reference=reference)
    click.echo((out / "bench.md").read_text())
    click.echo(f"report: {out / 'bench.md'}, plot: {out / 'bench.png'} ({result['header']['weights']})")


def _open_for_inference(source):
    """(runner, segmentor whose text tower encodes the class names, spec) of a model source
    (:class:`~opentrans.models.source.ModelSource`): a model directory, a deploy build (its text tower is the source
    model's; ``source.dense_mode`` must be the mode baked into its graph) or ``--model``/``--pretrained``.

    Raises:
        OpenTransError: a ``--dense-mode`` other than a deploy build's, or anything ``source.resolve()`` refuses.
    """
    from opentrans.deploy.targets import load_runner, read_build, source_model_dir
    from opentrans.inference.evaluate import TorchRunner
    from opentrans.models.artifact import SPEC_FILE, resolve_model

    from_dir = source.from_dir
    if from_dir is not None and not (Path(from_dir) / SPEC_FILE).exists():
        runner = load_runner(from_dir)
        build = read_build(from_dir)
        baked, asked = build.get("spec", {}).get("dense_mode", "maskclip"), source.dense_mode
        if asked is not None and asked != baked:
            raise OpenTransError(f"--dense-mode {asked}: {from_dir} was exported with dense mode {baked}, which is part "
                                 f"of its graph; re-run deploy with --dense-mode {asked}")
        if build.get("source", {}).get("from_dir"):
            seg, spec, _ = resolve_model(source_model_dir(from_dir), None, dense_mode=baked)
        else:
            seg, spec, _ = resolve_model(None, build["model"], build["pretrained"], image_size=tuple(build["image_size"]),
                                         dense_mode=baked)
        return runner, seg, spec
    seg, spec, _ = source.resolve()
    return TorchRunner(seg, model_name=spec.model), seg, spec


@cli.command(name="eval", epilog="Example: opentrans eval --from runs/x/deploy/openvino-int8 --data camvid:../shared/data/camvid\n\n"
             "Training-free modes compared: opentrans eval --model ViT-B-16 --pretrained openai --dense-mode all --short-side 336 --window 224x224 "
             "--stride 112x112 --data coco-object:../shared/data/coco-object-mini --prompt-sets coco-object "
             "--bg-threshold 0.1 --out runs/tf/coco.json")
@model_options
@data_options()
@cli_options(InferenceOptions)
@click.option("--protocol", type=click.Choice(["paper"]),
              help="paper: each dense mode's published settings (short side, windows, templates, temperature, "
                   "background threshold; docs/training_free.md); options given explicitly win.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the metrics as JSON here (several modes: also .md table and .png plot beside it).")
def eval_(source, dense_modes, data, split, limit, protocol, out, **kwargs):
    """mIoU, pixel accuracy and per-class IoU of a model or deploy build on a dataset; with several
    --dense-mode values (or 'all'), mIoU and latency of each training-free mode as a table and plot."""
    from opentrans.artifacts import check_writable, write_json
    from opentrans.inference.training_free import (eval_text, evaluate_modes, evaluate_one, markdown_modes,
                                                   write_modes_report)

    if out is not None:
        check_writable(out)
    options = options_from_kwargs(InferenceOptions, kwargs)
    if dense_modes is not None and len(dense_modes) > 1:
        from opentrans.models.artifact import SPEC_FILE

        if source.from_dir is not None and not (Path(source.from_dir) / SPEC_FILE).exists():
            raise OpenTransError("several --dense-mode values need a PyTorch model (--model or a prune/finetune "
                                 "directory); a deploy build has its mode baked in")
        seg, spec, _ = source.resolve()
        report = evaluate_modes(seg, spec, dense_modes, data, split, limit, options, desc=True, protocol=protocol)
        click.echo(markdown_modes(report))
        if out is not None:
            paths = write_modes_report(report, out)
            click.echo(f"report: {', '.join(str(p) for p in paths)}")
        return
    runner, seg, spec = _open_for_inference(source)
    result = evaluate_one(runner, seg, spec, data, split, limit, options, protocol)
    click.echo(eval_text(result))
    if out is not None:
        write_json(out, result.record)


@cli.command(epilog='Example: opentrans segment street.png --classes "road,car,sky,building" '
                    "--from runs/quickstart/finetune --out street_overlay.png")
@click.argument("image", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--classes", required=True, help="Comma-separated class names, e.g. 'road,car,sky'.")
@model_options
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Overlay PNG to write.")
def segment(image, classes, source, out):
    """Segment one image with free-form class names and write an overlay PNG."""
    from opentrans.inference.segment import segment_image

    from opentrans.artifacts import check_writable
    from opentrans.data.datasets import check_unique_classes

    check_writable(out)
    names = [c.strip() for c in classes.split(",") if c.strip()]
    if not names:
        raise OpenTransError("--classes: give at least one class name")
    check_unique_classes(names, "--classes")
    runner, seg, spec = _open_for_inference(source)
    text = runner.encode_classes(names)  # a deploy build: its own text graph (what a device runs)
    result = segment_image(runner, image, names, text, spec.image_size, spec.mean, spec.std, out)
    shares = ", ".join(f"{k} {v:.1f} %" for k, v in sorted(result["shares"].items(), key=lambda kv: -kv[1]))
    click.echo(f"wrote {out} ({runner.name}, {spec.weights}; classes encoded by {runner.text_source}): {shares}")


@cli.command(epilog="Example: opentrans run recipes/quickstart.yaml")
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--runs-root", type=click.Path(file_okay=False, path_type=Path), default=Path("runs"), show_default=True)
@click.option("--force", is_flag=True, help="Rerun every stage even if it finished earlier.")
def run(recipe, runs_root, force):
    """Run every stage of a recipe into RUNS_ROOT/NAME/STAGE/; finished stages are skipped on a rerun."""
    from opentrans.pipeline import run_recipe
    from opentrans.recipe import load_recipe

    report = run_recipe(load_recipe(recipe), runs_root=runs_root, force=force, echo=click.echo)
    click.echo(report.read_text())
    click.echo(f"report: {report}")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv, prog_name="opentrans")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
