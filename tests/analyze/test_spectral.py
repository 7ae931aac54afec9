"""Heavy-tail spectral analysis: weightwatcher alphas, name mapping, exclusions, report files, analyze stage."""

from __future__ import annotations

import csv
import json
import logging
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from opentrans.errors import OpenTransError
from opentrans.finetune.freeze import freeze_plan
from opentrans.analyze.spectral import (
    _import_weightwatcher,
    analyze_model,
    analyze_opentrans_qkv,
    analyze_spectrum,
    analyze_weightwatcher,
    authors_layers,
    esd,
    fit_power_law,
    fit_power_law_authors,
    layer_alphas,
    spectral_layers,
    write_alpha_report,
    write_esd_plot,
)
from conftest import TINY_VIT


def _linear_with_spectrum(n: int, m: int, tail_alpha: float, seed: int) -> nn.Linear:
    """A (n, m) Linear whose eigenvalues of W^T W follow a Pareto law p(lambda) ~ lambda^-tail_alpha."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(m, generator=g, dtype=torch.float64)
    evals = (1.0 - u) ** (-1.0 / (tail_alpha - 1.0))  # inverse CDF of the Pareto law on [1, inf)
    left, _ = torch.linalg.qr(torch.randn(n, m, generator=g, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    layer = nn.Linear(m, n, bias=False)
    layer.weight.data = ((left * evals.sqrt()) @ right.T).float()
    return layer


def test_alpha_recovers_known_tails_and_random_matrix_is_light_tailed():
    mp = nn.Linear(256, 512, bias=False)
    mp.weight.data = torch.randn(512, 256, generator=torch.Generator().manual_seed(0))  # Marchenko-Pastur bulk
    model = nn.Sequential(_linear_with_spectrum(512, 256, 2.0, 1), _linear_with_spectrum(512, 256, 3.0, 2),
                          _linear_with_spectrum(512, 256, 4.0, 3), mp)
    report = analyze_spectrum(model, prefix="m.")
    alphas = report.alphas()
    assert list(alphas) == ["m.0", "m.1", "m.2", "m.3"]
    for name, target in (("m.0", 2.0), ("m.1", 3.0), ("m.2", 4.0)):
        assert abs(alphas[name] - target) < 0.5, (name, alphas[name])
    assert alphas["m.0"] < alphas["m.1"] < alphas["m.2"] < alphas["m.3"]
    assert alphas["m.3"] > 6.0  # a Gaussian random matrix has no power-law tail: alpha is large
    assert report.excluded == ()
    assert all(la.num_eigs == 256 and la.kind == "Linear" and la.shape == (512, 256) for la in report.layers)
    assert report.median_alpha == pytest.approx(np.median(list(alphas.values())))


def test_vit_names_map_to_modules_and_patch_conv_is_excluded(tiny_vit):
    seg, _ = tiny_vit
    before = {k: v.clone() for k, v in seg.state_dict().items()}
    report = analyze_spectrum(seg.visual, prefix="clip.visual.")
    modules = dict(seg.named_modules())
    for la in report.layers:
        mod = modules[la.name]
        assert type(mod).__name__ == la.kind or (la.kind == "Linear" and isinstance(mod, nn.Linear))
        assert tuple(mod.weight.shape) == la.shape
        assert la.num_eigs == min(la.shape[:2])
        assert la.alpha > 1.0 and la.stable_rank > 0
    excluded = dict(report.excluded)
    assert "RGB" in excluded["clip.visual.conv1"]
    assert "in_proj_weight" in excluded["clip.visual.transformer.resblocks.0.attn"]
    # every Linear/Conv2d of the encoder is either analysed or excluded, never silently dropped
    layers = {f"clip.visual.{n}" for n, m in seg.visual.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    assert layers == {la.name for la in report.layers} | {n for n in excluded if not n.endswith(".attn")}
    assert len(report.layers) == 3 * 3  # out_proj, c_fc, c_proj per block
    # weights untouched, and the attribute weightwatcher sets on modules is removed again
    assert all(torch.equal(before[k], v) for k, v in seg.state_dict().items())
    assert not any("longname" in m.__dict__ for m in seg.modules())
    assert [la.name for la in layer_alphas(seg.visual, "clip.visual.")] == [la.name for la in report.layers]


def test_resnet_stem_excluded_and_conv_eigs_pooled(tiny_rn):
    seg, _ = tiny_rn
    report = analyze_spectrum(seg.visual, prefix="clip.visual.")
    names = {la.name: la for la in report.layers}
    assert "clip.visual.conv1" in dict(report.excluded)
    conv2 = names["clip.visual.conv2"]  # (4, 4, 3, 3): nine 4x4 slices pooled
    assert conv2.kind == "Conv2d" and conv2.num_eigs == 4 * 9
    assert names["clip.visual.attnpool.c_proj"].kind == "Linear"


def test_weightwatcher_rows_are_checked_against_modules(monkeypatch):
    weightwatcher = _import_weightwatcher()  # (a bare import would reconfigure the root logger)

    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))
    real = weightwatcher.WeightWatcher.analyze

    def shifted(self, *args, **kwargs):  # a weightwatcher whose layer ids are off by one
        details = real(self, *args, **kwargs)
        details["layer_id"] = details["layer_id"] + 2
        return details

    monkeypatch.setattr(weightwatcher.WeightWatcher, "analyze", shifted)
    with pytest.raises(OpenTransError, match="weightwatcher"):
        analyze_spectrum(model)


def test_weightwatcher_import_leaves_root_logger_alone():
    # weightwatcher's import calls logging.basicConfig(level=INFO); a fresh interpreter shows whether it leaks
    code = ("import logging; from opentrans.analyze.spectral import _import_weightwatcher; "
            "_import_weightwatcher(); root = logging.getLogger(); "
            "print(len(root.handlers), root.level)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["0", str(logging.WARNING)]
    assert "CUDA" not in out.stderr


def test_no_analysable_layer_raises():
    with pytest.raises(OpenTransError, match="no Linear or Conv2d"):
        analyze_spectrum(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()))


def test_report_files(tmp_path, tiny_vit):
    seg, _ = tiny_vit
    report = analyze_spectrum(seg.visual, prefix="clip.visual.")
    paths = write_alpha_report(report, tmp_path, weights="random-init weights")
    assert [p.name for p in paths] == ["alphas.csv", "alphas.json", "alphas.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alphas.csv", "alphas.json", "alphas.png"]  # no temp files
    rows = list(csv.DictReader(paths[0].open()))
    assert [r["name"] for r in rows] == [la.name for la in report.layers]
    assert [float(r["alpha"]) for r in rows] == pytest.approx([la.alpha for la in report.layers], rel=1e-5)
    data = json.loads(paths[1].read_text())
    assert data["weights"] == "random-init weights"
    assert data["median_alpha"] == pytest.approx(report.median_alpha)
    assert sum(r["below_median"] for r in data["layers"]) == sum(la.alpha < report.median_alpha for la in report.layers)
    assert {e["name"] for e in data["excluded"]} == {n for n, _ in report.excluded}
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_analyze_stage(tmp_path):
    from opentrans.artifacts import load_manifest
    from opentrans.analyze.options import AnalyzeOptions
    from opentrans.analyze.stage import analyze_stage
    from opentrans.models.source import ModelSource

    out = tmp_path / "analyze"
    figures = analyze_stage(ModelSource(model=TINY_VIT), AnalyzeOptions(estimator="both", towers=("image", "text")), out)
    manifest = load_manifest(out)
    assert manifest["weights"] == "random-init weights"
    assert manifest["figures"] == figures
    # the authors' layer set: image: the patch conv + 3 blocks x (c_fc, c_proj); text: 2 blocks x 2; left out:
    # every in_proj_weight and out_proj (5 blocks x 2). (Before the authors' layer set became the default this
    # test expected our Q/K/V-split counts, 18 + 12 analysed and 1 excluded: see the opentrans-qkv run below.)
    assert figures["layers_analysed"] == 7 + 4 and figures["excluded"] == 10
    assert figures["estimator"] == "both"
    assert {o["path"] for o in manifest["outputs"]} == {"alphas.csv", "alphas.json", "alphas.png", "esd.png"}
    data = json.loads((out / "alphas.json").read_text())
    assert data["median_alpha"] == pytest.approx(figures["median_alpha"], abs=1e-4)
    assert data["estimator"] == "opentrans" and data["comparison"]["estimator"] == "weightwatcher"
    assert data["comparison"]["layers_in_both"] == 10  # weightwatcher runs on our layer set: no patch conv
    rows = list(csv.DictReader((out / "alphas.csv").open()))
    assert {"alpha", "alpha_weighted", "stable_rank", "xmin", "ks_distance", "alpha_weightwatcher"} <= set(rows[0])
    assert rows[0]["name"] == "clip.visual.conv1" and rows[0]["alpha_weightwatcher"] == ""
    assert not any(r["name"].endswith("]") for r in rows)
    assert (out / "esd.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(manifest["options"]["esd_layers"]) == 3

    ours = analyze_stage(ModelSource(model=TINY_VIT), AnalyzeOptions(estimator="opentrans-qkv", towers=("image", "text")),
                         tmp_path / "qkv")
    # our layer set: image: 3 blocks x (Q, K, V, out_proj, c_fc, c_proj); text: 2 blocks x 6; only the patch conv
    # is left out
    assert ours["layers_analysed"] == 18 + 12 and ours["excluded"] == 1 and ours["estimator"] == "opentrans-qkv"
    rows = list(csv.DictReader((tmp_path / "qkv" / "alphas.csv").open()))
    assert any(r["name"].endswith("in_proj_weight[v]") and r["name"].startswith("clip.transformer.") for r in rows)

    bad = tmp_path / "bad"
    with pytest.raises(OpenTransError, match="unknown model"):
        analyze_stage(ModelSource(model="no-such-model"), AnalyzeOptions(), bad)
    with pytest.raises(OpenTransError, match="--esd-layers"):
        analyze_stage(ModelSource(model=TINY_VIT),
                      AnalyzeOptions(esd_layers=["clip.visual.transformer.resblocks.0.attn.out_proj"]), bad)
    with pytest.raises(OpenTransError, match="unknown tower"):
        analyze_stage(ModelSource(model=TINY_VIT), AnalyzeOptions(towers=("audio",)), bad)
    assert not bad.exists()


# ----------------------------------------------------------------- our opentrans-qkv estimator

def _pareto(n: int, alpha: float, seed: int, scale: float = 1.0) -> np.ndarray:
    u = np.random.default_rng(seed).random(n)
    return scale * (1.0 - u) ** (-1.0 / (alpha - 1.0))


def _reference_fit(eigs: np.ndarray, low: float = 0.95, high: float = 1.5):
    """A plain loop over the window, written independently of fit_power_law's vectorised sums."""
    x = np.sort(eigs[eigs > 1e-5])
    counts, edges = np.histogram(np.log10(x), bins=100)
    peak = 10 ** edges[np.argmax(counts)]
    best = None
    for i in range(len(x) - 1):
        if not low * peak <= x[i] <= high * peak:
            continue
        tail = x[i:]
        alpha = 1 + len(tail) / np.log(tail / x[i]).sum()
        d = np.abs(1 - (tail / x[i]) ** (1 - alpha) - np.arange(len(tail)) / len(tail)).max()
        if best is None or d < best[0]:
            best = (d, alpha, x[i])
    return best


