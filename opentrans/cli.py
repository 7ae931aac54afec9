"""The ``opentrans`` command line: one verb per pipeline stage, each a thin layer over the stage API."""

from __future__ import annotations

import functools
import logging
import sys
import warnings
from pathlib import Path

import click

from opentrans import __version__
from opentrans.errors import OpenTransError, OpenTransWarning
from opentrans.bench.options import BENCH_BATCH_HELP, BenchOptions
from opentrans.deploy.options import SETTINGS, DeployOptions
from opentrans.options import FiniteFloat, cli_options, options_from_kwargs


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


def model_options(f):
    """--from / --model / --pretrained / --allow-pickle / --image-size / --dense-mode, handed to the command as one
    ``source`` (:class:`opentrans.models.source.ModelSource`).

    ``--allow-pickle`` reaches :func:`opentrans.models.clip.load_clip` through
    :func:`opentrans.models.clip.pickle_allowed`: without it a ``--pretrained`` file is never unpickled.

    ``--dense-mode`` reaches the stage through :func:`opentrans.models.artifact.dense_mode_override`: with
    ``--model`` it is the mode the segmentor is built with (default ``maskclip``), with ``--from`` it replaces the
    mode stored in the artifact (default: keep it). A command whose function takes ``dense_modes`` (``eval``)
    receives the parsed list instead and may accept ``all`` or a comma-separated list.
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
    @click.option("--dense-mode", "dense_mode", metavar="MODE",
                  help="Training-free dense mode: maskclip (default), sclip, clearclip, naclip or cliper "
                       "(ViT only); with --from, replaces the artifact's mode." +
                       (" eval also takes 'all' or a comma-separated list." if takes_list else ""))
    @functools.wraps(f)
    def wrapper(*args, from_dir=None, model=None, pretrained="none", image_size=None, dense_mode=None,
                allow_pickle=False, **kwargs):
        from opentrans.models.artifact import dense_mode_override
        from opentrans.models.clip import pickle_allowed
        from opentrans.models.source import ModelSource
        from opentrans.training_free import parse_modes

        modes = parse_modes(dense_mode)
        if takes_list:
            source = ModelSource(from_dir, model, pretrained, image_size, None, allow_pickle)
            with pickle_allowed(allow_pickle):
                return f(*args, source=source, dense_modes=modes, **kwargs)
        if modes is not None and len(modes) > 1:
            raise OpenTransError(f"--dense-mode {dense_mode}: this command takes one mode (only eval compares several)")
        source = ModelSource(from_dir, model, pretrained, image_size, modes[0] if modes else None, allow_pickle)
        with dense_mode_override(source.dense_mode), pickle_allowed(allow_pickle):
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
@click.option("--estimator", type=click.Choice(["opentrans", "opentrans-qkv", "weightwatcher", "both"]),
              default="opentrans", show_default=True,
              help="opentrans: the OpenTrans authors' estimator and layer set; opentrans-qkv: ours (Q/K/V split, "
                   "corrected xmin window); weightwatcher; or both (opentrans beside weightwatcher).")
@click.option("--towers", default="image", show_default=True, help="Comma-separated CLIP towers: image, text.")
@click.option("--esd-layers", default=None,
              help="Comma-separated layer names for esd.png (default: smallest, median, largest alpha).")
@_out_option()
def analyze(source, estimator, towers, esd_layers, out):
    """Heavy-tail spectral analysis: power-law alpha of every analysed layer of the chosen towers."""
    from opentrans.finetune.stage import analyze_stage

    figures = analyze_stage(from_dir=source.from_dir, model=source.model, pretrained=source.pretrained, out_dir=out, image_size=source.image_size,
                            estimator=estimator, towers=[t.strip() for t in towers.split(",") if t.strip()],
                            esd_layers=[n.strip() for n in esd_layers.split(",") if n.strip()] if esd_layers else None)
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
@click.option("--method", type=click.Choice(["structured", "imp"]), default="structured", show_default=True,
              help="structured: remove channels (faster model). imp: OpenTrans iterative global magnitude pruning "
                   "(unstructured zeros; smaller compressed size, same dense latency).")
@click.option("--sparsity", type=FiniteFloat(),
              help="structured: fraction of prunable channels to remove; imp: fraction of weights zeroed; in (0, 1).")
@click.option("--importance", type=click.Choice(["magnitude", "lamp", "taylor"]), default="magnitude",
              show_default=True, help="structured only. taylor: Gauss-Newton Taylor estimate of the distillation loss "
                                      "increase, on the first --distill-data images (needs --distill-data).")
@click.option("--structures", default="channels", show_default=True, metavar="LIST",
              help="structured only: what to prune, comma-separated from channels (ViT MLP hidden / ResNet "
                   "bottleneck), heads (ViT attention heads / ResNet attention-pool heads), width (residual width / "
                   "ResNet residual channels of every stage, layer4 through the attention pool).")
@click.option("--head-sparsity", type=FiniteFloat(), help="structured: fraction of heads to remove (default: --sparsity).")
@click.option("--width-sparsity", type=FiniteFloat(), help="structured: fraction of residual width to remove (default: --sparsity).")
@click.option("--ranking", type=click.Choice(["per-layer", "global"]),
              help="structured: same fraction per layer, or one ranking across layers (default: per-layer for "
                   "magnitude, global for lamp/taylor).")
@click.option("--transfer-from", type=click.Path(path_type=Path),
              help="structured: re-apply the kept channels/heads/width of this prune output (kept_indices.json) to "
                   "the unpruned --model/--pretrained (or --from) model, instead of scoring.")
@click.option("--latency-repeats", type=click.IntRange(min=0), default=3, show_default=True,
              help="structured: rounds of the before/after latency measurement (0: skip).")
@click.option("--latency-backends", default="torch,openvino", show_default=True, metavar="LIST",
              help="structured: where latency is measured before/after: torch (eager dense path) and/or openvino "
                   "(whole segmentor as an f32 IR).")
@click.option("--round-to", type=click.IntRange(min=1), default=8, show_default=True,
              help="structured only: round kept widths to a multiple of this.")
@click.option("--rate", type=FiniteFloat(), default=0.1, show_default=True,
              help="imp: fraction of the remaining weights removed per round, in (0, 1).")
@click.option("--recovery-steps", type=int, default=0, show_default=True,
              help="Distillation steps from the unpruned model after pruning (imp: after every round); needs --distill-data.")
@click.option("--distill-data", metavar="FORMAT:PATH|FOLDER",
              help="Images for label-free distillation: camvid:PATH, folder:PATH (train split) or a folder of images.")
@click.option("--distill-limit", type=click.IntRange(min=1), help="Use only the first N distillation images.")
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True, help="Images per recovery step.")
@click.option("--lr", type=FiniteFloat(), default=1e-5, show_default=True, help="Adam learning rate of the recovery.")
@click.option("--seed", type=int, default=0, show_default=True, help="Recovery data-order seed.")
@click.option("--eval-data", metavar="FORMAT:PATH",
              help="Val dataset for fidelity to the unpruned model (teacher-agreement mIoU, feature cosine).")
@click.option("--eval-limit", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--masks", "masks", type=click.Path(dir_okay=False, path_type=Path),
              help="imp: re-apply this masks.safetensors (from an earlier imp run) instead of pruning anew.")
@click.option("--imp-targets", type=click.Choice(["authors", "extended"]), default="authors", show_default=True,
              help="imp: authors = every Conv2d but the first (the OpenTrans code; nothing to prune in a ViT); "
                   "extended = ours (ViT Linears + fused Q/K/V; ResNet layer1-4 convs + attention pool).")
@_out_option()
def prune(source, method, sparsity, importance, structures, head_sparsity,
          width_sparsity, ranking, transfer_from, latency_repeats, latency_backends, round_to, rate, recovery_steps,
          distill_data, distill_limit, batch_size, lr, seed, eval_data, eval_limit, masks, imp_targets, out):
    """Prune the CLIP image encoder: structured channels (torch-pruning) or OpenTrans IMP (global magnitude)."""
    if method == "structured":
        from opentrans.prune.stage import prune_stage

        used = [flag for flag, given in {"--rate": rate != 0.1, "--masks": masks,
                                         "--imp-targets": imp_targets != "authors"}.items() if given]
        if used:
            raise OpenTransError(f"{used[0]} applies to --method imp only")
        if sparsity is not None and transfer_from is not None:
            raise OpenTransError("give either --sparsity or --transfer-from, not both (the kept indices fix the shapes)")
        figures = prune_stage(from_dir=source.from_dir, model=source.model, pretrained=source.pretrained, out_dir=out, sparsity=sparsity,
                              importance=importance, round_to=round_to, image_size=source.image_size,
                              recovery_steps=recovery_steps, distill_data=distill_data, distill_limit=distill_limit,
                              batch_size=batch_size, lr=lr, seed=seed, eval_data=eval_data, eval_limit=eval_limit,
                              structures=structures, head_sparsity=head_sparsity, width_sparsity=width_sparsity,
                              ranking=ranking, transfer_from=transfer_from, latency_repeats=latency_repeats,
                              latency_backends=latency_backends)
    else:
        from opentrans.prune.imp_stage import imp_stage

        structured_only = {"--importance": importance != "magnitude", "--structures": structures != "channels",
                           "--head-sparsity": head_sparsity is not None, "--width-sparsity": width_sparsity is not None,
                           "--ranking": ranking is not None, "--transfer-from": transfer_from is not None}
        used = [flag for flag, given in structured_only.items() if given]
        if used:
            raise OpenTransError(f"{used[0]} applies to --method structured only")
        if sparsity is None and masks is None:
            raise OpenTransError("--method imp needs --sparsity (a fraction in (0, 1)) or --masks FILE")
        if sparsity is not None and masks is not None:
            raise OpenTransError("give either --sparsity or --masks, not both (the masks fix the sparsity)")
        figures = imp_stage(from_dir=source.from_dir, model=source.model, pretrained=source.pretrained, out_dir=out, sparsity=sparsity,
                            rate=rate, recovery_steps=recovery_steps, distill_data=distill_data,
                            distill_limit=distill_limit, batch_size=batch_size, lr=lr, seed=seed, eval_data=eval_data,
                            eval_limit=eval_limit, masks=masks, image_size=source.image_size, targets=imp_targets)
    _print_figures("prune", figures, out)


@cli.command(epilog="Example: opentrans finetune --from runs/x/prune --freeze-heavy-tail "
                    "--data camvid:../shared/data/camvid --steps 40 --out runs/x/finetune")
@model_options
@data_options(split="train")
@click.option("--freeze-heavy-tail/--no-freeze-heavy-tail", default=True, show_default=True,
              help="Freeze image-encoder layers by their alpha (see --freeze-policy); train the rest and the head.")
@click.option("--freeze-policy", type=click.Choice(["median", "fraction", "inverse", "random"]), default="median",
              show_default=True, help="median: freeze alpha < median (OpenTrans); fraction: freeze the "
              "--freeze-fraction smallest alphas; inverse: freeze alpha > median; random: a seeded control.")
@click.option("--freeze-fraction", type=FiniteFloat(0.0, 1.0), default=0.5, show_default=True)
@click.option("--estimator", type=click.Choice(["opentrans", "opentrans-qkv", "weightwatcher"]), default="opentrans",
              show_default=True, help="Alphas of the plan: the OpenTrans authors' estimator and layer set, ours "
                                      "(opentrans-qkv: Q/K/V split), or weightwatcher's.")
@click.option("--grad-accum", type=click.IntRange(min=1), default=1, show_default=True,
              help="Micro-batches per optimizer step.")
@click.option("--amp", type=click.Choice(["off", "bf16", "auto"]), default="off", show_default=True,
              help="bf16 autocast (auto: where the CPU has native bf16).")
@click.option("--checkpoint-every", type=click.IntRange(min=0), default=0, show_default=True,
              help="Save the training state every N steps into OUT/checkpoints; rerun to resume after a kill.")
@click.option("--loss", type=click.Choice(["ce", "focal", "dice", "focal-dice", "ssim", "focal-ssim"]), default="ce",
              show_default=True, help="focal-ssim: focal + (1 - SSIM) of class probability maps (SPT-SEG).")
@click.option("--adapter", type=click.Choice(["none", "lora", "oft", "hclip"]), default="none", show_default=True,
              help="Train LoRA/OFT/H-CLIP adapters on the plan's trainable layers instead of the layers themselves "
              "(merged into plain weights before saving).")
@click.option("--adapter-rank", type=click.IntRange(min=1), default=4, show_default=True, help="LoRA rank.")
@click.option("--oft-block", type=click.IntRange(min=2), default=16, show_default=True, help="OFT block size.")
@click.option("--adapter-options", metavar="JSON", help="Options of --adapter hclip, e.g. '{\"block_size\": 64}'.")
@click.option("--prompts", metavar="KIND", help="Learnable prompts to add and train: none (remove), vpt, spt-seg, "
              "ldvc, ...; default: keep the model's.")
@click.option("--prompt-options", metavar="JSON", help="Options of --prompts, e.g. '{\"tokens\": 10}'.")
@click.option("--head", metavar="NAME", help="Replace the head before training: linear, none, spt-seg, ldvc, ...; "
              "default: keep the model's.")
@click.option("--head-options", metavar="JSON", help="Options of --head (JSON object).")
@click.option("--unseen-classes", metavar="A,B,C", help="Zero-shot split: these classes are never labelled in "
              "training; reports mIoU(S), mIoU(U) and hIoU (CamVid: car,pedestrian,bicyclist).")
@click.option("--steps", type=click.IntRange(min=1), default=40, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True,
              help="Images per step (all processes together under torchrun).")
@click.option("--lr", type=FiniteFloat(), default=1e-3, show_default=True)
@click.option("--val-limit", type=click.IntRange(min=1), help="Validate on the first N val images.")
@click.option("--seed", type=int, default=0, show_default=True)
@_out_option()
def finetune(source, data, split, limit, freeze_heavy_tail, freeze_policy,
             freeze_fraction, estimator, grad_accum, amp, checkpoint_every, loss, adapter, adapter_rank, oft_block,
             adapter_options, prompts, prompt_options, head, head_options, unseen_classes, steps,
             batch_size, lr, val_limit, seed, out):
    """Selective finetuning on a labelled dataset, with heavy-tail freezing; reports val mIoU before/after.

    Under torchrun (e.g. torchrun --standalone --nproc_per_node 2 --no-python opentrans finetune ...) training
    runs with DistributedDataParallel (gloo) and only rank 0 writes.
    """
    from opentrans.finetune.stage import finetune_stage

    if split != "train":
        raise OpenTransError("finetune trains on --split train and validates on val")
    figures = finetune_stage(from_dir=source.from_dir, model=source.model, pretrained=source.pretrained, out_dir=out, data=data,
                             steps=steps, batch_size=batch_size, lr=lr, freeze_heavy_tail=freeze_heavy_tail,
                             train_limit=limit, val_limit=val_limit, image_size=source.image_size, seed=seed,
                             freeze_policy=freeze_policy, freeze_fraction=freeze_fraction, estimator=estimator,
                             grad_accum=grad_accum, amp=amp, checkpoint_every=checkpoint_every, loss=loss,
                             adapter=adapter, adapter_rank=adapter_rank, oft_block=oft_block,
                             adapter_options=adapter_options, prompts=prompts, prompt_options=prompt_options,
                             head=head, head_options=head_options, unseen_classes=unseen_classes)
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


def _open_for_inference(from_dir, model, pretrained, image_size):
    """(runner, segmentor whose text tower encodes the class names, spec) from a model directory, a deploy
    build (its text tower is the source model's) or ``--model``/``--pretrained``."""
    from opentrans.deploy.targets import load_runner, read_build, source_model_dir
    from opentrans.evaluate import TorchRunner
    from opentrans.models.artifact import SPEC_FILE, resolve_model

    if from_dir is not None and not (Path(from_dir) / SPEC_FILE).exists():
        from opentrans.models.artifact import current_dense_mode_override

        runner = load_runner(from_dir)
        build = read_build(from_dir)
        baked, asked = build.get("spec", {}).get("dense_mode", "maskclip"), current_dense_mode_override()
        if asked is not None and asked != baked:
            raise OpenTransError(f"--dense-mode {asked}: {from_dir} was exported with dense mode {baked}, which is part "
                                 f"of its graph; re-run deploy with --dense-mode {asked}")
        if build.get("source", {}).get("from_dir"):
            seg, spec, _ = resolve_model(source_model_dir(from_dir), None, dense_mode=baked)
        else:
            seg, spec, _ = resolve_model(None, build["model"], build["pretrained"], image_size=tuple(build["image_size"]),
                                         dense_mode=baked)
        return runner, seg, spec
    seg, spec, _ = resolve_model(from_dir, model, pretrained, image_size=image_size)
    return TorchRunner(seg), seg, spec


@cli.command(name="eval", epilog="Example: opentrans eval --from runs/x/deploy/openvino-int8 --data camvid:../shared/data/camvid\n\n"
             "Training-free modes compared: opentrans eval --model ViT-B-16 --pretrained openai --dense-mode all --short-side 336 --window 224x224 "
             "--stride 112x112 --data coco-object:../shared/data/coco-object-mini --prompt-sets coco-object "
             "--bg-threshold 0.1 --out runs/tf/coco.json")
@model_options
@data_options()
@click.option("--short-side", type=click.IntRange(min=1), help="Resize images to this short side (px, aspect kept).")
@click.option("--window", callback=_image_size, metavar="HxW", help="Sliding-window crop size (px).")
@click.option("--stride", callback=_image_size, metavar="HxW", help="Sliding-window step (px); default half the window.")
@click.option("--prompt-sets", metavar="FILE|NAME",
              help="One line per class, comma-separated prompts (e.g. a background set); built in: coco-object, voc.")
@click.option("--bg-threshold", type=FiniteFloat(0, 1, max_open=True),
              help="Pixels whose top class probability is below this go to the dataset's background class.")
@click.option("--templates", type=click.Path(dir_okay=False, path_type=Path),
              help="Prompt templates, one per line with {} for the class, or imagenet80 (CLIP's 80 ImageNet "
                   "templates; default: 6 built-in templates).")
@click.option("--logit-scale", type=float, help="Softmax temperature of the logits (default: the model's own; "
                                                "matters for --prompt-sets, --bg-threshold and cliper).")
@click.option("--protocol", type=click.Choice(["paper"]),
              help="paper: each dense mode's published settings (short side, windows, templates, temperature, "
                   "background threshold; docs/training_free.md); options given explicitly win.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the metrics as JSON here (several modes: also .md table and .png plot beside it).")
def eval_(source, dense_modes, data, split, limit, short_side, window, stride,
          prompt_sets, bg_threshold, templates, logit_scale, protocol, out):
    """mIoU, pixel accuracy and per-class IoU of a model or deploy build on a dataset; with several
    --dense-mode values (or 'all'), mIoU and latency of each training-free mode as a table and plot."""
    from opentrans.artifacts import check_writable, write_json
    from opentrans.data.datasets import check_labels
    from opentrans.evaluate import evaluate
    from opentrans.models.artifact import dense_mode_override
    from opentrans.training_free import (InferenceOptions, evaluate_modes, markdown_modes, open_inference,
                                         protocol_options, write_modes_report)

    if out is not None:
        check_writable(out)
    options = InferenceOptions(short_side=short_side, window=window, stride=stride, prompt_sets=prompt_sets,
                               bg_threshold=bg_threshold, templates=templates, logit_scale=logit_scale)
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
    with dense_mode_override(dense_modes[0] if dense_modes else None):
        runner, seg, spec = _open_for_inference(source.from_dir, source.model, source.pretrained, source.image_size)
    fixed = not hasattr(runner, "segmentor")
    if protocol == "paper":
        options = protocol_options(options, spec.dense_mode, data)
    runner, dataset, text, batch_size = open_inference(runner, seg, spec, data, split, limit, options, fixed_size=fixed)
    unknown = check_labels(dataset)
    metrics = evaluate(runner, dataset, text, batch_size=batch_size, desc=f"eval {runner.name}")
    metrics["unknown_label_pixels"] = unknown
    click.echo(f"{runner.name} ({spec.dense_mode}) on {dataset.name} ({split}, {len(dataset)} images), {spec.weights}; "
               f"{options.describe()}")
    for note in options.notes:
        click.echo(f"  note: {note}")
    click.echo(f"mIoU {metrics['miou']:.2f} %   pixel accuracy {metrics['pixel_acc']:.2f} %")
    if unknown:
        click.echo(f"  ignored: {unknown} mask pixels whose value is neither one of the {len(dataset.class_names)} "
                   f"classes nor the ignore index {dataset.ignore_index}")
    for name, iou in metrics["per_class_iou"].items():
        click.echo(f"  {name:<14} {'n/a' if iou is None else f'{iou:6.2f}'}")
    if out is not None:
        write_json(out, {"runner": runner.name, "dense_mode": spec.dense_mode, "weights": spec.weights,
                         "dataset": dataset.name, "split": split, "input": options.describe(),
                         "notes": list(options.notes), **metrics})


@cli.command(epilog='Example: opentrans segment street.png --classes "road,car,sky,building" '
                    "--from runs/quickstart/finetune --out street_overlay.png")
@click.argument("image", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--classes", required=True, help="Comma-separated class names, e.g. 'road,car,sky'.")
@model_options
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Overlay PNG to write.")
def segment(image, classes, source, out):
    """Segment one image with free-form class names and write an overlay PNG."""
    from opentrans.segment import segment_image

    from opentrans.artifacts import check_writable
    from opentrans.data.datasets import check_unique_classes

    check_writable(out)
    names = [c.strip() for c in classes.split(",") if c.strip()]
    if not names:
        raise OpenTransError("--classes: give at least one class name")
    check_unique_classes(names, "--classes")
    runner, seg, spec = _open_for_inference(source.from_dir, source.model, source.pretrained, source.image_size)
    # a deploy build encodes the class names with its own text graph (what a device runs); a model with PyTorch
    if getattr(runner, "text_encoder", None) is not None:  # every runner has encode_classes (opentrans.runtime)
        text, text_source = runner.encode_classes(names), "the build's text-encoder graph"
    else:
        text, text_source = seg.encode_classes(names, model_name=spec.model).numpy(), "the PyTorch text tower"
    result = segment_image(runner, image, names, text, spec.image_size, spec.mean, spec.std, out)
    shares = ", ".join(f"{k} {v:.1f} %" for k, v in sorted(result["shares"].items(), key=lambda kv: -kv[1]))
    click.echo(f"wrote {out} ({runner.name}, {spec.weights}; classes encoded by {text_source}): {shares}")


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
