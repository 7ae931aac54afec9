"""The ``analyze`` pipeline stage: per-layer heavy-tail alpha of the chosen towers.

:mod:`opentrans.analyze.spectral` measures (OpenTrans estimator, weightwatcher or both side by side); this stage
writes ``alphas.csv``, ``alphas.json``, ``alphas.png`` (bar chart), ``esd.png`` (ESD log-log plots with the fit of
chosen layers) and ``manifest.json`` (:class:`~opentrans.artifacts.StageRecord`). Every input is validated and
the analysis done before anything is written: on a user error it raises
:class:`~opentrans.errors.OpenTransError` and leaves ``out_dir`` untouched.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from opentrans.analyze.options import AnalyzeOptions
from opentrans.analyze.spectral import (
    TOWERS,
    LayerMatrix,
    SpectralReport,
    analyze_model,
    estimator_layers,
    write_alpha_report,
    write_esd_plot,
)
from opentrans.artifacts import StageRecord
from opentrans.errors import OpenTransError
from opentrans.models.source import ModelSource
from opentrans.options import as_record


def check_out_dir(out_dir: str | os.PathLike) -> Path:
    """``out_dir`` as a Path.

    Raises:
        OpenTransError: it exists and is not a folder.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OpenTransError(f"--out {out_dir}: exists and is not a folder")
    return out_dir


@dataclass
class AnalyzeResult:
    """What :func:`compute_analysis` measured.

    Attributes:
        report: the alphas the table uses (the first estimator: ``opentrans`` for ``both``).
        compare: weightwatcher's alphas beside them (``both`` only), else None.
        esd_layers: the layers ``esd.png`` plots, in order.
        matrices: ``{layer name: LayerMatrix}`` of the analysed layers (for the ESD plot).
        seconds: wall time of the analysis, all estimators (s).
    """

    report: SpectralReport
    compare: SpectralReport | None
    esd_layers: list[str]
    matrices: dict[str, LayerMatrix]
    seconds: float


def _chosen_esd_layers(report: SpectralReport, wanted: list[str] | None) -> list[str]:
    """``wanted`` (duplicates dropped), or the layers with the smallest, the median and the largest alpha.

    Raises:
        OpenTransError: a wanted name that is not an analysed layer.
    """
    if wanted:
        unknown = [n for n in wanted if n not in report.alphas()]
        if unknown:
            raise OpenTransError(f"--esd-layers: '{unknown[0]}' is not an analysed layer (see alphas.csv names)")
        return list(dict.fromkeys(wanted))
    ordered = sorted(report.layers, key=lambda la: la.alpha)
    return list(dict.fromkeys(la.name for la in (ordered[0], ordered[len(ordered) // 2], ordered[-1])))


def compute_analysis(seg, options: AnalyzeOptions) -> AnalyzeResult:
    """Alphas of ``seg``'s towers with ``options.estimator`` and the ESD layers to plot (writes nothing).

    Raises:
        OpenTransError: an unknown estimator/tower/ESD layer, or an encoder without analysable layers.
    """
    reports = analyze_model(seg, options.towers, options.estimator)
    report = next(iter(reports.values()))
    matrices = {lm.name: lm for t in options.towers
                for lm in estimator_layers(seg.get_submodule(TOWERS[t].rstrip(".")), TOWERS[t], options.estimator)}
    return AnalyzeResult(report=report, compare=reports.get("weightwatcher") if len(reports) == 2 else None,
                         esd_layers=_chosen_esd_layers(report, options.esd_layers), matrices=matrices,
                         seconds=sum(r.seconds for r in reports.values()))


def analyze_figures(result: AnalyzeResult, estimator: str) -> dict:
    """The manifest figures: ``layers_analysed``, ``excluded``, ``median_alpha`` (dimensionless), ``seconds``
    (wall time of the analysis, all estimators) and ``estimator``."""
    return {
        "layers_analysed": len(result.report.layers),
        "excluded": len(result.report.excluded),
        "median_alpha": round(result.report.median_alpha, 4),
        "seconds": round(result.seconds, 2),
        "estimator": estimator,
    }


def analyze_stage(source: ModelSource, options: AnalyzeOptions, out_dir: str | os.PathLike) -> dict:
    """Heavy-tail spectral analysis of a model's towers (``opentrans analyze``).

    Layer names are those of ``seg.named_modules()`` (``clip.visual.…``), so ``alphas.json`` applies
    directly to the segmentor. The analysis runs before anything is written.

    Args:
        source: the model (``--from`` or ``--model``/``--pretrained``/``--image-size``; the input size does not
            change the alphas).
        options: estimator (``opentrans``, the authors' estimator and layer set; ``opentrans-qkv``, ours;
            ``weightwatcher``; or ``both``: the table uses the authors' alphas, weightwatcher's, on the
            Q/K/V-split layer set, are written beside them), towers (``image`` and/or ``text``, see
            :data:`~opentrans.analyze.spectral.TOWERS`) and ``esd_layers`` (layer names for ``esd.png``;
            default: the layers with the smallest, the median and the largest alpha).
        out_dir: where ``alphas.csv``, ``alphas.json``, ``alphas.png``, ``esd.png`` and ``manifest.json`` go.

    Returns:
        The manifest figures (:func:`analyze_figures`).

    Raises:
        OpenTransError: bad model arguments (see :meth:`ModelSource.resolve`), an ``out_dir`` that is a file, an
            unknown estimator/tower/ESD layer, or an encoder without analysable layers.
    """
    started = time.perf_counter()
    options.check()
    out_dir = check_out_dir(out_dir)
    seg, spec, inputs = source.resolve()
    result = compute_analysis(seg, options)
    record = {**source.record(), **as_record(options.replace(esd_layers=result.esd_layers))}
    with StageRecord("analyze", out_dir, record, started=started) as rec:
        for path in inputs:
            rec.add_input(path)
        for path in write_alpha_report(result.report, out_dir, weights=spec.weights, compare=result.compare):
            rec.add_output(path)
        rec.add_output(write_esd_plot(out_dir / "esd.png", [result.matrices[n] for n in result.esd_layers],
                                      weights=spec.weights, estimator=options.estimator))
        rec.weights = spec.weights
        rec.figures = analyze_figures(result, options.estimator)
    return rec.figures
