"""Per-layer heavy-tailed spectral analysis of CLIP's towers (the ``analyze`` stage), three estimators.

* :func:`analyze_opentrans` (``--estimator opentrans``, the default): the OpenTrans authors' estimator and
  layer set, as their released code computes them (github.com/Xujxyang/OpenTrans at commit
  aea33ff3682403aec6d55a670030d6cb4b0623cd, ``utils.py``: ``get_module_names_shapes`` l. 211-233,
  ``matrix_esd_estimator`` l. 235-317, ``net_esd_estimator`` l. 320-423; called from ``plain_train_net.py``
  l. 400-411 with ``fix_fingers='xmin_peak'``, ``EVALS_THRESH=1e-5``, ``bins=100`` and the default
  ``conv_norm=0.5``): :func:`authors_layers` + :func:`esd` with ``conv_norm`` + :func:`fit_power_law_authors`.
  Only modules whose class is named ``Conv2d``, ``Conv1d`` or ``Linear`` get an alpha, so the fused Q/K/V
  ``in_proj_weight`` and ``out_proj`` (class ``NonDynamicallyQuantizableLinear``) of ``nn.MultiheadAttention``
  get none and the RGB patch/stem ``conv1`` does (ViT-B-16 image tower: 25 matrices); conv weights are scaled
  by ``sqrt(0.5)`` before the ESD; the xmin window's lower bound is ``log10(0.95 * peak)`` (their line; in
  effect no lower bound).
* :func:`analyze_opentrans_qkv` (``--estimator opentrans-qkv``, **ours**): the same Hill fit with our
  corrections: every Q, K and V row block and ``out_proj`` of a fused attention analysed, the RGB-input conv
  left out (rank <= 3 slices), no conv scaling, and the xmin window ``[0.95, 1.5] x`` the ESD peak with the
  lower bound unlogged (:func:`fit_power_law`; ViT-B-16 image tower: 72 matrices). It agrees with the authors'
  estimator on every ViT matrix both analyse (max |diff alpha| 1.5e-4 measured), but the median split over the
  two layer sets agrees on only 19 of the 24 common ViT-B-16 layers and 47 of the 58 common RN50 layers.
* :func:`analyze_weightwatcher` / :func:`analyze_spectrum`: weightwatcher 0.7.7, described below (on our
  Q/K/V-split layer set).
* :func:`analyze_model`: one estimator or ``both`` (the authors' estimator beside weightwatcher), over the
  ``image`` and/or ``text`` tower.

For every ``nn.Linear`` and ``nn.Conv2d`` weight W of the module, weightwatcher (Martin & Mahoney,
"Implicit Self-Regularization in Deep Neural Networks", JMLR 22(165), 2021; Martin, Peng & Mahoney,
"Predicting trends in the quality of state-of-the-art neural networks without access to training or
testing data", Nature Communications 12, 4122, 2021) computes the empirical spectral density (ESD) of ``W^T W`` and fits a power
law ``p(lambda) ~ lambda^-alpha`` to its tail: the Hill maximum-likelihood estimate of alpha with ``xmin``
chosen by the smallest Kolmogorov-Smirnov distance (Clauset et al., SIAM Review 2009). In this
heavy-tailed self-regularisation (HT-SR) theory a small alpha (about 2 to 4) marks a well-trained,
strongly correlated layer, and a large alpha (above about 6) a layer whose spectrum is still close to the
Marchenko-Pastur bulk of a random matrix. A Conv2d weight ``(out, in, kh, kw)`` is read as ``kh*kw``
matrices ``(out, in)`` whose eigenvalues are pooled into one ESD (weightwatcher's ``pool=True``).

OpenTrans (Xu, Chen, Zhao & Wei, "Transferable and Principled Efficiency for Open-Vocabulary
Segmentation", CVPR 2024, arXiv:2404.07448) uses these alphas as its heavy-tailed self-regularisation criterion:
layers with a heavy-tailed spectrum (small alpha) stay frozen during finetuning and the others are
updated (see :mod:`opentrans.finetune.freeze`).

What is left out, and why (each returned in :attr:`SpectralReport.excluded` with its reason):

* a Conv2d that reads the 3 RGB input channels (the ViT patch embedding ``conv1``, the ModifiedResNet
  stem ``conv1``): each of its ``kh*kw`` slices has rank <= 3, so its pooled ESD has no tail and its alpha
  (measured: about 18 for a random-init 16x16 patch conv; about 70 reported for a pretrained one) means
  nothing;
* (:func:`analyze_spectrum` only) the fused ``in_proj_weight`` (Q, K, V) of ``nn.MultiheadAttention``: it is
  a parameter, not a Linear module, so weightwatcher does not see it (its ``out_proj`` is analysed);
  :func:`analyze_weightwatcher` hands weightwatcher the Q, K, V slices as stand-in Linear modules;
* layers weightwatcher does not analyse (fewer than ``min_evals`` or more than ``max_evals`` eigenvalues)
  and layers whose power-law fit fails.

weightwatcher's fit is its default (KS-chosen ``xmin`` over all eigenvalues). The OpenTrans code instead
restricts ``xmin`` to near the ESD peak (``fix_fingers='xmin_peak'``); in weightwatcher 0.7.7 that option
fails for every layer (``powerlaw.Fit() got an unexpected keyword argument 'distribution'``), so it is not
used: alphas of layers with "fingers" (a few outlying eigenvalues) can come out larger than OpenTrans's,
and on a Marchenko-Pastur bulk (random init) weightwatcher's xmin lands on the bulk's sharp upper edge and
gives alpha >> 6 where the OpenTrans estimator gives about 3 (tested). Both agree (within 0.25) on
matrices with a true power-law tail.

Cost, 2 CPU cores, one BLAS thread: 11-12 s for the image tower of ViT-B-32 or ViT-B-16 (36 Linear layers
of 768x768 to 3072x768; SciPy SVD in float64; the patch conv is not analysed).

What the authors' code does beyond the alphas, and this package does not: it analyses their whole CLIP backbone
(``model.module.backbone``, the text tower included) and then gives ``requires_grad=True`` to *every* backbone
parameter whose name does not start with a frozen layer's name (LayerNorms, attention projections, embeddings
too). Here the plan is made over the towers asked for (``image`` in ``finetune``), and only the analysed layers
the plan marks trainable (and the head/prompts) train (:mod:`opentrans.finetune.freeze`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from torch import nn

from opentrans.artifacts import atomic_path, write_json, write_text
from opentrans.errors import OpenTransError
from opentrans.models.attention import has_fused_qkv
from opentrans.registry import Registry


@dataclass(frozen=True)
class LayerAlpha:
    """The fitted spectrum of one layer.

    Attributes:
        name: qualified module name, i.e. ``prefix`` + the name in ``module.named_modules()``.
        kind: ``Linear`` or ``Conv2d``.
        shape: the weight's shape, ``(out, in)`` or ``(out, in, kh, kw)``.
        alpha: power-law exponent of the ESD tail (dimensionless; smaller = heavier tail).
        alpha_weighted: ``alpha * log10(lambda_max)``, weightwatcher's scale-aware variant.
        stable_rank: ``||W||_F^2 / ||W||_2^2`` (sum of eigenvalues over the largest one; for a Conv2d
            weightwatcher reports it for the pooled ESD).
        num_eigs: number of eigenvalues in the ESD (``min(out, in) * kh * kw`` for a Conv2d).
        xmin: eigenvalue where the fitted power-law tail starts.
        warning: weightwatcher's verdict: ``""``, ``under-trained`` (alpha > 6) or ``over-trained`` (alpha < 2).
        ks_distance: Kolmogorov-Smirnov distance of the chosen fit (weightwatcher's ``D`` column or
            :attr:`PowerLawFit.ks_distance`); NaN where unknown.
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    alpha: float
    alpha_weighted: float
    stable_rank: float
    num_eigs: int
    xmin: float
    warning: str
    ks_distance: float = float("nan")


