"""The ``opentrans`` command line: one verb per pipeline stage, each a thin layer over the stage API."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from opentrans import __version__
from opentrans.errors import OpenTransError


class _Group(click.Group):
    """Turns :class:`OpenTransError` into a one-line ``Error: ...`` and exit status 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except OpenTransError as exc:
            raise click.ClickException(str(exc)) from None


def _image_size(ctx, param, value):
    if value is None:
        return None
    h, sep, w = value.lower().partition("x")
    if not sep or not h.isdigit() or not w.isdigit() or int(h) < 1 or int(w) < 1:
        raise click.BadParameter("expected HxW in pixels, e.g. 224x288")
    return int(h), int(w)


def model_options(f):
    """--from / --model / --pretrained / --image-size."""

    @click.option("--from", "from_dir", type=click.Path(file_okay=False, path_type=Path),
                  help="Artifact of an earlier stage (a directory written by prune or finetune).")
    @click.option("--model", help="open_clip architecture, e.g. ViT-B-16, ViT-B-32, RN50, opentrans-tiny-vit.")
    @click.option("--pretrained", default="none", show_default=True,
                  help="open_clip tag (needs a network), a local checkpoint path, or 'none' for random init.")
    @click.option("--image-size", callback=_image_size, metavar="HxW",
                  help="Network input size; default: short side = the model's native size.")
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        return f(*args, **kwargs)

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


@cli.command(epilog="Example: opentrans analyze --model ViT-B-16 --pretrained none --out runs/x/analyze")
@model_options
@_out_option()
def analyze(from_dir, model, pretrained, image_size, out):
    """Heavy-tail spectral analysis: weightwatcher power-law alpha of every image-encoder layer."""
    from opentrans.finetune.stage import analyze_stage

    figures = analyze_stage(from_dir=from_dir, model=model, pretrained=pretrained, out_dir=out, image_size=image_size)
    _print_figures("analyze", figures, out)


@cli.command(epilog="Example: opentrans prune --model ViT-B-16 --pretrained none --sparsity 0.5 --out runs/x/prune")
@model_options
@click.option("--sparsity", type=float, required=True, help="Fraction of prunable channels to remove, in (0, 1).")
@click.option("--importance", type=click.Choice(["magnitude", "lamp"]), default="magnitude", show_default=True)
@click.option("--round-to", type=click.IntRange(min=1), default=8, show_default=True,
              help="Round kept widths to a multiple of this.")
@_out_option()
def prune(from_dir, model, pretrained, image_size, sparsity, importance, round_to, out):
    """Structured pruning of the CLIP image encoder with torch-pruning (MLP / bottleneck channels)."""
    from opentrans.prune.stage import prune_stage

    figures = prune_stage(from_dir=from_dir, model=model, pretrained=pretrained, out_dir=out, sparsity=sparsity,
                          importance=importance, round_to=round_to, image_size=image_size)
    _print_figures("prune", figures, out)


@cli.command(epilog="Example: opentrans finetune --from runs/x/prune --freeze-heavy-tail "
                    "--data camvid:../shared/data/camvid --steps 40 --out runs/x/finetune")
@model_options
@data_options(split="train")
@click.option("--freeze-heavy-tail/--no-freeze-heavy-tail", default=True, show_default=True,
              help="Freeze image-encoder layers whose alpha is below the median; train the rest and the head.")
@click.option("--steps", type=click.IntRange(min=1), default=40, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--val-limit", type=click.IntRange(min=1), help="Validate on the first N val images.")
@click.option("--seed", type=int, default=0, show_default=True)
@_out_option()
def finetune(from_dir, model, pretrained, image_size, data, split, limit, freeze_heavy_tail, steps, batch_size, lr,
             val_limit, seed, out):
    """Selective finetuning on a labelled dataset, with heavy-tail freezing; reports val mIoU before/after."""
    from opentrans.finetune.stage import finetune_stage

    if split != "train":
        raise OpenTransError("finetune trains on --split train and validates on val")
    figures = finetune_stage(from_dir=from_dir, model=model, pretrained=pretrained, out_dir=out, data=data,
                             steps=steps, batch_size=batch_size, lr=lr, freeze_heavy_tail=freeze_heavy_tail,
                             train_limit=limit, val_limit=val_limit, image_size=image_size, seed=seed)
    _print_figures("finetune", figures, out)


@cli.command(epilog="Example: opentrans deploy --from runs/x/finetune --target openvino --precision int8 "
                    "--data camvid:../shared/data/camvid --out runs/x/deploy/openvino-int8")
@model_options
@click.option("--target", required=True, help="onnx, openvino, jetson or nvidia.")
@click.option("--precision", default="fp32", show_default=True, help="fp32, fp16 or int8 (what the target supports).")
@click.option("--data", required=True, metavar="FORMAT:PATH",
              help="Dataset for the parity check (val images) and INT8 calibration (train images).")
@click.option("--calib-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--parity-limit", type=click.IntRange(min=1), default=8, show_default=True,
              help="Number of real val images the export is compared with PyTorch on.")
@click.option("--opset", type=click.IntRange(min=14, max=20), default=17, show_default=True)
@_out_option()
def deploy(from_dir, model, pretrained, image_size, target, precision, data, calib_size, parity_limit, opset, out):
    """Export and verify: ONNX, OpenVINO IR (fp32 / NNCF INT8), Jetson bundle, TensorRT engine."""
    from opentrans.deploy.stage import deploy_stage

    figures = deploy_stage(from_dir=from_dir, model=model, pretrained=pretrained, out_dir=out, target=target,
                           precision=precision, data=data, parity_limit=parity_limit, calib_size=calib_size,
                           opset=opset, image_size=image_size)
    _print_figures("deploy", figures, out)


@cli.command(epilog="Example: opentrans bench runs/quickstart --data camvid:../shared/data/camvid --out runs/quickstart/bench")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@data_options()
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--reference", type=click.Path(file_okay=False, path_type=Path),
              help="PyTorch model directory whose argmax is the agreement reference (default: the first found).")
