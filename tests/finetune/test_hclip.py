"""H-CLIP adapters: identity at init, parameter counts, orthogonal text tower (hyperspherical energy kept) and
free image tower, DCRC on/off training, merging into plain weights, bad input."""

from __future__ import annotations

import open_clip
import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

from opentrans.errors import OpenTransError
from opentrans.models.artifact import build_segmentor
from opentrans.finetune.adapters import (
    DCRC,
    HCLIPAdapter,
    adapter_parameters,
    add_hclip,
    hyperspherical_energy,
    merge_adapters,
    tower_targets,
)

from conftest import TINY_VIT

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
    assert len(image_t) == 3 * 4 and len(text_t) == 2 * 4  # the authors' q, k, v, out_proj per block
    assert "clip.transformer.resblocks.0.attn.in_proj_weight[q]" in text_t
    assert "clip.visual.transformer.resblocks.2.attn.out_proj" in image_t
    assert not any(".mlp." in n for n in image_t + text_t)

    report = add_hclip(seg, block_size=BLOCK)
    assert report.kind == "hclip" and report.targets == tuple(image_t + text_t)
    # blocks: 4 per width-64 target, 16 per transformer block, 5 blocks in all; cross-layer map over 3 layers x 4
    # roles = 12 positions; one cross-modal map per layer over 4 + 4 slots
    assert report.trainable_params == 5 * 16 * BLOCK ** 2 + 12 ** 2 + 3 * 8 ** 2
    assert report.trainable_params == sum(p.numel() for p in seg.parameters() if p.requires_grad)
    assert report.trainable_params == sum(p.numel() for p in adapter_parameters(seg))
    assert report.adapted_params == 5 * 4 * 64 * 64
    with torch.no_grad():
        torch.testing.assert_close(_logits(seg, images), base, rtol=0, atol=1e-6)  # every R = I at init
    # the shared relations are stored once (one adapter owns them), not once per adapter
    assert len([k for k in seg.state_dict() if "cross_layer" in k]) == 1


def test_all_linear_targets_are_our_option(tiny_vit):
    seg = _frozen(tiny_vit[0])
    image_t, text_t = tower_targets(seg, "image", "all"), tower_targets(seg, "text", "all")
    assert len(image_t) == 3 * 6 and len(text_t) == 2 * 6  # q, k, v, out_proj, c_fc, c_proj per block
    assert "clip.visual.transformer.resblocks.2.mlp.c_proj" in image_t
    report = add_hclip(seg, block_size=BLOCK, default_targets="all")
    assert report.targets == tuple(image_t + text_t)
    # 36 blocks per transformer block (c_proj's input is 256 wide); 18 positions; 16 + 16 slots
    assert report.trainable_params == 5 * 36 * BLOCK ** 2 + 18 ** 2 + 3 * 32 ** 2
    with pytest.raises(OpenTransError, match="default targets 'mlp'"):
        tower_targets(seg, "image", "mlp")


def test_pop_alone_counts(tiny_vit):
    seg = _frozen(tiny_vit[0])
    report = add_hclip(seg, block_size=BLOCK, dcrc=False)
    # image: free b x b blocks; text: the strict upper triangle of each skew generator
    assert report.trainable_params == 3 * 16 * BLOCK ** 2 + 2 * 16 * BLOCK * (BLOCK - 1) // 2
    assert report.trainable_params == sum(p.numel() for p in seg.parameters() if p.requires_grad)


# ---- the authors' computation, transcribed independently from github.com/SJTU-DeepVisionLab/H-CLIP at commit
# d92c35d25303e805491c629f079ca72a34d7609d, cat_seg/third_party/oft_se_qkv_relation_vision_train_ortho_relation_free_half.py
# (oft_forward l. 28-34, oft_forward_vision l. 76-81, filt_q/k/v = torch.mm(W, block_diag(R)) l. 206-212 and
# l. 343-349, out_proj filt = torch.mm(block_diag(R), W) l. 470 and l. 590, cayley_batch l. 376-386) and
# cat_seg/third_party/model_oft_relation_both_free_half.py l. 338-377 (attn_layer_R (b, b, 4 L, num),
# net_l_R = Linear(4 L, 4 L, bias=False), net_m_R = 12 x Linear(num, num, bias=False)).

def _authors_cayley_batch(data):
    b, r, c = data.shape
    skew = 0.5 * (data - data.transpose(1, 2))
    eye = torch.eye(r, dtype=data.dtype).unsqueeze(0).expand(b, r, c)
    return torch.bmm(eye - skew, torch.inverse(eye + skew))