@dataclass(frozen=True)
class SpectralReport:
    """Result of :func:`analyze_spectrum`.

    Attributes:
        layers: analysed layers in module order.
        excluded: ``(name, reason)`` for every Linear/Conv2d (or MultiheadAttention in-projection) that was
            not given an alpha.
        seconds: wall time of the analysis (SVDs and fits), in seconds.
        estimator: ``weightwatcher`` (:func:`analyze_spectrum`, :func:`analyze_weightwatcher`) or
            ``opentrans`` (:func:`analyze_opentrans`).
    """

    layers: tuple[LayerAlpha, ...]
    excluded: tuple[tuple[str, str], ...]
    seconds: float
    estimator: str = "weightwatcher"

    @property
    def median_alpha(self) -> float:
        """Median alpha over :attr:`layers` (mean of the two middle values for an even count).

        Raises:
            OpenTransError: no layer was analysed.
        """
        if not self.layers:
            raise OpenTransError("no layer could be analysed, so there is no median alpha")
        return float(statistics.median(la.alpha for la in self.layers))

    def alphas(self) -> dict[str, float]:
        """``{layer name: alpha}`` in module order."""
        return {la.name: la.alpha for la in self.layers}


def _import_weightwatcher():
    """Import weightwatcher without its import-time side effects on logging.

    Its import logs two warnings about CUDA/SVD back ends (nothing actionable on a CPU) and calls
    ``logging.basicConfig(level=INFO)``, which would make every library's INFO messages (open_clip's
    tokenizer, ...) appear on stderr: the root logger's handlers and level are restored afterwards.
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    logging.disable(logging.WARNING)
    try:
        import weightwatcher
    finally:
        logging.disable(logging.NOTSET)
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)
    return weightwatcher


def _is_rgb_input_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.in_channels == 3


def _eig_count(weight: torch.Tensor) -> int:
    out, inp = weight.shape[:2]
    rf = math.prod(weight.shape[2:]) if weight.dim() > 2 else 1
    return min(out, inp) * rf


def analyze_spectrum(module: nn.Module, prefix: str = "") -> SpectralReport:
    """Power-law alpha of every Linear and Conv2d weight in ``module``, with weightwatcher.

    weightwatcher is called once, restricted (by layer id) to the Linear/Conv2d modules that are not
    RGB-input convolutions, with ``plot=False, randomize=False, mp_fit=False, vectors=False,
    fix_fingers=False, pool=True``, and BLAS limited to one thread (faster here, see the module notes).
    Its layer ids are positions in ``module.named_modules()``; each row is mapped back through that list
    and checked against the module's name and weight shape. Module attributes weightwatcher adds
    (``longname``) are removed again, and its ``print`` diagnostics are not shown (its logged warnings,
    e.g. a failed fit, are).

    Args:
        module: any ``nn.Module``, e.g. ``seg.visual``; its weights are read, not changed.
        prefix: prepended to every name, e.g. ``"clip.visual."`` so names match ``seg.named_modules()``.

    Returns:
        :class:`SpectralReport` with the analysed layers, the excluded ones with their reasons and the
        analysis time in seconds.

    Raises:
        OpenTransError: ``module`` has no Linear or Conv2d layer that can be analysed, or the installed
            weightwatcher reports layers that do not match the module (an unsupported version).
    """
    ww = _import_weightwatcher()
    names = [name for name, _ in module.named_modules()]
    modules = dict(module.named_modules())
    excluded: list[tuple[str, str]] = []
    wanted: dict[int, str] = {}
    for layer_id, name in enumerate(names):
        mod = modules[name]
        if has_fused_qkv(mod):
            excluded.append((prefix + name, "nn.MultiheadAttention fused in_proj_weight (Q,K,V) is not a Linear "
                                            "module: not analysed (its out_proj is)"))
        if not isinstance(mod, (nn.Linear, nn.Conv2d)):
            continue
        if _is_rgb_input_conv(mod):
            excluded.append((prefix + name, "convolution on the 3 RGB input channels (patch/stem conv): each "
                                            f"{mod.kernel_size[0]}x{mod.kernel_size[1]} slice has rank <= 3, "
                                            "so its spectrum has no tail and alpha is meaningless"))
            continue
        wanted[layer_id] = name
    if not wanted:
        raise OpenTransError(f"{type(module).__name__}: no Linear or Conv2d layer to analyse")

    had_longname = {id(m) for m in modules.values() if "longname" in m.__dict__}
    start = time.perf_counter()
    try:
        # One BLAS thread: the SVDs are of small matrices, and on a busy 2-core machine OpenBLAS's spinning
        # worker threads made the ViT-B analysis 3-9x slower (30-100 s instead of 11-12 s).
        with threadpool_limits(limits=1, user_api="blas"), contextlib.redirect_stdout(io.StringIO()):
            # (weightwatcher print()s "SMALL N PL FIT" for every layer with fewer than 20 eigenvalues)
            details = ww.WeightWatcher(model=module).analyze(
                layers=sorted(wanted), plot=False, randomize=False, mp_fit=False, vectors=False,
                fix_fingers=False, pool=True, start_ids=0)
    finally:
        for m in modules.values():
            if "longname" in m.__dict__ and id(m) not in had_longname:
                del m.__dict__["longname"]
    seconds = time.perf_counter() - start

    rows = {int(row["layer_id"]): row for row in details.to_dict("records")} if len(details) else {}
    layers = []
    for layer_id, name in wanted.items():
        mod = modules[name]
        weight = mod.weight
        kind = "Conv2d" if isinstance(mod, nn.Conv2d) else "Linear"
        row = rows.pop(layer_id, None)
        if row is None:
            excluded.append((prefix + name, f"weightwatcher {ww.__version__} did not analyse it ({_eig_count(weight)} "
                                            f"eigenvalues; it needs {ww.DEFAULT_MIN_EVALS} to "
                                            f"{ww.DEFAULT_MAX_EVALS})"))
            continue
        n, m = max(weight.shape[:2]), min(weight.shape[:2])
        if (name and row["longname"] != name) or (int(row["N"]), int(row["M"])) != (n, m):
            raise OpenTransError(
                f"weightwatcher {ww.__version__} reported layer {layer_id} as {row['longname']!r} "
                f"{int(row['N'])}x{int(row['M'])}, but it is {name!r} {n}x{m}; install weightwatcher 0.7.x")
        alpha = float(row["alpha"])
        if row.get("status") != "success" or not math.isfinite(alpha) or alpha <= 1.0:
            excluded.append((prefix + name, f"power-law fit failed (status {row.get('status')}, alpha {alpha:.3g})"))
            continue
        layers.append(LayerAlpha(
            name=prefix + name, kind=kind, shape=tuple(weight.shape), alpha=alpha,
            alpha_weighted=float(row["alpha_weighted"]), stable_rank=float(row["stable_rank"]),
            num_eigs=int(row["num_evals"]), xmin=float(row["xmin"]), warning=str(row.get("warning") or ""),
            ks_distance=float(row.get("D", float("nan"))),
        ))
    if rows:
        extra = ", ".join(str(r["longname"]) for r in rows.values())
        raise OpenTransError(f"weightwatcher {ww.__version__} analysed layers it was not asked for ({extra}); "
                             "install weightwatcher 0.7.x")
    if not layers:
        raise OpenTransError(f"{type(module).__name__}: no layer could be analysed "
                             f"({'; '.join(f'{n}: {r}' for n, r in excluded)})")
    return SpectralReport(layers=tuple(layers), excluded=tuple(excluded), seconds=seconds)


def layer_alphas(module: nn.Module, prefix: str = "") -> list[LayerAlpha]:
    """The analysed layers of :func:`analyze_spectrum` (same arguments and errors), without the excluded
    ones and the timing."""
    return list(analyze_spectrum(module, prefix).layers)


def _short(name: str) -> str:
    for head in ("clip.visual.transformer.resblocks.", "clip.visual.", "transformer.resblocks."):
        if name.startswith(head):
            return name[len(head):]
    return name


def write_alpha_report(report: SpectralReport, out_dir: str | os.PathLike, weights: str | None = None,
                       compare: SpectralReport | None = None) -> list[Path]:
    """Write ``alphas.csv``, ``alphas.json`` and ``alphas.png`` into ``out_dir``, each atomically.

    * ``alphas.csv``: one row per analysed layer: name, kind, shape, alpha, alpha_weighted, stable_rank,
      num_eigs, xmin, warning, ks_distance, below_median (the layers the median freeze policy keeps
      frozen) and, with ``compare``, ``alpha_<compare.estimator>`` (empty where that estimator has no alpha).
    * ``alphas.json``: the same rows plus ``excluded`` (name, reason), ``median_alpha``, ``seconds`` and
      ``weights`` (provenance, e.g. ``random-init weights``).
    * ``alphas.png``: bar chart of alpha per layer (module order) with the median as a dashed line;
      bars below the median (heavy-tailed, frozen by the median policy) in a separate colour; with
      ``compare``, its alphas as black markers beside the bars.
    * ``alphas.json`` with ``compare`` also holds ``comparison``: the other estimator, its seconds, its
      median alpha, the layers both fitted, and the mean and max absolute alpha difference over them.

    Args:
        report: from :func:`analyze_spectrum`, :func:`analyze_opentrans` or :func:`analyze_weightwatcher`.
        compare: the same layers analysed by another estimator (side by side; the plan uses ``report``).
        out_dir: created if missing.
        weights: provenance of the analysed weights, written into the JSON and the plot title.

    Returns:
        The three paths, in the order above.

    Raises:
        OpenTransError: ``report`` has no analysed layer.
    """
    out_dir = Path(out_dir)
    median = report.median_alpha
    rows = [{**asdict(la), "shape": list(la.shape), "below_median": la.alpha < median} for la in report.layers]
    other = compare.alphas() if compare is not None else {}
    comparison = None
    if compare is not None:
        key = f"alpha_{compare.estimator}"
        for row in rows:
            row[key] = other.get(row["name"], float("nan"))
        common = [(la.alpha, other[la.name]) for la in report.layers if la.name in other]
        diffs = [abs(a - b) for a, b in common]
        comparison = {"estimator": compare.estimator, "seconds": round(compare.seconds, 3),
                      "median_alpha": compare.median_alpha, "layers_in_both": len(common),
                      "mean_abs_alpha_diff": statistics.fmean(diffs) if diffs else None,
                      "max_abs_alpha_diff": max(diffs) if diffs else None}

    columns = list(rows[0])
    lines = [",".join(columns)]
    for row in rows:
        cells = []
        for c in columns:
            v = row[c]
            if c == "shape":
                v = "x".join(str(s) for s in v)
            elif isinstance(v, float):
                v = "" if math.isnan(v) else f"{v:.6g}"
            cells.append(str(v))
        lines.append(",".join(cells))
    csv_path = write_text(out_dir / "alphas.csv", "\n".join(lines) + "\n")

    json_path = write_json(out_dir / "alphas.json", {
        "weights": weights,
        "median_alpha": median,
        "seconds": round(report.seconds, 3),
        "estimator": report.estimator,
        "method": SPECTRAL_ESTIMATORS.get(report.estimator).method,
        "layers": rows,
        "excluded": [{"name": n, "reason": r} for n, r in report.excluded],
        "comparison": comparison,
    })

    _plot_alphas(report, other, compare, weights, out_dir / "alphas.png")
    return [csv_path, json_path, out_dir / "alphas.png"]


def _plot_alphas(report: SpectralReport, other: dict[str, float], compare: SpectralReport | None,
                 weights: str | None, path: Path) -> None:
    """``alphas.png`` (see :func:`write_alpha_report`), written atomically."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state
    from matplotlib.patches import Patch

    median = report.median_alpha
    n = len(report.layers)
    fig = Figure(figsize=(max(7.0, 0.22 * n + 3.5), 4.8))
    ax = fig.add_subplot(1, 1, 1)
    alphas = [la.alpha for la in report.layers]
    below = [a < median for a in alphas]
    ax.bar(range(n), alphas, color=["tab:blue" if b else "tab:orange" for b in below])
    handles = [Patch(color="tab:blue", label=f"{report.estimator} alpha < median: frozen (median policy)"),
               Patch(color="tab:orange", label=f"{report.estimator} alpha >= median: trained")]
    if compare is not None:
        handles += ax.plot(range(n), [other.get(la.name, float("nan")) for la in report.layers], "k_", markersize=8,
                           label=f"{compare.estimator} alpha")
    handles.append(ax.axhline(median, color="black", linestyle="--", linewidth=1, label=f"median alpha = {median:.2f}"))
    finite = [a for a in alphas if math.isfinite(a) and a > 0]
    if finite and max(finite) / min(finite) > 8:  # one outlier (e.g. conv1) would flatten every other bar
        ax.set_yscale("log")
        ax.set_ylabel("power-law alpha of the ESD (log scale)")
    else:
        ax.set_ylabel("power-law alpha of the ESD")
    ax.set_xticks(range(n))
    ax.set_xticklabels([_short(la.name) for la in report.layers], rotation=90, fontsize=7)
    ax.set_xlim(-0.7, n - 0.3)
    ax.set_xlabel("layer (image tower, input to output)")
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(f"Per-layer heavy-tail alpha, {n} layers\n{weights}" if weights else
                 f"Per-layer heavy-tail alpha, {n} layers", fontsize=9)
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)


