"""The ``cliper`` dense mode: CLIPer's early-layer fusion and its score fusion."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from opentrans.errors import OpenTransError
from opentrans.models.dense.common import _head, attend, embed_tokens, grid_logits_to_image, qkv, register


#: How cliper resizes the positional embedding (:data:`opentrans.models.dense.common.POS_RESIZE_METHODS`).
POS_RESIZE = "bilinear"
#: The paper's published ViT-B/16 evaluation settings (see :func:`opentrans.inference.training_free.paper_protocol`):
#: ``"*"`` for every dataset, a ``--data`` format key for what differs, ``"source"`` the files read,
#: ``"notes"`` what OpenTrans does not reproduce.
PROTOCOL = {
    "source": "linsun449/cliper.code@c05fa41a4966d0a43af513546b17c346ccd42559 scripts/config/vit-b-16/ovs_*.yaml, "
              "modified_clip/model.py L30, L155-163, L221-227",
    "*": {"short_side": 336, "window": None, "stride": None, "templates": None, "needs_templates": True,
          "logit_scale": 100.0, "cliper_keep": 0.2},
    "voc": {"cliper_keep": 0.1},
    "voc20": {"cliper_keep": 0.1},
    "coco-object": {"logit_scale": 50.0, "templates": "imagenet80", "needs_templates": False},
    "cityscapes": {"short_side": 560, "cliper_keep": 0.35, "templates": "imagenet80", "needs_templates": False},
    "notes": ("CLIPer's label assignment (cam_to_label with bkg_thre/score_threshold) and its 0.5/0.5 mix of "
              "whole-image and sliding-window scores (sliding_crop_size in some configs) are not implemented; "
              "whole-image inference as in its sliding_crop_size: 0 configs",
              "CLIPer rounds both sides to a multiple of the patch size; OpenTrans resizes the short side to "
              "336 and floors the long side's patches"),
}
#: CLIPer keeps, per class, only last-layer probabilities above this share of the class's maximum over patches
#: (``seg_last[seg_last < seg_last.amax((-1, -2), keepdim=True) * self.cfg.attention_thr] = 0`` in
#: linsun449/cliper.code ``modified_clip/model.py`` L227). ``attention_thr`` is 0.2 in most of the authors'
#: ViT-B/16 configs (``scripts/config/vit-b-16/ovs_*.yaml``), 0.1 for VOC-21/VOC-20 and 0.35 for Cityscapes;
#: :mod:`opentrans.inference.training_free` sets the per-dataset value under ``--protocol paper``.
CLIPER_KEEP = 0.2
#: CLIPer's softmax temperature: ``self.logit_scale = cfg.logit_scale`` (``modified_clip/model.py`` L30), 100 in the
#: authors' ViT-B/16 configs but for COCO-Object (``ovs_coco5k.yaml``) and COCO-Stuff, 50. A constant of
#: the method, not CLIP's learnt logit scale (which is also 100 for OpenAI's weights).
CLIPER_LOGIT_SCALE = 100.0
#: Floor of CLIPer's fused scores before the log that turns them into logits.
CLIPER_EPS = 1e-6
#: Score fusions :func:`cliper_scores` offers: the authors' (default) and OpenTrans's own earlier variant.
CLIPER_FUSIONS = ("cliper", "row-average")


def cliper_features(visual: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIPer's early-layer fusion (Sun et al., "CLIPer: Hierarchically Improving Spatial Representation of
    CLIP for Open-Vocabulary Semantic Segmentation", arXiv:2411.13836, method section: early-layer fusion).

    1. The first L-1 blocks run unchanged; their per-head attention maps are summed,
       ``M = sum_{l<L} A_l`` ``(B, heads, N, N)``, and their normalised inputs ``e_l = ln_1^l(x_l)`` are kept
       (the *embeddings* of early layers); ``e_L = x_L`` is the input of the last block.
    2. ``M`` is turned into a fused attention map: one Sinkhorn step (column then row normalisation), then
       ``A = relu((M + M^T)/2 - colmean)``, rows normalised to 1.
    3. Every embedding goes through the last block's value path under the fused map, without residual or FFN:
       ``f_l = proj(ln_post(ls_1(Attn_L(A) on ln_1^L(e_l))))``.

    The authors' code (linsun449/cliper.code at c05fa41a4966d0a43af513546b17c346ccd42559,
    ``modified_clip/model.py`` L57-67 and L112-138, ``attn_type='fused-attn'``, ``fuse_feature=True``) applies
    the two normalisations of step 2 in place inside the loop over the L embeddings, so embedding l sees
    ``l + 1`` Sinkhorn steps and the map returned for score fusion sees L; this function reproduces that
    exactly. The positional embedding is resized bilinearly to the exact grid (L165-174, :data:`POS_RESIZE`).

    Returns:
        ``features`` ``(L, B, h*w, D)`` (one per embedding, not normalised) and the head-averaged fused map
        of the last embedding restricted to patches, ``(B, h*w, h*w)``.
    """
    x, grid = embed_tokens(visual, images, POS_RESIZE)
    blocks = visual.transformer.resblocks
    last = blocks[-1]
    embeds, fused = [], None
    for block in blocks[:-1]:
        xn = block.ln_1(x)
        embeds.append(xn)
        q, k, v = qkv(block.attn, xn)
        weights = torch.softmax((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1), dim=-1)  # (B, heads, N, N)
        fused = weights if fused is None else fused + weights
        x = x + block.ls_1(attend(block.attn, weights, v))
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
    embeds.append(x)
    if fused is None:  # a one-block ViT has no early layers: fall back to the identity map
        n = x.shape[1]
        fused = torch.eye(n, dtype=x.dtype).expand(x.shape[0], last.attn.num_heads, n, n)
    feats, attn_map = [], None
    for e in embeds:
        fused = fused / fused.sum(dim=-2, keepdim=True)
        fused = fused / fused.sum(dim=-1, keepdim=True)
        a = (fused + fused.transpose(-2, -1)) / 2
        a = torch.clamp(a - a.mean(dim=-2, keepdim=True), min=0)
        a = a / a.sum(dim=-1, keepdim=True).clamp_min(1e-12)  # the floor only guards an all-zero row
        _, _, v = qkv(last.attn, last.ln_1(e))
        feats.append(_head(visual, last.ls_1(attend(last.attn, a, v)), grid))
        attn_map = a
    n = grid[0] * grid[1]
    return torch.stack(feats), attn_map.mean(dim=1)[:, 1:1 + n, 1:1 + n]