@pytest.mark.parametrize("alpha", [2.0, 2.5, 3.5])
def test_fit_power_law_recovers_pareto_exponent_and_matches_reference(alpha):
    eigs = _pareto(4000, alpha, seed=int(alpha * 10), scale=0.3)
    fit = fit_power_law(eigs)
    assert abs(fit.alpha - alpha) < 0.15, fit
    d, ref_alpha, ref_xmin = _reference_fit(eigs)
    assert fit.alpha == pytest.approx(ref_alpha, rel=1e-9) and fit.xmin == ref_xmin
    assert fit.ks_distance == pytest.approx(d, rel=1e-9)
    assert 0.95 * fit.peak <= fit.xmin <= 1.5 * fit.peak
    assert fit.num_tail == int((eigs >= fit.xmin).sum()) and fit.num_eigs == 4000
    assert fit.alpha_weighted == pytest.approx(fit.alpha * math.log10(eigs.max()))
    assert fit.stable_rank == pytest.approx(eigs.sum() / eigs.max())
    assert fit_power_law(eigs * 7.0).alpha == pytest.approx(fit.alpha, rel=1e-9)  # scale-free


def test_fit_power_law_rejects_too_few_or_flat_spectra():
    with pytest.raises(OpenTransError, match="needs 8"):
        fit_power_law(np.ones(5))
    with pytest.raises(OpenTransError, match="no spread|no power-law"):
        fit_power_law(np.ones(50))
    with pytest.raises(OpenTransError, match="window"):
        fit_power_law(_pareto(100, 2.0, 0), window=(1.2, 1.5))