# ---------------------------------------------------------------------------------------------------------
# The OpenTrans estimator (own implementation), both towers, Q/K/V split, and the side-by-side comparison.
# ---------------------------------------------------------------------------------------------------------

#: The authors' scaling of conv weights before the ESD (``net_esd_estimator(conv_norm=0.5)``: ``W * sqrt(0.5)``).
CONV_NORM = 0.5
#: Class names (lower case) the authors' ``get_module_names_shapes`` analyses.
AUTHORS_CLASSES = ("conv2d", "conv1d", "linear")
#: The authors skip a Linear whose weight's aspect ratio is at least this ("ignore classifier layer").
AUTHORS_CLASSIFIER_RATIO = 8
#: ``--towers`` choices: module-name prefix of each CLIP tower inside the segmentor.
TOWERS = {"image": "clip.visual.", "text": "clip.transformer."}
#: Eigenvalues at or below this are dropped before the fit (the OpenTrans/TempBalance ``EVALS_THRESH``).
EVALS_THRESH = 1e-5
#: Histogram bins over ``log10(lambda)`` used to locate the ESD peak (as in weightwatcher and OpenTrans).
PEAK_BINS = 100
#: The xmin search window around the ESD peak, as multiples of the peak eigenvalue: ``[0.95, 1.5] * peak``.
XMIN_WINDOW = (0.95, 1.5)
#: Fewest eigenvalues a layer needs for a fit (weightwatcher's ``DEFAULT_MIN_EVALS`` is 8 as well).
MIN_EIGS = 8
#: Suffixes of the three row blocks of a fused ``in_proj_weight`` ``(3*E, E)``: query, key, value.
QKV = ("q", "k", "v")


