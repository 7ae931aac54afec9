"""``opentrans run``: every stage of a recipe in order, into ``runs/NAME/STAGE/``, resumable.

With a ``bench`` stage the run first saves the unpruned starting model as ``runs/NAME/base/``: bench
measures it beside the pruned and finetuned models and every deploy build, as the reference for speed-ups
and teacher agreement.

A stage whose directory already holds a complete manifest with the same options is skipped, so a rerun
after an interruption continues where it stopped. Changing a stage's options reruns it and every stage
after it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from opentrans.artifacts import StageRecord, is_complete, read_json, write_json, write_text
from opentrans.models.artifact import SPEC_FILE, resolve_model, save_segmentor
from opentrans.models.clip import pickle_allowed
from opentrans.options import as_record
from opentrans.recipe import Recipe


def base_stage(out_dir: Path, model: str, pretrained: str, image_size: tuple[int, int] | None) -> dict:
    """Save the unpruned, untrained starting model as an artifact, so ``bench`` measures every variant
    (unpruned, pruned, finetuned) and holds each against the unpruned model (teacher agreement)."""
    started = time.perf_counter()
    seg, spec, _ = resolve_model(None, model, pretrained, image_size=image_size)
    with StageRecord("base", out_dir, {"model": model, "pretrained": pretrained, "image_size": image_size},
                     started=started) as rec:
        rec.add_output(save_segmentor(seg, spec, out_dir))
        rec.add_output(out_dir / SPEC_FILE)
        rec.weights = spec.weights
        rec.figures = {"params_m": sum(p.numel() for p in seg.visual.parameters()) / 1e6}
    return rec.figures


def _stage_plan(recipe: Recipe, root: Path) -> list[tuple[str, Path, dict, Callable[[], dict]]]:
    """(label, directory, options, thunk) for each stage of the recipe, in order."""
    from opentrans.bench import bench_stage
    from opentrans.deploy.stage import deploy_stage
    from opentrans.analyze.stage import analyze_stage
    from opentrans.finetune.stage import finetune_stage
    from opentrans.models.source import ModelSource
    from opentrans.prune.stage import prune_stage

    base = {"model": recipe.model, "pretrained": recipe.pretrained, "image_size": recipe.image_size}
    plan: list[tuple[str, Path, dict, Callable[[], dict]]] = []
    source: dict = {"from_dir": None, "model": recipe.model, "pretrained": recipe.pretrained,
                    "image_size": recipe.image_size}
    if recipe.bench is not None:
        out = root / "base"
        plan.append(("base", out, {**base}, lambda out=out: base_stage(out, recipe.model, recipe.pretrained,
                                                                      recipe.image_size)))
    if recipe.analyze is not None:
        out = root / "analyze"
        plan.append(("analyze", out, {**base, **as_record(recipe.analyze)},
                     lambda out=out, src=dict(source): analyze_stage(
                         ModelSource(**src, allow_pickle=recipe.allow_pickle), recipe.analyze, out)))
    if recipe.prune is not None:
        out, opts = root / "prune", as_record(recipe.prune)
        plan.append(("prune", out, {**base, **opts},
                     lambda out=out, src=dict(source): prune_stage(
                         ModelSource(**src, allow_pickle=recipe.allow_pickle), recipe.prune, out)))
        source = {"from_dir": out, "model": None, "pretrained": "none", "image_size": None}
    if recipe.finetune is not None:
        out, opts = root / "finetune", as_record(recipe.finetune)
        plan.append(("finetune", out, {**base, **opts, "data": recipe.data},
                     lambda out=out, src=dict(source): finetune_stage(
                         ModelSource(**src, allow_pickle=recipe.allow_pickle), recipe.finetune, out, recipe.data)))
        source = {"from_dir": out, "model": None, "pretrained": "none", "image_size": None}
    if recipe.deploy is not None:
        for b in recipe.deploy.builds:
            out, o = root / "deploy" / f"{b.target}-{b.precision}", recipe.deploy.options_for(b, recipe.data)
            record = recipe.deploy.record_for(b, recipe.data)
            plan.append((f"deploy {b.target}-{b.precision}", out, {**base, **record},
                         lambda out=out, src=ModelSource(**source, allow_pickle=recipe.allow_pickle), o=o:
                         deploy_stage(src, o, out)))
    if recipe.bench is not None:
        out, o = root / "bench", recipe.bench
        targets = [root / s for s in ("base", "prune", "finetune", "deploy")]
        plan.append(("bench", out, {**base, **as_record(o), "data": recipe.data},
                     lambda out=out, o=o, t=targets: bench_stage([p for p in t if p.exists()], o, out, recipe.data,
                                                                reference=root / "base")))
    return plan


def run_recipe(recipe: Recipe, runs_root: str | os.PathLike = "runs", force: bool = False,
               echo: Callable[[str], None] = print) -> Path:
    """Run every stage of ``recipe`` into ``runs_root/NAME/``; return the path of the run's report.

    Writes ``run.json`` (per-stage wall time and headline figures) and ``report.md`` at the run root.

    Raises:
        OpenTransError: from any stage (bad input, failed parity check, ...); finished stages are kept.
    """
    root = Path(runs_root) / recipe.name
    root.mkdir(parents=True, exist_ok=True)
    summary, rerun_rest = [], force
    for label, out, options, thunk in _stage_plan(recipe, root):
        done = is_complete(out) and read_json(out / "manifest.json").get("run_options") == _jsonable(options)
        if done and not rerun_rest:
            echo(f"[skip] {label}: finished earlier ({out})")
        else:
            rerun_rest = True  # everything downstream of a rerun stage is stale
            echo(f"[run ] {label} -> {out}")
            start = time.perf_counter()
            with pickle_allowed(recipe.allow_pickle):
                thunk()
            manifest = read_json(out / "manifest.json")
            manifest["run_options"] = _jsonable(options)
            write_json(out / "manifest.json", manifest)
            echo(f"[done] {label} in {time.perf_counter() - start:.1f} s")
        manifest = read_json(out / "manifest.json")
        summary.append({"stage": label, "dir": str(out), "wall_time_s": manifest["wall_time_s"],
                        "weights": manifest.get("weights"), "figures": manifest.get("figures", {})})
    write_json(root / "run.json", {"recipe": _jsonable(asdict(recipe)), "stages": summary})
    report = root / "report.md"
    write_text(report, _report_markdown(recipe, root, summary))
    return report


def _jsonable(obj):
    """``obj`` as it reads back from JSON (tuples -> lists, paths -> strings), for option comparison."""
    return json.loads(json.dumps(obj, default=str))


def _report_markdown(recipe: Recipe, root: Path, summary: list[dict]) -> str:
    weights = next((s["weights"] for s in summary if s["weights"]), "unknown weights")
    lines = [f"# Run {recipe.name}", "", f"Model {recipe.model}, **{weights}**, data `{recipe.data}`.", "",
             "| stage | wall time s | headline figures |", "|---|---:|---|"]
    for s in summary:
        figs = s["figures"]
        if s["stage"] == "bench":
            text = "; ".join(f"{k}: {v['median_ms']:.1f} ms, mIoU {v['miou']}" for k, v in figs.items())
        else:
            text = ", ".join(f"{k}={_short(v)}" for k, v in figs.items() if not isinstance(v, (dict, list)))
        lines.append(f"| {s['stage']} | {s['wall_time_s']:.1f} | {text} |")
    bench = root / "bench" / "bench.md"
    if bench.exists():
        lines += ["", bench.read_text().replace("# Benchmark", "## Benchmark", 1)]
    return "\n".join(lines) + "\n"


def _short(v):
    return f"{v:.4g}" if isinstance(v, float) else v
