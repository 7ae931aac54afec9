"""Whole-head, residual-width and attention-pool pruning, Taylor importance, kept-index transfer and ONNX parity of
pruned tiny random-init models, on real CamVid images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import CAMVID_SPEC, TINY_RN, TINY_VIT, real_data, save_finished

from opentrans.cli import cli
from opentrans.data import open_dataset
from opentrans.errors import OpenTransError
from opentrans.models.artifact import SPEC_FILE, build_segmentor, load_segmentor, save_segmentor
from opentrans.models.attention import PrunedAttentionPool2d, PrunedMultiheadAttention, convert_attention
from opentrans.prune.imp import imp_targets
from opentrans.prune.stage import KEPT_FILE
from opentrans.prune.structured import prune_structured, structure_sizes, taylor_scores


def prune_stage(from_dir, model, pretrained, out_dir, sparsity=None, image_size=None, **options):
    """:func:`opentrans.prune.stage.prune_stage` with the model source and options spelled out."""
    from opentrans.models.source import ModelSource
    from opentrans.prune.options import StructuredOptions
    from opentrans.prune.stage import prune_stage as stage

    return stage(ModelSource(from_dir, model, pretrained, image_size), StructuredOptions(sparsity=sparsity, **options),
                 out_dir)


def imp_stage(from_dir, model, pretrained, out_dir, sparsity=None, image_size=None, targets="authors", **options):
    """:func:`opentrans.prune.imp_stage.imp_stage` with the model source and options spelled out."""
    from opentrans.models.source import ModelSource
    from opentrans.prune.imp_stage import imp_stage as stage
    from opentrans.prune.options import ImpOptions

    return stage(ModelSource(from_dir, model, pretrained, image_size),
                 ImpOptions(sparsity=sparsity, imp_targets=targets, **options), out_dir)

VIT_WIDTH, VIT_HEADS, HEAD_DIM, VIT_LAYERS = 64, 2, 32, 3  # opentrans-tiny-vit.json
RN_WIDTH, RN_HEADS = 256, 8  # opentrans-tiny-rn.json: layer4 output 8 * 32, attnpool heads = width*32 // 32
RN_STAGE_WIDTHS = {"layer1": 32, "layer2": 64, "layer3": 128, "layer4": RN_WIDTH}  # residual width per stage
TEXT = torch.randn(3, 32, generator=torch.Generator().manual_seed(3))  # (C, D) class embeddings


def _images(spec, limit: int = 2) -> torch.Tensor:
    ds = open_dataset(CAMVID_SPEC, "val", spec.image_size, spec.mean, spec.std, limit=limit)
    return torch.stack([ds[i][0] for i in range(len(ds))])  # (B, 3, H, W)


def _zero_vit_head(seg, head: int) -> None:
    """Zero head ``head`` of every block: its Q, K, V rows (+ biases) and its out_proj columns."""
    for block in seg.visual.transformer.resblocks:
        attn = block.attn
        for s in range(3):
            rows = slice(s * VIT_WIDTH + head * HEAD_DIM, s * VIT_WIDTH + (head + 1) * HEAD_DIM)
            attn.in_proj_weight.data[rows] = 0
            attn.in_proj_bias.data[rows] = 0
        attn.out_proj.weight.data[:, head * HEAD_DIM:(head + 1) * HEAD_DIM] = 0


@real_data
@torch.no_grad()
def test_pruning_zeroed_heads_keeps_the_function_exactly():
    seg, spec = build_segmentor(TINY_VIT, "none")
    _zero_vit_head(seg, 1)
    images = _images(spec)
    reference = seg(images, TEXT)
    pooled_ref = seg.clip.encode_image(torch.nn.functional.interpolate(images, size=(64, 64)))
    survivors = [b.attn.in_proj_weight[:HEAD_DIM].clone() for b in seg.visual.transformer.resblocks]

    report = prune_structured(seg, 0.5, "magnitude", model_name=spec.model, structures="heads")
    for block, q_rows in zip(seg.visual.transformer.resblocks, survivors):
        attn = block.attn
        assert isinstance(attn, PrunedMultiheadAttention) and attn.num_heads == 1
        assert attn.in_proj_weight.shape == (3 * HEAD_DIM, VIT_WIDTH) and attn.out_proj.weight.shape == (VIT_WIDTH, HEAD_DIM)
        assert torch.equal(attn.in_proj_weight[:HEAD_DIM], q_rows)  # head 0 survived, head 1 (zeros) went
    assert report["structures"]["heads"] == {"target": 0.5, "before": 0.0, "achieved": 0.5, "original": 6, "kept": 3}
    assert report["gmacs_after"] < report["gmacs_before"]
    torch.testing.assert_close(seg(images, TEXT), reference, rtol=1e-5, atol=1e-5)
    pooled = seg.clip.encode_image(torch.nn.functional.interpolate(images, size=(64, 64)))
    torch.testing.assert_close(pooled, pooled_ref, rtol=1e-5, atol=1e-5)
    # IMP still finds the fused Q/K/V of a head-pruned block
    assert "transformer.resblocks.0.attn.in_proj_weight" in {t.name for t in imp_targets(seg.visual, "extended")}


@real_data
@torch.no_grad()
def test_resnet_attnpool_heads_and_all_stage_width():
    seg, spec = build_segmentor(TINY_RN, "none")
    pool = seg.visual.attnpool
    inner, head_dim = pool.q_proj.out_features, pool.q_proj.out_features // RN_HEADS
    dead = [1, 4, 6, 7]
    for h in dead:  # zero half the pool's heads
        rows = slice(h * head_dim, (h + 1) * head_dim)
        for lin in (pool.q_proj, pool.k_proj, pool.v_proj):
            lin.weight[rows] = 0
            lin.bias[rows] = 0
        pool.c_proj.weight[:, rows] = 0
    images = _images(spec)
    reference, pooled_ref = seg(images, TEXT), seg.clip.encode_image(images[..., :64, :64])
    prune_structured(seg, 0.5, "magnitude", model_name=spec.model, structures="heads")
    pool = seg.visual.attnpool
    assert isinstance(pool, PrunedAttentionPool2d) and pool.num_heads == RN_HEADS - len(dead)
    assert pool.q_proj.weight.shape == (inner // 2, RN_WIDTH) and pool.c_proj.in_features == inner // 2
    torch.testing.assert_close(seg(images, TEXT), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seg.clip.encode_image(images[..., :64, :64]), pooled_ref, rtol=1e-5, atol=1e-5)

    report = prune_structured(seg, 0.5, "lamp", round_to=8, model_name=spec.model, structures="width,heads")
    assert report["structures"]["width"]["kept"] == sum(RN_STAGE_WIDTHS.values()) // 2  # global: layer-adaptive
    sizes = structure_sizes(seg, "width")
    assert list(sizes) == list(RN_STAGE_WIDTHS)
    assert all(c % 8 == 0 and c <= RN_STAGE_WIDTHS[k] for k, c in sizes.items())
    _assert_rn_stage_shapes(seg.visual, sizes)
    assert seg(images, TEXT).shape == (2, 3, *spec.image_size)
    assert seg.clip.encode_image(images[..., :64, :64]).shape == (2, 32)


def _assert_rn_stage_shapes(v, sizes: dict[str, int]) -> None:
    """Every tensor of each stage's residual stream has the stage's pruned width (see structured._resnet_stage_set)."""
    stages = list(RN_STAGE_WIDTHS)
    for k, stage in enumerate(stages):
        c, blocks = sizes[stage], list(getattr(v, stage))
        for j, block in enumerate(blocks):
            assert block.conv3.out_channels == block.conv3.weight.shape[0] == block.bn3.num_features == c
            assert block.bn3.running_mean.shape == (c,)
            if j > 0:
                assert block.conv1.in_channels == block.conv1.weight.shape[1] == c
        assert blocks[0].downsample[1].weight.shape[0] == blocks[0].downsample[2].num_features == c
        if k + 1 < len(stages):
            nxt = getattr(v, stages[k + 1])[0]
            assert nxt.conv1.weight.shape[1] == nxt.downsample[1].weight.shape[1] == nxt.conv1.in_channels == c
    c4 = sizes["layer4"]
    assert v.attnpool.positional_embedding.shape[1] == v.attnpool.k_proj.in_features == c4


@real_data
@torch.no_grad()
def test_resnet_width_of_a_middle_stage_removes_zeroed_channels_exactly():
    """Channels of layer2's residual stream whose producers (every conv3/bn3, the downsample conv/BN) are zero
    carry 0 everywhere, so removing them with their consumers (layer2 conv1 inputs, layer3.0 conv1/downsample
    inputs) keeps the function exactly."""
    from opentrans.prune.structured import apply_kept_indices

    seg, spec = build_segmentor(TINY_RN, "none")
    dead = [0, 5, 17, 40, 41, 63]
    for block in seg.visual.layer2:
        convs_bns = [(block.conv3, block.bn3)]
        if block.downsample is not None:
            convs_bns.append((block.downsample[1], block.downsample[2]))
        for conv, bn in convs_bns:
            conv.weight[dead] = 0
            bn.weight[dead] = 0
            bn.bias[dead] = 0
    images = _images(spec)
    reference = seg(images, TEXT)
    kept = [i for i in range(RN_STAGE_WIDTHS["layer2"]) if i not in dead]
    apply_kept_indices(seg, {"width": {"layer2": kept}})
    assert structure_sizes(seg, "width") == RN_STAGE_WIDTHS | {"layer2": len(kept)}
    _assert_rn_stage_shapes(seg.visual, structure_sizes(seg, "width"))
    torch.testing.assert_close(seg(images, TEXT), reference, rtol=1e-5, atol=1e-5)


@real_data
@pytest.mark.parametrize("arch", [TINY_VIT, TINY_RN])
def test_head_and_width_pruned_round_trip_and_onnx_parity(arch, tmp_path):
    import onnxruntime as ort

    from opentrans.deploy.export import export_onnx

    seg, spec = build_segmentor(arch, "none")
    report = prune_structured(seg, 0.5, "magnitude", round_to=8, model_name=spec.model,
                              structures="channels,heads,width", width_sparsity=0.25)
    width = report["structures"]["width"]["kept"]
    assert width == (48 if arch == TINY_VIT else 360)
    if arch == TINY_RN:  # every stage keeps 3/4 of its residual width
        assert structure_sizes(seg, "width") == {"layer1": 24, "layer2": 48, "layer3": 96, "layer4": 192}
    save_segmentor(seg, spec, tmp_path)
    raw = json.loads((tmp_path / SPEC_FILE).read_text())
    assert raw["modules"] and all(m["type"].startswith("Pruned") for m in raw["modules"].values())
    loaded, loaded_spec = load_segmentor(tmp_path)
    for s in ("channels", "heads", "width"):
        assert structure_sizes(loaded, s) == structure_sizes(seg, s)
    images = _images(spec)
    with torch.no_grad():
        expected = seg(images, TEXT)
        assert torch.equal(loaded(images, TEXT), expected)
    if arch == TINY_RN:
        _assert_rn_stage_shapes(loaded.visual, structure_sizes(seg, "width"))
        assert {"clip.visual.layer1.0.conv3.weight", "clip.visual.layer2.0.conv1.weight"} <= set(raw["shapes"])
    if arch == TINY_VIT:
        assert loaded.visual.transformer.resblocks[0].attn.embed_dim == width
        assert loaded.visual.ln_post.normalized_shape == (width,)
    path = export_onnx(loaded, tmp_path / "model.onnx")
    out = ort.InferenceSession(str(path)).run(None, {"images": images.numpy(), "text_embeds": TEXT.numpy()})[0]
    np.testing.assert_allclose(out, expected.numpy(), rtol=1e-4, atol=1e-4)


def test_old_model_json_without_modules_still_loads(tmp_path):
    seg, spec = build_segmentor(TINY_VIT, "none")
    prune_structured(seg, 0.5, model_name=spec.model)
    save_segmentor(seg, spec, tmp_path)
    raw = json.loads((tmp_path / SPEC_FILE).read_text())
    assert raw.pop("modules") == {}
    (tmp_path / SPEC_FILE).write_text(json.dumps(raw))
    loaded, _ = load_segmentor(tmp_path)
    assert isinstance(loaded.visual.transformer.resblocks[0].attn, torch.nn.MultiheadAttention)


@real_data
def test_taylor_scores_are_nonzero_and_zero_for_a_dead_head():
    """At the unpruned point the distillation gradient is 0, but the Gauss-Newton Taylor scores are not; a head
    whose out_proj columns are 0 contributes nothing, so its score is exactly 0."""
    seg, spec = build_segmentor(TINY_VIT, "none")
    _zero_vit_head(seg, 1)
    convert_attention(seg.visual)
    scores = taylor_scores(seg, _images(spec), ("channels", "heads", "width"), probes=4)
    for name, s in scores["heads"].items():
        assert s.shape == (VIT_HEADS,) and s[0] > 0 and s[1] == 0, name
    assert all((s > 0).float().mean() > 0.9 for s in scores["channels"].values())
    assert (scores["width"]["width"] > 0).all()
    assert not any(p.grad is not None for p in seg.parameters())  # nothing left behind

    report = prune_structured(seg, 0.5, "taylor", model_name=spec.model, structures="heads", calibration=_images(spec))
    assert report["ranking"] == "global" and report["structures"]["heads"]["kept"] == 3
    assert all(b.attn.num_heads == 1 for b in seg.visual.transformer.resblocks)  # the dead heads went first
    with pytest.raises(OpenTransError, match="calibration"):
        prune_structured(seg, 0.6, "taylor", model_name=spec.model, structures="heads")


def test_targets_below_current_and_composition_per_structure(tiny_vit):
    seg, spec = tiny_vit
    prune_structured(seg, 0.5, model_name=spec.model, structures="heads,width", width_sparsity=0.25)
    with pytest.raises(OpenTransError, match=r"already at 50\.0% heads sparsity"):
        prune_structured(seg, 0.25, model_name=spec.model, structures="heads")
    with pytest.raises(OpenTransError, match=r"already at 25\.0% width sparsity"):
        prune_structured(seg, 0.5, model_name=spec.model, structures="width", width_sparsity=0.125)
    report = prune_structured(seg, 0.5, model_name=spec.model, structures="channels,width")
    assert report["structures"]["width"] == {"target": 0.5, "before": 0.25, "achieved": 0.5, "original": 64, "kept": 32}
    assert structure_sizes(seg, "heads") == {f"transformer.resblocks.{i}.attn": 1 for i in range(VIT_LAYERS)}


@real_data
def test_transfer_reproduces_shapes_and_outputs(tmp_path):
    """Two composed prunes write kept indices relative to the original architecture; re-applied to the same
    unpruned weights they give the same model, and to other weights the same shapes."""
    base, other = tmp_path / "base", tmp_path / "other"
    for path in (base, other):
        seg, spec = build_segmentor(TINY_VIT, "none")  # deterministic random init
        if path == other:  # "other weights", e.g. another checkpoint of the same architecture
            with torch.no_grad():
                for p in seg.visual.parameters():
                    p.mul_(1.0 + 0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        save_finished(seg, spec, path)
    p1, p2, t_same, t_other = (tmp_path / n for n in ("p1", "p2", "t_same", "t_other"))
    prune_stage(base, None, "none", p1, 0.25, latency_repeats=0)
    prune_stage(p1, None, "none", p2, 0.5, structures="channels,heads,width", width_sparsity=0.25,
                latency_repeats=0)
    kept = json.loads((p2 / KEPT_FILE).read_text())
    assert kept["base"] == "original" and set(kept["structures"]) == {"channels", "heads", "width"}
    prune_stage(base, None, "none", t_same, transfer_from=p2, latency_repeats=0)
    prune_stage(other, None, "none", t_other, transfer_from=p2 / KEPT_FILE, latency_repeats=0)
    pruned, spec = load_segmentor(p2)
    same, _ = load_segmentor(t_same)
    diff, _ = load_segmentor(t_other)
    for s in ("channels", "heads", "width"):
        assert structure_sizes(same, s) == structure_sizes(pruned, s) == structure_sizes(diff, s)
    images = _images(spec)
    with torch.no_grad():
        assert torch.equal(same(images, TEXT), pruned(images, TEXT))
        assert not torch.equal(diff(images, TEXT), pruned(images, TEXT))
    with pytest.raises(OpenTransError, match="unpruned model"):
        prune_stage(p2, None, "none", tmp_path / "bad", transfer_from=p2, latency_repeats=0)
    kept["structures"]["heads"]["transformer.resblocks.0.attn"] = [0, 7]
    (tmp_path / "broken.json").write_text(json.dumps(kept))
    with pytest.raises(OpenTransError, match="invalid kept indices"):
        prune_stage(base, None, "none", tmp_path / "bad", transfer_from=tmp_path / "broken.json", latency_repeats=0)
    assert not (tmp_path / "bad").exists()


@real_data
def test_resnet_all_stage_width_transfer_composes_and_old_layer4_files_apply(tmp_path):
    """RN width kept indices are recorded per stage relative to the original and compose over two prunes;
    re-applied to the unpruned weights they reproduce the model. A kept file from before all-stage width (only
    ``layer4``) still applies: the other stages stay whole."""
    base, p1, p2, same, old = (tmp_path / n for n in ("base", "p1", "p2", "same", "old"))
    seg, spec = build_segmentor(TINY_RN, "none")
    save_finished(seg, spec, base)
    prune_stage(base, None, "none", p1, 0.25, structures="width", latency_repeats=0)
    prune_stage(p1, None, "none", p2, 0.5, structures="channels,heads,width", latency_repeats=0)
    kept = json.loads((p2 / KEPT_FILE).read_text())
    first = json.loads((p1 / KEPT_FILE).read_text())["structures"]["width"]
    width = kept["structures"]["width"]
    assert list(width) == list(RN_STAGE_WIDTHS)
    for stage, c in RN_STAGE_WIDTHS.items():
        assert len(first[stage]) == 3 * c // 4 and len(width[stage]) == c // 2
        assert set(width[stage]) <= set(first[stage])  # indices into the original, composed
    prune_stage(base, None, "none", same, transfer_from=p2, latency_repeats=0)
    pruned, _ = load_segmentor(p2)
    again, _ = load_segmentor(same)
    for s in ("channels", "heads", "width"):
        assert structure_sizes(again, s) == structure_sizes(pruned, s)
    _assert_rn_stage_shapes(again.visual, structure_sizes(again, "width"))
    images = _images(spec)
    with torch.no_grad():
        assert torch.equal(again(images, TEXT), pruned(images, TEXT))

    legacy = {"format": kept["format"], "model": kept["model"], "base": "original",
              "structures": {"width": {"layer4": width["layer4"]}}}
    (tmp_path / "legacy.json").write_text(json.dumps(legacy))
    prune_stage(base, None, "none", old, transfer_from=tmp_path / "legacy.json", latency_repeats=0)
    loaded, _ = load_segmentor(old)
    assert structure_sizes(loaded, "width") == RN_STAGE_WIDTHS | {"layer4": RN_WIDTH // 2}
    legacy["structures"]["width"]["layer3"] = [0, RN_STAGE_WIDTHS["layer3"]]  # out of range
    (tmp_path / "broken.json").write_text(json.dumps(legacy))
    with pytest.raises(OpenTransError, match="layer3: invalid kept indices"):
        prune_stage(base, None, "none", tmp_path / "bad", transfer_from=tmp_path / "broken.json", latency_repeats=0)


def test_cli_structures_and_bad_input(tmp_path):
    runner = CliRunner()
    out = tmp_path / "p"
    result = runner.invoke(cli, ["prune", "--model", TINY_VIT, "--sparsity", "0.5", "--structures", "heads,width",
                                 "--width-sparsity", "0.25", "--latency-repeats", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    md = (out / "prune_report.md").read_text()
    assert "| heads | `transformer.resblocks.0.attn` | 2 | 2 | 1 |" in md and "| width | `width` | 64 | 64 | 48 |" in md
    for args, message in [
        (["--structures", "mlp,ffn", "--sparsity", "0.5"], "unknown structure 'ffn'"),
        (["--sparsity", "0.5", "--head-sparsity", "1.2", "--structures", "heads"], "--head-sparsity 1.2"),
        (["--sparsity", "0.5", "--importance", "taylor"], "needs --distill-data"),
        (["--method", "imp", "--sparsity", "0.5", "--structures", "heads"], "--structures applies to --method structured"),
        (["--sparsity", "0.5", "--transfer-from", str(out)], "not both"),
    ]:
        bad = tmp_path / "bad"
        result = runner.invoke(cli, ["prune", "--model", TINY_VIT, *args, "--out", str(bad)])
        assert result.exit_code == 1 and message in result.output, (args, result.output)
        assert result.output.strip().count("\n") == 0 and not bad.exists()
    # pruning the pruned artifact composes: heads go on from 50 % (at least one per layer stays), width stays
    result = runner.invoke(cli, ["prune", "--from", str(out), "--sparsity", "0.75", "--structures", "heads",
                                 "--latency-repeats", "0", "--out", str(tmp_path / "p2")])
    assert result.exit_code == 0, result.output
    seg, spec = load_segmentor(tmp_path / "p2")
    assert structure_sizes(seg, "width") == {"width": 48} and spec.lineage == ["prune", "prune"]
    assert structure_sizes(seg, "heads") == {f"transformer.resblocks.{i}.attn": 1 for i in range(VIT_LAYERS)}


@real_data
def test_prune_stage_taylor_with_calibration_images(tmp_path):
    figures = prune_stage(None, TINY_VIT, "none", tmp_path / "t", 0.5, importance="taylor",
                          structures="channels,heads", distill_data=CAMVID_SPEC, distill_limit=2, latency_repeats=0)
    report = json.loads((tmp_path / "t" / "prune_report.json").read_text())
    assert report["importance"] == "taylor" and report["structures"]["heads"]["kept"] == 3
    assert figures["gmacs_after"] < figures["gmacs_before"]


@real_data
def test_finetuning_an_imp_artifact_keeps_its_zeros(tmp_path):
    """``finetune --from`` an IMP artifact: the artifact's masks are found next to it, gradient hooks keep the
    pruned weights at exactly zero under AdamW with weight decay, and a loaded/deployed model keeps them too."""
    from opentrans.prune.imp import artifact_masks, imp_targets, keep_masked_zeros

    imp_stage(None, TINY_VIT, "none", tmp_path / "imp", 0.3, rate=0.3, targets="extended")
    seg, spec = load_segmentor(tmp_path / "imp")
    masks = artifact_masks(tmp_path / "imp")
    assert artifact_masks(tmp_path) is None and masks is not None
    keep_masked_zeros(seg, masks)
    params = list(seg.visual.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    images = _images(spec)
    for _ in range(3):
        loss = seg.dense_features(images).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for t in imp_targets(seg.visual, "extended"):
        w = getattr(t.module, t.param)
        assert torch.all(w[~masks[t.name]] == 0), t.name
        assert (w[masks[t.name]] != 0).all()


def test_spectral_plan_and_adapters_see_the_pruned_attention():
    """A head/width-pruned block's fused Q/K/V (inner width != model width) is analysed, planned and adapted like an
    unpruned one: slices are in_proj_weight.shape[0] // 3 rows, not embed_dim."""
    from opentrans.finetune.adapters import add_lora, merge_adapters
    from opentrans.finetune.freeze import apply_freeze_plan, freeze_plan
    from opentrans.analyze.spectral import analyze_model

    seg, spec = build_segmentor(TINY_VIT, "none")
    prune_structured(seg, 0.5, "magnitude", model_name=spec.model, structures="heads")
    layers = analyze_model(seg, ("image",), "opentrans-qkv")["opentrans-qkv"].layers
    qkv = [la.name for la in layers if la.name.endswith("]")]
    assert len(qkv) == 3 * VIT_LAYERS
    plan = freeze_plan(layers, "fraction", fraction=0.0)
    apply_freeze_plan(seg, plan)
    name = "clip.visual.transformer.resblocks.0.attn.in_proj_weight[k]"
    attn = seg.visual.transformer.resblocks[0].attn
    before = attn.in_proj_weight.detach().clone()  # (3 * HEAD_DIM, W) after pruning one of two heads
    add_lora(seg, [name], rank=2)
    with torch.no_grad():
        for p in attn.parametrizations.in_proj_weight[0].parameters():
            p.fill_(0.1)
    merge_adapters(seg)
    after = attn.in_proj_weight.detach()
    assert after.shape == (3 * HEAD_DIM, VIT_WIDTH)
    assert torch.equal(after[:HEAD_DIM], before[:HEAD_DIM]) and torch.equal(after[2 * HEAD_DIM:], before[2 * HEAD_DIM:])
    assert not torch.equal(after[HEAD_DIM:2 * HEAD_DIM], before[HEAD_DIM:2 * HEAD_DIM])  # only the K rows moved