@dataclass(frozen=True)
class PowerLawFit:
    """A Hill power-law fit of one ESD (see :func:`fit_power_law`).

    Attributes:
        alpha: tail exponent of ``p(lambda) ~ lambda^-alpha`` (dimensionless).
        xmin: eigenvalue where the tail starts (units of ``W^T W``, i.e. squared weight units).
        ks_distance: Kolmogorov-Smirnov distance between the empirical tail CDF and the fitted one.
        num_tail: eigenvalues ``>= xmin``.
        lambda_max: largest eigenvalue (squared spectral norm).
        alpha_weighted: ``alpha * log10(lambda_max)`` (Martin, Peng & Mahoney 2021, the "alpha-hat" metric).
        stable_rank: ``sum(lambda) / lambda_max`` = ``||W||_F^2 / ||W||_2^2`` (pooled for a conv).
        num_eigs: eigenvalues in the ESD (after dropping those ``<= EVALS_THRESH``).
        peak: left edge of the ESD peak bin (the centre of the xmin window).
    """

    alpha: float
    xmin: float
    ks_distance: float
    num_tail: int
    lambda_max: float
    alpha_weighted: float
    stable_rank: float
    num_eigs: int
    peak: float


@dataclass(frozen=True)
class LayerMatrix:
    """One weight matrix (or pooled conv weight) to analyse.

    Attributes:
        name: module name with the prefix; a slice of a fused attention projection is named
            ``<mha>.in_proj_weight[q|k|v]``.
        kind: ``Linear``, ``Conv2d`` or ``MHA-q``/``MHA-k``/``MHA-v``.
        weight: the tensor (a view, never copied): ``(out, in)`` or ``(out, in, kh, kw)``.
    """

    name: str
    kind: str
    weight: torch.Tensor