def _authors_block_rs(layer_r, net_l, net_m, count, slots, text):
    """q_R, k_R, v_R, proj_R (each (slots, b, b)) of the block with ``self.count == count`` (4, 8, ...)."""
    b1, n1, l1, m1 = layer_r.shape
    t = layer_r.reshape(b1, n1 * l1, m1)  # rearrange 'B1 N1 L1 M1 -> B1 (N1 L1) M1'
    t = t @ net_m[int((count - 4) / 4)].T  # nn.Linear(num, num, bias=False) on the last axis
    t = t[:, :, :slots] if text else t[:, :, -slots:]  # text [:, :, :4], image [:, :, -6:]
    t = t.reshape(b1, n1, l1, slots).permute(3, 0, 1, 2)  # 'B1 (N1 L1) M1 -> M1 B1 N1 L1'
    re = (t @ net_l.T)[..., count - 4:count]  # nn.Linear(4 L, 4 L, bias=False), then this block's 4 positions
    return re[..., 0], re[..., 1], re[..., 2], re[..., 3]


def _authors_weights(in_proj, out_proj, rs, text):
    """(filt for in_proj (3E, E), filt for out_proj (E, E)) as OFTLinearLayer_both_relation[_in][_text] compute."""
    q_r, k_r, v_r, proj_r = (_authors_cayley_batch(r) for r in rs) if text else rs
    wq, wk, wv = in_proj.chunk(3, dim=0)
    filt = torch.cat([torch.mm(wq, torch.block_diag(*q_r)), torch.mm(wk, torch.block_diag(*k_r)),
                      torch.mm(wv, torch.block_diag(*v_r))], dim=0)
    return filt, torch.mm(torch.block_diag(*proj_r), out_proj)