def cliper_scores(feats: torch.Tensor, attn_map: torch.Tensor, text: torch.Tensor, scale,
                  keep: float = CLIPER_KEEP, fusion: str = "cliper") -> torch.Tensor:
    """CLIPer's score fusion (arXiv:2411.13836; linsun449/cliper.code at c05fa41a4966d0a43af513546b17c346ccd42559,
    ``modified_clip/model.py`` L214-230, ``CLIPer.forward`` with ``fuse_feature=True``, ``select_layer=-1``).

    ``P_l = softmax_c(scale * cos(f_l, [t_1..t_C, mean_c t_c]))[:C]`` per layer ``(N, C)`` (the mean class embedding
    is an extra distractor, as in the authors' code); the last layer's map keeps, per class, the patches at or
    above ``keep`` times that class's maximum over patches, ``P_L'``. Then, by ``fusion``:

    * ``"cliper"`` (default, the authors'): ``A^T P_L' + mean_{l<=L} P_l`` with ``P_L`` replaced by ``P_L'`` in
      the mean. Their ``seg_last.flatten(-2, -1) @ attn.mean(0)[1:, 1:]`` multiplies the ``(C, N)`` scores by
      ``A`` from the right, i.e. ``A^T P`` in this ``(N, C)`` layout, and the in-place thresholding of
      ``seg_last`` (a view of ``seg[-1]``) also zeroes the last layer inside ``seg.mean(0)``.
    * ``"row-average"`` (OpenTrans's own variant, not the authors'): ``A P_L' + mean_{l<L} P_l``, each patch
      averaging the last-layer scores over its row of ``A``, and the mean over the first L-1 layers only.

    Args:
        feats: ``(L, B, N, D)`` from :func:`cliper_features`; attn_map: ``(B, N, N)``;
        text: class embeddings ``(C, D)``; scale: the softmax temperature (a float or scalar tensor,
            :data:`CLIPER_LOGIT_SCALE` in the authors' code); keep: :data:`CLIPER_KEEP`; fusion: see above.

    Returns:
        fused scores ``(B, N, C)``, non-negative (not a distribution).

    Raises:
        OpenTransError: an unknown ``fusion``.
    """
    if fusion not in CLIPER_FUSIONS:
        raise OpenTransError(f"unknown CLIPer fusion '{fusion}'; choose one of {', '.join(CLIPER_FUSIONS)}")
    text = F.normalize(text, dim=-1)
    text = torch.cat([text, F.normalize(text.mean(0, keepdim=True), dim=-1)], dim=0)
    probs = torch.softmax(scale * F.normalize(feats, dim=-1) @ text.t(), dim=-1)[..., :-1]  # (L, B, N, C)
    last = probs[-1]
    last = torch.where(last < keep * last.amax(dim=1, keepdim=True), torch.zeros_like(last), last)  # (B, N, C)
    if fusion == "row-average":
        fused = attn_map @ last
        return fused + probs[:-1].mean(0) if probs.shape[0] > 1 else fused
    layers = torch.cat([probs[:-1], last[None]], dim=0)  # (L, B, N, C), the last layer thresholded
    return attn_map.transpose(-2, -1) @ last + layers.mean(0)


def cliper_logits(seg: nn.Module, images: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """The ``cliper`` mode's logits ``(B, C, H, W)`` for a segmentor ``seg``
    (:class:`~opentrans.models.segmentor.OpenVocabSegmentor`): ``log`` of CLIPer's fused class scores
    (:func:`cliper_scores` at ``seg.logit_scale()`` and ``seg.cliper_keep``, the head applied to every layer's
    features), bilinearly upsampled to the input size and floored at :data:`CLIPER_EPS`, so their argmax and
    softmax are those of the fused scores."""
    feats, attn_map = cliper_features(seg.visual, images)  # (L, B, h*w, D), (B, h*w, h*w)
    grid = seg.grid_of(images)
    feats = seg.head(feats.flatten(0, 1), grid, text_embeds).view_as(feats)
    scores = cliper_scores(feats, attn_map, text_embeds, seg.logit_scale(), keep=seg.cliper_keep)
    scores = grid_logits_to_image(scores, grid, images.shape[-2:])
    return torch.log(torch.clamp(scores, min=CLIPER_EPS))


@register("cliper", rank=5, pos_resize=POS_RESIZE, protocol=PROTOCOL, logits=cliper_logits,
          logit_scale=CLIPER_LOGIT_SCALE)
def cliper_last(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Dense features ``(B, h*w, D)`` of CLIPer's last-layer embedding (the mode's features without the score
    fusion, which :meth:`opentrans.models.segmentor.OpenVocabSegmentor.forward` applies)."""
    return cliper_features(visual, images)[0][-1]
