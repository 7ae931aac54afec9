"""The open-vocabulary segmentor: dense CLIP patch features, cosine similarity with class text embeddings.

``OpenVocabSegmentor(images (B,3,H,W) float32, text_embeds (C,D) float32) -> logits (B,C,H,W)``.
Text embeddings are an *input* of the image graph, so the class list can change on a device without a
re-export; the text tower is encoded separately (:meth:`OpenVocabSegmentor.encode_classes`).
"""

from __future__ import annotations

import math

import open_clip
import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import VisionTransformer
from torch import nn

from opentrans.errors import OpenTransError

DENSE_MODES = ("maskclip",)
HEADS = ("linear", "none")
#: Prompt templates averaged per class (a subset of CLIP's ImageNet ensemble).
TEMPLATES = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of a small {}.",
    "a photo of a large {}.",
    "there is a {} in the scene.",
    "a cropped photo of the {}.",
)


class LinearHead(nn.Module):
    """Residual linear decoder on patch features: ``f + W f + b``, initialised to the identity.

    Shapes: ``(B, N, D) -> (B, N, D)``. Starting at the identity means an untrained head leaves the
    training-free segmentor unchanged; finetuning moves it away from there.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return feats + self.proj(feats)


def _interpolate_pos_embed(pos: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """Bicubically resize a ViT positional embedding ``(1 + gh*gw, W)`` to another patch grid."""
    if tuple(old_grid) == tuple(new_grid):
        return pos
    cls_pos, patch_pos = pos[:1], pos[1:]
    width = pos.shape[-1]
    patch_pos = patch_pos.reshape(1, old_grid[0], old_grid[1], width).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos, size=new_grid, mode="bicubic", align_corners=False)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(new_grid[0] * new_grid[1], width)
    return torch.cat([cls_pos, patch_pos], dim=0)


def _linear_rows(weight: torch.Tensor, bias: torch.Tensor | None, start: int, stop: int):
    return weight[start:stop], None if bias is None else bias[start:stop]


class OpenVocabSegmentor(nn.Module):
    """Training-free dense CLIP segmentation with an optional trainable head.

    Args:
        clip: an ``open_clip.CLIP`` model (ViT or ModifiedResNet image tower); its image tower may be pruned.
        image_size: network input ``(H, W)`` in pixels; for a ViT both must be multiples of the patch size.
        dense_mode: how dense features are read from the last block. ``maskclip``: MaskCLIP's value path
            (Zhou et al., "Extract Free Dense Labels from CLIP", ECCV 2022, Sec. 3.2): the last block's
            query-key attention, residual and FFN are dropped, each token keeps ``out_proj(W_v ln_1(x))``,
            followed by ``ln_post`` and ``proj``. For ModifiedResNet the attention pool's ``v_proj`` and
            ``c_proj`` are applied to every spatial position.
        head: ``linear`` (:class:`LinearHead`) or ``none``.

    Raises:
        OpenTransError: an unsupported image tower, dense mode or head, or an input size that is not a
            multiple of the patch size.
    """

    def __init__(self, clip: nn.Module, image_size: tuple[int, int], dense_mode: str = "maskclip", head: str = "linear"):
        super().__init__()
        if dense_mode not in DENSE_MODES:
            raise OpenTransError(f"unknown dense mode '{dense_mode}'; choose one of {', '.join(DENSE_MODES)}")
        if head not in HEADS:
            raise OpenTransError(f"unknown head '{head}'; choose one of {', '.join(HEADS)}")
        if not isinstance(clip.visual, (VisionTransformer, ModifiedResNet)):
            raise OpenTransError(f"image tower {type(clip.visual).__name__} is not supported (ViT or ModifiedResNet)")
        self.clip = clip
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.dense_mode = dense_mode
        self.head_type = head
        stride = self.stride
        if self.image_size[0] % stride or self.image_size[1] % stride:
            raise OpenTransError(f"input size {self.image_size} must be a multiple of the stride {stride}")
        self.head = LinearHead(self.embed_dim) if head == "linear" else nn.Identity()

    @property
    def visual(self) -> nn.Module:
        """The CLIP image encoder (what ``prune`` and ``analyze`` work on)."""
        return self.clip.visual

    @property
    def is_vit(self) -> bool:
        return isinstance(self.clip.visual, VisionTransformer)

    @property
    def stride(self) -> int:
        """Output stride of the dense features in pixels (patch size for a ViT, 32 for ModifiedResNet)."""
        return self.visual.patch_size[0] if self.is_vit else 32

    @property
    def embed_dim(self) -> int:
        """D, the joint image-text embedding width."""
        if self.is_vit:
            return self.visual.proj.shape[1]
        return self.visual.attnpool.c_proj.out_features

    @property
    def feature_grid(self) -> tuple[int, int]:
        """(h, w) of the dense feature map for :attr:`image_size`."""
        return self.image_size[0] // self.stride, self.image_size[1] // self.stride

    def _vit_dense(self, images: torch.Tensor) -> torch.Tensor:
        v = self.visual
        x = v.conv1(images)  # (B, W, h, w)
        grid = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, W)
        cls = v.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1)
        x = x + _interpolate_pos_embed(v.positional_embedding, v.grid_size, tuple(grid)).to(x.dtype)
        x = v.ln_pre(x)
        blocks = v.transformer.resblocks
        for block in blocks[:-1]:
            x = block(x)
        last = blocks[-1]
        attn: nn.MultiheadAttention = last.attn
        width = attn.embed_dim
        w_v, b_v = _linear_rows(attn.in_proj_weight, attn.in_proj_bias, 2 * width, 3 * width)
        x = F.linear(last.ln_1(x), w_v, b_v)
        x = last.ls_1(attn.out_proj(x))
        x = v.ln_post(x[:, 1:]) @ v.proj  # (B, h*w, D)
        return x

    def _resnet_dense(self, images: torch.Tensor) -> torch.Tensor:
        v = self.visual
        x = v.stem(images)
        x = v.layer4(v.layer3(v.layer2(v.layer1(x))))  # (B, C, h, w)
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, C)
        x = v.attnpool.c_proj(v.attnpool.v_proj(x))  # (B, h*w, D)
        return x

    def dense_features(self, images: torch.Tensor) -> torch.Tensor:
        """Head-adapted dense features ``(B, h*w, D)``, not normalised, for images ``(B, 3, H, W)``."""
        feats = self._vit_dense(images) if self.is_vit else self._resnet_dense(images)
        return self.head(feats)

    def forward(self, images: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, C, H, W)``: CLIP's logit scale times the cosine of each patch with each class embedding,
        bilinearly upsampled to the input size."""
        feats = F.normalize(self.dense_features(images), dim=-1)
        text = F.normalize(text_embeds, dim=-1)
        logits = self.clip.logit_scale.exp() * feats @ text.t()  # (B, h*w, C)
        b, _, c = logits.shape
        h, w = images.shape[-2] // self.stride, images.shape[-1] // self.stride
        logits = logits.transpose(1, 2).reshape(b, c, h, w)
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)

    @torch.no_grad()
    def encode_classes(self, class_names: list[str], templates: tuple[str, ...] = TEMPLATES,
                       model_name: str | None = None) -> torch.Tensor:
        """Text embeddings ``(C, D)``, L2-normalised, each the mean over ``templates`` of one class name.

        Raises:
            OpenTransError: an empty class list.
        """
        if not class_names:
            raise OpenTransError("no class names given")
        tokenizer = open_clip.get_tokenizer(model_name) if model_name else open_clip.tokenize
        embeds = []
        for name in class_names:
            tokens = tokenizer([t.format(name) for t in templates])
            e = F.normalize(self.clip.encode_text(tokens), dim=-1).mean(0)
            embeds.append(F.normalize(e, dim=-1))
        return torch.stack(embeds)


def default_image_size(clip: nn.Module, source_hw: tuple[int, int]) -> tuple[int, int]:
    """Input size for images of ``source_hw``: short side = the model's native size, long side scaled and
    rounded down to a multiple of the stride (e.g. CamVid 360x480 -> 224x288 for ViT-B-32)."""
    visual = clip.visual
    native = visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else visual.image_size
    stride = visual.patch_size[0] if isinstance(visual, VisionTransformer) else 32
    h, w = source_hw
    scale = native / min(h, w)
    return (max(stride, math.floor(h * scale / stride) * stride), max(stride, math.floor(w * scale / stride) * stride))
