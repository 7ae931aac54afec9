"""LDVC: deep vision-language prompts (opentrans.models.prompts.ldvc) and the local-consensus decoder with route
attention (opentrans.models.decoders.ldvc): identity at init, template-initialised text prompts, routing equal to a
dense masked reference, gradients to both towers and every decoder parameter, training, save/load, ONNX parity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from opentrans.errors import OpenTransError
from opentrans.models.artifact import load_segmentor, save_segmentor
from opentrans.models.decoders.ldvc import RouteAttention, _side
from opentrans.models.prompts import build_prompts
from opentrans.models.prompts.ldvc import CLASS_TEMPLATE

CLASSES = ["road", "car", "sky", "tree", "person"]
HEAD = {"windows": 2, "topk": 3, "heads": 2, "depth": 2, "hidden": 32}


def _images(seg, n=2, seed=0):
    return torch.randn(n, 3, *seg.image_size, generator=torch.Generator().manual_seed(seed))


def _perturb(module, scale=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def test_decoder_is_identity_at_init(tiny_vit):
    seg, _ = tiny_vit
    images, text = _images(seg), seg.encode_classes(CLASSES)
    with torch.no_grad():
        plain = seg(images, text)
        seg.set_head("ldvc", HEAD)
        decoded = seg(images, text)
        _perturb(seg.head)
        moved = seg(images, text)
    torch.testing.assert_close(decoded, plain, atol=0, rtol=0)
    assert not torch.allclose(moved, plain, atol=1e-3)  # the head does act once trained


@pytest.mark.parametrize("fixture", ["tiny_vit", "tiny_rn"])
def test_text_prompts_start_at_the_template(fixture, request):
    seg, _ = request.getfixturevalue(fixture)
    plain = seg.encode_classes(CLASSES, templates=(CLASS_TEMPLATE,))
    prompts = build_prompts("ldvc", seg.clip)
    seg.set_prompts(prompts)
    assert prompts.templates == (CLASS_TEMPLATE,)
    assert prompts.text_prompts.shape == (len(seg.clip.transformer.resblocks), 4, seg.clip.transformer.width)
    # encode_classes uses the prompts' template and, at init, gives the unprompted embeddings of that template
    torch.testing.assert_close(seg.encode_classes(CLASSES), plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(prompts.class_embeddings(seg.clip, CLASSES), plain, atol=1e-5, rtol=0)
    with torch.no_grad():
        prompts.text_prompts.add_(torch.randn_like(prompts.text_prompts))  # not a constant: LayerNorm removes those
    assert (seg.encode_classes(CLASSES) - plain).abs().max() > 1e-2  # the prompts are in the text tower
    if fixture == "tiny_rn":  # text prompts only on a ResNet image tower
        assert prompts.visual_depth == 0
        assert not any("coupler" in n or "visual" in n for n, _ in prompts.named_parameters())
        with pytest.raises(OpenTransError, match="need a ViT"):
            build_prompts("ldvc", seg.clip, {"visual_depth": 1})
        with torch.no_grad():
            assert seg(_images(seg), plain).shape == (2, len(CLASSES), *seg.image_size)


@pytest.mark.parametrize("h,w,windows,topk", [(4, 5, 2, 2), (5, 7, 4, 3), (6, 6, 3, 9), (3, 5, 4, 1)])
def test_route_attention_equals_masked_dense_attention(h, w, windows, topk):
    """BiFormer's routing: each token attends exactly to the tokens of the top-k windows of its window (ranked by
    window-mean q . window-mean k), padded slots excluded; checked against dense attention with that mask."""
    torch.manual_seed(0)
    dim, heads, b = 16, 2, 2
    route = RouteAttention(dim, heads, windows, topk)
    x = torch.randn(b, h * w, dim)
    with torch.no_grad():
        out = route(x, (h, w))
        sh, nh = _side(h, windows)
        sw, nw = _side(w, windows)
        q, k, v = route.qkv(x).chunk(3, dim=-1)
        win = torch.tensor([(i // sh) * nw + j // sw for i in range(h) for j in range(w)])
        member = F.one_hot(win, nh * nw).float().t()  # (R, N)
        member = member / member.sum(1, keepdim=True)
        idx = torch.topk((member @ q) @ (member @ k).transpose(1, 2), topk, dim=-1).indices
        routed = torch.zeros(b, nh * nw, nh * nw, dtype=torch.bool).scatter_(-1, idx, True)
        allowed = routed[:, win][:, :, win]  # (B, N, N): key j allowed for query i
        d = dim // heads
        qh, kh, vh = (t.reshape(b, h * w, heads, d).transpose(1, 2) for t in (q, k, v))
        scores = (qh @ kh.transpose(-2, -1) / math.sqrt(d)).masked_fill(~allowed[:, None], float("-inf"))
        attended = (scores.softmax(-1) @ vh).transpose(1, 2).reshape(b, h * w, dim)
        lce = route.lce(v.transpose(1, 2).reshape(b, dim, h, w)).flatten(2).transpose(1, 2)
        expected = route.proj(attended + lce)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    if topk < nh * nw:  # sparse routing really differs from full attention
        full = route.proj((qh @ kh.transpose(-2, -1) / math.sqrt(d)).softmax(-1).matmul(vh)
                          .transpose(1, 2).reshape(b, h * w, dim) + lce)
        assert not torch.allclose(out, full, atol=1e-4)


def test_gradients_reach_both_towers_and_every_decoder_parameter_and_training_helps(tiny_vit, camvid_spec):
    from opentrans.data import collate, open_dataset
    from opentrans.finetune.trainer import resize_masks

    torch.manual_seed(0)  # the decoder's and couplers' default init
    seg, spec = tiny_vit
    data = open_dataset(camvid_spec, "train", spec.image_size, spec.mean, spec.std, limit=2)
    images, masks = collate([data[i] for i in range(len(data))])
    target = resize_masks(masks, seg.image_size)
    prompts = build_prompts("ldvc", seg.clip)
    seg.set_prompts(prompts)
    seg.set_head("ldvc", HEAD)
    for p in seg.clip.parameters():
        p.requires_grad_(False)
    trainable = [p for p in seg.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in [*seg.head.parameters(), *prompts.parameters()]}
    opt = torch.optim.AdamW(trainable, lr=3e-3, weight_decay=0.0)
    seg.train()
    losses = []
    for step in range(5):
        opt.zero_grad(set_to_none=True)
        text = prompts.class_embeddings(seg.clip, list(data.class_names))  # differentiable text tower
        loss = F.cross_entropy(seg(images, text), target, ignore_index=data.ignore_index)
        loss.backward()
        if step == 0:  # the zero-initialised out_proj blocks the decoder's inner gradients at init
            assert prompts.text_prompts.grad.abs().sum() > 0
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in prompts.couplers.parameters())
        if step == 1:  # after one step every parameter of both towers' prompts and of the decoder learns
            silent = [n for n, p in [*seg.head.named_parameters(), *prompts.named_parameters()]
                      if p.grad is None or p.grad.abs().sum() == 0]
            assert not silent, silent
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 1e-3, losses


def test_uncoupled_visual_prompts_get_gradients(tiny_vit):
    seg, _ = tiny_vit
    prompts = build_prompts("ldvc", seg.clip, {"coupled": False, "visual_tokens": 2})
    seg.set_prompts(prompts)
    assert prompts.options() == {"text_depth": 2, "visual_depth": 3, "visual_tokens": 2, "coupled": False}
    text = prompts.class_embeddings(seg.clip, CLASSES)
    seg(_images(seg), text).square().mean().backward()
    # the last image block is run by hand in the maskclip mode, so only blocks 0..L-2 use their tokens
    assert prompts.visual_prompts.grad[:-1].abs().sum(dim=(1, 2)).min() > 0
    assert prompts.text_prompts.grad.abs().sum() > 0


def test_save_load_round_trip(tiny_vit, tmp_path):
    seg, spec = tiny_vit
    seg.set_prompts(build_prompts("ldvc", seg.clip, {"text_depth": 1}))
    seg.set_head("ldvc", HEAD)
    _perturb(seg.prompts, seed=2)
    _perturb(seg.head, seed=3)
    images = _images(seg)
    text = seg.encode_classes(CLASSES)
    with torch.no_grad():
        before = seg(images, text)
    save_segmentor(seg, spec, tmp_path)
    loaded, loaded_spec = load_segmentor(tmp_path)
    assert loaded_spec.prompts == {"kind": "ldvc", "text_depth": 1, "visual_depth": 1, "visual_tokens": 4,
                                   "coupled": True}
    assert (loaded_spec.head, loaded_spec.head_options) == ("ldvc", HEAD)
    loaded_text = loaded.encode_classes(CLASSES)
    torch.testing.assert_close(loaded_text, text, atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images, loaded_text), before, atol=0, rtol=0)


def test_onnx_export_matches_torch(tiny_vit, tmp_path):
    import onnxruntime as ort

    from opentrans.deploy.export import export_onnx

    seg, _ = tiny_vit
    seg.set_prompts(build_prompts("ldvc", seg.clip))
    seg.set_head("ldvc", HEAD)
    _perturb(seg.head, seed=4)
    _perturb(seg.prompts, seed=5)
    path = export_onnx(seg, tmp_path / "ldvc.onnx", opset=17)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n, classes in ((2, CLASSES), (3, CLASSES[:2])):  # batch and class count differ from the trace (2, 3)
        images, text = _images(seg, n, seed=n), seg.encode_classes(classes)  # text tower in torch
        got = session.run(None, {"images": images.numpy(), "text_embeds": text.numpy()})[0]
        with torch.no_grad():
            want = seg(images, text).numpy()
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    with pytest.raises(OpenTransError, match="dynamic height/width"):
        export_onnx(seg, tmp_path / "dyn.onnx", dynamic_hw=True)


def test_errors(tiny_vit):
    seg, _ = tiny_vit
    seg.set_head("ldvc", {"windows": 2, "topk": 2})
    with pytest.raises(OpenTransError, match="needs class text embeddings"):
        seg.dense_features(_images(seg))
    with pytest.raises(OpenTransError, match="topk=5 exceeds the 2x2=4 windows"):
        seg.set_head("ldvc", {"windows": 2, "topk": 5})
    seg.set_head("ldvc", {"windows": 8, "topk": 30})  # 64 windows asked, but the 4x5 grid holds only 4x5=20
    with pytest.raises(OpenTransError, match="holds only 4x5=20 windows"):
        seg(_images(seg), seg.encode_classes(CLASSES))
    with pytest.raises(OpenTransError, match="not divisible by heads"):
        seg.set_head("ldvc", {"hidden": 30, "heads": 4})
    with pytest.raises(OpenTransError, match="bad options"):
        seg.set_head("ldvc", {"window": 2})
    with pytest.raises(OpenTransError, match="visual_tokens=4 or coupled=False"):
        build_prompts("ldvc", seg.clip, {"visual_tokens": 2})
    with pytest.raises(OpenTransError, match="exceeds text_depth"):
        build_prompts("ldvc", seg.clip, {"text_depth": 1, "visual_depth": 2})
    with pytest.raises(OpenTransError, match="text_depth 3 outside 0..2"):
        build_prompts("ldvc", seg.clip, {"text_depth": 3})
