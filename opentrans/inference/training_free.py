"""Training-free evaluation across dense modes: mIoU and latency per mode, as a table and a plot.

:func:`open_inference` assembles what ``opentrans eval`` runs (dataset, short-side resize, sliding windows,
prompt sets and background threshold around a runner); :func:`evaluate_modes` runs it for several modes of
one set of weights and :func:`write_modes_report` writes ``<stem>.json``, ``<stem>.md`` and ``<stem>.png``.
Latency is the median wall time of one runner call on one image (batch 1), sliding windows included, so it
is what a user of that configuration waits per image on the machine the report names.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from opentrans.artifacts import atomic_path, machine_description, write_json, write_text
from opentrans.data import open_dataset
from opentrans.errors import OpenTransError
from opentrans.inference.evaluate import TorchRunner, evaluate
from opentrans.inference.options import InferenceOptions
from opentrans.inference.sliding import (
    LogitScaleRunner,
    PromptSetRunner,
    ShortSideDataset,
    SlidingWindowRunner,
    cached_text_embeddings,
    encode_prompt_sets,
    read_prompt_sets,
    read_templates,
)
from opentrans.models.dense import DENSE
from opentrans.models.segmentor import DENSE_MODES


def parse_modes(value: str | None) -> list[str] | None:
    """``--dense-mode`` value -> list of modes: ``all``, one mode or a comma-separated list; None stays None.

    Raises:
        OpenTransError: an unknown mode or an empty list.
    """
    if value is None:
        return None
    modes = list(DENSE_MODES) if value.strip() == "all" else [m.strip() for m in value.split(",") if m.strip()]
    unknown = [m for m in modes if m not in DENSE_MODES]
    if unknown or not modes:
        raise OpenTransError(f"--dense-mode {value}: choose from {', '.join(DENSE_MODES)}, a comma-separated list, or all")
    return list(dict.fromkeys(modes))


def paper_protocol(mode: str, data_format: str) -> dict:
    """The settings of ``mode``'s paper for a ``--data`` format, merged: each mode's ``PROTOCOL`` registered with it
    (:class:`opentrans.models.dense.DenseMode`, e.g. ``opentrans/models/dense/sclip.py``), taken from the authors'
    configs: ``"*"`` holds the settings of every dataset, a ``--data`` format key (``coco-object``, ``voc``, ...)
    what differs for it; ``"source"`` names the files, ``"notes"`` what OpenTrans does not reproduce.
    ``templates: "imagenet80"`` is CLIP's 80 ImageNet templates; ``templates: None`` with ``needs_templates`` means
    the authors used a file OpenTrans does not ship. ``window: None`` is whole-image inference (at ``short_side``).

    Returns:
        ``{"settings": {option: value}, "source": str, "notes": tuple[str, ...]}``; for a mode without a recorded
        protocol (``maskclip``: MaskCLIP's own mmseg configs were not transcribed) empty settings and one note.
    """
    table = DENSE.get(mode).protocol if mode in DENSE else None
    if table is None:
        return {"settings": {}, "source": "", "notes": (f"no paper protocol recorded for {mode}: the given options "
                                                         "are used",)}
    settings = dict(table["*"])
    extra = dict(table.get(data_format, {}))
    notes = tuple(table.get("notes", ())) + tuple(extra.pop("notes", ()))
    settings.update(extra)
    return {"settings": settings, "source": table["source"], "notes": notes}


def protocol_options(options: InferenceOptions, mode: str, data: str) -> InferenceOptions:
    """``options`` with every option the user left unset taken from ``mode``'s paper protocol for the format of
    ``data`` (``FORMAT:PATH``); options given explicitly win. ``notes`` lists what is not reproduced.

    Raises:
        OpenTransError: the protocol needs a template file OpenTrans does not ship (CLIPer's own templates) and
            none was given.
    """
    fmt = data.partition(":")[0]
    proto = paper_protocol(mode, fmt)
    settings = dict(proto["settings"])
    if settings.pop("needs_templates", False) and not options.templates:
        raise OpenTransError(f"--protocol paper --dense-mode {mode} on {fmt}: CLIPer averages its own 15 templates "
                             "(linsun449/cliper.code template/car_template.txt), which OpenTrans does not ship; pass "
                             "that file with --templates")
    updates = {}
    for key, value in settings.items():
        given = getattr(options, key)
        if key == "stride" and options.window is not None:
            continue  # a window given by hand keeps its own (or the default) stride
        if given is None:
            updates[key] = value
    source = (f"paper protocol of {mode}: {proto['source']}",) if proto["source"] else ()
    return replace(options, **updates, notes=tuple(options.notes) + source + tuple(proto["notes"]))


def open_inference(runner, seg, spec, data: str, split: str, limit: int | None, options: InferenceOptions,
                   fixed_size: bool = False):
    """``(runner, dataset, text embeddings, batch size)`` for evaluation with ``options``.

    Args:
        runner: the base runner (PyTorch model or a deploy build).
        seg, spec: the segmentor whose text tower encodes the classes, and its spec.
        fixed_size: the runner takes only ``spec.image_size`` (an ONNX/OpenVINO build): ``short_side`` then
            needs a window of exactly that size.

    Raises:
        OpenTransError: inconsistent options (a threshold on a dataset without background class, a stride
            without window, a window that a fixed-size build cannot run, prompt sets of the wrong length), or a
            window or short side whose forward pass needs more memory than is available.
    """
    if options.stride and not options.window:
        raise OpenTransError("--stride needs --window")
    if fixed_size and options.window and tuple(options.window) != tuple(spec.image_size):
        raise OpenTransError(f"--window {options.window[0]}x{options.window[1]}: this build runs only at its input "
                             f"size {spec.image_size[0]}x{spec.image_size[1]}")
    if fixed_size and options.short_side and not options.window:
        raise OpenTransError("--short-side with a deploy build needs --window (the build's input size)")
    templates = read_templates(options.templates) if options.templates else None
    if options.logit_scale is not None or options.cliper_keep is not None:
        runner = LogitScaleRunner(runner, seg, options.logit_scale, options.cliper_keep)
    dataset = open_dataset(data, split, spec.image_size, spec.mean, spec.std, limit=limit)
    batch_size = 4
    if options.short_side:
        dataset = ShortSideDataset.wrap(dataset, options.short_side)
        batch_size = 1
    if not fixed_size and (options.window or options.short_side) and len(dataset):
        from opentrans.models.segmentor import check_inference_memory

        if options.window:  # the model runs on window-sized crops (an image below the window is padded to it)
            hw, what = tuple(options.window), f"--window {options.window[0]}x{options.window[1]}"
        else:  # the model runs on the whole short-side-resized image; the first image's aspect stands for all
            h0, w0 = dataset.load_image(0)[1]
            scale = options.short_side / min(h0, w0)
            hw, what = (max(1, round(h0 * scale)), max(1, round(w0 * scale))), f"--short-side {options.short_side}"
        check_inference_memory(seg, hw, what, classes=len(dataset.class_names))
    if options.window:
        stride = options.stride or (max(1, options.window[0] // 2), max(1, options.window[1] // 2))
        runner = SlidingWindowRunner(runner, options.window, stride)
        batch_size = 1
    if options.prompt_sets or options.bg_threshold is not None:
        if options.bg_threshold is not None and dataset.background_index is None:
            raise OpenTransError(f"--bg-threshold: {dataset.name} has no background class")
        sets = read_prompt_sets(options.prompt_sets) if options.prompt_sets else [[n] for n in dataset.class_names]
        if len(sets) != len(dataset.class_names):
            raise OpenTransError(f"--prompt-sets {options.prompt_sets}: {len(sets)} lines for "
                                 f"{len(dataset.class_names)} classes (one line per class, in label order)")
        text, index = encode_prompt_sets(seg, sets, spec.model, options.cache_dir, templates)
        runner = PromptSetRunner(runner, index, len(dataset.class_names), options.bg_threshold,
                                 dataset.background_index or 0)
    else:
        text = cached_text_embeddings(seg, list(dataset.class_names), spec.model, options.cache_dir, templates)
    return runner, dataset, text, batch_size


@dataclass
class EvalResult:
    """One runner's evaluation on one dataset (what ``opentrans eval`` prints and writes).

    Attributes:
        record: JSON-able ``{"runner", "dense_mode", "weights", "dataset", "split", "input", "notes", "miou",
            "pixel_acc", "per_class_iou", "images", "unknown_label_pixels"}`` (percentages).
        ignore_index: the dataset's ignore label (named when mask pixels outside the classes were ignored).
    """

    record: dict
    ignore_index: int


def evaluate_one(runner, seg, spec, data: str, split: str, limit: int | None, options: InferenceOptions,
                 protocol: str | None = None) -> EvalResult:
    """mIoU, pixel accuracy and per-class IoU of ``runner`` (PyTorch or a deploy build, see :func:`open_inference`)
    on ``data``; with ``protocol="paper"`` the options the user left unset come from the mode's paper
    (:func:`protocol_options`).

    Raises:
        OpenTransError: as :func:`open_inference`.
    """
    from opentrans.data.datasets import check_labels

    fixed = not isinstance(runner, TorchRunner)  # a deploy build takes the input size it was exported at
    if protocol == "paper":
        options = protocol_options(options, spec.dense_mode, data)
    runner, dataset, text, batch_size = open_inference(runner, seg, spec, data, split, limit, options, fixed_size=fixed)
    unknown = check_labels(dataset)
    metrics = evaluate(runner, dataset, text, batch_size=batch_size, desc=f"eval {runner.name}")
    metrics["unknown_label_pixels"] = unknown
    record = {"runner": runner.name, "dense_mode": spec.dense_mode, "weights": spec.weights, "dataset": dataset.name,
              "split": split, "input": options.describe(), "notes": list(options.notes), **metrics}
    return EvalResult(record, dataset.ignore_index)


def eval_text(result: EvalResult) -> str:
    """The console report of :func:`evaluate_one`: header, paper-protocol notes, mIoU and pixel accuracy, ignored
    pixels, and one line per class."""
    r = result.record
    lines = [f"{r['runner']} ({r['dense_mode']}) on {r['dataset']} ({r['split']}, {r['images']} images), "
             f"{r['weights']}; {r['input']}"]
    lines += [f"  note: {note}" for note in r["notes"]]
    lines.append(f"mIoU {r['miou']:.2f} %   pixel accuracy {r['pixel_acc']:.2f} %")
    if r["unknown_label_pixels"]:
        lines.append(f"  ignored: {r['unknown_label_pixels']} mask pixels whose value is neither one of the "
                     f"{len(r['per_class_iou'])} classes nor the ignore index {result.ignore_index}")
    lines += [f"  {name:<14} {'n/a' if iou is None else f'{iou:6.2f}'}" for name, iou in r["per_class_iou"].items()]
    return "\n".join(lines)


class _Timed:
    """A runner that records the wall time of each call, in ms per image."""

    def __init__(self, runner):
        self.runner, self.name, self.ms = runner, runner.name, []

    def __call__(self, images: np.ndarray, text_embeds: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        out = self.runner(images, text_embeds)
        self.ms.append(1000.0 * (time.perf_counter() - t0) / len(images))
        return out


def evaluate_modes(seg, spec, modes: list[str], data: str, split: str = "val", limit: int | None = None,
                   options: InferenceOptions | None = None, warmup: int = 1, desc: bool = False,
                   protocol: str | None = None) -> dict:
    """mIoU (%) and latency (median ms per image, batch 1) of each dense mode of one PyTorch segmentor.

    The segmentor's mode is switched in place (every mode shares the weights) and restored afterwards.
    ``warmup`` untimed calls on the first image precede each mode's timed evaluation. With ``protocol="paper"``
    each mode runs under its own paper's settings (:func:`protocol_options`; options given explicitly win), and
    each row records its ``input`` and ``notes``.

    Returns:
        ``{"header": {...}, "rows": [{"mode", "miou", "pixel_acc", "median_ms", "p90_ms", "images", "input",
        "notes"}, ...]}``.
    """
    options = options or InferenceOptions()
    original = seg.dense_mode
    rows = []
    try:
        for mode in modes:
            seg.set_dense_mode(mode)
            mode_options = protocol_options(options, mode, data) if protocol == "paper" else options
            runner, dataset, text, batch_size = open_inference(TorchRunner(seg, name=f"torch-fp32 {mode}"), seg, spec,
                                                               data, split, limit, mode_options)
            first = dataset[0][0][None].numpy()
            for _ in range(warmup):
                runner(first, text)
            timed = _Timed(runner)
            metrics = evaluate(timed, dataset, text, batch_size=1,
                               desc=f"eval {mode}" if desc else None)
            rows.append({"mode": mode, "miou": metrics["miou"], "pixel_acc": metrics["pixel_acc"],
                         "median_ms": statistics.median(timed.ms), "p90_ms": float(np.percentile(timed.ms, 90)),
                         "images": metrics["images"], "input": mode_options.describe(),
                         "notes": list(mode_options.notes)})
    finally:
        seg.set_dense_mode(original)
    header = {"model": spec.model, "weights": spec.weights, "dataset": dataset.name, "split": split,
              "images": len(dataset),
              "input": options.describe() if protocol != "paper" else "each mode's paper protocol (see each row)",
              "image_size": list(spec.image_size), "machine": machine_description()}
    return {"header": header, "rows": rows}


def markdown_modes(report: dict) -> str:
    """The report as a markdown table, with model, weights, data and machine above it."""
    h = report["header"]
    machine = h.get("machine", {})
    lines = [f"**{h['model']}, {h['weights']}** on {h['dataset']} ({h['split']}, {h['images']} images); "
             f"input: {h['input']}; model input {h['image_size'][0]}x{h['image_size'][1]}.",
             f"Latency: median (p90) ms per image, batch 1, PyTorch fp32 on {machine.get('cpu', 'this CPU')}, "
             f"{machine.get('logical_cores', '?')} logical cores.", "",
             "| mode | mIoU % | pixel acc. % | median ms | p90 ms |", "|---|---:|---:|---:|---:|"]
    for r in report["rows"]:
        lines.append(f"| {r['mode']} | {r['miou']:.2f} | {r['pixel_acc']:.2f} | {r['median_ms']:.1f} | {r['p90_ms']:.1f} |")
    if any(r.get("input", h["input"]) != h["input"] or r.get("notes") for r in report["rows"]):
        lines.append("")
        for r in report["rows"]:
            notes = "; ".join(r.get("notes") or [])
            lines.append(f"* {r['mode']}: {r.get('input', h['input'])}" + (f". {notes}" if notes else ""))
    return "\n".join(lines) + "\n"


def plot_modes(reports: list[dict], path: str | os.PathLike) -> Path:
    """One panel per report: mIoU bars per mode, with median latency (ms) written on each bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(reports), figsize=(5.5 * len(reports), 4), squeeze=False)
    for ax, rep in zip(axes[0], reports):
        rows, h = rep["rows"], rep["header"]
        xs = range(len(rows))
        bars = ax.bar(xs, [r["miou"] for r in rows], color="tab:blue")
        for bar, r in zip(bars, rows):
            ax.annotate(f"{r['median_ms']:.0f} ms", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        textcoords="offset points", xytext=(0, 3), ha="center", fontsize=8)
        ax.set_xticks(list(xs), [r["mode"] for r in rows])
        ax.set_ylabel("mIoU %")
        ax.set_title(f"{h['model']} ({h['weights']})\n{Path(h['dataset'].split(':', 1)[-1]).name}, "
                     f"{h['images']} images\n{h['input']}", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return Path(path)


def write_modes_report(report: dict, json_path: str | os.PathLike) -> list[Path]:
    """Write ``json_path`` and, beside it, ``.md`` and ``.png`` with the same stem; return the three paths."""
    json_path = Path(json_path)
    js = write_json(json_path, report)
    md = write_text(json_path.with_suffix(".md"), markdown_modes(report))
    png = plot_modes([report], json_path.with_suffix(".png"))
    return [js, md, png]