def test_default_pop_and_dcrc_compute_what_the_authors_code_computes(tiny_vit):
    seg = _frozen(tiny_vit[0]).double()
    towers = {"image": seg.clip.visual.transformer.resblocks, "text": seg.clip.transformer.resblocks}
    original = {(t, i): (blk.attn.in_proj_weight.detach().clone(), blk.attn.out_proj.weight.detach().clone())
                for t, blocks in towers.items() for i, blk in enumerate(blocks)}
    add_hclip(seg, block_size=BLOCK)
    seg.double()  # the adapter parameters too
    bank = next(m for m in seg.modules() if isinstance(m, DCRC))
    slots = {"text": 64 // BLOCK, "image": 64 // BLOCK}
    layers = 3  # positions 4 l + {q, k, v, out_proj} over the deeper (image) tower
    g = torch.Generator().manual_seed(0)
    layer_r = torch.randn(BLOCK, BLOCK, 4 * layers, slots["text"] + slots["image"], generator=g,
                          dtype=torch.float64) * 0.3
    # the tiny text tower has 2 blocks, the image tower 3: the text slots of layer 2 hold no block (zeros here;
    # the authors' ViT-B/16 towers are both 12 deep, so their tensor has no such cells)
    layer_r[:, :, 4 * 2:, :slots["text"]] = 0.0
    net_l = torch.eye(4 * layers, dtype=torch.float64) + 0.2 * torch.randn(4 * layers, 4 * layers, generator=g,
                                                                           dtype=torch.float64)
    net_m = [torch.eye(8, dtype=torch.float64) + 0.2 * torch.randn(8, 8, generator=g, dtype=torch.float64)
             for _ in range(layers)]
    with torch.no_grad():
        for j, (p, s) in enumerate(zip(bank._pos.tolist(), bank._slot.tolist())):
            bank.blocks[j].copy_(layer_r[:, :, p, s])
        bank.cross_layer.copy_(net_l)
        bank.cross_modal.copy_(torch.stack(net_m))
    roles = ["attn.in_proj_weight[q]", "attn.in_proj_weight[k]", "attn.in_proj_weight[v]", "attn.out_proj"]
    for t, blocks in towers.items():
        for i, blk in enumerate(blocks):
            for r, role in enumerate(roles):
                mod, pname = (blk.attn, "in_proj_weight") if r < 3 else (blk.attn.out_proj, "weight")
                adapter = mod.parametrizations[pname][-1] if r == 3 else \
                    [a for a in mod.parametrizations[pname] if a.rows[0] == r * 64][0]
                # the authors' layout: position 4 l + role, text slots first, then the image slots
                p, s0, n, orth = bank.entries[adapter.index]
                assert (p, s0, n, orth) == (4 * i + r, 0 if t == "text" else slots["text"], 4, t == "text")
            rs = _authors_block_rs(layer_r, net_l, net_m, 4 * (i + 1), slots[t], t == "text")
            want_in, want_out = _authors_weights(*original[(t, i)], rs, t == "text")
            torch.testing.assert_close(blk.attn.in_proj_weight, want_in, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(blk.attn.out_proj.weight, want_out, rtol=1e-10, atol=1e-10)


def test_pop_without_dcrc_and_our_rows_variant(tiny_vit):
    seg = _frozen(tiny_vit[0]).double()
    attn = seg.clip.transformer.resblocks[0].attn
    w_in, w_out = attn.in_proj_weight.detach().clone(), attn.out_proj.weight.detach().clone()
    targets = ["clip.transformer.resblocks.0.attn.in_proj_weight[v]", "clip.transformer.resblocks.0.attn.out_proj"]
    add_hclip(seg, [], targets, block_size=BLOCK, dcrc=False)
    seg.double()
    with torch.no_grad():
        for p in adapter_parameters(seg):
            p.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(p.numel()))
    v_ad, o_ad = attn.parametrizations.in_proj_weight[0], attn.out_proj.parametrizations.weight[0]
    r_v, r_o = v_ad.transform(), o_ad.transform()
    torch.testing.assert_close(r_v @ r_v.T, torch.eye(64, dtype=torch.float64), atol=1e-10, rtol=0)
    # the authors' sides: V rows times R (l. 349), R times out_proj (l. 590)
    torch.testing.assert_close(attn.in_proj_weight[128:], w_in[128:] @ r_v, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(attn.out_proj.weight, r_o @ w_out, rtol=1e-10, atol=1e-10)
    assert torch.equal(attn.in_proj_weight[:128], w_in[:128])

    seg2 = _frozen(build_segmentor(TINY_VIT, "none")[0]).double()
    attn2 = seg2.clip.transformer.resblocks[0].attn
    add_hclip(seg2, [], targets, block_size=BLOCK, dcrc=False, pop="rows")  # ours: W0 R^T for every target
    seg2.double()
    with torch.no_grad():
        for p, q in zip(adapter_parameters(seg2), adapter_parameters(seg)):
            p.copy_(q)
    torch.testing.assert_close(attn2.in_proj_weight[128:], w_in[128:] @ r_v.T, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(attn2.out_proj.weight, w_out @ r_o.T, rtol=1e-10, atol=1e-10)
    # not the same transform for the same parameters
    assert (attn2.out_proj.weight - attn.out_proj.weight).abs().max() > 1e-3
    with pytest.raises(OpenTransError, match="unknown H-CLIP pop 'cols'"):
        add_hclip(_frozen(build_segmentor(TINY_VIT, "none")[0]), [], targets, block_size=BLOCK, pop="cols")


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
    for name in text_t:  # ... and kept the angles and norms of its Q/K/V neurons (rows: W0 R with a
        # Cayley-orthogonal R) and of its out_proj columns (R W0, the authors' output side); the assertion was
        # on rows for every target before pop="authors" became the default (our pop="rows" keeps that)
        a, b = (after[name].T, before[name].T) if name.endswith("out_proj") else (after[name], before[name])
        assert hyperspherical_energy(a) == pytest.approx(hyperspherical_energy(b), rel=1e-5)
        torch.testing.assert_close(a.norm(dim=1), b.norm(dim=1), rtol=1e-5, atol=1e-6)
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


@pytest.mark.slow
def test_vit_b16_default_trainable_count_is_the_authors_code():
    # 480 blocks of 128 x 128 (attn_layer_R (128, 128, 48, 10)) + net_l_R 48 x 48 + 12 net_m_R 10 x 10:
    # 7,867,824 = 5.26 % of CLIP ViT-B/16 (the paper's "5.63 M, about 4 %" does not match its own code)
    clip = open_clip.create_model("ViT-B-16")
    for p in clip.parameters():
        p.requires_grad_(False)
    total = sum(p.numel() for p in clip.parameters())
    report = add_hclip(clip)
    assert len(report.targets) == 2 * 12 * 4
    assert report.trainable_params == 480 * 128 ** 2 + 48 ** 2 + 12 * 10 ** 2 == 7_867_824
    assert round(100 * report.trainable_params / total, 2) == 5.26