@contextlib.contextmanager
def single_thread():
    """Run the block with one torch intra-op thread and one BLAS thread, restoring both afterwards.

    Measured on the shared 2-core machine (load average about 8): ``torch.linalg.svdvals`` of a
    3072x768 float32 matrix took 35 s with 2 torch threads and 0.45 s with one (spinning worker threads
    of a busy machine); the eigenvalue path of :func:`esd` took 0.17 s with one thread.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(threads)


def esd(weight: torch.Tensor, conv_norm: float = 1.0) -> np.ndarray:
    """Eigenvalues of ``W^T W``, ascending, float64, negatives from rounding clipped to 0.

    ``W`` ``(out, in)``: ``min(out, in)`` eigenvalues. ``W`` ``(out, in, kh, kw)`` (Conv2d) or ``(out, in, k)``
    (Conv1d): read as ``kh*kw`` (``k``) matrices ``(out, in)`` (the OpenTrans/TempBalance reshape
    ``(k*k, out, in)``) whose eigenvalues are pooled, ``kh*kw*min(out, in)`` values, after scaling the weight by
    ``sqrt(conv_norm)`` (the authors' ``conv_norm``: :data:`CONV_NORM` for ``--estimator opentrans``, 1 for
    ours). They are the squared singular values of ``W``; they are computed as ``torch.linalg.eigvalsh`` of the
    smaller Gram matrix (``W^T W`` or ``W W^T``, same non-zero spectrum) in float64, which was 2.5x faster than
    float32 ``svdvals`` here and keeps the small eigenvalues to about ``1e-16 * lambda_max``. Call inside
    :func:`single_thread` for speed on a busy machine.

    Raises:
        OpenTransError: a weight that is not 2-D, 3-D or 4-D.
    """
    w = weight.detach()
    if w.dim() not in (2, 3, 4):
        raise OpenTransError(f"cannot take the ESD of a {w.dim()}-D weight {tuple(w.shape)}; expected 2-D to 4-D")
    w = w.double()
    if w.dim() > 2:
        w = w.flatten(2).permute(2, 0, 1) * math.sqrt(conv_norm)  # (k*k, out, in)
    gram = w.mT @ w if w.shape[-2] >= w.shape[-1] else w @ w.mT
    evals = torch.linalg.eigvalsh(gram).reshape(-1).clamp_min(0.0).numpy()
    return np.sort(evals)


def fit_power_law_authors(eigs, bins: int = PEAK_BINS, thresh: float = EVALS_THRESH) -> PowerLawFit:
    """The OpenTrans authors' power-law fit of an ESD, as their ``matrix_esd_estimator`` computes it with
    ``fix_fingers='xmin_peak'`` (github.com/Xujxyang/OpenTrans at aea33ff3, ``utils.py`` l. 235-317):

    1. eigenvalues ascending; keep those ``> thresh`` (all of them if none is);
    2. histogram ``log10(lambda)`` into ``bins`` equal bins between its min and max (``torch.histc``); the peak
       ``p`` is ``10^(left edge)`` of the first fullest bin;
    3. candidates ``xmin = lambda_i``, ``i < N - 1``, in ascending order: skipped while
       ``lambda_i < log10(0.95 p)`` (their line 283: the lower bound is a *logarithm*, so in effect there is
       none unless ``p > 1.05``), stopping at the first ``lambda_i > 1.5 p``;
    4. per candidate ``alpha = 1 + n / (sum_{j >= i} ln lambda_j - n ln lambda_i)`` (``n = N - i``) and, if
       ``alpha > 1``, ``D = max_j |1 - (lambda_j / xmin)^(1 - alpha) - (j - i) / n|``; a candidate that is
       skipped or has ``alpha <= 1`` keeps ``D = 1`` (and ``alpha`` 0 when skipped);
    5. the first index with the smallest ``D`` over all ``N - 1`` entries wins (so a spectrum without any
       fitted candidate gets the entry 0, as theirs does).

    Computed in float64 (theirs: float32 on a GPU); ``xmin`` is the chosen candidate (their ``xmin`` column
    records the smallest eigenvalue instead). ``alpha_weighted`` and ``stable_rank`` as theirs.

    Raises:
        OpenTransError: fewer than 2 eigenvalues (their code would fail on an empty candidate list).
    """
    x = np.sort(np.asarray(eigs, dtype=np.float64).ravel())
    nz = x[x > thresh]
    if nz.size == 0:
        nz = x
    total = int(nz.size)
    if total < 2:
        raise OpenTransError(f"only {total} eigenvalue(s); the authors' power-law fit needs at least 2")
    lnx = np.log(nz)
    h = torch.from_numpy(np.log10(nz))
    lo, hi = h.min(), h.max()
    counts = torch.histc(h, bins, min=float(lo), max=float(hi))
    edges = torch.linspace(float(lo), float(hi), bins + 1, dtype=torch.float64)
    peak = float(10.0 ** edges[int(torch.argmax(counts))])
    low, high = math.log10(0.95 * peak), 1.5 * peak
    alphas = np.zeros(total - 1)
    ds = np.ones(total - 1)
    tail_sum = np.cumsum(lnx[::-1])[::-1]  # tail_sum[i] = sum_{j >= i} ln x_j
    for i in range(total - 1):
        xmin = nz[i]
        if xmin < low:
            continue
        if xmin > high:
            break
        n = total - i
        with np.errstate(divide="ignore"):
            alpha = 1.0 + n / (tail_sum[i] - n * lnx[i])
        alphas[i] = alpha
        if alpha > 1:
            ds[i] = float(np.max(np.abs(1.0 - (nz[i:] / xmin) ** (1.0 - alpha) - np.arange(n) / n)))
    k = int(np.argmin(ds))
    alpha = float(alphas[k])
    lam_max = float(nz[-1])
    return PowerLawFit(alpha=alpha, xmin=float(nz[k]), ks_distance=float(ds[k]), num_tail=total - k,
                       lambda_max=lam_max, alpha_weighted=float(alpha * math.log10(lam_max)),
                       stable_rank=float(nz.sum() / lam_max), num_eigs=total, peak=peak)


def fit_power_law(eigs, bins: int = PEAK_BINS, window: tuple[float, float] = XMIN_WINDOW,
                  thresh: float = EVALS_THRESH) -> PowerLawFit:
    """The OpenTrans power-law fit of an ESD: Hill estimator with ``xmin`` chosen near the ESD peak.

    Following the OpenTrans code (Xu et al., CVPR 2024; it reuses the ``net_esd_estimator`` of TempBalance,
    Zhou et al., NeurIPS 2023, with ``fix_fingers='xmin_peak'``) and Martin & Mahoney (JMLR 2021, Sec. 4):

    1. keep eigenvalues ``> thresh``, sorted ascending ``lambda_1 <= ... <= lambda_N``;
    2. histogram ``log10(lambda)`` into ``bins`` equal bins; the peak ``p`` is ``10^(left edge)`` of the
       fullest bin (the mode of the ESD on a log scale);
    3. every ``lambda_i`` with ``window[0]*p <= lambda_i <= window[1]*p`` and at least one eigenvalue above it
       is an ``xmin`` candidate (weightwatcher 0.7.7 means the same window, ``(0.95 p, 1.5 p)``, but takes
       ``log10`` of its lower end by mistake; the lower end is used unlogged here);
    4. for each candidate, with the ``n = N - i + 1`` eigenvalues ``x_j >= xmin``, the continuous Hill MLE
       (Clauset, Shalizi & Newman, SIAM Review 2009, eq. 3.1) ``alpha = 1 + n / sum_j ln(x_j / xmin)``
       and the KS distance ``D = max_j |1 - (x_j/xmin)^(1-alpha) - (j-1)/n|`` (the OpenTrans form);
    5. the candidate with the smallest ``D`` wins. If the window holds no candidate (a peak spread over
       very wide bins) the first eigenvalue ``>= window[0]*p`` is used.

    Args:
        eigs: 1-D array-like of eigenvalues (any order).
        bins, window, thresh: see above.

    Returns:
        :class:`PowerLawFit`.

    Raises:
        OpenTransError: fewer than :data:`MIN_EIGS` eigenvalues above ``thresh``, or a bad ``window``.
    """
    if not (0 < window[0] <= 1 <= window[1]):
        raise OpenTransError(f"xmin window {window}: need 0 < low <= 1 <= high (multiples of the ESD peak)")
    x = np.sort(np.asarray(eigs, dtype=np.float64).ravel())
    x = x[x > thresh]
    total = int(x.size)
    if total < MIN_EIGS:
        raise OpenTransError(f"only {total} eigenvalues above {thresh:g}; a power-law fit needs {MIN_EIGS}")
    logs = np.log10(x)
    counts, edges = np.histogram(logs, bins=bins)
    peak = float(10.0 ** edges[int(np.argmax(counts))])
    cand = np.flatnonzero((x >= window[0] * peak) & (x <= window[1] * peak))
    cand = cand[cand < total - 1]
    if cand.size == 0:
        cand = np.flatnonzero(x >= window[0] * peak)[:1]
        cand = cand[cand < total - 1] if cand.size else np.array([0])
    lnx = np.log(x)
    tail_sum = np.cumsum(lnx[::-1])[::-1]  # tail_sum[i] = sum_{j >= i} ln x_j
    best = None
    for i in cand:
        n = total - i
        s = tail_sum[i] - n * lnx[i]
        if s <= 0:  # all tail eigenvalues equal xmin: no tail to fit
            continue
        alpha = 1.0 + n / s
        model_cdf = 1.0 - (x[i:] / x[i]) ** (1.0 - alpha)
        d = float(np.max(np.abs(model_cdf - np.arange(n) / n)))
        if best is None or d < best[0]:
            best = (d, alpha, int(i), n)
    if best is None:
        raise OpenTransError("the ESD has no spread above its peak: no power-law tail to fit")
    d, alpha, i, n = best
    lam_max = float(x[-1])
    return PowerLawFit(alpha=float(alpha), xmin=float(x[i]), ks_distance=d, num_tail=n, lambda_max=lam_max,
                       alpha_weighted=float(alpha * math.log10(lam_max)), stable_rank=float(x.sum() / lam_max),
                       num_eigs=total, peak=peak)


def spectral_layers(module: nn.Module, prefix: str = "", split_qkv: bool = True
                    ) -> tuple[list[LayerMatrix], list[tuple[str, str]]]:
    """The weight matrices of ``module`` that get an alpha, and the left-out ones with their reasons.

    Analysed: every ``nn.Linear`` and ``nn.Conv2d`` weight, and (``split_qkv``) the three ``(E, E)`` row
    blocks Q, K, V of each ``nn.MultiheadAttention.in_proj_weight`` ``(3E, E)`` (open_clip's fused
    projection; separate Q/K/V matrices of a ModifiedResNet attention pool are Linear modules already).
    Left out, with a reason: convolutions reading the 3 RGB channels (each ``kh x kw`` slice has rank
    <= 3: no tail, a meaningless alpha), weights with fewer than :data:`MIN_EIGS` eigenvalues, and (without
    ``split_qkv``) fused in-projections. Embeddings and bare parameters (``proj``, ``text_projection``,
    positional embeddings) are lookup tables/projections outside OpenTrans's Linear/Conv2d scope and are
    not listed.

    Raises:
        OpenTransError: nothing left to analyse.
    """
    layers: list[LayerMatrix] = []
    excluded: list[tuple[str, str]] = []
    for name, mod in module.named_modules():
        full = prefix + name
        if isinstance(mod, nn.MultiheadAttention) or has_fused_qkv(mod):
            w = mod.in_proj_weight
            if not has_fused_qkv(mod):
                continue  # separate q/k/v_proj_weight (kdim != embed_dim): not used by CLIP
            if not split_qkv:
                excluded.append((full, "nn.MultiheadAttention fused in_proj_weight (Q,K,V) is not a Linear "
                                       "module: not analysed (its out_proj is)"))
                continue
            for tag, block in zip(QKV, w.detach().chunk(3, dim=0)):
                layers.append(LayerMatrix(f"{full}.in_proj_weight[{tag}]", f"MHA-{tag}", block))
            continue
        if not isinstance(mod, (nn.Linear, nn.Conv2d)):
            continue
        if _is_rgb_input_conv(mod):
            excluded.append((full, "convolution on the 3 RGB input channels (patch/stem conv): each "
                                   f"{mod.kernel_size[0]}x{mod.kernel_size[1]} slice has rank <= 3, "
                                   "so its spectrum has no tail and alpha is meaningless"))
            continue
        if _eig_count(mod.weight) < MIN_EIGS:
            excluded.append((full, f"only {_eig_count(mod.weight)} eigenvalues; a fit needs {MIN_EIGS}"))
            continue
        layers.append(LayerMatrix(full, "Conv2d" if isinstance(mod, nn.Conv2d) else "Linear", mod.weight.detach()))
    if not layers:
        raise OpenTransError(f"{type(module).__name__}: no Linear or Conv2d layer to analyse")
    return layers, excluded


def _warning(alpha: float) -> str:
    return "under-trained" if alpha > 6 else "over-trained" if alpha < 2 else ""


def analyze_opentrans_qkv(module: nn.Module, prefix: str = "", split_qkv: bool = True) -> SpectralReport:
    """Per-layer alpha with **our** variant of the OpenTrans estimator (``--estimator opentrans-qkv``:
    :func:`esd` + :func:`fit_power_law`, see the module notes), no weightwatcher.

    Layers as :func:`spectral_layers`; a layer whose fit fails is moved to ``excluded`` with the reason.
    The eigenvalue computations run in :func:`single_thread`.

    Raises:
        OpenTransError: nothing to analyse, or no layer could be fitted.
    """
    mats, excluded = spectral_layers(module, prefix, split_qkv)
    return _fit_layers(module, mats, excluded, esd, fit_power_law, "opentrans-qkv")


def _fit_layers(module: nn.Module, mats: list[LayerMatrix], excluded: list[tuple[str, str]],
                spectrum: Callable[[torch.Tensor], np.ndarray], fit_fn: Callable[[np.ndarray], Any],
                estimator: str) -> SpectralReport:
    """Fit every layer's ESD (``spectrum(weight)``, computed in :func:`single_thread`) with ``fit_fn``; a layer whose
    fit fails moves to ``excluded`` with the reason.

    Raises:
        OpenTransError: no layer could be fitted.
    """
    start = time.perf_counter()
    layers = []
    for lm in mats:
        with single_thread():
            eigs = spectrum(lm.weight)
        try:
            fit = fit_fn(eigs)
        except OpenTransError as exc:
            excluded.append((lm.name, f"power-law fit failed: {exc}"))
            continue
        layers.append(LayerAlpha(name=lm.name, kind=lm.kind, shape=tuple(lm.weight.shape), alpha=fit.alpha,
                                 alpha_weighted=fit.alpha_weighted, stable_rank=fit.stable_rank,
                                 num_eigs=_eig_count(lm.weight), xmin=fit.xmin, warning=_warning(fit.alpha),
                                 ks_distance=fit.ks_distance))
    if not layers:
        raise OpenTransError(f"{type(module).__name__}: no layer could be analysed")
    return SpectralReport(layers=tuple(layers), excluded=tuple(excluded), seconds=time.perf_counter() - start,
                          estimator=estimator)


def authors_layers(module: nn.Module, prefix: str = "") -> tuple[list[LayerMatrix], list[tuple[str, str]]]:
    """The weight matrices the OpenTrans authors' code gives an alpha, and the left-out ones with their reasons.

    As ``get_module_names_shapes`` and the loop of ``net_esd_estimator`` (github.com/Xujxyang/OpenTrans at
    aea33ff3, ``utils.py`` l. 211-233 and l. 376-381): every module whose class name, lower-cased, is
    ``conv2d``, ``conv1d`` or ``linear`` (so not ``NonDynamicallyQuantizableLinear``, the class of
    ``nn.MultiheadAttention.out_proj``, and not the fused ``in_proj_weight``, which is no module), the RGB
    patch/stem conv included, except a Linear whose weight has ``max/min >= 8`` ("ignore classifier layer").
    Left out with a reason: those, and every other Linear/Conv subclass or fused attention projection.

    Raises:
        OpenTransError: a Linear under an ``attn``/``attention`` name with a ``(E, 3E)`` or ``(3E, E)`` weight
            (a fused Q/K/V Linear, which the authors split into ``<name>_q/_k/_v``; no CLIP tower has one and a
            freeze plan could not address the parts), or nothing left to analyse.
    """
    layers: list[LayerMatrix] = []
    excluded: list[tuple[str, str]] = []
    for name, mod in module.named_modules():
        full = prefix + name
        cls = type(mod).__name__
        if has_fused_qkv(mod):
            excluded.append((full, "nn.MultiheadAttention fused in_proj_weight (Q,K,V) is not a module: the "
                                   "authors' get_module_names_shapes does not see it"))
            continue
        if cls.lower() not in AUTHORS_CLASSES:
            if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                excluded.append((full, f"class {cls} is not named Conv2d/Conv1d/Linear: the authors' "
                                       "get_module_names_shapes skips it"))
            continue
        w = mod.weight.detach()
        if ("attn" in full or "attention" in full) and w.dim() == 2 and (
                w.shape[0] == w.shape[1] // 3 or w.shape[1] == w.shape[0] // 3):
            raise OpenTransError(f"{full}: a fused Q/K/V Linear {tuple(w.shape)}, which the authors' code splits "
                                 "into _q/_k/_v parts; not supported")
        if cls.lower() == "linear" and max(w.shape) / min(w.shape) >= AUTHORS_CLASSIFIER_RATIO:
            excluded.append((full, f"Linear {tuple(w.shape)} with aspect ratio >= {AUTHORS_CLASSIFIER_RATIO}: "
                                   "the authors skip it as a classifier layer"))
            continue
        layers.append(LayerMatrix(full, cls, w))
    if not layers:
        raise OpenTransError(f"{type(module).__name__}: no Conv2d/Conv1d/Linear layer to analyse")
    return layers, excluded


def analyze_opentrans(module: nn.Module, prefix: str = "") -> SpectralReport:
    """Per-layer alpha with the OpenTrans authors' estimator and layer set (``--estimator opentrans``, the
    default; module notes): :func:`authors_layers`, :func:`esd` with ``conv_norm =`` :data:`CONV_NORM`,
    :func:`fit_power_law_authors`. The eigenvalue computations run in :func:`single_thread`.

    Raises:
        OpenTransError: nothing to analyse (see :func:`authors_layers`).
    """
    mats, excluded = authors_layers(module, prefix)
    return _fit_layers(module, mats, excluded, lambda w: esd(w, conv_norm=CONV_NORM), fit_power_law_authors,
                       "opentrans")


class _MatrixBag(nn.Module):
    """Linear/Conv2d stand-ins sharing the storage of given weights (so weightwatcher sees Q/K/V slices)."""

    def __init__(self, mats: list[LayerMatrix]):
        super().__init__()
        for i, lm in enumerate(mats):
            w = lm.weight
            if w.dim() == 4:
                mod = nn.Conv2d(w.shape[1], w.shape[0], tuple(w.shape[2:]), bias=False, device="meta")
            else:
                mod = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
            mod.weight = nn.Parameter(w, requires_grad=False)
            self.add_module(str(i), mod)


def analyze_weightwatcher(module: nn.Module, prefix: str = "", split_qkv: bool = True) -> SpectralReport:
    """Per-layer alpha with weightwatcher (:func:`analyze_spectrum`) over the same layers as
    :func:`analyze_opentrans`, Q/K/V slices included (wrapped as bias-free Linear stand-ins that share the
    weights' storage). weightwatcher's fit is its default (KS-chosen ``xmin`` over all eigenvalues, see the
    module notes); ``ks_distance`` is its ``D``.

    Raises:
        OpenTransError: as :func:`analyze_spectrum`.
    """
    mats, excluded = spectral_layers(module, prefix, split_qkv)
    report = analyze_spectrum(_MatrixBag(mats))
    by_id = {str(i): lm for i, lm in enumerate(mats)}
    layers = tuple(LayerAlpha(**{**asdict(la), "name": by_id[la.name].name, "kind": by_id[la.name].kind,
                                 "shape": tuple(by_id[la.name].weight.shape)}) for la in report.layers)
    excluded += [(by_id[n].name, r) for n, r in report.excluded]
    return SpectralReport(layers=layers, excluded=tuple(excluded), seconds=report.seconds, estimator="weightwatcher")


@dataclass(frozen=True)
class Estimator:
    """A registered alpha estimator (entry of :data:`SPECTRAL_ESTIMATORS`).

    Attributes:
        name: its ``--estimator`` name.
        analyze: ``analyze(module, prefix, split_qkv) -> SpectralReport`` over one tower (``prefix`` names the
            layers, ``split_qkv`` analyses Q/K/V of fused attention separately where the estimator can).
        layers: ``layers(module, prefix) -> (list[LayerMatrix], excluded)``: the matrices it analyses.
        method: one sentence on the method, for ``alphas.json``.
        authors_fit: the ESD plot uses the authors' conv scaling and fit (:func:`fit_power_law_authors`)
            instead of ours (:func:`fit_power_law`).
    """

    name: str
    analyze: Callable[[nn.Module, str, bool], SpectralReport]
    layers: Callable[[nn.Module, str], tuple[list[LayerMatrix], list[tuple[str, str]]]]
    authors_fit: bool = False
    method: str = ""


#: ``--estimator`` names -> :class:`Estimator`. The built-in three register below; another estimator registers
#: itself in its own module of :mod:`opentrans.analyze.estimators` (imported on the first lookup).
SPECTRAL_ESTIMATORS: Registry[Estimator] = Registry("estimator", plugins="opentrans.analyze.estimators")
#: the analyze stage's extra choice: the authors' estimator beside weightwatcher
BOTH = "both"
SPECTRAL_ESTIMATORS.add("opentrans", Estimator(
    "opentrans", lambda module, prefix, split_qkv: analyze_opentrans(module, prefix), authors_layers, authors_fit=True,
    method="OpenTrans authors' power-law alpha of each layer's ESD (their utils.py net_esd_estimator: Hill "
           "MLE, xmin with the smallest KS distance in [log10(0.95 p), 1.5 p] around the ESD peak p, "
           "'xmin_peak'; Conv2d/Conv1d/Linear modules by class name, conv weights scaled by sqrt(0.5))"))
SPECTRAL_ESTIMATORS.add("opentrans-qkv", Estimator(
    "opentrans-qkv", analyze_opentrans_qkv, spectral_layers,
    method="ours: OpenTrans power-law alpha of each layer's ESD (Hill MLE, xmin with the smallest KS "
           "distance within [0.95, 1.5] x the ESD peak; pooled conv slices; Q/K/V split, out_proj "
           "analysed, RGB-input conv left out)"))
SPECTRAL_ESTIMATORS.add("weightwatcher", Estimator(
    "weightwatcher", analyze_weightwatcher, spectral_layers,
    method="weightwatcher power-law alpha of each layer's ESD (Hill MLE, KS-chosen xmin over all "
           "eigenvalues, pooled conv slices)"))


def estimator_names(with_both: bool = False) -> list[str]:
    """Registered estimator names (``opentrans`` first), plus ``both`` when ``with_both``."""
    names = SPECTRAL_ESTIMATORS.names()
    names = [n for n in ("opentrans",) if n in names] + [n for n in names if n != "opentrans"]
    return [*names, BOTH] if with_both else names


def _estimators_of(estimator: str) -> list[Estimator]:
    """The entries behind ``estimator`` (``both``: opentrans, then weightwatcher).

    Raises:
        OpenTransError: an unknown name (the message lists the valid ones).
    """
    names = ["opentrans", "weightwatcher"] if estimator == BOTH else [estimator]
    if any(n not in SPECTRAL_ESTIMATORS for n in names):
        raise OpenTransError(f"unknown estimator '{estimator}'; choose one of {', '.join(estimator_names(True))}")
    return [SPECTRAL_ESTIMATORS.get(n) for n in names]


def analyze_model(seg: nn.Module, towers: tuple[str, ...] | list[str] = ("image",), estimator: str = "opentrans",
                  split_qkv: bool = True) -> dict[str, SpectralReport]:
    """Analyse the chosen CLIP towers of a segmentor with one or both estimators.

    Args:
        seg: an :class:`~opentrans.models.segmentor.OpenVocabSegmentor` (names are ``seg.named_modules()``
            names, ``clip.visual.*`` for the image tower, ``clip.transformer.*`` for the text tower).
        towers: any of :data:`TOWERS` (``image``, ``text``).
        estimator: a name of :data:`SPECTRAL_ESTIMATORS`: ``opentrans`` (the authors', :func:`analyze_opentrans`),
            ``opentrans-qkv`` (ours, :func:`analyze_opentrans_qkv`), ``weightwatcher``; or ``both``
            (``opentrans`` and ``weightwatcher``).
        split_qkv: ``opentrans-qkv`` and ``weightwatcher`` only: analyse Q, K, V of fused attention projections
            separately (the authors' layer set never has them).

    Returns:
        ``{estimator: SpectralReport}`` with one or two entries (``opentrans`` first); each report holds
        the layers of all towers in tower order.

    Raises:
        OpenTransError: an unknown tower or estimator, a tower the model lacks, or nothing to analyse.
    """
    entries = _estimators_of(estimator)
    towers = list(towers)
    bad = [t for t in towers if t not in TOWERS]
    if bad or not towers:
        raise OpenTransError(f"unknown tower '{bad[0] if bad else ''}'; choose from {', '.join(TOWERS)}")
    roots = []
    for t in towers:
        try:
            roots.append((TOWERS[t], seg.get_submodule(TOWERS[t].rstrip("."))))
        except AttributeError:
            raise OpenTransError(f"this model has no {t} tower ({TOWERS[t].rstrip('.')})") from None
    out = {}
    for entry in entries:
        parts = [entry.analyze(mod, prefix, split_qkv) for prefix, mod in roots]
        out[entry.name] = SpectralReport(layers=tuple(la for p in parts for la in p.layers),
                                         excluded=tuple(e for p in parts for e in p.excluded),
                                         seconds=sum(p.seconds for p in parts), estimator=entry.name)
    return out


def estimator_layers(module: nn.Module, prefix: str, estimator: str) -> list[LayerMatrix]:
    """The matrices ``estimator`` analyses in ``module``: :func:`authors_layers` for ``opentrans`` and ``both``,
    :func:`spectral_layers` (Q/K/V split) for ``opentrans-qkv`` and ``weightwatcher``.

    Raises:
        OpenTransError: an unknown estimator, or nothing to analyse.
    """
    return _estimators_of(estimator)[0].layers(module, prefix)[0]


def _readable_log_ticks(axis) -> None:
    """Log-axis labels at 1, 2 and 5 times the powers of ten, written plainly (0.5, 1, 2), and no labels on the
    minor ticks (over less than a decade matplotlib labels them too, and they overlap)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def write_esd_plot(path: str | os.PathLike, layers: list[LayerMatrix], weights: str | None = None,
                   estimator: str = "opentrans") -> Path:
    """Log-log ESD plots with the fitted power law, one panel per layer, written atomically (PNG).

    ``estimator`` ``opentrans`` (or ``both``): the authors' ESD (conv weights scaled by ``sqrt(0.5)``) and fit
    (:func:`fit_power_law_authors`); otherwise ours (:func:`fit_power_law`; weightwatcher's own fit is not
    redrawn).

    Each panel: the empirical complementary CDF ``P(lambda >= x)`` of the layer's eigenvalues (points),
    the fitted tail ``(n/N) (x/xmin)^(1-alpha)`` from ``xmin`` on (line), and ``xmin``/the ESD peak as
    vertical lines. (A CCDF is used rather than a density histogram: it needs no binning and a power-law
    tail is a straight line of slope ``1 - alpha``.)

    Raises:
        OpenTransError: no layers given, or a layer that cannot be fitted.
    """
    from matplotlib.figure import Figure

    if not layers:
        raise OpenTransError("no layers to plot")
    cols = min(3, len(layers))
    rows = math.ceil(len(layers) / cols)
    fig = Figure(figsize=(4.2 * cols, 3.4 * rows))
    authors = _estimators_of(estimator)[0].authors_fit
    for k, lm in enumerate(layers):
        with single_thread():
            eigs = esd(lm.weight, conv_norm=CONV_NORM if authors else 1.0)
        eigs = eigs[eigs > EVALS_THRESH]
        fit = fit_power_law_authors(eigs) if authors else fit_power_law(eigs)
        ax = fig.add_subplot(rows, cols, k + 1)
        n_all = eigs.size
        ccdf = 1.0 - np.arange(n_all) / n_all
        ax.loglog(eigs, ccdf, ".", markersize=3, color="tab:blue", label="ESD (CCDF)")
        xs = np.geomspace(fit.xmin, fit.lambda_max, 50)
        ax.loglog(xs, fit.num_tail / n_all * (xs / fit.xmin) ** (1.0 - fit.alpha), "-", color="tab:red",
                  label=f"fit alpha={fit.alpha:.2f}, KS={fit.ks_distance:.3f}")
        ax.axvline(fit.xmin, color="tab:red", linestyle=":", linewidth=1, label=f"xmin = {fit.xmin:.3g}")
        ax.axvline(fit.peak, color="gray", linestyle="--", linewidth=1, label=f"ESD peak = {fit.peak:.3g}")
        _readable_log_ticks(ax.xaxis)
        ax.set_title(_short(lm.name), fontsize=8)
        ax.set_xlabel("eigenvalue of W^T W", fontsize=7)
        ax.set_ylabel("P(lambda >= x)", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="lower left")
    title = f"ESD with the {'OpenTrans authors' if authors else 'opentrans-qkv (ours)'} power-law fit"
    fig.suptitle(f"{title}\n{weights}" if weights else title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    return path
