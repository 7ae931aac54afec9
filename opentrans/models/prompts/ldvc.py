"""LDVC's learnable deep vision-language prompts (``@register_prompts("ldvc")``).

LDVC ("Open-vocabulary segmentation with Learnable Deep Vision-language prompts and a local Consensus decoder")
learns deep prompts in *both* CLIP towers and refines the dense features with a local-consensus decoder
(:mod:`opentrans.models.decoders.ldvc`). Neither the paper's text nor its code could be retrieved offline for
this implementation (searches of the stored papers, code and issue corpora found nothing under that title), so the
prompt design follows the task brief and the multi-modal prompt learning it builds on, MaPLe (Khattak et al.,
"MaPLe: Multi-modal Prompt Learning", CVPR 2023, arXiv:2210.03117, Sec. 3.2; official code
muzairkhattak/multimodal-prompt-learning). Equation numbers are not quoted (MaPLe's could not be checked offline
either): the formulas are written out, the MaPLe part named, and where LDVC may differ it is stated.

Text prompts (MaPLe, deep language prompting): for every text block ``i < J_t`` (``text_depth``) the
four token positions of the template "a photo of a" (positions 1..4, right after SOT) are overwritten by learnable
vectors ``P_i`` ``(4, W_t)``::

    x_i = block_i([x_{i-1}[0], P_i, x_{i-1}[5:]])     # x_{i-1}[1:5] ("a photo of a") replaced by P_i

The sequence length stays 77, so the causal mask and the EOT pooling of open_clip's text tower stay valid
(:mod:`opentrans.models.prompts` conventions), and :attr:`LDVCPrompts.templates` is ``("a photo of a {}.",)`` so
``encode_classes`` builds the sentences the prompts were made for. ``P_i`` is *initialised from the hidden states
of that template*: the text tower runs once on the tokenized "a photo of a" when the module is built and ``P_i`` is
block ``i``'s input at positions 1..4 (for ``i = 0`` that is token + positional embedding). Because the text
attention is causal, positions 1..4 of "a photo of a {class}." never see the class name, so these hidden states
are the same for every class and, at initialisation, the prompted embedding of every class equals the unprompted
embedding of "a photo of a {class}." (MaPLe initialises only the first layer from the word embeddings of
"a photo of a" and the deeper prompts randomly; initialising every depth from the template's own hidden states is
this implementation's choice, so that an untrained module changes nothing in the text tower). The states are read
from the text tower as it is when the module is built, so build it before attaching other text prompts.

Training: ``OpenVocabSegmentor.encode_classes`` runs under ``no_grad``; a loop that trains the text prompts computes
the class embeddings with :meth:`LDVCPrompts.class_embeddings` (same values, differentiable) at every step.

Visual prompts (MaPLe, deep vision prompting and vision-language prompt coupling): for every image
block ``i < J_v`` (``visual_depth``) ``P`` prompt tokens go at the **end** of the sequence, replacing the previous
block's (VPT-deep, :func:`~opentrans.models.prompts.append_tokens`). With ``coupled=True`` (default) they are
projections of the text prompts of the same depth, so the two towers' prompts are learnt jointly::

    P~_i = F_i(P_i),   F_i: Linear(W_t -> W_v), one per coupled depth   # MaPLe 'V-L prompt coupling'

which makes ``P = 4`` (one visual token per text prompt token) and needs ``J_v <= J_t``. With ``coupled=False`` the
visual tokens are free parameters (``trunc_normal(std=0.02)``). Whether LDVC couples the towers this way could not
be checked; coupling is the reading of "vision-language prompts" as in MaPLe and is the default.

Image towers: a ViT gets both kinds of prompts. A ModifiedResNet image tower has no token sequence to prompt, so
there the module learns **text prompts only** (``visual_depth`` resolves to 0, and asking for visual prompts raises
:class:`~opentrans.errors.OpenTransError`). As with every prompt module, CLIPer's dense mode runs the image blocks
by hand, so visual prompts do not act there (text prompts do), and the dense modes' hand-run last image block
ignores its prompt hook (the previous block's prompt tokens are still in the sequence).
"""

from __future__ import annotations

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from torch import nn

from opentrans.errors import OpenTransError
from opentrans.models.prompts import PromptModule, append_tokens, register_prompts

#: The template the text prompts replace (its 4 tokens after SOT) and the class template they are used with.
TEMPLATE_CONTEXT = "a photo of a"
CLASS_TEMPLATE = "a photo of a {}."
#: Token positions of the template's words in the tokenized sentence (0 is SOT).
PROMPT_START = 1


