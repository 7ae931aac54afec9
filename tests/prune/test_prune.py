"""Structured pruning (torch-pruning) of the tiny random-init ViT and ModifiedResNet, on real CamVid images."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import CAMVID_SPEC, TINY_RN, TINY_VIT, real_data

from opentrans.artifacts import read_json
from opentrans.data import open_dataset
from opentrans.errors import OpenTransError
from opentrans.models.artifact import build_segmentor, load_segmentor, save_segmentor
from opentrans.prune import count_encoder_cost, prunable_widths, prune_structured


def prune_stage(from_dir, model, pretrained, out_dir, sparsity=None, image_size=None, **options):
    """:func:`opentrans.prune.stage.prune_stage` with the model source and options spelled out."""
    from opentrans.models.source import ModelSource
    from opentrans.prune.options import StructuredOptions
    from opentrans.prune.stage import prune_stage as stage

    return stage(ModelSource(from_dir, model, pretrained, image_size), StructuredOptions(sparsity=sparsity, **options),
                 out_dir)

TEMPLATES = ("a photo of a {}.",)  # one prompt per class keeps the text tower cheap
VIT_WIDTH, VIT_MLP, VIT_LAYERS, EMBED = 64, 256, 3, 32  # opentrans-tiny-vit.json
RN_PLANES = {"layer1": 8, "layer2": 16, "layer3": 32, "layer4": 64}  # opentrans-tiny-rn.json, width 8


def _camvid(spec, limit: int = 2):
    """(images (B,3,H,W) from CamVid val at the model's input size, class names)."""
    ds = open_dataset(CAMVID_SPEC, "val", spec.image_size, spec.mean, spec.std, limit=limit)
    return torch.stack([ds[i][0] for i in range(len(ds))]), list(ds.class_names)


@torch.no_grad()
def _logits(seg, spec, text: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (2, C, H, W) on two CamVid val images; ``text`` (C, D) defaults to ``seg``'s own class embeddings."""
    images, classes = _camvid(spec)
    return seg(images, seg.encode_classes(classes, TEMPLATES) if text is None else text)


def _mlp_widths(seg) -> list[int]:
    return [block.mlp.c_fc.out_features for block in seg.visual.transformer.resblocks]


@real_data
def test_vit_mlp_pruned_by_exact_amount_and_residual_untouched(tiny_vit):
    seg, spec = tiny_vit
    frozen = {k: v.clone() for k, v in seg.visual.state_dict().items() if ".mlp." not in k}
    report = prune_structured(seg, 0.5, round_to=8, model_name=spec.model)

    assert _mlp_widths(seg) == [VIT_MLP // 2] * VIT_LAYERS
    for block in seg.visual.transformer.resblocks:
        assert block.mlp.c_proj.weight.shape == (VIT_WIDTH, VIT_MLP // 2)
        assert block.mlp.c_proj.in_features == VIT_MLP // 2
        assert block.attn.in_proj_weight.shape == (3 * VIT_WIDTH, VIT_WIDTH)
    assert seg.visual.proj.shape == (VIT_WIDTH, EMBED)
    after = seg.visual.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())  # attention, norms, embeddings: bit-identical

    assert report["layers"] == [
        {"structure": "channels", "layer": f"transformer.resblocks.{i}.mlp.c_fc", "original": VIT_MLP,
         "before": VIT_MLP, "after": VIT_MLP // 2}
        for i in range(VIT_LAYERS)
    ]
    assert report["sparsity"] == 0.5 and report["sparsity_before"] == 0.0
    # Each block loses 128 c_fc rows (+ biases) and 128 c_proj columns.
    removed_params = VIT_LAYERS * 128 * (2 * VIT_WIDTH + 1)
    assert report["params_m_before"] - report["params_m_after"] == pytest.approx(removed_params / 1e6, abs=1e-9)
    # Dense path at 64x80: 21 tokens; the MLPs of all blocks run (MaskCLIP, as its authors' code, keeps the last
    # block's FFN on the value path; issue 12: this used to count VIT_LAYERS - 1 blocks, the residual-free variant).
    tokens = 1 + (64 // 16) * (80 // 16)
    removed_macs = VIT_LAYERS * 2 * tokens * VIT_WIDTH * 128
    assert report["gmacs_before"] - report["gmacs_after"] == pytest.approx(removed_macs / 1e9, abs=1e-12)

    logits = _logits(seg, spec)
    assert logits.shape == (2, 11, *spec.image_size)
    assert torch.isfinite(logits).all()


def test_count_encoder_cost_counts_attention_matmuls(tiny_vit):
    seg, _ = tiny_vit
    n, patches, w, mlp = 1 + 4 * 5, 4 * 5, VIT_WIDTH, VIT_MLP  # input 64x80, patch 16
    full_block = n * w * 3 * w + 2 * n * n * w + n * w * w + 2 * n * w * mlp  # qkv, QK^T + AV, out_proj, MLP
    # last block (MaskCLIP, issue 12): value projection, out_proj and the MLP on the value path
    last_block = 2 * n * w * w + 2 * n * w * mlp
    expected = patches * w * 3 * 16 * 16 + (VIT_LAYERS - 1) * full_block + last_block + patches * w * EMBED
    cost = count_encoder_cost(seg)
    assert cost["gmacs"] * 1e9 == pytest.approx(expected, abs=0.5)
    assert cost["params_m"] == sum(p.numel() for p in seg.visual.parameters()) / 1e6


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "last_mlp", "rounded"), [("maskclip-noresidual", False, 16.42),
                                                           ("maskclip", True, 17.35)])
def test_count_encoder_cost_vit_b16_analytic(mode, last_mlp, rounded):
    # ViT-B-16 at 224x224 (random init: the count depends on shapes only): 14x14 patches + CLS, width 768, MLP 3072,
    # 12 heads, 12 blocks, output 512. The dense path runs 11 blocks in full (their QK^T and AV products whatever
    # attention kernel torch dispatches to), the last block's value path (V projection and out_proj; MaskCLIP as
    # its authors' code also the last MLP on every token) and proj.
    seg, _ = build_segmentor("ViT-B-16", "none", image_size=(224, 224), dense_mode=mode)
    n, patches, w, mlp = 197, 196, 768, 3072
    full_block = n * w * 3 * w + 2 * n * n * w + n * w * w + 2 * n * w * mlp
    expected = (patches * w * 3 * 16 * 16 + 11 * full_block + 2 * n * w * w + last_mlp * 2 * n * w * mlp
                + patches * w * 512)
    gmacs = count_encoder_cost(seg)["gmacs"]
    assert gmacs * 1e9 == pytest.approx(expected, abs=0.5)
    assert round(gmacs, 2) == rounded


@pytest.mark.parametrize(("sparsity", "round_to", "expected"), [
    (0.3, 8, 176),  # 256 * 0.7 = 179.2 -> nearest multiple of 8
    (0.3, None, 179),
    (0.3, 32, 192),  # 179.2 -> 5.6 multiples of 32 -> 6
    (0.99, 8, 8),  # 2.56 channels -> at least one multiple
])
def test_vit_round_to(tiny_vit, sparsity, round_to, expected):
    seg, spec = tiny_vit
    report = prune_structured(seg, sparsity, round_to=round_to, model_name=spec.model)
    assert _mlp_widths(seg) == [expected] * VIT_LAYERS
    assert report["sparsity"] == pytest.approx(1 - expected / VIT_MLP)


@real_data
def test_resnet_bottleneck_internal_channels_only(tiny_rn):
    seg, spec = tiny_rn
    v = seg.visual
    internal = (".conv1.", ".bn1.", ".conv2.", ".bn2.", ".conv3.weight")
    frozen = {k: t.clone() for k, t in v.state_dict().items() if not (k.startswith("layer") and any(s in k for s in internal))}
    report = prune_structured(seg, 0.5, round_to=8, model_name=spec.model)

    # planes * 0.5 rounded to a multiple of 8, at least 8: layer1 keeps its 8 channels.
    expected = {"layer1": 8, "layer2": 8, "layer3": 16, "layer4": 32}
    for stage, planes in RN_PLANES.items():
        block = getattr(v, stage)[0]
        assert block.conv1.out_channels == block.bn1.num_features == block.conv2.in_channels == expected[stage]
        assert block.conv2.out_channels == block.bn2.num_features == block.conv3.in_channels == expected[stage]
        assert block.bn2.running_mean.shape == (expected[stage],)
        assert block.conv3.out_channels == 4 * planes  # residual width unchanged
    after = v.state_dict()
    assert all(torch.equal(after[k], t) for k, t in frozen.items())  # stem, conv3 outputs, downsample, attnpool
    assert report["sparsity"] == pytest.approx(1 - 2 * sum(expected.values()) / (2 * sum(RN_PLANES.values())))
    assert report["params_m_after"] < report["params_m_before"]
    assert report["gmacs_after"] < report["gmacs_before"]

    assert _logits(seg, spec).shape == (2, 11, *spec.image_size)


def _zero_vit_channels(seg, gen) -> list[torch.Tensor]:
    kept = []
    for block in seg.visual.transformer.resblocks:
        perm = torch.randperm(VIT_MLP, generator=gen)
        dead, keep = perm[: VIT_MLP // 2], perm[VIT_MLP // 2:].sort().values
        block.mlp.c_fc.weight[dead] = 0
        block.mlp.c_fc.bias[dead] = 0
        block.mlp.c_proj.weight[:, dead] = 0
        kept.append(block.mlp.c_fc.weight[keep].clone())
    return kept


def _zero_rn_channels(seg, gen) -> None:
    for stage in RN_PLANES:
        block = getattr(seg.visual, stage)[0]
        for conv, bn, nxt in ((block.conv1, block.bn1, block.conv2), (block.conv2, block.bn2, block.conv3)):
            dead = torch.randperm(conv.out_channels, generator=gen)[: conv.out_channels // 2]
            conv.weight[dead] = 0
            bn.weight[dead] = 0
            bn.bias[dead] = 0
            nxt.weight[:, dead] = 0


@real_data
@pytest.mark.parametrize("arch", [TINY_VIT, TINY_RN])
@torch.no_grad()
def test_magnitude_removes_the_dead_channels_and_keeps_the_function(arch):
    """Half the channels of every prunable layer carry exact zeros; magnitude pruning at 0.5 must remove
    exactly those, so the logits on real images do not change."""
    seg, spec = build_segmentor(arch, "none")
    gen = torch.Generator().manual_seed(0)
    kept = _zero_vit_channels(seg, gen) if arch == TINY_VIT else _zero_rn_channels(seg, gen)
    reference = _logits(seg, spec)
    prune_structured(seg, 0.5, "magnitude", round_to=None, model_name=spec.model)
    assert sum(prunable_widths(seg).values()) * 2 == sum(prunable_widths(build_segmentor(arch, "none")[0]).values())
    if kept:
        for block, weight in zip(seg.visual.transformer.resblocks, kept):
            assert torch.equal(block.mlp.c_fc.weight, weight)  # the surviving rows, in their original order
    torch.testing.assert_close(_logits(seg, spec), reference, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_lamp_ranks_globally(tiny_vit):
    """Block 0 has 192 of its 256 channels zeroed: LAMP's global ranking takes them first, so block 0 ends far
    narrower than the others while the total meets the target."""
    seg, spec = tiny_vit
    mlp = seg.visual.transformer.resblocks[0].mlp
    mlp.c_fc.weight[:192] = 0
    mlp.c_proj.weight[:, :192] = 0
    report = prune_structured(seg, 0.5, "lamp", round_to=8, model_name=spec.model)
    widths = _mlp_widths(seg)
    assert report["importance"] == "lamp" and report["ranking"] == "global"
    assert widths[0] <= 64 < min(widths[1:])
    assert all(w % 8 == 0 for w in widths)
    assert abs(sum(widths) - VIT_LAYERS * VIT_MLP // 2) <= 4 * VIT_LAYERS  # at most half a multiple per layer
    assert torch.count_nonzero(seg.visual.transformer.resblocks[0].mlp.c_fc.weight.abs().sum(1)) == widths[0]


@real_data
@pytest.mark.parametrize("arch", [TINY_VIT, TINY_RN])
def test_save_load_round_trip_is_exact(arch, tmp_path):
    seg, spec = build_segmentor(arch, "none")
    prune_structured(seg, 0.6, round_to=8, model_name=spec.model)
    save_segmentor(seg, spec, tmp_path)
    loaded, loaded_spec = load_segmentor(tmp_path)
    assert loaded_spec.shapes  # the changed shapes travel in model.json
    assert prunable_widths(loaded) == prunable_widths(seg)
    text = seg.encode_classes(["road", "car", "sky"], TEMPLATES)
    assert torch.equal(_logits(loaded, loaded_spec, text), _logits(seg, spec, text))


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5, math.nan, True, "0.5"])
def test_bad_sparsity_raises_and_writes_nothing(tiny_vit, tmp_path, bad):
    seg, spec = tiny_vit
    with pytest.raises(OpenTransError, match="sparsity"):
        prune_structured(seg, bad, model_name=spec.model)
    assert _mlp_widths(seg) == [VIT_MLP] * VIT_LAYERS
    out = tmp_path / "out"
    with pytest.raises(OpenTransError, match="sparsity"):
        prune_stage(None, TINY_VIT, "none", out, bad)
    assert not out.exists()


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"importance": "fisher"}, "unknown importance"), ({"round_to": 0}, "round"),
    ({"importance": "taylor"}, "taylor needs --distill-data"), ({"structures": "channels,ffn"}, "unknown structure 'ffn'"),
    ({"structures": ""}, "unknown structure"), ({"head_sparsity": 1.0, "structures": "heads"}, "--head-sparsity"),
    ({"width_sparsity": 0.0, "structures": "width"}, "--width-sparsity"), ({"ranking": "local"}, "unknown ranking"),
])
def test_bad_options_raise_and_write_nothing(tmp_path, kwargs, match):
    out = tmp_path / "out"
    with pytest.raises(OpenTransError, match=match):
        prune_stage(None, TINY_VIT, "none", out, 0.5, **kwargs)
    assert not out.exists()


def test_pruning_composes_against_original_widths(tiny_vit):
    seg, spec = tiny_vit
    prune_structured(seg, 0.25, model_name=spec.model)
    assert _mlp_widths(seg) == [192] * VIT_LAYERS
    report = prune_structured(seg, 0.5, model_name=spec.model)
    assert _mlp_widths(seg) == [128] * VIT_LAYERS  # 0.5 of the original 256, not 0.5 of 192
    assert report["sparsity_before"] == 0.25 and report["sparsity"] == 0.5
    assert {(row["original"], row["before"], row["after"]) for row in report["layers"]} == {(256, 192, 128)}
    with pytest.raises(OpenTransError, match=r"already at 50\.0% sparsity"):
        prune_structured(seg, 0.4, model_name=spec.model)
    assert _mlp_widths(seg) == [128] * VIT_LAYERS
    # Without model_name the current widths count as the original ones.
    prune_structured(seg, 0.5)
    assert _mlp_widths(seg) == [64] * VIT_LAYERS


def test_prune_stage_writes_model_reports_and_manifest(tmp_path):
    first, second, third = tmp_path / "p1", tmp_path / "p2", tmp_path / "p3"
    figures = prune_stage(None, TINY_VIT, "none", first, 0.25)
    manifest = read_json(first / "manifest.json")
    assert manifest["status"] == "complete" and manifest["stage"] == "prune"
    assert manifest["weights"] == "random-init weights"
    assert manifest["figures"] == figures
    assert {o["path"] for o in manifest["outputs"]} == {"model.safetensors", "model.json", "kept_indices.json",
                                                       "prune_report.json", "prune_report.md"}
    assert figures["sparsity"] == 0.25 and figures["params_m_after"] < figures["params_m_before"]
    assert json.loads((first / "prune_report.json").read_text())["weights"] == "random-init weights"
    md = (first / "prune_report.md").read_text()
    assert "random-init weights" in md and "| channels | `transformer.resblocks.0.mlp.c_fc` | 256 | 256 | 192 |" in md
    assert figures["latency_ms_before"] > 0 and figures["latency_ms_after"] > 0 and "Latency, torch CPU" in md
    assert figures["latency_ms_before_openvino"] > 0 and figures["latency_ms_after_openvino"] > 0
    assert "Latency, OpenVINO CPU f32" in md and not list(first.glob(".latency-*"))  # the IRs were temporary

    figures2 = prune_stage(first, None, "none", second, 0.5)
    assert figures2["params_m_before"] == pytest.approx(figures["params_m_after"])
    loaded, spec = load_segmentor(second)
    assert spec.lineage == ["prune", "prune"]
    assert _mlp_widths(loaded) == [128] * VIT_LAYERS
    assert {i["path"] for i in read_json(second / "manifest.json")["inputs"]} == {str(first / "model.json"), str(first / "model.safetensors")}

    with pytest.raises(OpenTransError, match=r"already at 50\.0% sparsity"):
        prune_stage(second, None, "none", third, 0.25)
    assert not third.exists()
    with pytest.raises(OpenTransError, match="--from directory"):
        prune_stage(second, None, "none", second, 0.75)