def test_esd_squares_singular_values_and_pools_conv_slices():
    g = torch.Generator().manual_seed(0)
    for shape in ((40, 24), (24, 40)):
        w = torch.randn(*shape, generator=g)
        expect = np.sort(torch.linalg.svdvals(w.double()).numpy() ** 2)
        assert np.allclose(esd(w), expect, rtol=1e-9, atol=1e-9)
    conv = torch.randn(12, 8, 3, 3, generator=g)
    pooled = np.sort(np.concatenate([torch.linalg.svdvals(conv[:, :, i, j].double()).numpy() ** 2
                                     for i in range(3) for j in range(3)]))
    got = esd(conv)
    assert got.shape == (9 * 8,) and np.allclose(got, pooled, rtol=1e-9, atol=1e-9)
    conv1d = torch.randn(12, 8, 3, generator=g)  # a Conv1d weight (the authors analyse Conv1d too): 3 slices
    assert esd(conv1d, conv_norm=0.5).shape == (3 * 8,)
    assert np.allclose(esd(conv, conv_norm=0.5), 0.5 * pooled, rtol=1e-9, atol=1e-9)  # W * sqrt(0.5)
    with pytest.raises(OpenTransError, match="1-D"):
        esd(torch.zeros(2))


def test_both_estimators_recover_known_tails_side_by_side():
    mp = nn.Linear(256, 512, bias=False)
    mp.weight.data = torch.randn(512, 256, generator=torch.Generator().manual_seed(0))
    model = nn.Sequential(_linear_with_spectrum(512, 256, 2.0, 1), _linear_with_spectrum(512, 256, 3.0, 2),
                          _linear_with_spectrum(512, 256, 4.0, 3), mp)
    ours = analyze_opentrans_qkv(model, "m.").alphas()
    theirs = analyze_weightwatcher(model, "m.").alphas()
    assert list(ours) == list(theirs) == ["m.0", "m.1", "m.2", "m.3"]
    for name, target in (("m.0", 2.0), ("m.1", 3.0), ("m.2", 4.0)):
        assert abs(ours[name] - target) < 0.5, (name, ours[name])
        assert abs(ours[name] - theirs[name]) < 0.25, (name, ours[name], theirs[name])  # the estimators agree
    assert ours["m.0"] < ours["m.1"] < ours["m.2"]
    # a Gaussian (Marchenko-Pastur) matrix: weightwatcher's global xmin lands on the sharp bulk edge (huge
    # alpha); xmin_peak fits from near the bulk's mode, a moderate alpha above the Pareto(2) tail's
    assert theirs["m.3"] > 6.0 and ours["m.0"] < ours["m.3"] < theirs["m.3"]


