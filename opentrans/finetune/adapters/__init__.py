"""Parameter-efficient adapters on CLIP weights, as ``torch.nn.utils.parametrize`` parametrizations.

Each adapter replaces a weight ``W0`` by ``f(W0; theta)`` with a small trainable ``theta`` and a frozen ``W0``:

* :mod:`~opentrans.finetune.adapters.lora`: LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language
  Models", ICLR 2022, eq. 3): ``W = W0 + (alpha / r) B A``;
* :mod:`~opentrans.finetune.adapters.oft`: OFT (Qiu et al., "Controlling Text-to-Image Diffusion by
  Orthogonal Finetuning", NeurIPS 2023, eqs. 2-4): ``W = W0 R^T`` with a block-diagonal orthogonal ``R``
  from the Cayley transform, which keeps the angles between neurons (the hyperspherical energy);
* :mod:`~opentrans.finetune.adapters.hclip`: H-CLIP (Peng et al., CVPR 2025, arXiv:2405.18840): block-diagonal
  transforms on both towers, Cayley-orthogonal on the text tower and free on the image tower, produced by
  cross-layer/cross-modal relation maps (DCRC) over all blocks of both towers.

Targets are named like the spectral analysis names layers (:func:`~opentrans.analyze.spectral.spectral_layers`):
a Linear module (``clip.visual.transformer.resblocks.0.mlp.c_fc``) or one Q/K/V row block of a fused
attention projection (``...attn.in_proj_weight[q]``), so a freeze plan's ``trainable`` list can be adapted
directly. Because they are parametrizations, the adapted model runs unchanged code (open_clip's
``nn.MultiheadAttention`` reads the adapted ``in_proj_weight``), and :func:`merge_adapters` folds every
adapter into plain weights (exactly, both adapters are linear in the weight) so an adapted model exports
like any other.

Each ``--adapter`` choice is an :class:`~opentrans.finetune.adapters.common.AdapterKind` in
:data:`~opentrans.finetune.adapters.common.ADAPTERS`, registered by its own module (``none.py``, ``lora.py``,
``oft.py``, ``hclip.py``): a new adapter is one new module here.
"""

from opentrans.finetune.adapters.common import (
    ADAPTERS,
    AdapterKind,
    AdapterReport,
    adapter_names,
    adapter_parameters,
    merge_adapters,
)
from opentrans.finetune.adapters.hclip import DCRC, HCLIPAdapter, add_hclip, tower_targets
from opentrans.finetune.adapters.lora import LoRA, add_lora
from opentrans.finetune.adapters.oft import OFT, add_oft, hyperspherical_energy

__all__ = ["ADAPTERS", "DCRC", "OFT", "AdapterKind", "AdapterReport", "adapter_names", "HCLIPAdapter", "LoRA", "adapter_parameters", "add_hclip", "add_lora",
           "add_oft", "hyperspherical_energy", "merge_adapters", "tower_targets"]
