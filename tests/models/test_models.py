"""Segmentor forward, MaskCLIP dense path, and safetensors artifacts round trips."""

import json

import pytest
import torch
import torch.nn.functional as F

from opentrans.errors import OpenTransError
from opentrans.models.artifact import load_segmentor, resolve_model, save_segmentor
from opentrans.models.clip import RANDOM_INIT, load_clip
from conftest import TINY_RN, TINY_VIT


@pytest.mark.parametrize("fixture", ["tiny_vit", "tiny_rn"])
def test_forward_shapes_and_round_trip(fixture, request, tmp_path):
    seg, spec = request.getfixturevalue(fixture)
    text = seg.encode_classes(["road", "car", "sky", "tree"], model_name=spec.model)
    assert text.shape == (4, seg.embed_dim)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(4))
    images = torch.randn(2, 3, *spec.image_size)
    with torch.no_grad():
        logits = seg(images, text)
    assert logits.shape == (2, 4, *spec.image_size)
    save_segmentor(seg, spec, tmp_path)
    assert json.loads((tmp_path / "model.json").read_text())["weights"] == RANDOM_INIT
    loaded, spec2 = load_segmentor(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images, text), logits, rtol=0, atol=0)
    assert spec2 == spec


def test_maskclip_uses_value_path_of_last_block(tiny_vit):
    """The dense features are MaskCLIP's value path with the last block's residual and FFN, as in the authors'
    code (chongzhou96/MaskCLIP@245d31f mmseg/models/backbones/vit.py L97-104: ``v += x; v = ffn(norm2(v),
    identity=v)``): v = x + out_proj(W_v ln_1(x)), ln_post(v + mlp(ln_2(v))) @ proj. Issue 12: this test used
    to expect the residual-free ln_post(out_proj(W_v ln_1(x))) @ proj, now the ``maskclip-noresidual`` mode."""
    seg, spec = tiny_vit
    v = seg.visual
    images = torch.randn(1, 3, 64, 64)  # the tiny ViT's native grid: no position interpolation involved
    with torch.no_grad():
        x = v._embeds(images)
        for blk in v.transformer.resblocks[:-1]:
            x = blk(x)
        last = v.transformer.resblocks[-1]
        w = last.attn.embed_dim
        val = last.attn.out_proj(F.linear(last.ln_1(x), last.attn.in_proj_weight[2 * w:], last.attn.in_proj_bias[2 * w:]))
        val = x + val
        val = val + last.mlp(last.ln_2(val))
        expected = v.ln_post(val[:, 1:]) @ v.proj
        got = seg.dense_features(images)
        torch.testing.assert_close(got, expected)
        seg.set_dense_mode("maskclip-noresidual")
        torch.testing.assert_close(seg.dense_features(images),
                                   v.ln_post(last.attn.out_proj(F.linear(last.ln_1(x), last.attn.in_proj_weight[2 * w:],
                                                                         last.attn.in_proj_bias[2 * w:]))[:, 1:]) @ v.proj)
    # and differs from the ordinary last-block output (query-key attention is really dropped)
    with torch.no_grad():
        ordinary = v.ln_post(last(x)[:, 1:]) @ v.proj
    assert not torch.allclose(got, ordinary, atol=1e-3)


def test_linear_head_starts_at_identity_and_is_trainable(tiny_vit):
    seg, _ = tiny_vit
    feats = torch.randn(2, 5, seg.embed_dim)
    torch.testing.assert_close(seg.head(feats), feats)
    assert all(p.requires_grad for p in seg.head.parameters())


def test_bad_inputs(tmp_path, tiny_vit):
    with pytest.raises(OpenTransError, match="unknown model"):
        load_clip("ViT-Z-99")
    with pytest.raises(OpenTransError, match="no such file"):
        load_clip(TINY_VIT, "/nonexistent/weights.bin")
    with pytest.raises(OpenTransError, match="either --from"):
        resolve_model(tmp_path, TINY_VIT)
    with pytest.raises(OpenTransError, match="no model.json"):
        resolve_model(tmp_path, None)
    seg, spec = tiny_vit
    save_segmentor(seg, spec, tmp_path)
    spec_json = json.loads((tmp_path / "model.json").read_text())
    spec_json["model"], spec_json["image_size"] = TINY_RN, [64, 64]  # ViT weights declared as a ResNet
    (tmp_path / "model.json").write_text(json.dumps(spec_json))
    with pytest.raises(OpenTransError, match="does not match"):
        load_segmentor(tmp_path)


def test_random_init_is_deterministic():
    a = load_clip(TINY_VIT).model.visual.conv1.weight
    b = load_clip(TINY_VIT).model.visual.conv1.weight
    torch.testing.assert_close(a, b, rtol=0, atol=0)