def test_qkv_split_covers_both_towers(tiny_vit):
    seg, _ = tiny_vit
    assert list(analyze_model(seg, ("image",), "both")) == ["opentrans", "weightwatcher"]
    ours = analyze_model(seg, ("image", "text"), "opentrans-qkv")["opentrans-qkv"]
    theirs = analyze_model(seg, ("image", "text"), "weightwatcher")["weightwatcher"]
    assert [la.name for la in ours.layers] == [la.name for la in theirs.layers]
    names = [la.name for la in ours.layers]
    for tower, blocks in (("clip.visual.transformer", 3), ("clip.transformer", 2)):
        for b in range(blocks):
            for tag in "qkv":
                assert f"{tower}.resblocks.{b}.attn.in_proj_weight[{tag}]" in names
    assert len(names) == 6 * 3 + 6 * 2 and dict(ours.excluded).keys() == {"clip.visual.conv1"}
    layers = {lm.name: lm for lm in spectral_layers(seg.visual, "clip.visual.")[0]}
    k = layers["clip.visual.transformer.resblocks.1.attn.in_proj_weight[k]"]
    assert k.kind == "MHA-k" and torch.equal(k.weight, seg.visual.transformer.resblocks[1].attn.in_proj_weight[64:128])
    assert all(la.kind.startswith("MHA-") == la.name.endswith("]") for la in ours.layers)
    assert all(math.isfinite(la.ks_distance) and la.ks_distance < 1 for la in ours.layers + theirs.layers)
    with pytest.raises(OpenTransError, match="estimator"):
        analyze_model(seg, ("image",), "hill")


