"""The open-vocabulary segmentor: dense CLIP patch features, cosine similarity with class text embeddings.

``OpenVocabSegmentor(images (B,3,H,W) float32, text_embeds (C,D) float32) -> logits (B,C,H,W)``.
Text embeddings are an *input* of the image graph, so the class list can change on a device without a
re-export; the text tower is encoded separately (:meth:`OpenVocabSegmentor.encode_classes`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import VisionTransformer
from torch import nn

from opentrans.errors import OpenTransError
from opentrans.models import dense as _dense
from opentrans.models.heads import build_head
from opentrans.models.prompts import PromptModule

#: Training-free dense modes (the registry of :mod:`opentrans.models.dense`, in report order); a ModifiedResNet
#: supports only :data:`~opentrans.models.dense.RN_MODES` (``maskclip``).
DENSE_MODES = _dense.VIT_MODES
#: Prompt templates averaged per class (a subset of CLIP's ImageNet ensemble).
TEMPLATES = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of a small {}.",
    "a photo of a large {}.",
    "there is a {} in the scene.",
    "a cropped photo of the {}.",
)


_interpolate_pos_embed = _dense._interpolate_pos_embed


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (``MemAvailable`` of /proc/meminfo), or None where the OS does
    not say (the memory check is then skipped)."""
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_inference_memory(seg: "OpenVocabSegmentor", hw: tuple[int, int], what: str, classes: int = 32) -> None:
    """Refuse an input size whose forward pass (:meth:`OpenVocabSegmentor.inference_bytes`) needs more memory than
    is available, before anything of that size is allocated.

    Raises:
        OpenTransError: naming ``what`` (the option that set the size), the estimate and the memory available.
    """
    needed, detail = seg.inference_bytes(hw, classes=classes)
    available = available_memory()
    if available is not None and needed > available:
        raise OpenTransError(f"{what}: one image at {hw[0]}x{hw[1]} needs about {needed / 2**30:,.1f} GiB ({detail}), "
                             f"more than the {available / 2**30:,.1f} GiB available; choose a smaller size")


def check_dense_mode(dense_mode: str, visual: nn.Module) -> None:
    """Raise :class:`OpenTransError` unless ``dense_mode`` is one of :data:`DENSE_MODES` and, for a
    ModifiedResNet image tower, one of :data:`~opentrans.models.dense.RN_MODES` (``maskclip``)."""
    if dense_mode not in DENSE_MODES:
        raise OpenTransError(f"unknown dense mode '{dense_mode}'; choose one of {', '.join(DENSE_MODES)}")
    if dense_mode not in _dense.RN_MODES and not isinstance(visual, VisionTransformer):
        raise OpenTransError(f"dense mode '{dense_mode}' needs a ViT image tower; a ResNet supports only "
                             f"{', '.join(_dense.RN_MODES)}")


