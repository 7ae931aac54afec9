"""VPT-deep prompts: shape kept, outputs changed, gradients through the segmentor, init, save/load, ONNX parity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from opentrans.errors import OpenTransError
from opentrans.models.artifact import load_segmentor, save_segmentor
from opentrans.models.prompts import build_prompts
from opentrans.models.prompts.vpt import VPTDeep

WIDTH, BLOCKS, PATCH = 64, 3, 16  # opentrans-tiny-vit


def _inputs(seg, classes=4):
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, *seg.image_size, generator=g), torch.randn(classes, seg.embed_dim, generator=g)


def test_shape_kept_outputs_change_and_counts(tiny_vit):
    seg, _ = tiny_vit
    seg.eval()
    images, text = _inputs(seg)
    with torch.no_grad():
        plain = seg(images, text)
        vpt = build_prompts("vpt", seg.clip)
        seg.set_prompts(vpt)
        prompted = seg(images, text)
    assert isinstance(vpt, VPTDeep) and vpt.options() == {"tokens": 10, "layers": None, "seed": 0, "dropout": 0.0}
    assert prompted.shape == plain.shape
    assert not torch.allclose(prompted, plain, atol=1e-4)
    assert sum(p.numel() for p in vpt.parameters()) == BLOCKS * 10 * WIDTH
    shallow = build_prompts("vpt", seg.clip, {"tokens": 4, "layers": 2})
    assert sum(p.numel() for p in shallow.parameters() if p.requires_grad) == 2 * 4 * WIDTH

    # deep: block i sees exactly 1 + h*w + p tokens (the previous block's prompts replaced, not piled up)
    lengths = []
    hooks = [b.register_forward_pre_hook(lambda _m, a: lengths.append(a[0].shape[1]), prepend=False)
             for b in seg.clip.visual.transformer.resblocks]
    with torch.no_grad():
        seg.clip.encode_image(images[..., :64, :64])  # CLIP's own forward (native 64 x 64) calls every block
    for hook in hooks:
        hook.remove()
    assert lengths == [1 + (64 // PATCH) ** 2 + 10] * BLOCKS


def test_xavier_uniform_init_is_seeded(tiny_vit):
    seg, _ = tiny_vit
    a = build_prompts("vpt", seg.clip, {"seed": 3}).prompts
    b = build_prompts("vpt", seg.clip, {"seed": 3}).prompts
    c = build_prompts("vpt", seg.clip, {"seed": 4}).prompts
    bound = math.sqrt(6.0 / (3 * PATCH * PATCH + WIDTH))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound  # U(-v, v) fills its range
    assert abs(a.mean().item()) < 0.1 * bound


def test_gradient_reaches_prompts_in_maskclip(tiny_vit):
    seg, _ = tiny_vit
    assert seg.dense_mode == "maskclip"
    for p in seg.parameters():
        p.requires_grad_(False)
    seg.set_prompts(build_prompts("vpt", seg.clip, {"tokens": 5}))
    images, text = _inputs(seg)
    seg(images, text).logsumexp(1).mean().backward()
    grad = seg.prompts.prompts.grad
    assert grad is not None and grad.shape == (BLOCKS, 5, WIDTH)
    # blocks before the last are called as modules: their prompts shape the patch tokens MaskCLIP reads
    assert all(grad[i].abs().sum() > 0 for i in range(BLOCKS - 1))
    # MaskCLIP's last block runs by hand (value path only), so its pre-hook and prompts are not used
    assert grad[-1].abs().sum() == 0


def test_save_load_round_trip(tiny_vit, tmp_path):
    seg, spec = tiny_vit
    seg.eval()
    seg.set_prompts(build_prompts("vpt", seg.clip, {"tokens": 3, "layers": 2, "seed": 7}))
    with torch.no_grad():
        seg.prompts.prompts.add_(0.5)  # trained values, not the seeded init, must come back
    images, text = _inputs(seg)
    with torch.no_grad():
        before = seg(images, text)
    save_segmentor(seg, spec, tmp_path)
    loaded, loaded_spec = load_segmentor(tmp_path)
    assert loaded_spec.prompts == {"kind": "vpt", "tokens": 3, "layers": 2, "seed": 7, "dropout": 0.0}
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(images, text), before, rtol=0, atol=0)


def test_onnx_export_matches_torch(tiny_vit, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from opentrans.deploy.export import export_onnx

    seg, _ = tiny_vit
    seg.eval()
    seg.set_prompts(build_prompts("vpt", seg.clip, {"tokens": 4}))
    path = export_onnx(seg, tmp_path / "vpt.onnx")
    images, text = _inputs(seg, classes=5)
    images = torch.cat([images, images.flip(0)])  # another batch size than the trace's
    with torch.no_grad():
        expected = seg(images, text).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"images": images.numpy(), "text_embeds": text.numpy()})
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    with torch.no_grad():
        seg.set_prompts(None)
        plain = seg(images, text).numpy()
    assert np.abs(got - plain).max() > 1e-3  # the prompts are inside the graph


def test_bad_options(tiny_vit, tiny_rn):
    seg, _ = tiny_vit
    with pytest.raises(OpenTransError, match="needs a ViT"):
        build_prompts("vpt", tiny_rn[0].clip)
    with pytest.raises(OpenTransError, match="tokens 0"):
        build_prompts("vpt", seg.clip, {"tokens": 0})
    with pytest.raises(OpenTransError, match="layers 4"):
        build_prompts("vpt", seg.clip, {"layers": 4})
    with pytest.raises(OpenTransError, match="bad options"):
        build_prompts("vpt", seg.clip, {"depth": 2})
