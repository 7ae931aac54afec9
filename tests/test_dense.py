"""Training-free dense modes (MaskCLIP, SCLIP, ClearCLIP, NACLIP, CLIPer): formulas, ONNX parity, pruning."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import CAMVID_SPEC, TINY_VIT
from opentrans.data import open_dataset
from opentrans.deploy import export_onnx
from opentrans.deploy.targets.onnx import OnnxRuntimeRunner
from opentrans.errors import OpenTransError
from opentrans.models import dense
from opentrans.models.artifact import build_segmentor, load_segmentor, save_segmentor
from opentrans.models.segmentor import DENSE_MODES

VIT_MODES = dense.VIT_MODES


def _last_block_input(seg, images):
    v = seg.visual
    x, _ = dense.embed_tokens(v, images)
    for blk in v.transformer.resblocks[:-1]:
        x = blk(x)
    return x, v.transformer.resblocks[-1]


def test_qkv_and_attend_reproduce_torch_attention(tiny_vit):
    """The helpers every mode is built from give exactly nn.MultiheadAttention's output for softmax(qk^T)."""
    seg, _ = tiny_vit
    blk = seg.visual.transformer.resblocks[0]
    x = torch.randn(2, 21, blk.attn.embed_dim)
    with torch.no_grad():
        q, k, v = dense.qkv(blk.attn, x)
        weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
        ours = dense.attend(blk.attn, weights, v)
        ref, ref_w = blk.attn(x, x, x, need_weights=True, average_attn_weights=False)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weights, ref_w, rtol=1e-5, atol=1e-6)