@_out_option()
def bench(paths, data, split, limit, warmup, repeats, batch_size, reference, out):
    """Latency (median, p90, images/s) and mIoU of every model and build under PATHS; table + Pareto plot."""
    from opentrans.bench import bench_stage

    result = bench_stage(list(paths), out, data, split=split, limit=limit, warmup=warmup, repeats=repeats,
                         batch_size=batch_size, reference=reference)
    click.echo((out / "bench.md").read_text())
    click.echo(f"report: {out / 'bench.md'}, plot: {out / 'bench.png'} ({result['header']['weights']})")


def _open_for_inference(from_dir, model, pretrained, image_size):
    """(runner, segmentor whose text tower encodes the class names, spec) from a model directory, a deploy
    build (its text tower is the source model's) or ``--model``/``--pretrained``."""
    from opentrans.deploy.targets import load_runner, read_build, source_model_dir
    from opentrans.evaluate import TorchRunner
    from opentrans.models.artifact import SPEC_FILE, resolve_model

    if from_dir is not None and not (Path(from_dir) / SPEC_FILE).exists():
        runner = load_runner(from_dir)
        build = read_build(from_dir)
        if build.get("source", {}).get("from_dir"):
            seg, spec, _ = resolve_model(source_model_dir(from_dir), None)
        else:
            seg, spec, _ = resolve_model(None, build["model"], build["pretrained"], image_size=tuple(build["image_size"]))
        return runner, seg, spec
    seg, spec, _ = resolve_model(from_dir, model, pretrained, image_size=image_size)
    return TorchRunner(seg), seg, spec


@cli.command(name="eval", epilog="Example: opentrans eval --from runs/x/deploy/openvino-int8 --data camvid:../shared/data/camvid")
@model_options
@data_options()
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Also write the metrics as JSON here.")
def eval_(from_dir, model, pretrained, image_size, data, split, limit, out):
    """mIoU, pixel accuracy and per-class IoU of a model or deploy build on a dataset."""
    from opentrans.artifacts import write_json
    from opentrans.data import open_dataset
    from opentrans.evaluate import evaluate

    runner, seg, spec = _open_for_inference(from_dir, model, pretrained, image_size)
    dataset = open_dataset(data, split, spec.image_size, spec.mean, spec.std, limit=limit)
    text = seg.encode_classes(list(dataset.class_names), model_name=spec.model).numpy()
    metrics = evaluate(runner, dataset, text, desc=f"eval {runner.name}")
    click.echo(f"{runner.name} on {dataset.name} ({split}, {len(dataset)} images), {spec.weights}")
    click.echo(f"mIoU {metrics['miou']:.2f} %   pixel accuracy {metrics['pixel_acc']:.2f} %")
    for name, iou in metrics["per_class_iou"].items():
        click.echo(f"  {name:<14} {'n/a' if iou is None else f'{iou:6.2f}'}")
    if out is not None:
        write_json(out, {"runner": runner.name, "weights": spec.weights, "dataset": dataset.name, "split": split,
                         **metrics})


@cli.command(epilog='Example: opentrans segment street.png --classes "road,car,sky,building" '
                    "--from runs/quickstart/finetune --out street_overlay.png")
@click.argument("image", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--classes", required=True, help="Comma-separated class names, e.g. 'road,car,sky'.")
@model_options
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Overlay PNG to write.")
def segment(image, classes, from_dir, model, pretrained, image_size, out):
    """Segment one image with free-form class names and write an overlay PNG."""
    from opentrans.segment import segment_image

    names = [c.strip() for c in classes.split(",") if c.strip()]
    if not names:
        raise OpenTransError("--classes: give at least one class name")
    runner, seg, spec = _open_for_inference(from_dir, model, pretrained, image_size)
    text = seg.encode_classes(names, model_name=spec.model).numpy()
    result = segment_image(runner, image, names, text, spec.image_size, spec.mean, spec.std, out)
    shares = ", ".join(f"{k} {v:.1f} %" for k, v in sorted(result["shares"].items(), key=lambda kv: -kv[1]))
    click.echo(f"wrote {out} ({runner.name}, {spec.weights}): {shares}")


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