def test_resnet_conv_layers_pooled_by_both_opentrans_estimators(tiny_rn):
    seg, _ = tiny_rn
    report = analyze_model(seg, ("image",), "opentrans-qkv")["opentrans-qkv"]
    names = {la.name: la for la in report.layers}
    assert names["clip.visual.conv2"].kind == "Conv2d" and names["clip.visual.conv2"].num_eigs == 4 * 9
    assert "clip.visual.conv1" in dict(report.excluded)
    assert "clip.visual.attnpool.q_proj" in names  # separate Q/K/V Linear modules of the attention pool
    authors = analyze_model(seg, ("image",), "opentrans")["opentrans"]
    names = {la.name: la for la in authors.layers}
    assert names["clip.visual.conv2"].num_eigs == 4 * 9 and "clip.visual.conv1" in names  # the RGB stem too
    assert "clip.visual.attnpool.q_proj" in names
    assert "classifier" in dict(authors.excluded)["clip.visual.attnpool.c_proj"]  # (32, 256): aspect ratio 8


def test_esd_plot_and_comparison_report(tmp_path, tiny_vit):
    seg, _ = tiny_vit
    reports = analyze_model(seg, ("image",), "both")
    paths = write_alpha_report(reports["opentrans"], tmp_path, weights="random-init weights",
                               compare=reports["weightwatcher"])
    data = json.loads(paths[1].read_text())
    diffs = [abs(r["alpha"] - r["alpha_weightwatcher"]) for r in data["layers"]
             if r["alpha_weightwatcher"] is not None]  # the patch conv has no weightwatcher alpha (null)
    assert len(diffs) == data["comparison"]["layers_in_both"] == 6
    assert data["comparison"]["max_abs_alpha_diff"] == pytest.approx(max(diffs))
    mats = spectral_layers(seg.visual, "clip.visual.")[0][:2]
    png = write_esd_plot(tmp_path / "esd.png", mats, weights="random-init weights")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alphas.csv", "alphas.json", "alphas.png", "esd.png"]


# ----------------------------------------------------------------- the OpenTrans authors' estimator (the default)
# An independent transcription of github.com/Xujxyang/OpenTrans at aea33ff3682403aec6d55a670030d6cb4b0623cd,
# utils.py: get_module_names_shapes l. 211-233 (attn_split_qkv l. 184-208), matrix_esd_estimator l. 235-317 with
# fix_fingers='xmin_peak', net_esd_estimator l. 320-423 (EVALS_THRESH=1e-5, bins=100, conv_norm=0.5), and the
# median split of plain_train_net.py l. 21-29 and 412-420. Differences, all numerical: float64 on the CPU (theirs
# float32 on CUDA, .cuda() calls dropped), and the histogram boundaries in that dtype.

