"""VPT-deep: learnable visual prompt tokens before every ViT block.

Jia, Tang, Chen, Cardie, Belongie, Hariharan, Lim, "Visual Prompt Tuning", ECCV 2022, arXiv:2203.12119,
Sec. 3.2, "VPT-Deep" (equation numbers not checked offline)::

    [x_i, _, E_i] = L_i([x_{i-1}, P_{i-1}, E_{i-1}]),   i = 1 .. N

``P_{i-1}`` ``(p, d)`` are the ``p`` learnable tokens fed to block ``L_i``; the block's outputs at the prompt
positions are discarded and the next block gets fresh tokens ``P_i``. Only the prompts (and a head) train; the
ViT is frozen. With ``layers = k < N`` blocks ``1 .. k`` get new prompts and the tokens leaving block ``k`` flow
through the remaining blocks like any other token (the paper's prompt-depth ablation).

Initialisation (the authors' code, KMnP/vpt ``src/models/vit_prompt/vit.py``): xavier-uniform over the
patch-embedding fan, ``U(-v, v)`` with ``v = sqrt(6 / (3 * ph * pw + d))`` (``ph x pw`` the patch size), seeded
here so a build is reproducible. The authors' optional prompt dropout (``PROMPT.DROPOUT``, 0 by default) is the
``dropout`` option; their optional prompt projection (``PROMPT.PROJECT``, off by default) is not implemented.

OpenTrans convention (:mod:`opentrans.models.prompts`): the tokens go at the **end** of the sequence
``(B, 1 + h*w + p, d)`` instead of between CLS and the patches as in the paper. The prompts carry no
positional embedding and attention is permutation-equivariant, so the computation is the same; CLS stays at 0
and the patches at ``1 .. h*w`` for the dense modes, which drop the prompt tokens before ``ln_post``/``proj``.

The dense modes run the last block by hand (MaskCLIP's value path etc., :mod:`opentrans.models.dense`), so
that block's forward pre-hook does not fire there: the last block's prompts act only where the block is called
as a module (CLIP's pooled path), and in the dense modes get no gradient. CLIPer runs every block by hand: no
visual prompt acts in the ``cliper`` mode.
"""

from __future__ import annotations

import functools
import math

import torch
from open_clip.transformer import VisionTransformer
from torch import nn

from opentrans.errors import OpenTransError
from opentrans.models.prompts import PromptModule, append_tokens, register_prompts


@register_prompts("vpt")
class VPTDeep(PromptModule):
    """VPT-deep prompts for an open_clip ViT image tower.

    Args:
        clip: an ``open_clip.CLIP`` with a ``VisionTransformer`` image tower (not stored; hooks only).
        tokens: ``p``, prompt tokens per block (10 by default; the paper tunes it per task).
        layers: how many blocks from the first get their own prompts (None: all, VPT-deep; 1: VPT-shallow).
        seed: seed of the xavier-uniform initialisation.
        dropout: dropout probability on the prompt tokens while training (the authors' ``PROMPT.DROPOUT``).

    Attributes:
        prompts: ``(layers, tokens, width)`` float32, the trainable tokens ``P_0 .. P_{layers-1}``.

    Raises:
        OpenTransError: a ModifiedResNet (or any non-ViT) image tower, ``tokens < 1``, ``layers`` outside
            ``1 .. number of blocks``, or ``dropout`` outside ``[0, 1)``.
    """

    def __init__(self, clip: nn.Module, tokens: int = 10, layers: int | None = None, seed: int = 0,
                 dropout: float = 0.0):
        super().__init__()
        visual = clip.visual
        if not isinstance(visual, VisionTransformer):
            raise OpenTransError(f"VPT needs a ViT image tower; got {type(visual).__name__} (prompt tokens "
                                 "need a token sequence)")
        blocks = len(visual.transformer.resblocks)
        depth = blocks if layers is None else int(layers)
        if int(tokens) < 1:
            raise OpenTransError(f"VPT tokens {tokens}: must be >= 1")
        if not 1 <= depth <= blocks:
            raise OpenTransError(f"VPT layers {layers}: must be between 1 and the {blocks} blocks of the image tower")
        if not 0.0 <= float(dropout) < 1.0:
            raise OpenTransError(f"VPT dropout {dropout}: must be in [0, 1)")
        self.tokens = int(tokens)
        self.layers = None if layers is None else depth
        self.depth = depth
        self.seed = int(seed)
        self.dropout_p = float(dropout)
        self.dropout = nn.Dropout(self.dropout_p)
        width = visual.class_embedding.shape[0]
        ph, pw = visual.patch_size
        bound = math.sqrt(6.0 / float(3 * ph * pw + width))
        gen = torch.Generator().manual_seed(self.seed)
        init = (torch.rand(depth, self.tokens, width, generator=gen) * 2 - 1) * bound
        self.prompts = nn.Parameter(init)

    def options(self) -> dict:
        return {"tokens": self.tokens, "layers": self.layers, "seed": self.seed, "dropout": self.dropout_p}

    def _prepend(self, index: int, _module: nn.Module, args: tuple):
        """Forward pre-hook of block ``index``: drop the previous block's prompts, append ``P_index``."""
        x = args[0]  # (B, 1 + h*w [+ p], width)
        return (append_tokens(x, self.dropout(self.prompts[index]), 0 if index == 0 else self.tokens), *args[1:])

    def _install(self, clip: nn.Module) -> None:
        for i, block in enumerate(clip.visual.transformer.resblocks[: self.depth]):
            # a partial of a bound method: a deep copy of the model rebinds it to the copied prompt module
            self._hook(block, functools.partial(self._prepend, i))
