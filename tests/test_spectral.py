"""Heavy-tail spectral analysis: weightwatcher alphas, name mapping, exclusions, report files, analyze stage."""

from __future__ import annotations

import csv
import json
import logging
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from opentrans.errors import OpenTransError
from opentrans.finetune.spectral import _import_weightwatcher, analyze_spectrum, layer_alphas, write_alpha_report
from tests.conftest import TINY_VIT


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
    code = ("import logging; from opentrans.finetune.spectral import _import_weightwatcher; "
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
    from opentrans.finetune.stage import analyze_stage

    out = tmp_path / "analyze"
    figures = analyze_stage(None, TINY_VIT, "none", out)
    manifest = load_manifest(out)
    assert manifest["weights"] == "random-init weights"
    assert manifest["figures"] == figures
    assert figures["layers_analysed"] == 9 and figures["excluded"] == 4
    assert {o["path"] for o in manifest["outputs"]} == {"alphas.csv", "alphas.json", "alphas.png"}
    assert json.loads((out / "alphas.json").read_text())["median_alpha"] == pytest.approx(figures["median_alpha"], abs=1e-4)

    bad = tmp_path / "bad"
    with pytest.raises(OpenTransError, match="unknown model"):
        analyze_stage(None, "no-such-model", "none", bad)
    assert not bad.exists()
