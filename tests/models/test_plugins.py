"""The head and prompt registries: a registered module is built by name, acts in every dense mode, and a saved
model with one rebuilds exactly (see opentrans.models.heads / opentrans.models.prompts)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from opentrans.errors import OpenTransError
from opentrans.models import dense
from opentrans.models.artifact import load_segmentor, save_segmentor
from opentrans.models.heads import build_head, head_names, register_head
from opentrans.models.prompts import PROMPTS, PromptModule, append_tokens, build_prompts, register_prompts


@register_prompts("test-deep")
class _DeepTokens(PromptModule):
    """P tokens appended before every visual block (deep, replacing the previous block's)."""

    def __init__(self, clip, tokens: int = 3):
        super().__init__()
        blocks = clip.visual.transformer.resblocks
        self.n = tokens
        self.tokens = nn.Parameter(torch.randn(len(blocks), tokens, clip.visual.class_embedding.shape[0]))

    def options(self):
        return {"tokens": self.n}

    def _install(self, clip):
        for i, block in enumerate(clip.visual.transformer.resblocks):
            self._hook(block, lambda _m, args, i=i: (append_tokens(args[0], self.tokens[i], 0 if i == 0 else self.n),
                                                     *args[1:]))


@register_head("test-text-shift")
class _TextShift(nn.Module):
    """A head that needs the class embeddings: adds a learned multiple of their mean."""

    def __init__(self, dim, scale: float = 0.5):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale))

    def forward(self, feats, grid=None, text=None):
        if text is None:
            raise OpenTransError("test-text-shift needs class embeddings")
        return feats + self.scale * text.mean(0)


def _inputs(seg, classes=4):
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, *seg.image_size, generator=g), torch.randn(classes, seg.embed_dim, generator=g)


@pytest.mark.parametrize("mode", dense.VIT_MODES)
def test_prompts_change_features_but_not_their_shape(tiny_vit, mode):
    seg, _ = tiny_vit
    seg.set_dense_mode(mode)
    images, text = _inputs(seg)
    with torch.no_grad():
        plain = seg(images, text)
        seg.set_prompts(build_prompts("test-deep", seg.clip, {"tokens": 3}))
        prompted = seg(images, text)
        seg.set_prompts(None)
        again = seg(images, text)
    assert prompted.shape == plain.shape
    torch.testing.assert_close(again, plain)  # detaching removes every hook
    if mode != "cliper":  # CLIPer runs the blocks by hand: visual prompts do not act there (documented)
        assert not torch.allclose(prompted, plain)


def test_prompts_and_head_round_trip(tiny_vit, tmp_path):
    seg, spec = tiny_vit
    seg.set_head("test-text-shift", {"scale": 0.25})
    seg.set_prompts(build_prompts("test-deep", seg.clip, {"tokens": 2}))
    images, text = _inputs(seg)
    with torch.no_grad():
        before = seg(images, text)
    save_segmentor(seg, spec, tmp_path)
    loaded, loaded_spec = load_segmentor(tmp_path)
    assert loaded_spec.prompts == {"kind": "test-deep", "tokens": 2}
    assert (loaded_spec.head, loaded_spec.head_options) == ("test-text-shift", {"scale": 0.25})
    assert not any(k.startswith("clip.") and "prompts" in k for k in loaded.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(loaded(images, text), before)


def test_registry_errors(tiny_vit):
    seg, _ = tiny_vit
    assert {"linear", "none"} <= set(head_names())
    with pytest.raises(OpenTransError, match="unknown head"):
        build_head("no-such-head", 8)
    with pytest.raises(OpenTransError, match="bad options"):
        seg.set_head("linear", {"nonsense": 1})
    with pytest.raises(OpenTransError, match="unknown prompts"):
        build_prompts("no-such-prompts", seg.clip)
    with pytest.raises(OpenTransError, match="needs class embeddings"):
        seg.set_head("test-text-shift")
        seg.dense_features(_inputs(seg)[0])
    assert "test-deep" in PROMPTS