def test_clearclip_sclip_naclip_last_block_formulas(tiny_vit):
    """Each mode's last block, recomputed head by head with explicit loops (independent of the vectorised code)."""
    seg, _ = tiny_vit
    v = seg.visual
    images = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        x, last = _last_block_input(seg, images)
        xn = last.ln_1(x)[0]  # (N, W)
        width = last.attn.embed_dim
        heads = last.attn.num_heads
        d = width // heads
        q, k, val = F.linear(xn, last.attn.in_proj_weight, last.attn.in_proj_bias).split(width, dim=-1)

        def per_head(weight_fn):
            outs = []
            for h in range(heads):
                sl = slice(h * d, (h + 1) * d)
                outs.append(weight_fn(q[:, sl], k[:, sl]) @ val[:, sl])
            return last.attn.out_proj(torch.cat(outs, dim=-1))

        s = d ** -0.5
        clear = per_head(lambda qh, kh: torch.softmax(s * qh @ qh.t(), -1))
        sclip_attn = per_head(lambda qh, kh: torch.softmax(s * qh @ qh.t(), -1) + torch.softmax(s * kh @ kh.t(), -1))
        # NACLIP: Gaussian over patch coordinates of the 4x5 grid, std 5 patches, CLS row/column 0
        coords = [(i, j) for i in range(4) for j in range(5)]
        omega = torch.zeros(21, 21)
        for a, (i, j) in enumerate(coords, 1):
            for b, (m, n) in enumerate(coords, 1):
                omega[a, b] = math.exp(-((i - m) ** 2 + (j - n) ** 2) / (2 * 5.0 ** 2))
        nac = per_head(lambda qh, kh: torch.softmax(s * kh @ kh.t() + omega, -1))

        head = lambda t: v.ln_post(t[None, 1:]) @ v.proj  # noqa: E731
        x_s = x[0] + sclip_attn
        x_s = x_s + last.mlp(last.ln_2(x_s))
        torch.testing.assert_close(dense.clearclip(v, images), head(clear), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(dense.sclip(v, images), head(x_s), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(dense.naclip(v, images), head(nac), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(dense.gaussian_bias((4, 5)), omega, rtol=1e-6, atol=1e-7)


def test_gaussian_bias_matches_naclip_convolution_construction():
    """NACLIP builds omega by convolving one-hot maps with a (2h-1, 2w-1) Gaussian window; same result here."""
    h, w, std = 3, 4, 2.0
    c = 1 / (std * math.sqrt(2))
    ks = [torch.linspace(-(n - 1) * c, (n - 1) * c, 2 * n - 1) for n in (h, w)]
    window = torch.exp(-(torch.stack(torch.meshgrid(*ks, indexing="ij")) ** 2).sum(0))
    onehot = torch.eye(h * w).view(h * w, 1, h, w)
    conv = F.conv2d(onehot, window[None, None], padding="same").view(h * w, h * w)
    torch.testing.assert_close(dense.gaussian_bias((h, w), std)[1:, 1:], conv, rtol=1e-5, atol=1e-6)


def test_cliper_fused_map_and_score_fusion(tiny_vit):
    seg, _ = tiny_vit
    images = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        feats, amap = dense.cliper_features(seg.visual, images)
    layers = len(seg.visual.transformer.resblocks)
    assert feats.shape == (layers, 2, 20, seg.embed_dim) and amap.shape == (2, 20, 20)
    assert (amap >= 0).all()
    # score fusion on a hand-made case: 2 layers, 1 image, 3 patches, 2 classes
    text = torch.eye(2)
    f = torch.tensor([[[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]], [[[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]]])
    a = torch.eye(3)[None]
    scale = torch.tensor(10.0)
    got = dense.cliper_scores(f, a, text, scale, keep=0.2)
    t_all = torch.cat([text, F.normalize(text.mean(0, keepdim=True), dim=-1)])
    p = torch.softmax(scale * F.normalize(f, dim=-1) @ t_all.t(), -1)[..., :2]
    last = p[-1].clone()
    last[last < 0.2 * last.amax(1, keepdim=True)] = 0
    torch.testing.assert_close(got, a @ last + p[0])


@pytest.mark.parametrize("mode", VIT_MODES)
def test_every_mode_segments_and_round_trips(mode, tmp_path):
    seg, spec = build_segmentor(TINY_VIT, "none", dense_mode=mode)
    text = torch.randn(3, seg.embed_dim)
    images = torch.randn(2, 3, *spec.image_size)
    with torch.no_grad():
        logits = seg(images, text)
        feats = seg.dense_features(images)
    assert logits.shape == (2, 3, *spec.image_size) and torch.isfinite(logits).all()
    assert feats.shape == (2, math.prod(seg.feature_grid), seg.embed_dim)
    save_segmentor(seg, spec, tmp_path)
    loaded, spec2 = load_segmentor(tmp_path)
    assert spec2.dense_mode == mode and loaded.dense_mode == mode
    with torch.no_grad():
        torch.testing.assert_close(loaded(images, text), logits, rtol=0, atol=0)


def test_modes_differ_and_resnet_supports_only_maskclip(tiny_vit):
    seg, spec = tiny_vit
    images = torch.randn(1, 3, *spec.image_size)
    outs = {}
    with torch.no_grad():
        for mode in VIT_MODES:
            seg.dense_mode = mode
            outs[mode] = seg.dense_features(images)
    for a in VIT_MODES:
        for b in VIT_MODES:
            if a < b:
                assert not torch.allclose(outs[a], outs[b], atol=1e-4), (a, b)
    with pytest.raises(OpenTransError, match="ResNet supports only maskclip"):
        build_segmentor("opentrans-tiny-rn", "none", dense_mode="naclip")
    with pytest.raises(OpenTransError, match="unknown dense mode"):
        build_segmentor(TINY_VIT, "none", dense_mode="gem")
    assert DENSE_MODES == VIT_MODES


def test_every_vit_mode_exports_to_onnx_with_parity_on_a_camvid_image(tmp_path):
    """torch.onnx.export(dynamo=False) of each mode, ONNX Runtime and OpenVINO vs PyTorch on a real CamVid image."""
    import openvino as ov

    for mode in VIT_MODES:
        seg, spec = build_segmentor(TINY_VIT, "none", dense_mode=mode)
        ds = open_dataset(CAMVID_SPEC, "val", spec.image_size, spec.mean, spec.std, limit=1)
        image = ds[0][0][None].numpy()
        text = seg.encode_classes(list(ds.class_names), model_name=TINY_VIT).numpy()
        path = export_onnx(seg, tmp_path / f"{mode}.onnx")
        with torch.no_grad():
            ref = seg(torch.from_numpy(image), torch.from_numpy(text)).numpy()
        out = OnnxRuntimeRunner(path)(image, text)
        assert out.shape == ref.shape
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4, err_msg=mode)
        assert (out.argmax(1) == ref.argmax(1)).mean() > 0.999, mode
        # and OpenVINO converts the same file (f32 inference precision, see docs/pitfalls)
        compiled = ov.Core().compile_model(ov.convert_model(str(path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        np.testing.assert_allclose(compiled([image, text])[0], ref, rtol=1e-4, atol=1e-4, err_msg=f"openvino {mode}")


def test_modes_run_on_a_structurally_pruned_vit():
    """Pruned MLP widths (what `opentrans prune` changes) leave every mode working."""
    from opentrans.prune.structured import prune_structured

    seg, spec = build_segmentor(TINY_VIT, "none")
    before = seg.visual.transformer.resblocks[0].mlp.c_fc.out_features
    prune_structured(seg, 0.5, round_to=None)
    assert seg.visual.transformer.resblocks[0].mlp.c_fc.out_features < before
    images = torch.randn(1, 3, *spec.image_size)
    text = torch.randn(4, seg.embed_dim)
    with torch.no_grad():
        for mode in VIT_MODES:
            seg.dense_mode = mode
            assert torch.isfinite(seg(images, text)).all(), mode


def test_cliper_diffusion_compensation_math_and_plugin_errors(tmp_path):
    """CLIPer's fine-grained compensation on a 4x4 latent grid, against a direct re-computation."""
    from opentrans.models.diffusion_refine import StableDiffusionAttention, compensate

    g = torch.Generator().manual_seed(0)
    att = torch.softmax(torch.randn(3, 16, 16, generator=g), dim=-1)
    scores = torch.rand(2, 4, 4, generator=g)
    norm = att / (att.amax(dim=-2, keepdim=True) + 1e-5)
    norm = torch.where(norm < 0.1, torch.zeros_like(norm), norm)
    norm = norm / (norm.sum(-1, keepdim=True) + 1e-5)
    coarse = scores.flatten(1).t()
    torch.testing.assert_close(compensate(scores, att), (norm[0] @ norm[1] @ norm[2] @ coarse).t().reshape(2, 4, 4))
    torch.testing.assert_close(compensate(scores, att, "mean"), (norm.mean(0) @ coarse).t().reshape(2, 4, 4))
    with pytest.raises(OpenTransError, match="g\\*g"):
        compensate(scores, torch.rand(1, 15, 15))
    with pytest.raises(OpenTransError, match="diffusers|model_index.json"):
        StableDiffusionAttention(tmp_path)