class OpenVocabSegmentor(nn.Module):
    """Training-free dense CLIP segmentation with an optional trainable head.

    Args:
        clip: an ``open_clip.CLIP`` model (ViT or ModifiedResNet image tower); its image tower may be pruned.
        image_size: network input ``(H, W)`` in pixels; for a ViT both must be multiples of the patch size.
        dense_mode: how dense features are read from the last block (papers and equations in
            :mod:`opentrans.models.dense`):

            * ``maskclip`` (default): MaskCLIP as its authors' code computes it: the last block's query-key
              attention is replaced by the identity, its residual and FFN stay (``v = x + out_proj(W_v ln_1(x))``,
              ``v + mlp(ln_2(v))``), then ``ln_post`` and ``proj``. For ModifiedResNet the attention pool's
              ``v_proj`` and ``c_proj`` are applied to every position.
            * ``maskclip-noresidual``: the residual-free, FFN-free baseline the ClearCLIP repository calls MaskCLIP
              (``ln_post(out_proj(W_v ln_1(x)))``), OpenTrans's ``maskclip`` before issue 12.
            * ``sclip``: correlative self-attention ``softmax(qq^T)+softmax(kk^T)``, residual and FFN kept.
            * ``clearclip``: q-q attention, no residual, no FFN.
            * ``naclip``: k-k attention plus a Gaussian neighbourhood bias, no residual, no FFN.
            * ``cliper``: CLIPer's early-layer fusion: summed early-layer attention maps and early-layer
              embeddings pushed through the last block; the logits are ``log`` of CLIPer's fused class scores
              (floored at :data:`~opentrans.models.dense.CLIPER_EPS`), so their argmax and softmax are those of the fused scores.
              CLIPer's diffusion-based fine-grained compensation is not part of the graph (see
              :mod:`opentrans.models.diffusion_refine`).

            Only ``maskclip`` exists for a ModifiedResNet image tower.
        head: a registered head (:mod:`opentrans.models.heads`): ``linear`` (:class:`~opentrans.models.heads.LinearHead`, default),
            ``none``, or a paper's decoder (:mod:`opentrans.models.decoders`); ``head_options`` are its options.

    Learnable prompt tokens (:mod:`opentrans.models.prompts`) are attached with :meth:`set_prompts` and live
    in ``self.prompts`` (None by default).

    Two evaluation settings are plain attributes (not saved with the model; an export bakes their current
    values into the graph): ``logit_temperature`` (None: CLIP's own logit scale for every mode but ``cliper``,
    :data:`~opentrans.models.dense.CLIPER_LOGIT_SCALE` for ``cliper``; a float: that softmax temperature, e.g. a
    paper's ``logit_scale``) and ``cliper_keep`` (CLIPer's last-layer keep threshold,
    :data:`~opentrans.models.dense.CLIPER_KEEP`).

    Raises:
        OpenTransError: an unsupported image tower, dense mode (any mode but ``maskclip`` on a ResNet) or head,
            or an input size that is not a multiple of the patch size.
    """

    def __init__(self, clip: nn.Module, image_size: tuple[int, int], dense_mode: str = "maskclip", head: str = "linear",
                 head_options: dict | None = None):
        super().__init__()
        check_dense_mode(dense_mode, clip.visual)
        if not isinstance(clip.visual, (VisionTransformer, ModifiedResNet)):
            raise OpenTransError(f"image tower {type(clip.visual).__name__} is not supported (ViT or ModifiedResNet)")
        self.clip = clip
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.dense_mode = dense_mode
        self.head_type = head
        stride = self.stride
        if self.image_size[0] % stride or self.image_size[1] % stride:
            raise OpenTransError(f"input size {self.image_size} must be a multiple of the stride {stride}")
        self.head_options = dict(head_options or {})
        self.head = build_head(head, self.embed_dim, self.head_options)
        self.prompts: PromptModule | None = None
        self.logit_temperature: float | None = None
        self.cliper_keep: float = _dense.CLIPER_KEEP

    def logit_scale(self) -> torch.Tensor:
        """The softmax temperature the logits carry (a scalar tensor): ``logit_temperature`` if set, else the dense
        mode's own (:attr:`~opentrans.models.dense.DenseMode.logit_scale`, e.g.
        :data:`~opentrans.models.dense.CLIPER_LOGIT_SCALE` for ``cliper``) and CLIP's learnt logit scale otherwise."""
        if self.logit_temperature is not None:
            return torch.tensor(float(self.logit_temperature))
        own = _dense.DENSE.get(self.dense_mode).logit_scale
        if own is not None:
            return torch.tensor(own)
        return self.clip.logit_scale.exp()

    def set_head(self, head: str, options: dict | None = None) -> None:
        """Replace the head by a fresh registered head (e.g. a paper's decoder before finetuning).

        Raises:
            OpenTransError: an unknown head or bad options (see :func:`~opentrans.models.heads.build_head`).
        """
        self.head = build_head(head, self.embed_dim, options)
        self.head_type, self.head_options = head, dict(options or {})

    def set_prompts(self, prompts: PromptModule | None) -> None:
        """Attach learnable prompt tokens (replacing any attached before), or detach them with None.

        The prompts act through hooks on ``self.clip``'s blocks (see :mod:`opentrans.models.prompts`); their
        parameters are saved under ``prompts.*``. CLIPer's early-layer fusion runs the blocks by hand, so visual
        prompts do not act in the ``cliper`` dense mode (text prompts do).
        """
        if self.prompts is not None:
            self.prompts.detach()
        if prompts is None:
            self.prompts = None
            return
        prompts.attach(self.clip)
        self.prompts = prompts

    def set_dense_mode(self, dense_mode: str) -> None:
        """Switch the training-free mode in place (the weights are shared by every mode).

        Raises:
            OpenTransError: an unknown mode, or a mode other than ``maskclip`` on a ResNet image tower.
        """
        check_dense_mode(dense_mode, self.visual)
        self.dense_mode = dense_mode

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

    def inference_bytes(self, hw: tuple[int, int], batch: int = 1, classes: int = 32) -> tuple[int, str]:
        """A lower estimate of the memory one forward pass at input ``hw`` = (H, W) takes beyond the weights, and
        what dominates it: for a ViT the attention map of one block (``heads x N^2`` floats, N tokens; the dense
        modes compute it explicitly) and the token activations, for a ResNet the stem's feature maps; plus the
        logits upsampled to ``hw``. Used to refuse input sizes far beyond memory before allocating anything."""
        h, w = int(hw[0]), int(hw[1])
        logits = 2 * batch * classes * h * w * 4
        if self.is_vit:
            tokens = (h // self.stride) * (w // self.stride) + 1
            heads = self.visual.transformer.resblocks[-1].attn.num_heads
            width = self.visual.transformer.width
            attention = 2 * batch * heads * tokens * tokens * 4
            activations = 12 * batch * tokens * width * 4
            return attention + activations + logits, f"attention over {tokens:,} tokens"
        stem = self.visual.conv1.out_channels
        return 8 * batch * stem * (h // 2) * (w // 2) * 4 + logits, f"ResNet feature maps of {h // 2}x{w // 2}"

    @property
    def feature_grid(self) -> tuple[int, int]:
        """(h, w) of the dense feature map for :attr:`image_size`."""
        return self.image_size[0] // self.stride, self.image_size[1] // self.stride

    def _vit_dense(self, images: torch.Tensor) -> torch.Tensor:
        return _dense.vit_dense(self.dense_mode, self.visual, images)  # (B, h*w, D)

    def _resnet_dense(self, images: torch.Tensor) -> torch.Tensor:
        v = self.visual
        x = v.stem(images)
        x = v.layer4(v.layer3(v.layer2(v.layer1(x))))  # (B, C, h, w)
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, C)
        x = v.attnpool.c_proj(v.attnpool.v_proj(x))  # (B, h*w, D)
        return x

    def grid_of(self, images: torch.Tensor) -> tuple[int, int]:
        """``(h, w)`` feature grid for images ``(B, 3, H, W)``."""
        return images.shape[-2] // self.stride, images.shape[-1] // self.stride

    def dense_features(self, images: torch.Tensor, text_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Head-adapted dense features ``(B, h*w, D)``, not normalised, for images ``(B, 3, H, W)``.

        ``text_embeds`` ``(C, D)`` go to a head that attends to the classes (None: no class list; such a head
        raises). For ``cliper`` these are the features of the last-layer embedding under the fused attention
        map (the score fusion over all layers happens in :meth:`forward`)."""
        feats = self._vit_dense(images) if self.is_vit else self._resnet_dense(images)
        return self.head(feats, self.grid_of(images), text_embeds)

    def forward(self, images: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, C, H, W)``: :meth:`logit_scale` times the cosine of each patch with each class embedding,
        bilinearly upsampled to the input size (for ``cliper``: ``log`` of the fused class scores, see the class
        docstring); a mode with its own logits (:attr:`~opentrans.models.dense.DenseMode.logits`) computes them."""
        own_logits = _dense.DENSE.get(self.dense_mode).logits
        if own_logits is not None:
            return own_logits(self, images, text_embeds)
        feats = F.normalize(self.dense_features(images, text_embeds), dim=-1)
        text = F.normalize(text_embeds, dim=-1)
        logits = self.logit_scale() * feats @ text.t()  # (B, h*w, C)
        b, _, c = logits.shape
        h, w = images.shape[-2] // self.stride, images.shape[-1] // self.stride
        logits = logits.transpose(1, 2).reshape(b, c, h, w)
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)

    @torch.no_grad()
    def encode_classes(self, class_names: list[str], templates: tuple[str, ...] = TEMPLATES,
                       model_name: str | None = None) -> torch.Tensor:
        """Text embeddings ``(C, D)``, L2-normalised, each the mean over ``templates`` of one class name.

        Attached text prompts that assume a template (``self.prompts.templates``) replace ``templates``.

        Raises:
            OpenTransError: an empty class list.
        """
        if not class_names:
            raise OpenTransError("no class names given")
        if self.prompts is not None and self.prompts.templates:
            templates = tuple(self.prompts.templates)
        tokenizer = open_clip.get_tokenizer(model_name) if model_name else open_clip.tokenize
        prompts = [t.format(name) for name in class_names for t in templates]
        chunk = 256  # prompts per text-tower call: batching is several times faster than one call per class
        encoded = [F.normalize(self.clip.encode_text(tokenizer(prompts[i:i + chunk])), dim=-1)
                   for i in range(0, len(prompts), chunk)]
        per_class = torch.cat(encoded).view(len(class_names), len(templates), -1).mean(1)
        return F.normalize(per_class, dim=-1)


def default_image_size(clip: nn.Module, source_hw: tuple[int, int]) -> tuple[int, int]:
    """Input size for images of ``source_hw``: short side = the model's native size, long side scaled and
    rounded down to a multiple of the stride (e.g. CamVid 360x480 -> 224x288 for ViT-B-32)."""
    visual = clip.visual
    native = visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else visual.image_size
    stride = visual.patch_size[0] if isinstance(visual, VisionTransformer) else 32
    h, w = source_hw
    scale = native / min(h, w)
    return (max(stride, math.floor(h * scale / stride) * stride), max(stride, math.floor(w * scale / stride) * stride))
