"""H-CLIP adapters: identity at init, parameter counts, orthogonal text tower (hyperspherical energy kept) and
free image tower, DCRC on/off training, merging into plain weights, bad input."""

from __future__ import annotations

import open_clip
import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

from opentrans.errors import OpenTransError
from opentrans.finetune.adapters import (
    DCRC,
    HCLIPAdapter,
    adapter_parameters,
    add_hclip,
    hyperspherical_energy,
    merge_adapters,
    tower_targets,
)

BLOCK = 16  # divides every input width of the tiny configs (64 and 256)
CLASSES = ["sky", "road", "car"]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add contention on a shared CPU
    yield
    torch.set_num_threads(threads)


def _frozen(seg):
    seg.eval()
    for p in seg.parameters():
        p.requires_grad_(False)
    return seg


def _logits(seg, images, classes=CLASSES):
    text = seg.clip.encode_text(open_clip.tokenize(list(classes)))  # the text tower stays in the graph
    return seg(images, text)


def _weights(seg, names):
    """The current (adapted) weight rows of each target, detached."""
    from opentrans.finetune.adapters.common import resolve_target

    out = {}
    for name in names:
        module, pname, (start, stop) = resolve_target(seg, name)
        out[name] = getattr(module, pname)[start:stop].detach().clone()
    return out


def test_default_targets_identity_at_init_and_counts(tiny_vit):
    seg = _frozen(tiny_vit[0])
    images = torch.randn(2, 3, *seg.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = _logits(seg, images)
    image_t, text_t = tower_targets(seg, "image"), tower_targets(seg, "text")
    assert len(image_t) == 3 * 6 and len(text_t) == 2 * 6  # q, k, v, out_proj, c_fc, c_proj per block
    assert "clip.transformer.resblocks.0.attn.in_proj_weight[q]" in text_t
    assert "clip.visual.transformer.resblocks.2.mlp.c_proj" in image_t

    report = add_hclip(seg, block_size=BLOCK)
    assert report.kind == "hclip" and report.targets == tuple(image_t + text_t)
    # blocks: 4 per width-64 input, 16 for c_proj (input 256): 36 per transformer block, 5 blocks in all;
    # cross-layer map over 3 layers x 6 roles = 18 positions; one cross-modal map per layer over 16 + 16 slots
    assert report.trainable_params == 5 * 36 * BLOCK ** 2 + 18 ** 2 + 3 * 32 ** 2
    assert report.trainable_params == sum(p.numel() for p in seg.parameters() if p.requires_grad)
    assert report.trainable_params == sum(p.numel() for p in adapter_parameters(seg))
    assert report.adapted_params == 5 * (4 * 64 * 64 + 256 * 64 + 64 * 256)
    with torch.no_grad():
        torch.testing.assert_close(_logits(seg, images), base, rtol=0, atol=1e-6)  # every R = I at init
    # the shared relations are stored once (one adapter owns them), not once per adapter
    assert len([k for k in seg.state_dict() if "cross_layer" in k]) == 1


def test_pop_alone_counts(tiny_vit):
    seg = _frozen(tiny_vit[0])
    report = add_hclip(seg, block_size=BLOCK, dcrc=False)
    # image: free b x b blocks; text: the strict upper triangle of each skew generator
    assert report.trainable_params == 3 * 36 * BLOCK ** 2 + 2 * 36 * BLOCK * (BLOCK - 1) // 2
    assert report.trainable_params == sum(p.numel() for p in seg.parameters() if p.requires_grad)


@pytest.mark.parametrize("dcrc", [True, False])
def test_training_keeps_text_energy_changes_image_and_merges(tiny_vit, camvid_val, dcrc):
    seg = _frozen(tiny_vit[0])
    samples = [camvid_val[i] for i in range(2)]
    images = torch.stack([s[0] for s in samples])
    labels = torch.stack([s[1] for s in samples])
    image_t, text_t = tower_targets(seg, "image"), tower_targets(seg, "text")
    before = _weights(seg, image_t + text_t)
    add_hclip(seg, block_size=BLOCK, dcrc=dcrc)
    opt = torch.optim.AdamW(adapter_parameters(seg), lr=3e-2)
    losses = []
    for _ in range(10):
        opt.zero_grad()
        logits = _logits(seg, images, camvid_val.class_names)
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits, labels, ignore_index=len(camvid_val.class_names))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3, losses
    if dcrc:  # the relation maps trained away from the identity: blocks communicate across layers and towers
        bank = next(m for m in seg.modules() if isinstance(m, DCRC))
        eye = torch.eye(bank.cross_layer.shape[0])
        assert (bank.cross_layer.detach() - eye).abs().max() > 1e-3
        assert (bank.cross_modal.detach() - torch.eye(bank.slots)).abs().max() > 1e-3

    after = _weights(seg, image_t + text_t)
    changed_text = [n for n in text_t if not torch.equal(after[n], before[n])]
    assert len(changed_text) >= len(text_t) // 2  # the text tower really trained ...
    for name in text_t:  # ... and kept its neurons' angles and norms (Cayley-orthogonal R)
        assert hyperspherical_energy(after[name]) == pytest.approx(hyperspherical_energy(before[name]), rel=1e-5)
        torch.testing.assert_close(after[name].norm(dim=1), before[name].norm(dim=1), rtol=1e-5, atol=1e-6)
    changed_image = [n for n in image_t if not torch.equal(after[n], before[n])]
    assert changed_image
    # the free image blocks are not orthogonal: some image layer's energy moved
    assert any(hyperspherical_energy(after[n]) != pytest.approx(hyperspherical_energy(before[n]), rel=1e-5)
               for n in changed_image)

    with torch.no_grad():
        adapted = _logits(seg, images, camvid_val.class_names)
    assert merge_adapters(seg) == len(image_t) + len(text_t)
    assert not any(parametrize.is_parametrized(m) for m in seg.modules())
    assert not any(isinstance(m, HCLIPAdapter) for m in seg.modules())
    with torch.no_grad():
        torch.testing.assert_close(_logits(seg, images, camvid_val.class_names), adapted, rtol=1e-5, atol=1e-5)