def _authors_get_module_names_shapes(model):
    names, modules = [], []
    for name, module in model.named_modules():
        if type(module).__name__.lower() in ["conv2d", "conv1d", "linear"]:
            if "attn" in name or "attention" in name:
                m, n = module.weight.shape
                assert not (m == n // 3 or n == m // 3), "attn_split_qkv would split this Linear (none in CLIP)"
            names.append(name)
            modules.append(module)
    return names, modules


def _authors_matrix_esd_estimator(matrix, evals_thresh=0.00001, bins=100):
    eigs = torch.square(torch.linalg.svdvals(matrix.double()).flatten())
    eigs, _ = torch.sort(eigs, descending=False)
    nz_eigs = eigs[eigs > evals_thresh]
    big_n = len(nz_eigs)
    if big_n == 0:
        nz_eigs = eigs
        big_n = len(nz_eigs)
    log_nz_eigs = torch.log(nz_eigs)
    alphas = torch.zeros(big_n - 1, dtype=torch.float64)
    ds = torch.ones(big_n - 1, dtype=torch.float64)
    hist_nz_eigs = torch.log10(nz_eigs)
    min_e, max_e = hist_nz_eigs.min(), hist_nz_eigs.max()
    counts = torch.histc(hist_nz_eigs, bins, min=min_e, max=max_e)
    boundaries = torch.linspace(min_e, max_e, bins + 1, dtype=torch.float64)
    ih = torch.argmax(counts)
    xmin2 = 10 ** boundaries[ih]
    xmin_min = torch.log10(0.95 * xmin2)
    xmin_max = 1.5 * xmin2
    for i, xmin in enumerate(nz_eigs[:-1]):
        if xmin < xmin_min:
            continue
        if xmin > xmin_max:
            break
        n = float(big_n - i)
        seq = torch.arange(n, dtype=torch.float64)
        alpha = 1 + n / (torch.sum(log_nz_eigs[i:]) - n * log_nz_eigs[i])
        alphas[i] = alpha
        if alpha > 1:
            ds[i] = torch.max(torch.abs(1 - (nz_eigs[i:] / xmin) ** (-alpha + 1) - seq / n))
    k = torch.argmin(ds)
    return alphas[k].item(), ds[k].item()


def _authors_net_esd_estimator(net, conv_norm=0.5):
    out = {"longname": [], "alpha": [], "D": []}
    for name, m in zip(*_authors_get_module_names_shapes(net)):
        if type(m).__name__.lower() == "linear" and max(m.weight.shape) / min(m.weight.shape) >= 8:
            continue
        matrix = m.weight.data.clone()
        if len(matrix.shape) > 2:
            matrix = torch.flatten(matrix, start_dim=2) * math.sqrt(conv_norm)
            matrix = matrix.transpose(1, 2).transpose(0, 1)
        alpha, d = _authors_matrix_esd_estimator(matrix)
        out["longname"].append(name)
        out["alpha"].append(alpha)
        out["D"].append(d)
    return out


def _authors_median(lst):
    s = sorted(lst)
    n = len(s)
    return s[n // 2] if n % 2 == 1 else (s[n // 2 - 1] + s[n // 2]) / 2


@pytest.mark.parametrize("fixture", ["tiny_vit", "tiny_rn"])
def test_default_estimator_layers_alphas_and_split_are_the_authors(fixture, request):
    seg, _ = request.getfixturevalue(fixture)
    theirs = _authors_net_esd_estimator(seg.visual)
    report = analyze_model(seg, ("image",))["opentrans"]  # the default estimator
    assert [la.name for la in report.layers] == ["clip.visual." + n for n in theirs["longname"]]
    # (rel 1e-6: the eigenvalues come from eigvalsh of the Gram matrix here and from svdvals there; the
    # rank-3 slices of the patch conv differ by ~2e-7 relative in alpha)
    assert [la.alpha for la in report.layers] == pytest.approx(theirs["alpha"], rel=1e-6)
    assert [la.ks_distance for la in report.layers] == pytest.approx(theirs["D"], rel=1e-5, abs=1e-6)
    mid = _authors_median(theirs["alpha"])
    frozen = {"clip.visual." + n for n, a in zip(theirs["longname"], theirs["alpha"]) if a < mid}
    plan = freeze_plan(report.layers)
    assert set(plan.frozen) == frozen and plan.median_alpha == pytest.approx(mid, rel=1e-6)
    # the authors analyse the RGB conv and no attention projection
    assert "clip.visual.conv1" in plan.alphas
    assert not any(n.endswith("]") or n.endswith("out_proj") for n in plan.alphas)
    assert [lm.name for lm in authors_layers(seg.visual, "clip.visual.")[0]] == [la.name for la in report.layers]


@pytest.mark.parametrize("scale", [1e-3, 1.0, 40.0, 1e3])
def test_authors_fit_with_its_logged_lower_bound_and_conv_scaling(scale):
    # scale > 1.05 / peak makes log10(0.95 peak) positive, so the lower bound does cut candidates
    layer = _linear_with_spectrum(300, 120, 2.5, int(scale * 7) + 1)
    w = layer.weight.data.double() * math.sqrt(scale)
    alpha, d = _authors_matrix_esd_estimator(w)
    fit = fit_power_law_authors(esd(w))
    assert fit.alpha == pytest.approx(alpha, rel=1e-9) and fit.ks_distance == pytest.approx(d, rel=1e-9)
    # conv weights: (k*k, out, in) slices of W * sqrt(0.5)
    conv = torch.randn(24, 16, 3, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * scale
    theirs = _authors_matrix_esd_estimator((conv.flatten(2) * math.sqrt(0.5)).transpose(1, 2).transpose(0, 1))
    ours = fit_power_law_authors(esd(conv, conv_norm=0.5))
    assert ours.alpha == pytest.approx(theirs[0], rel=1e-9) and ours.ks_distance == pytest.approx(theirs[1], rel=1e-9)


def test_estimator_registry_names_and_lookup():
    from opentrans.analyze.spectral import SPECTRAL_ESTIMATORS, estimator_names

    assert estimator_names() == ["opentrans", "opentrans-qkv", "weightwatcher"]
    assert estimator_names(with_both=True)[-1] == "both"
    assert SPECTRAL_ESTIMATORS.get("opentrans").authors_fit and not SPECTRAL_ESTIMATORS.get("weightwatcher").authors_fit
    with pytest.raises(OpenTransError, match="unknown estimator 'nope'; choose one of opentrans, opentrans-qkv"):
        analyze_model(nn.Linear(4, 4), estimator="nope")
