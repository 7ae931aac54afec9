"""LoRA and OFT adapters: identity at init, parameter counts, which rows change, orthogonality, merging."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils import parametrize

from opentrans.errors import OpenTransError
from opentrans.finetune.adapters import (
    OFT,
    adapter_parameters,
    add_lora,
    add_oft,
    hyperspherical_energy,
    merge_adapters,
)

from conftest import real_data

BLOCK1 = "clip.visual.transformer.resblocks.1"


def _inputs(seg):
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, *seg.image_size, generator=g), torch.randn(5, seg.embed_dim, generator=g)


def _train(seg, params, steps=3):
    images, text = _inputs(seg)
    opt = torch.optim.SGD(params, lr=0.5)
    for _ in range(steps):
        opt.zero_grad()
        seg(images, text).logsumexp(1).mean().backward()  # any objective that reaches the adapted layers
        opt.step()


def test_lora_counts_rows_and_merge(tiny_vit):
    seg, _ = tiny_vit
    seg.eval()
    images, text = _inputs(seg)
    with torch.no_grad():
        base = seg(images, text)
    original = {k: v.clone() for k, v in seg.state_dict().items()}
    for p in seg.parameters():
        p.requires_grad_(False)
    targets = [f"{BLOCK1}.mlp.c_fc", f"{BLOCK1}.attn.in_proj_weight[q]", f"{BLOCK1}.attn.in_proj_weight[v]"]
    report = add_lora(seg, targets, rank=4, alpha=8.0)
    assert report.trainable_params == 4 * (64 + 256) + 2 * 4 * (64 + 64)
    assert report.trainable_params == sum(p.numel() for p in seg.parameters() if p.requires_grad)
    assert report.adapted_params == 256 * 64 + 2 * 64 * 64
    with torch.no_grad():
        assert torch.equal(seg(images, text), base)  # B = 0: the adapted model starts as the base model

    _train(seg, adapter_parameters(seg))
    attn = seg.get_submodule(f"{BLOCK1}.attn")
    w = attn.in_proj_weight.detach()  # the adapted (parametrized) weight
    w0 = original[f"{BLOCK1}.attn.in_proj_weight"]
    assert torch.equal(w[64:128], w0[64:128])  # K untouched
    assert not torch.equal(w[:64], w0[:64]) and not torch.equal(w[128:], w0[128:])
    delta = (w - w0)[:64]
    assert torch.linalg.matrix_rank(delta.double(), atol=1e-5) <= 4  # a rank-r update (up to float32 rounding)
    with torch.no_grad():
        adapted = seg(images, text)
    assert not torch.allclose(adapted, base)

    assert merge_adapters(seg) == 3
    assert not any(parametrize.is_parametrized(m) for m in seg.modules())
    assert seg.state_dict().keys() == original.keys()
    with torch.no_grad():
        assert torch.allclose(seg(images, text), adapted, atol=1e-5)
    changed = {k for k in original if not torch.equal(original[k], seg.state_dict()[k])}
    assert changed == {f"{BLOCK1}.mlp.c_fc.weight", f"{BLOCK1}.attn.in_proj_weight"}


def test_oft_is_orthogonal_keeps_hyperspherical_energy_and_merges(tiny_vit):
    seg, _ = tiny_vit
    seg.eval()
    images, text = _inputs(seg)
    for p in seg.parameters():
        p.requires_grad_(False)
    fc = seg.get_submodule(f"{BLOCK1}.mlp.c_fc")
    he0 = hyperspherical_energy(fc.weight)
    w0 = fc.weight.detach().clone()
    report = add_oft(seg, [f"{BLOCK1}.mlp.c_fc", f"{BLOCK1}.attn.in_proj_weight[k]"], block_size=16)
    assert report.trainable_params == 2 * (64 // 16) * (16 * 15 // 2)
    assert report.trainable_params == sum(p.numel() for p in adapter_parameters(seg))
    assert torch.equal(fc.weight, w0)  # Q = 0: R = I

    _train(seg, adapter_parameters(seg))
    oft = fc.parametrizations.weight[0]
    assert isinstance(oft, OFT) and oft.skew.abs().max() > 0
    r = oft.rotation().double()
    assert torch.allclose(r @ r.T, torch.eye(64, dtype=torch.float64), atol=1e-5)
    assert (r[:16, 16:] == 0).all()  # block-diagonal
    assert not torch.allclose(fc.weight, w0)
    assert hyperspherical_energy(fc.weight) == pytest.approx(he0, rel=1e-5)
    assert torch.allclose(fc.weight.norm(dim=1), w0.norm(dim=1), rtol=1e-5)
    attn = seg.get_submodule(f"{BLOCK1}.attn")
    kq = attn.parametrizations.in_proj_weight.original
    assert torch.equal(attn.in_proj_weight[:64], kq[:64]) and torch.equal(attn.in_proj_weight[128:], kq[128:])

    with torch.no_grad():
        adapted = seg(images, text)
    merge_adapters(seg)
    with torch.no_grad():
        assert torch.allclose(seg(images, text), adapted, atol=1e-5)

    # an unconstrained update of the same layer changes the energy (the check above can fail)
    fc.weight.data += 0.05 * torch.randn_like(fc.weight)
    assert hyperspherical_energy(fc.weight) != pytest.approx(he0, rel=1e-5)


def test_bad_targets_register_nothing(tiny_vit):
    seg, _ = tiny_vit
    with pytest.raises(OpenTransError, match="not a Linear"):
        add_lora(seg, [f"{BLOCK1}.mlp.c_fc", f"{BLOCK1}.ln_1"])
    with pytest.raises(OpenTransError, match="rank"):
        add_lora(seg, [f"{BLOCK1}.mlp.c_fc", f"{BLOCK1}.attn.in_proj_weight[q]"], rank=65)
    with pytest.raises(OpenTransError, match="block size"):
        add_oft(seg, [f"{BLOCK1}.mlp.c_fc"], block_size=48)
    with pytest.raises(OpenTransError, match="duplicates"):
        add_oft(seg, [f"{BLOCK1}.mlp.c_fc", f"{BLOCK1}.mlp.c_fc"])
    assert not any(parametrize.is_parametrized(m) for m in seg.modules())


@real_data
@pytest.mark.parametrize("adapter", ["lora", "oft"])
def test_finetune_stage_with_adapter_saves_merged_plain_weights(tmp_path, adapter):
    import json

    from opentrans.finetune.options import FinetuneOptions
    from opentrans.finetune.stage import finetune_stage
    from opentrans.models.source import ModelSource
    from opentrans.models.artifact import build_segmentor, load_segmentor
    from conftest import CAMVID_SPEC, TINY_VIT

    out = tmp_path / adapter
    figures = finetune_stage(ModelSource(model=TINY_VIT),
                             FinetuneOptions(steps=2, batch_size=1, lr=1e-2, train_limit=1, val_limit=1,
                                             adapter=adapter, adapter_rank=2), out, CAMVID_SPEC, progress=False)
    report = json.loads((out / "finetune_report.json").read_text())
    info = report["adapter"]
    assert info["kind"] == adapter and info["merged"] == len(info["targets"]) > 0
    assert set(info["targets"]) <= set(report["trainable_layers"])
    # trainable = adapter parameters (less any outside the dense path) + the head, far fewer than the layers
    assert figures["trainable_params"] == info["trainable_params"] + report["head_params"] - report["gradient_free_params"]
    assert figures["trainable_params"] < sum(report["trainable_layer_params"].values())
    seg, _ = load_segmentor(out)  # plain keys: the adapters were merged
    fresh, _ = build_segmentor(TINY_VIT, "none")
    state, fresh_state = seg.state_dict(), fresh.state_dict()
    assert state.keys() == fresh_state.keys()
    changed = {k for k in state if not torch.equal(state[k], fresh_state[k])}
    adapted = {t[: t.index("[")] if t.endswith("]") else f"{t}.weight" for t in info["targets"]}
    assert changed - {"head.proj.weight", "head.proj.bias"} <= adapted and changed & adapted
    if adapter == "oft":  # merged OFT layers keep their neurons' norms
        for k in changed & adapted:
            if k.endswith(".weight"):
                assert torch.allclose(state[k].norm(dim=1), fresh_state[k].norm(dim=1), rtol=1e-4)


def test_adapter_registry_gives_the_cli_choices_and_takes_a_plugin():
    """Each adapter registers itself in its own module; a new kind is a choice of the options and the CLI."""
    import click
    from click.testing import CliRunner

    from opentrans.finetune.adapters import ADAPTERS, AdapterKind, adapter_names
    from opentrans.finetune.options import FinetuneOptions
    from opentrans.options import cli_options

    assert adapter_names() == ["none", "lora", "oft", "hclip"]
    ADAPTERS.add("test-kind", AdapterKind("test-kind", None))
    try:
        assert adapter_names()[-1] == "test-kind"
        FinetuneOptions(adapter="test-kind").check()
        command = cli_options(FinetuneOptions)(click.command()(lambda **kwargs: None))  # as the CLI builds it
        assert "test-kind" in CliRunner().invoke(command, ["--help"]).output
    finally:
        ADAPTERS._entries.pop("test-kind")
    with pytest.raises(OpenTransError, match="--adapter test-kind: choose one of none, lora, oft, hclip"):
        FinetuneOptions(adapter="test-kind").check()