def test_orthogonal_blocks_and_subset_targets(tiny_vit):
    seg = _frozen(tiny_vit[0])
    image = ["clip.visual.transformer.resblocks.1.mlp.c_fc"]
    text = ["clip.transformer.resblocks.0.attn.in_proj_weight[k]", "clip.transformer.resblocks.1.mlp.c_proj"]
    report = add_hclip(seg, image, text, block_size=32)
    with torch.no_grad():
        for p in adapter_parameters(seg):
            p.add_(0.1 * torch.randn_like(p))  # any parameter values: text R stays orthogonal, image R does not
    attn = seg.get_submodule("clip.transformer.resblocks.0.attn")
    text_k = attn.parametrizations.in_proj_weight[0]
    r = text_k.transform().double()
    torch.testing.assert_close(r @ r.T, torch.eye(64, dtype=torch.float64), atol=1e-5, rtol=0)
    assert (r[:32, 32:] == 0).all()  # block-diagonal
    original = attn.parametrizations.in_proj_weight.original
    assert torch.equal(attn.in_proj_weight[:64], original[:64])  # Q and V rows untouched
    assert torch.equal(attn.in_proj_weight[128:], original[128:])
    free = seg.get_submodule(image[0]).parametrizations.weight[0].transform().double()
    assert not torch.allclose(free @ free.T, torch.eye(64, dtype=torch.float64), atol=1e-3)
    # positions: (block 1, mlp.c_fc), (block 0, attn.in_proj_weight[k]), (block 1, mlp.c_proj); slots 8 + 2
    assert report.trainable_params == (2 + 2 + 8) * 32 ** 2 + 3 ** 2 + 2 * 10 ** 2


def test_bad_input_registers_nothing(tiny_vit):
    seg = _frozen(tiny_vit[0])
    with pytest.raises(OpenTransError, match="block size 128: must be >= 2 and divide the input width 64"):
        add_hclip(seg)  # the paper's 128 does not divide the tiny widths
    with pytest.raises(OpenTransError, match="block size 48"):
        add_hclip(seg, block_size=48)
    with pytest.raises(OpenTransError, match="not inside the text tower"):
        add_hclip(seg, [], ["clip.visual.transformer.resblocks.0.mlp.c_fc"], block_size=BLOCK)
    with pytest.raises(OpenTransError, match="not a Linear"):
        add_hclip(seg, ["clip.visual.transformer.resblocks.0.ln_1"], [], block_size=BLOCK)
    with pytest.raises(OpenTransError, match="no H-CLIP targets"):
        add_hclip(seg, [], [], block_size=BLOCK)
    assert not any(parametrize.is_parametrized(m) for m in seg.modules())
