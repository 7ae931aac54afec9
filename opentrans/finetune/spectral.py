"""Per-layer heavy-tailed spectral analysis of an image encoder (the ``analyze`` stage).

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
* the fused ``in_proj_weight`` (Q, K, V) of ``nn.MultiheadAttention``: it is a parameter, not a Linear
  module, so weightwatcher does not see it (its ``out_proj`` is analysed);
* layers weightwatcher does not analyse (fewer than ``min_evals`` or more than ``max_evals`` eigenvalues)
  and layers whose power-law fit fails.

The fit is weightwatcher's default (KS-chosen ``xmin`` over all eigenvalues). The OpenTrans code instead
restricts ``xmin`` to near the ESD peak (``fix_fingers='xmin_peak'``); in weightwatcher 0.7.7 that option
fails for every layer (``powerlaw.Fit() got an unexpected keyword argument 'distribution'``), so it is not
used: alphas of layers with "fingers" (a few outlying eigenvalues) can come out larger than OpenTrans's.

Cost, 2 CPU cores, one BLAS thread: 11-12 s for the image tower of ViT-B-32 or ViT-B-16 (36 Linear layers
of 768x768 to 3072x768; SciPy SVD in float64; the patch conv is not analysed).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from threadpoolctl import threadpool_limits
from torch import nn

from opentrans.artifacts import atomic_path, write_json, write_text
from opentrans.errors import OpenTransError

#: Files written by :func:`write_alpha_report`.
ALPHA_FILES = ("alphas.csv", "alphas.json", "alphas.png")


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


@dataclass(frozen=True)
class SpectralReport:
    """Result of :func:`analyze_spectrum`.

    Attributes:
        layers: analysed layers in module order.
        excluded: ``(name, reason)`` for every Linear/Conv2d (or MultiheadAttention in-projection) that was
            not given an alpha.
        seconds: wall time of the weightwatcher analysis, in seconds.
    """

    layers: tuple[LayerAlpha, ...]
    excluded: tuple[tuple[str, str], ...]
    seconds: float

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
        if isinstance(mod, nn.MultiheadAttention) and mod.in_proj_weight is not None:
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


def write_alpha_report(report: SpectralReport, out_dir: str | os.PathLike, weights: str | None = None) -> list[Path]:
    """Write ``alphas.csv``, ``alphas.json`` and ``alphas.png`` into ``out_dir``, each atomically.

    * ``alphas.csv``: one row per analysed layer: name, kind, shape, alpha, alpha_weighted, stable_rank,
      num_eigs, xmin, warning, below_median (the layers the median freeze policy keeps frozen).
    * ``alphas.json``: the same rows plus ``excluded`` (name, reason), ``median_alpha``, ``seconds`` and
      ``weights`` (provenance, e.g. ``random-init weights``).
    * ``alphas.png``: bar chart of alpha per layer (module order) with the median as a dashed line;
      bars below the median (heavy-tailed, frozen by the median policy) in a separate colour.

    Args:
        report: from :func:`analyze_spectrum`.
        out_dir: created if missing.
        weights: provenance of the analysed weights, written into the JSON and the plot title.

    Returns:
        The three paths, in the order above.

    Raises:
        OpenTransError: ``report`` has no analysed layer.
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    out_dir = Path(out_dir)
    median = report.median_alpha
    rows = [{**asdict(la), "shape": list(la.shape), "below_median": la.alpha < median} for la in report.layers]

    columns = list(rows[0])
    lines = [",".join(columns)]
    for row in rows:
        cells = []
        for c in columns:
            v = row[c]
            if c == "shape":
                v = "x".join(str(s) for s in v)
            elif isinstance(v, float):
                v = f"{v:.6g}"
            cells.append(str(v))
        lines.append(",".join(cells))
    csv_path = write_text(out_dir / "alphas.csv", "\n".join(lines) + "\n")

    json_path = write_json(out_dir / "alphas.json", {
        "weights": weights,
        "median_alpha": median,
        "seconds": round(report.seconds, 3),
        "method": "weightwatcher power-law alpha of each layer's ESD (Hill MLE, KS-chosen xmin, pooled conv slices)",
        "layers": rows,
        "excluded": [{"name": n, "reason": r} for n, r in report.excluded],
    })

    n = len(report.layers)
    fig = Figure(figsize=(max(6.0, 0.22 * n + 2.0), 4.5))
    ax = fig.add_subplot(1, 1, 1)
    alphas = [la.alpha for la in report.layers]
    colours = ["tab:blue" if a < median else "tab:orange" for a in alphas]
    ax.bar(range(n), alphas, color=colours)
    ax.axhline(median, color="black", linestyle="--", linewidth=1, label=f"median alpha = {median:.2f}")
    ax.set_xticks(range(n))
    ax.set_xticklabels([_short(la.name) for la in report.layers], rotation=90, fontsize=6)
    ax.set_ylabel("power-law alpha of the ESD")
    title = "Per-layer heavy-tail alpha (blue: below median, frozen)"
    ax.set_title(f"{title}\n{weights}" if weights else title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(out_dir / "alphas.png") as tmp:
        fig.savefig(tmp, dpi=120)
    return [csv_path, json_path, out_dir / "alphas.png"]
