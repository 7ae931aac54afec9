"""Optional plugin: CLIPer's fine-grained compensation with Stable Diffusion self-attention.

CLIPer (Sun et al., arXiv:2411.13836, method section: fine-grained compensation) refines the coarse
early-layer-fusion prediction with self-attention maps of a Stable Diffusion UNet run for one denoising step on
the image. This needs a Stable Diffusion checkpoint (e.g. ``stabilityai/stable-diffusion-2-1-base``, about
5 GB) and the ``diffusers`` package, neither of which OpenTrans ships or installs, and it is not part of the
exported image graph: it runs in PyTorch after the segmentor, only when the user supplies the weights.

* :func:`compensate` is the refinement itself (pure tensor code, tested): with self-attention maps
  ``S_1..S_n`` ``(4096, 4096)`` of the 64x64 latent grid, each is normalised by its column maxima, entries
  below 0.1 are zeroed, rows are normalised, and the coarse scores ``P`` ``(C, 64, 64)`` become
  ``(S_1 S_2 ... S_n) P`` (``SFSA``, the authors' default) or ``mean(S) P`` (``mean``).
  (linsun449/cliper.code ``ovs/pipeline.py``: ``Pipeline.refinement``.)
* :class:`StableDiffusionAttention` extracts those maps with ``diffusers`` from a local
  ``StableDiffusionPipeline`` folder, hooking the UNet self-attention layers the authors use (default: the
  last two 64x64 up-block self-attentions, their ``attention_layers_to_use: [-4, -6]`` for ViT-B/16) at
  timestep index 45 of 50 with an empty prompt (``diffusion_model/stable_diffusion.py`` there). It has not
  been run in OpenTrans's CI (no diffusion weights there); :func:`compensate` has.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from opentrans.errors import OpenTransError

#: Self-attention (``attn1``) modules of the SD UNet's 64x64 up-blocks, as indexed by the authors (-6, -4, -2).
UP_SELF_ATTENTION = {
    -6: "up_blocks.3.attentions.0.transformer_blocks.0.attn1",
    -4: "up_blocks.3.attentions.1.transformer_blocks.0.attn1",
    -2: "up_blocks.3.attentions.2.transformer_blocks.0.attn1",
}
LATENT = 64


def compensate(scores: torch.Tensor, self_attn: torch.Tensor, mode: str = "SFSA", floor: float = 0.1) -> torch.Tensor:
    """Refine coarse class scores with diffusion self-attention (CLIPer's fine-grained compensation).

    Args:
        scores: ``(C, h, w)`` non-negative class scores (e.g. CLIPer's fused scores, ``exp`` of its logits).
        self_attn: ``(n, g*g, g*g)`` self-attention maps of a square g x g latent grid (heads x layers; g = 64
            for Stable Diffusion at 512x512).
        mode: ``SFSA`` (product of all maps, the authors' default) or ``mean``.
        floor: entries below this share of their column maximum are zeroed.

    Returns:
        refined scores ``(C, g, g)``.

    Raises:
        OpenTransError: maps of another shape or an unknown mode.
    """
    n_tok = int(self_attn.shape[-1])
    grid = round(n_tok ** 0.5)
    if self_attn.dim() != 3 or self_attn.shape[-2] != n_tok or grid * grid != n_tok:
        raise OpenTransError(f"self-attention maps must be (n, g*g, g*g), got {tuple(self_attn.shape)}")
    if mode not in ("SFSA", "mean"):
        raise OpenTransError(f"unknown compensation mode '{mode}' (SFSA or mean)")
    coarse = F.interpolate(scores[None].float(), size=(grid, grid), mode="bilinear", align_corners=False)[0]
    coarse = coarse.flatten(1).t()  # (4096, C)
    att = self_attn.float()
    att = att / (att.amax(dim=-2, keepdim=True) + 1e-5)
    att = torch.where(att < floor, torch.zeros_like(att), att)
    att = att / (att.sum(dim=-1, keepdim=True) + 1e-5)
    if mode == "mean":
        mixed = att.mean(0)
    else:
        mixed = functools.reduce(torch.matmul, att, torch.eye(n_tok, dtype=att.dtype))
    return (mixed @ coarse).t().reshape(-1, grid, grid)


class StableDiffusionAttention:
    """Self-attention maps ``(n, 4096, 4096)`` of a Stable Diffusion UNet for one RGB image (512x512 input).

    Args:
        weights: a local ``diffusers`` ``StableDiffusionPipeline`` folder (``model_index.json`` inside).
        layers: keys of :data:`UP_SELF_ATTENTION`.
        timestep_index: index into a 50-step schedule (45 as the authors).

    Raises:
        OpenTransError: ``diffusers`` is not installed, or ``weights`` is not a pipeline folder.
    """

    def __init__(self, weights: str | os.PathLike, layers=(-4, -6), timestep_index: int = 45, device: str = "cpu"):
        try:
            from diffusers import StableDiffusionPipeline
        except ImportError:
            raise OpenTransError("CLIPer's fine-grained compensation needs the diffusers package "
                                 "(pip install diffusers) and Stable Diffusion weights") from None
        weights = Path(weights)
        if not (weights / "model_index.json").is_file():
            raise OpenTransError(f"{weights}: not a diffusers StableDiffusionPipeline folder (no model_index.json)")
        self.pipe = StableDiffusionPipeline.from_pretrained(str(weights)).to(device)
        self.timestep_index, self.maps, self.layers = timestep_index, {}, tuple(layers)
        for key in layers:
            module = self.pipe.unet.get_submodule(UP_SELF_ATTENTION[key])
            module.register_forward_pre_hook(functools.partial(self._record, key), with_kwargs=True)

    def _record(self, key, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        q = module.head_to_batch_dim(module.to_q(hidden))
        k = module.head_to_batch_dim(module.to_k(hidden))
        self.maps[key] = module.get_attention_scores(q, k, None)[: module.heads]  # first image's heads

    @torch.no_grad()
    def __call__(self, rgb) -> torch.Tensor:
        pipe = self.pipe
        image = pipe.image_processor.preprocess(rgb, height=8 * LATENT, width=8 * LATENT)
        latents = pipe.vae.encode(image.to(pipe.vae.dtype))[0].mean * pipe.vae.config.scaling_factor
        pipe.scheduler.set_timesteps(50)
        t = pipe.scheduler.timesteps[self.timestep_index]
        latents = pipe.scheduler.add_noise(latents, torch.randn_like(latents), t)
        prompt, _ = pipe.encode_prompt("", latents.device, 1, do_classifier_free_guidance=False)
        self.maps.clear()
        pipe.unet(latents, t, encoder_hidden_states=prompt, return_dict=False)
        return torch.cat([self.maps[k] for k in self.layers])  # in the order given, as the authors