def _seq_first(transformer: nn.Module) -> bool:
    """True when the open_clip ``Transformer`` runs ``(L, B, W)`` sequences (``batch_first=False``)."""
    return not getattr(transformer, "batch_first", True)


@register_prompts("ldvc")
class LDVCPrompts(PromptModule):
    """Deep text + visual prompts of LDVC, optionally coupled MaPLe-style (see the module notes for equations).

    Args:
        clip: the ``open_clip.CLIP`` the prompts are made for (its text tower runs once here, under ``no_grad``,
            to initialise the text prompts; the model is not kept).
        text_depth: how many text blocks get prompts (``J_t``), from the first; None: every text block.
        visual_depth: how many image blocks get prompts (``J_v``); None: every image block for an uncoupled ViT,
            ``min(J_t, image blocks)`` when coupled, 0 for a ResNet image tower.
        visual_tokens: ``P``, prompt tokens appended per image block (4 by default; must be 4 when coupled,
            one per text prompt token).
        coupled: visual prompts are ``Linear(W_t -> W_v)`` projections of the text prompts (MaPLe's V-L
            coupling function).

    Parameters (saved under ``prompts.*``):
        text_prompts: ``(J_t, 4, W_t)``, initialised from the hidden states of "a photo of a".
        visual_prompts: ``(J_v, P, W_v)`` when not coupled (absent otherwise).
        couplers: ``J_v`` ``Linear(W_t, W_v)`` when coupled.

    Raises:
        OpenTransError: a model without CLIP's own text transformer (e.g. ``CustomTextCLIP``), depths outside
            ``0..blocks``, ``visual_tokens < 1``, visual prompts asked of a ResNet
            image tower, ``coupled`` with ``visual_tokens != 4`` or ``visual_depth > text_depth``, or a tokenizer
            that does not put "a photo of a" in 4 tokens.
    """

    templates = (CLASS_TEMPLATE,)

    def __init__(self, clip: nn.Module, text_depth: int | None = None, visual_depth: int | None = None,
                 visual_tokens: int = 4, coupled: bool = True):
        super().__init__()
        if not hasattr(clip, "transformer") or not hasattr(clip.transformer, "resblocks"):
            raise OpenTransError(f"ldvc: {type(clip).__name__} has no open_clip CLIP text transformer to prompt")
        text_blocks = clip.transformer.resblocks
        is_vit = isinstance(clip.visual, VisionTransformer)
        tokens = open_clip.tokenize([TEMPLATE_CONTEXT])  # (1, 77): SOT, a, photo, of, a, EOT, 0...
        n_ctx = int((tokens[0] != 0).sum()) - 2
        if n_ctx != 4:
            raise OpenTransError(f"ldvc: the tokenizer splits '{TEMPLATE_CONTEXT}' into {n_ctx} tokens, expected 4")
        self.n_ctx = n_ctx
        text_depth = len(text_blocks) if text_depth is None else int(text_depth)
        if not 0 <= text_depth <= len(text_blocks):
            raise OpenTransError(f"ldvc: text_depth {text_depth} outside 0..{len(text_blocks)} (text blocks)")
        visual_tokens = int(visual_tokens)
        if visual_tokens < 1:
            raise OpenTransError(f"ldvc: visual_tokens must be >= 1, got {visual_tokens}")
        n_visual = len(clip.visual.transformer.resblocks) if is_vit else 0
        if visual_depth is None:
            visual_depth = 0 if not is_vit else (min(text_depth, n_visual) if coupled else n_visual)
        visual_depth = int(visual_depth)
        if visual_depth and not is_vit:
            raise OpenTransError("ldvc: visual prompts need a ViT image tower; a ResNet image tower takes text "
                                 "prompts only (visual_depth=0)")
        if not 0 <= visual_depth <= n_visual:
            raise OpenTransError(f"ldvc: visual_depth {visual_depth} outside 0..{n_visual} (image blocks)")
        if coupled and visual_depth:
            if visual_tokens != n_ctx:
                raise OpenTransError(f"ldvc: coupled visual prompts are projections of the {n_ctx} text prompt "
                                     f"tokens; set visual_tokens={n_ctx} or coupled=False")
            if visual_depth > text_depth:
                raise OpenTransError(f"ldvc: coupled visual_depth {visual_depth} exceeds text_depth {text_depth}; "
                                     "each coupled image block needs the text prompts of the same depth")
        self.text_depth, self.visual_depth = text_depth, visual_depth
        self.visual_tokens, self.coupled = visual_tokens, bool(coupled)
        self.text_prompts = nn.Parameter(self._template_states(clip, tokens, text_depth))  # (J_t, 4, W_t)
        width_t = clip.transformer.width
        if is_vit and visual_depth:
            width_v = clip.visual.class_embedding.shape[0]
            if self.coupled:
                self.couplers = nn.ModuleList(nn.Linear(width_t, width_v) for _ in range(visual_depth))
            else:
                self.visual_prompts = nn.Parameter(torch.empty(visual_depth, visual_tokens, width_v))
                nn.init.trunc_normal_(self.visual_prompts, std=0.02)

    @staticmethod
    @torch.no_grad()
    def _template_states(clip: nn.Module, tokens: torch.Tensor, depth: int) -> torch.Tensor:
        """Inputs of the first ``depth`` text blocks at the template's positions 1..4: ``(depth, 4, W_t)``."""
        states: list[torch.Tensor] = []
        seq_first = _seq_first(clip.transformer)

        def grab(_module, args):
            x = args[0].transpose(0, 1) if seq_first else args[0]  # (1, 77, W_t)
            states.append(x[0, PROMPT_START:PROMPT_START + 4].detach().clone().float())

        handles = [block.register_forward_pre_hook(grab) for block in clip.transformer.resblocks[:depth]]
        try:
            clip.encode_text(tokens)
        finally:
            for handle in handles:
                handle.remove()
        if not depth:
            return torch.empty(0, 4, clip.transformer.width)
        return torch.stack(states)

    def options(self) -> dict:
        return {"text_depth": self.text_depth, "visual_depth": self.visual_depth,
                "visual_tokens": self.visual_tokens, "coupled": self.coupled}

    def visual_prompt(self, i: int) -> torch.Tensor:
        """Prompt tokens ``(P, W_v)`` of image block ``i`` (``F_i(P_i)`` when coupled, MaPLe's coupling)."""
        if self.coupled:
            return self.couplers[i](self.text_prompts[i])
        return self.visual_prompts[i]

    def _install(self, clip: nn.Module) -> None:
        seq_first_t = _seq_first(clip.transformer)
        for i, block in enumerate(clip.transformer.resblocks[:self.text_depth]):
            self._hook(block, lambda _m, args, i=i: (self._overwrite(args[0], i, seq_first_t), *args[1:]))
        if self.visual_depth:
            seq_first_v = _seq_first(clip.visual.transformer)
            for i, block in enumerate(clip.visual.transformer.resblocks[:self.visual_depth]):
                self._hook(block, lambda _m, args, i=i: (self._append(args[0], i, seq_first_v), *args[1:]))

    def _overwrite(self, x: torch.Tensor, i: int, seq_first: bool) -> torch.Tensor:
        """Text block ``i``'s input with positions 1..4 replaced by ``P_i`` (length unchanged)."""
        if seq_first:
            x = x.transpose(0, 1)
        p = self.text_prompts[i].to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        out = torch.cat([x[:, :PROMPT_START], p, x[:, PROMPT_START + self.n_ctx:]], dim=1)
        return out.transpose(0, 1) if seq_first else out

    def _append(self, x: torch.Tensor, i: int, seq_first: bool) -> torch.Tensor:
        """Image block ``i``'s input with the prompt tokens at the end (replacing block ``i-1``'s)."""
        if seq_first:
            x = x.transpose(0, 1)
        out = append_tokens(x, self.visual_prompt(i), 0 if i == 0 else self.visual_tokens)
        return out.transpose(0, 1) if seq_first else out

    def class_embeddings(self, clip: nn.Module, class_names: list[str]) -> torch.Tensor:
        """Differentiable class embeddings ``(C, D)``, L2-normalised, of ``CLASS_TEMPLATE.format(name)`` through
        the (prompted) text tower: what a training loop uses so the loss reaches the text prompts
        (``OpenVocabSegmentor.encode_classes`` gives the same values under ``no_grad``). The module must be
        attached to ``clip``.

        Raises:
            OpenTransError: an empty class list, or a module not attached to any model.
        """
        if not class_names:
            raise OpenTransError("no class names given")
        if not self._handles:
            raise OpenTransError("ldvc prompts are not attached; call seg.set_prompts(...) first")
        tokens = open_clip.tokenize([CLASS_TEMPLATE.format(name) for name in class_names])
        return F.normalize(clip.encode_text(tokens), dim=-1)
