"""The ``prune`` stage: load a model, prune its image encoder, write the model, reports and manifest.

Output directory::

    model.safetensors, model.json   the pruned segmentor (lineage gains "prune")
    kept_indices.json               which units (channels, heads, width) survive, relative to the original
                                    architecture: re-apply to other weights with ``--transfer-from``
    prune_report.json               the full report of :func:`~opentrans.prune.structured.prune_structured`
                                    plus measured latency and file sizes
    prune_report.md                 the same for people: cost before/after and the per-layer sizes
    manifest.json                   written last, status "complete"

Optionally the pruned model recovers by label-free distillation from the frozen unpruned one
(:func:`opentrans.prune.distill.recover`, as for IMP) and its fidelity to the unpruned model is measured on a
val dataset (teacher-agreement mIoU, dense feature cosine; :func:`opentrans.prune.imp_stage.fidelity`).
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
from pathlib import Path

import torch

from opentrans.artifacts import StageRecord, check_replaceable, read_json, staged_dir, write_json, write_text
from opentrans.errors import OpenTransError
from opentrans.models.artifact import SPEC_FILE, WEIGHTS_FILE, resolve_model, save_segmentor
from opentrans.prune.structured import (
    STRUCTURES,
    apply_kept_indices,
    check_kept_indices,
    check_targets,
    compose_kept,
    count_encoder_cost,
    original_sizes,
    prune_structured,
    structure_sizes,
    validate_prune_options,
)

REPORT_JSON = "prune_report.json"
REPORT_MD = "prune_report.md"
KEPT_FILE = "kept_indices.json"
KEPT_FORMAT = "opentrans.kept-indices/1"
#: Calibration images used by ``--importance taylor`` (the first ones of ``--distill-data``).
CALIBRATION_IMAGES = 8


def _change(before: float, after: float) -> str:
    return f"{100.0 * (after - before) / before:+.1f}%" if before else "n/a"


def render_markdown(report: dict, model: str, weights: str) -> str:
    """Markdown summary of a :func:`prune_structured` report (plus the stage's latency and sizes) for ``model``
    with weights ``weights``."""
    h, w = report["image_size"]
    lines = [f"# Prune report: {model}", ""]
    if report.get("transfer_from"):
        lines += [f"Weights: **{weights}**. Pruned shapes transferred from `{report['transfer_from']}` "
                  f"(kept indices re-applied, no scoring).", ""]
    else:
        lines += [
            f"Weights: **{weights}**. Importance `{report['importance']}` ({report['ranking']} ranking), "
            f"round_to {report['round_to']}.",
            "",
        ]
    lines += ["| Structure | units (original) | target | before | achieved | kept |", "|---|---:|---:|---:|---:|---:|"]
    for name, s in report["structures"].items():
        target = "n/a" if s.get("target") is None else f"{s['target']:.1%}"
        lines.append(f"| {name} | {s['original']} | {target} | {s['before']:.1%} | {s['achieved']:.1%} | {s['kept']} |")
    lines += [
        "",
        f"| Image encoder ({weights}, {h}x{w}, batch 1) | before | after | change |",
        "|---|---:|---:|---:|",
        f"| Params (M) | {report['params_m_before']:.4g} | {report['params_m_after']:.4g} | "
        f"{_change(report['params_m_before'], report['params_m_after'])} |",
        f"| GMACs (dense path) | {report['gmacs_before']:.4g} | {report['gmacs_after']:.4g} | "
        f"{_change(report['gmacs_before'], report['gmacs_after'])} |",
    ]
    if "weights_mb_before" in report:
        lines.append(f"| Weights, whole segmentor (MB, fp32) | {report['weights_mb_before']:.4g} | "
                     f"{report['weights_mb_after']:.4g} | {_change(report['weights_mb_before'], report['weights_mb_after'])} |")
    lat = report.get("latency")
    lat_ov = report.get("latency_openvino")
    if lat:
        lines.append(f"| Latency, torch CPU, {lat['threads']} threads (ms, median) | {lat['ms_before']:.4g} | "
                     f"{lat['ms_after']:.4g} | {_change(lat['ms_before'], lat['ms_after'])} |")
    if lat_ov:
        lines.append(f"| Latency, OpenVINO CPU f32, {lat_ov['threads']} threads (ms, median) | "
                     f"{lat_ov['ms_before']:.4g} | {lat_ov['ms_after']:.4g} | "
                     f"{_change(lat_ov['ms_before'], lat_ov['ms_after'])} |")
    lines += [
        "",
        "GMACs: matrix products and convolutions of the dense path the segmentor runs (element-wise ops not "
        "counted). Params: every parameter of the image tower.",
    ]
    if lat:
        lines.append(f"Latency (torch): image encoder dense path, batch 1, measured before and after pruning in the "
                     f"same run (interleaved, {lat['repeats']} rounds); speed-up {lat['speedup']:.2f}x for a MAC "
                     f"ratio (before / after) of {lat['mac_ratio']:.2f}x (ratio {lat['speedup'] / lat['mac_ratio']:.2f}).")
    if lat_ov:
        lines.append(f"Latency (OpenVINO): whole segmentor graph (ONNX -> IR, f32 inference precision, 11 classes), "
                     f"batch 1, same run, interleaved; speed-up {lat_ov['speedup']:.2f}x.")
    lines += ["", "| Structure | Layer | original | before | after |", "|---|---|---:|---:|---:|"]
    lines += [f"| {row.get('structure', 'channels')} | `{row['layer']}` | {row['original']} | {row['before']} | "
              f"{row['after']} |" for row in report["layers"]]
    rec = report.get("recovery")
    if rec:
        lines += ["", f"Recovery: {rec['steps']} label-free distillation steps on `{rec['distill_data']}`; distillation "
                  f"loss on a fixed batch {rec['loss_pruned']:.5f} after pruning -> {rec['loss_recovered']:.5f} after "
                  f"recovery."]
    fid = report.get("fidelity")
    if fid:
        lines += ["", f"Fidelity to the unpruned model on `{report['eval_data']}` val ({fid['images']} images, "
                  f"{weights}): teacher-agreement mIoU **{fid['teacher_miou']:.2f} %**, pixel agreement "
                  f"{fid['pixel_agreement']:.2f} %, dense feature cosine {fid['feature_cosine']:.4f}."]
    return "\n".join(lines) + "\n"


#: ``--latency-backends`` choices: the image encoder's dense path in eager torch, and the whole segmentor graph
#: exported to ONNX and converted to an OpenVINO IR (f32 inference precision).
LATENCY_BACKENDS = ("torch", "openvino")


def measure_latency(models: dict[str, torch.nn.Module], images: torch.Tensor, repeats: int = 3,
                    threads: int | None = None, backends: tuple[str, ...] = ("torch",),
                    work_dir: str | os.PathLike | None = None) -> dict[str, dict[str, float]]:
    """Median latency in milliseconds of each model on each back end, measured interleaved (round-robin over the
    models, :func:`opentrans.bench.latency.interleaved_ms`) with a fixed number of threads, so every model sees the
    same machine load and the before/after ratio is a side-by-side measurement.

    * ``torch``: ``model.dense_features(images)`` (the image encoder's dense path), eager, ``threads`` threads.
    * ``openvino``: the whole segmentor (``images`` and 11 random class embeddings in, logits out), exported with
      :func:`opentrans.deploy.export.export_onnx` into ``work_dir`` and compiled by OpenVINO with the f32
      inference-precision hint and ``threads`` inference threads.

    Args:
        models: ``{name: OpenVocabSegmentor}``; images: ``(1, 3, H, W)`` float32.
        repeats: timed rounds (one warm-up call per model first).
        backends: a subset of :data:`LATENCY_BACKENDS`.
        work_dir: folder for the ONNX/IR files of the ``openvino`` back end (required with it).

    Returns:
        ``{backend: {name: median ms}}``.

    Raises:
        OpenTransError: ``openvino`` without the openvino package or without ``work_dir``.
    """
    from opentrans.timing import interleaved_ms

    threads = threads or torch.get_num_threads()
    out: dict[str, dict[str, float]] = {}
    if "torch" in backends:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with torch.no_grad():
                calls = {name: (lambda m=m: m.eval().dense_features(images)) for name, m in models.items()}
                out["torch"] = interleaved_ms(calls, repeats)
        finally:
            torch.set_num_threads(previous)
    if "openvino" in backends:
        if work_dir is None:
            raise OpenTransError("OpenVINO latency needs a work folder for the exported models")
        from opentrans.deploy.targets.openvino import check_available

        check_available()
        import numpy as np
        import openvino as ov

        from opentrans.deploy.export import export_onnx

        x = images.numpy().astype(np.float32)
        dim = next(iter(models.values())).embed_dim
        text = np.random.default_rng(0).standard_normal((11, dim)).astype(np.float32)
        calls = {}
        for name, m in models.items():
            onnx_path = export_onnx(m.eval(), Path(work_dir) / f"latency_{name}.onnx")
            compiled = ov.Core().compile_model(ov.convert_model(str(onnx_path)), "CPU",
                                               {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads})
            request = compiled.create_infer_request()
            calls[name] = lambda r=request: r.infer({"images": x, "text_embeds": text})
        out["openvino"] = interleaved_ms(calls, repeats)
    return out


def _state_mb(seg: torch.nn.Module) -> float:
    return sum(t.numel() * t.element_size() for t in seg.state_dict().values()) / 1e6


def read_kept_indices(path: str | os.PathLike) -> dict:
    """The contents of a ``kept_indices.json`` (``{"format", "model", "base", "structures"}``).

    Raises:
        OpenTransError: a missing file or one of another format.
    """
    path = Path(path)
    if path.is_dir():
        path = path / KEPT_FILE
    if not path.is_file():
        raise OpenTransError(f"--transfer-from {path}: no {KEPT_FILE}; point it at the output of a structured prune")
    raw = read_json(path)
    if raw.get("format") != KEPT_FORMAT:
        raise OpenTransError(f"{path}: not an {KEPT_FORMAT} file")
    return raw


def transfer_structure(seg, model_name: str, kept: dict) -> dict:
    """Re-apply the pruned shapes of a ``kept_indices.json`` (indices relative to the original architecture) to
    ``seg``, an unpruned segmentor of that architecture with other weights (e.g. pretrained ones); in place.

    Args:
        seg: the segmentor to prune; kept: the file contents (see :func:`read_kept_indices`).

    Returns:
        ``{structure: {layer: kept count}}``.

    Raises:
        OpenTransError: indices for another architecture, indices relative to an already pruned input
            (``base`` other than ``original``), or a ``seg`` that is already pruned in one of the structures.
    """
    check_transfer(seg, model_name, kept)
    apply_kept_indices(seg, kept["structures"])
    return {s: {k: len(v) for k, v in layers.items()} for s, layers in kept["structures"].items()}


def check_transfer(seg, model_name: str, kept: dict) -> None:
    """The checks of :func:`transfer_structure`, without changing anything.

    Raises:
        OpenTransError: see :func:`transfer_structure`.
    """
    if kept.get("model") != model_name:
        raise OpenTransError(f"kept indices are for {kept.get('model')}, not {model_name}")
    if kept.get("base") != "original":
        raise OpenTransError("these kept indices are relative to an already pruned model, not to the original "
                             "architecture; they cannot be transferred")
    structures = kept["structures"]
    for structure in structures:
        if structure not in STRUCTURES:
            raise OpenTransError(f"unknown structure '{structure}' in kept indices")
        if structure_sizes(seg, structure) != original_sizes(seg, model_name, structure):
            raise OpenTransError(f"--transfer-from needs an unpruned model; this one has pruned {structure}")
    check_kept_indices(seg, structures)


def prune_stage(from_dir: str | os.PathLike | None, model: str | None, pretrained: str,
                out_dir: str | os.PathLike, sparsity: float | None = None, importance: str = "magnitude",
                round_to: int | None = 8, image_size: tuple[int, int] | None = None, recovery_steps: int = 0,
                distill_data: str | None = None, distill_limit: int | None = None, batch_size: int = 4,
                lr: float = 1e-5, seed: int = 0, eval_data: str | None = None, eval_limit: int | None = 8,
                structures: str | tuple[str, ...] = "channels", head_sparsity: float | None = None,
                width_sparsity: float | None = None, ranking: str | None = None,
                transfer_from: str | os.PathLike | None = None, latency_repeats: int = 3,
                latency_backends: str | tuple[str, ...] = LATENCY_BACKENDS) -> dict:
    """Prune a model's image encoder and write the result into ``out_dir``.

    Args:
        from_dir: the output directory of an earlier stage (``--from``), or None.
        model, pretrained: open_clip architecture and weights (``none``, a tag or a path) when ``from_dir`` is
            None; see :func:`opentrans.models.artifact.resolve_model`.
        out_dir: stage directory; gets ``model.safetensors``, ``model.json``, ``kept_indices.json``,
            ``prune_report.json``, ``prune_report.md`` and ``manifest.json``.
        sparsity: target fraction in (0, 1) of prunable channels removed, relative to the original
            architecture (so pruning an already pruned model composes; see :func:`prune_structured`); also the
            default target of ``heads``/``width``. Not used with ``transfer_from``.
        importance: ``magnitude``, ``lamp`` or ``taylor`` (needs ``distill_data``: its first
            :data:`CALIBRATION_IMAGES` images are the calibration batch).
        round_to: kept channel/width counts rounded to a multiple of this; None or 1 for none.
        image_size: network input (H, W) in pixels for a fresh ``--model`` (default: CamVid-shaped).
        recovery_steps, distill_data, distill_limit, batch_size, lr, seed: optional label-free distillation
            recovery after pruning (0 steps: none), as for IMP (see :func:`opentrans.prune.imp_stage.imp_stage`).
        eval_data, eval_limit: val dataset (``FORMAT:PATH``, first ``eval_limit`` images) for fidelity to the
            unpruned model (``teacher_miou`` %, ``feature_cosine``); None skips it.
        structures, head_sparsity, width_sparsity, ranking: what to prune and how (see :func:`prune_structured`).
        transfer_from: a structured-prune output directory (or its ``kept_indices.json``): re-apply its kept
            indices to this (unpruned) model instead of scoring.
        latency_repeats: rounds of the before/after latency measurement (0: not measured).
        latency_backends: ``torch`` and/or ``openvino`` (comma-separated string or tuple; see
            :func:`measure_latency`), measured before and after pruning in the same run.

    Returns:
        The manifest's figures: ``params_m_before/after`` (M params), ``gmacs_before/after`` (GMACs, dense path,
        batch 1), ``sparsity`` (achieved fraction) and ``sparsity_target`` and, when measured,
        ``latency_ms_before/after`` and ``speedup``.

    Raises:
        OpenTransError: invalid options, both or neither model sources, ``image_size`` with ``from_dir``,
            ``out_dir`` equal to ``from_dir``, a target below the model's current sparsity, bad recovery
            options, recovery steps without ``distill_data``, ``taylor`` without ``distill_data``, an empty
            image folder, an unusable ``transfer_from``, an ``out_dir`` that may not be replaced (a file, a
            non-empty directory that is not a finished stage, or one holding files its stage did not write). All of
            these are checked before anything is written. The stage writes beside ``out_dir`` and renames its
            directory onto it only once complete (:func:`opentrans.artifacts.staged_dir`): a failed rerun, e.g. on a
            full disk, leaves an earlier artifact there intact.
    """
    from opentrans.prune.distill import check_recovery_options, evaluate_distill_loss, open_images, recover

    started = time.perf_counter()
    kept_src = None
    if transfer_from is not None:
        kept_src = read_kept_indices(transfer_from)
        parsed = tuple(s for s in STRUCTURES if s in kept_src["structures"])
    else:
        if sparsity is None:
            raise OpenTransError("--sparsity is required (a fraction in (0, 1), e.g. 0.5), or --transfer-from DIR")
        parsed = validate_prune_options(sparsity, importance, round_to, structures, head_sparsity, width_sparsity,
                                        ranking)
    check_recovery_options(recovery_steps, batch_size, lr)
    if isinstance(latency_repeats, bool) or not isinstance(latency_repeats, int) or latency_repeats < 0:
        raise OpenTransError(f"--latency-repeats {latency_repeats}: must be an integer >= 0")
    if isinstance(latency_backends, str):
        latency_backends = tuple(b.strip() for b in latency_backends.split(",") if b.strip())
    unknown = [b for b in latency_backends if b not in LATENCY_BACKENDS]
    if unknown or not latency_backends:
        raise OpenTransError(f"--latency-backends {','.join(latency_backends)}: choose from {', '.join(LATENCY_BACKENDS)}")
    if latency_repeats and "openvino" in latency_backends:
        from opentrans.deploy.targets.openvino import check_available

        check_available()
    if recovery_steps > 0 and distill_data is None:
        raise OpenTransError(f"--recovery-steps {recovery_steps} needs --distill-data (a folder of images); "
                             f"or pass --recovery-steps 0")
    if importance == "taylor" and distill_data is None and kept_src is None:
        raise OpenTransError("--importance taylor needs --distill-data (unlabeled calibration images)")
    out_dir = Path(out_dir)
    if from_dir is not None and image_size is not None:
        raise OpenTransError("--image-size applies to a fresh --model only; a --from model keeps its input size")
    if from_dir is not None and Path(from_dir).resolve() == out_dir.resolve():
        raise OpenTransError(f"--out {out_dir} is the --from directory; write the pruned model somewhere else")
    check_replaceable(out_dir)
    seg, spec, inputs = resolve_model(from_dir, model, pretrained, image_size=image_size)
    if kept_src is not None:
        check_transfer(seg, spec.model, kept_src)
    else:
        targets = {"channels": sparsity, "heads": head_sparsity or sparsity, "width": width_sparsity or sparsity}
        check_targets(seg, spec.model, {s: targets[s] for s in parsed})
    previous_kept, base = None, "original"
    if from_dir is not None:
        if (Path(from_dir) / KEPT_FILE).is_file():
            previous_kept = read_kept_indices(Path(from_dir) / KEPT_FILE)
            base = previous_kept.get("base", "input")
            previous_kept = previous_kept["structures"]
        elif any(structure_sizes(seg, s) != original_sizes(seg, spec.model, s) for s in STRUCTURES):
            base = "input"  # pruned by something that left no kept indices: they can only be relative to it
    need_images = recovery_steps > 0 or (importance == "taylor" and kept_src is None)
    distill = evalset = None
    if need_images:
        distill = open_images(distill_data, spec.image_size, spec.mean, spec.std, limit=distill_limit)
    if eval_data is not None:
        from opentrans.data import open_dataset

        evalset = open_dataset(eval_data, "val", spec.image_size, spec.mean, spec.std, limit=eval_limit)
    teacher = copy.deepcopy(seg).eval().requires_grad_(False) if (recovery_steps or evalset or latency_repeats) else None

    options = {
        "from": None if from_dir is None else str(from_dir),
        "model": spec.model,
        "pretrained": spec.pretrained,
        "image_size": list(spec.image_size),
    }
    if kept_src is None:
        options |= {"sparsity": sparsity, "importance": importance, "round_to": round_to,
                    "structures": ",".join(parsed)}
        if head_sparsity is not None or width_sparsity is not None or ranking is not None:
            options |= {"head_sparsity": head_sparsity, "width_sparsity": width_sparsity, "ranking": ranking}
    else:
        options["transfer_from"] = str(transfer_from)
    if recovery_steps:
        options |= {"recovery_steps": recovery_steps, "distill_data": distill_data, "distill_limit": distill_limit,
                    "batch_size": batch_size, "lr": lr, "seed": seed}
    # written beside --out and renamed onto it only once complete: a failed rerun leaves the old artifact
    with staged_dir(out_dir) as staging, StageRecord("prune", staging, options, started=started) as rec:
        for path in inputs:
            rec.add_input(path)
        if kept_src is not None:
            src_path = Path(transfer_from)
            rec.add_input(src_path / KEPT_FILE if src_path.is_dir() else src_path)
        weights_mb_before = _state_mb(seg)
        if kept_src is not None:
            before = {s: structure_sizes(seg, s) for s in parsed}
            originals = {s: original_sizes(seg, spec.model, s) for s in parsed}
            cost_before = count_encoder_cost(seg)
            transfer_structure(seg, spec.model, kept_src)
            cost_after = count_encoder_cost(seg)
            after = {s: structure_sizes(seg, s) for s in parsed}
            report = {
                "transfer_from": str(transfer_from), "importance": None, "ranking": None, "round_to": None,
                "structures": {s: {"target": None, "before": 0.0,
                                   "achieved": 1 - sum(after[s].values()) / sum(originals[s].values()),
                                   "original": sum(originals[s].values()), "kept": sum(after[s].values())}
                               for s in parsed},
                "image_size": list(seg.image_size),
                "params_m_before": cost_before["params_m"], "params_m_after": cost_after["params_m"],
                "gmacs_before": cost_before["gmacs"], "gmacs_after": cost_after["gmacs"],
                "macs_reduction": 1 - cost_after["gmacs"] / cost_before["gmacs"],
                "layers": [{"structure": s, "layer": k, "original": originals[s][k], "before": before[s][k],
                            "after": after[s][k]} for s in parsed for k in before[s]],
            }
            first = parsed[0]
            report |= {"sparsity_target": None, "sparsity_before": 0.0, "sparsity": report["structures"][first]["achieved"]}
            kept_out = {"format": KEPT_FORMAT, "model": spec.model, "base": "original",
                        "structures": kept_src["structures"]}
        else:
            calibration = None
            if importance == "taylor":
                calibration = torch.stack([distill[i] for i in range(min(len(distill), CALIBRATION_IMAGES))])
            report = prune_structured(seg, sparsity, importance, round_to, model_name=spec.model, structures=parsed,
                                      head_sparsity=head_sparsity, width_sparsity=width_sparsity, ranking=ranking,
                                      calibration=calibration, seed=seed)
            originals = {s: original_sizes(seg, spec.model, s) for s in STRUCTURES}
            kept_out = {"format": KEPT_FORMAT, "model": spec.model, "base": base,
                        "structures": compose_kept(previous_kept, report.pop("kept_indices"), originals)}
        report = {"model": spec.model, "weights": spec.weights, **report}
        if latency_repeats:
            probe = torch.randn(1, 3, *spec.image_size, generator=torch.Generator().manual_seed(0))
            with tempfile.TemporaryDirectory(prefix=".latency-", dir=staging) as work:
                per_backend = measure_latency({"before": teacher, "after": seg}, probe, latency_repeats,
                                              backends=latency_backends, work_dir=work)
            for backend, ms in per_backend.items():
                report["latency" if backend == "torch" else f"latency_{backend}"] = {
                    "backend": backend, "ms_before": ms["before"], "ms_after": ms["after"],
                    "speedup": ms["before"] / ms["after"], "mac_ratio": report["gmacs_before"] / report["gmacs_after"],
                    "repeats": latency_repeats, "threads": torch.get_num_threads(), "batch": 1}
        if distill is not None and recovery_steps > 0:
            probe = torch.stack([distill[i] for i in range(min(len(distill), batch_size))])
            loss_pruned = evaluate_distill_loss(seg, teacher, probe)
            losses = recover(seg, teacher, distill, recovery_steps, [], batch_size, lr, seed)
            report["recovery"] = {"steps": recovery_steps, "distill_data": distill_data, "loss_pruned": loss_pruned,
                                  "loss_recovered": evaluate_distill_loss(seg, teacher, probe), "train_losses": losses}
        if evalset is not None:
            from opentrans.prune.imp_stage import fidelity

            text = teacher.encode_classes(list(evalset.class_names), model_name=spec.model)
            report["eval_data"] = eval_data
            report["fidelity"] = fidelity(seg, teacher, evalset, text)
        spec.lineage.append("prune")
        rec.add_output(save_segmentor(seg, spec, staging))
        rec.add_output(staging / SPEC_FILE)
        rec.add_output(write_json(staging / KEPT_FILE, kept_out))
        report["weights_mb_before"] = weights_mb_before
        report["weights_mb_after"] = _state_mb(seg)
        report["file_mb"] = (staging / WEIGHTS_FILE).stat().st_size / 1e6
        rec.add_output(write_json(staging / REPORT_JSON, report))
        rec.add_output(write_text(staging / REPORT_MD, render_markdown(report, spec.model, spec.weights)))
        rec.weights = spec.weights
        rec.figures = {
            "params_m_before": report["params_m_before"],
            "params_m_after": report["params_m_after"],
            "gmacs_before": report["gmacs_before"],
            "gmacs_after": report["gmacs_after"],
            "sparsity": report["sparsity"],
            "sparsity_target": report["sparsity_target"],
            "file_mb": report["file_mb"],
        }
        for key, suffix in (("latency", ""), ("latency_openvino", "_openvino")):
            if key in report:
                rec.figures |= {f"latency_ms_before{suffix}": report[key]["ms_before"],
                                f"latency_ms_after{suffix}": report[key]["ms_after"],
                                f"speedup{suffix}": report[key]["speedup"]}
        if evalset is not None:
            rec.figures["teacher_miou"] = report["fidelity"]["teacher_miou"]
            rec.figures["feature_cosine"] = report["fidelity"]["feature_cosine"]
    return rec.figures
