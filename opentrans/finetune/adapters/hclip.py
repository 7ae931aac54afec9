"""H-CLIP: parameter-efficient finetuning of both CLIP towers in hyperspherical space.

Peng, Xu, Zeng, Huang, Wang, Shen, "Parameter-efficient Fine-tuning in Hyperspherical Space for
Open-vocabulary Semantic Segmentation" (H-CLIP), CVPR 2025, arXiv:2405.18840, Sec. 3 (the issue cites
eqs. 5-20). The paper's text past the abstract was not reachable offline; the equations below are
transcribed from the authors' released code (``cat_seg/third_party/oft_se_qkv_relation_vision_train_ortho_
relation_free_half.py`` and ``model_oft_relation_both_free_half.py`` of the H-CLIP CAT-Seg code base, read in
public copies of it such as github.com/ZhaoYi-10-13/HPS-Seg), which is what the published numbers come from. Paper
equation numbers are therefore not quoted one by one; each step names what it implements.

Notation: a target is a weight ``W0`` ``(out, in)`` (a Linear, or the Q/K/V row block of a fused attention
in-projection); ``b`` is the block size and ``n = in / b`` its number of blocks.

**POP, partial orthogonal fine-tuning** (block-diagonal transforms of the pretrained weights)::

    W' = W0 R^T,   R = diag(R_1, ..., R_n),   R_k (b, b)                                   (POP)

Every neuron (row ``w_i`` of ``W0``) is multiplied by the same ``R``.

* Text tower (orthogonal): ``R_k = (I - S_k)(I + S_k)^-1`` with ``S_k = (A_k - A_k^T) / 2`` (the Cayley
  transform of a skew-symmetric matrix, as in the authors' ``cayley_batch``). ``R`` is orthogonal, so all
  pairwise angles and norms of the text neurons are kept and with them the hyperspherical energy
  ``HE(W) = sum_{i != j} 1 / ||w_i/|w_i| - w_j/|w_j|||`` (:func:`~opentrans.finetune.adapters.oft.
  hyperspherical_energy`): the paper's constraint that keeps the text encoder's generalisation. ``A_k = 0``
  at init (``R = I``).
* Image tower (unconstrained): ``R_k = A_k``, a free ``b x b`` matrix initialised to the identity
  (the authors' ``OFTLinearLayer_both_relation_in``, no Cayley, ``attn_layer_R_v = eye``).

**DCRC, dual cross-relation communication** (with ``dcrc=True``). All blocks ``A`` of all adapted targets of
both towers are stacked into one tensor ``T`` of shape ``(P, S, b, b)`` (the authors' ``attn_layer_R``
``(b, b, 4 L, 10)``): ``P`` positions, one per (layer index, role) such as ``(3, "attn.in_proj_weight[q]")``,
shared by the two towers, so the text and image Q of block 3 sit at the same position; ``S = S_t + S_v`` slots,
the text target's ``n`` blocks at slots ``0..S_t-1`` and the image target's at ``S_t..S-1`` (the authors: 4 text
+ 6 image blocks of 128 for ViT-B/16). Two learnable bias-free linear relation maps (one-layer "MLPs";
the authors' ``net_l_R`` and ``net_m_R``, identity at init) produce each target's blocks::

    T_l[p]      = sum_p' W_l[p, p'] T[p']                      cross-layer relation over all positions
    A_t[s]      = sum_s' W_m^(g(p))[s, s'] T_l[p, s']           cross-modal relation over the slots of both towers

with ``W_l`` ``(P, P)``, one ``W_m^(g)`` ``(S, S)`` per layer index ``g`` of the output position (the authors'
``net_m_R[count // 4]``), and the target reading the rows ``s`` of its own tower's slots. The text blocks are
then skew-symmetrised and Cayley-transformed as above, so DCRC never breaks the text tower's orthogonality;
the image blocks are used as they are. Positions/slots of ``T`` where a tower has no block (a role one tower
lacks, a narrower target) are fixed zeros, not parameters.

Interpretations (the code base adapts only Q, K, V and the attention output projection of ViT-B/L; here any
Linear or Q/K/V slice can be a target): positions are keyed by ``(layer index, role)`` instead of the authors'
fixed ``4 l + {q,k,v,o}``; targets with more blocks (an MLP ``c_proj`` has ``in = 4 width``) widen ``S``;
the authors apply their text ``out_proj`` block on the output side (``R W0``, which keeps the energy of the
columns); here every target uses the input side ``W0 R^T`` so the energy of the text *neurons* (rows) is kept
for every adapted text layer, and the authors' Cayley sign ``(I - S)(I + S)^-1`` is used throughout. With the
authors' targets (Q, K, V, ``out_proj`` of all 12 blocks of ViT-B/16, ``b = 128``) the trainable count is theirs:
``480 * 128^2 + 48^2 + 12 * 10^2 = 7,867,824``; adding every MLP Linear (the ``None`` default) gives 17.7M.
The DCRC adds ``N^2 b^2`` multiply-adds per forward for all ``N`` blocks (about 17 GFLOP for ViT-B/16 with every
target), recomputed per target like the authors' code recomputes the relations in every block.

The adapters are ``torch.nn.utils.parametrize`` parametrizations, so the adapted model runs unchanged code and
:func:`~opentrans.finetune.adapters.common.merge_adapters` folds them into plain weights.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from opentrans.errors import OpenTransError
from opentrans.models.attention import has_fused_qkv
from opentrans.finetune.adapters.common import AdapterReport, register, resolve_target

_LAYER = re.compile(r"(?:^|\.)resblocks\.(\d+)\.(.+)$")
TOWERS = ("image", "text")


def _cayley(skew: torch.Tensor) -> torch.Tensor:
    """``(I - S)(I + S)^-1`` for skew-symmetric ``S`` ``(n, b, b)``: orthogonal blocks ``(n, b, b)``."""
    eye = torch.eye(skew.shape[-1], dtype=skew.dtype, device=skew.device).expand_as(skew)
    return torch.linalg.solve(eye + skew, eye - skew, left=False)


class DCRC(nn.Module):
    """The stacked block tensor of all H-CLIP targets of both towers and its two relation maps.

    Args:
        block_size: ``b``.
        entries: per target, ``(position, first slot, blocks n, orthogonal)``.
        positions: ``P``; ``groups``: the layer-index group of each position (``len == P``).
        slots: ``S`` (text slots first, then image slots).

    Parameters: ``blocks`` ``(N, b, b)`` (every real block; zeros for orthogonal/text blocks, identity for
    free/image blocks), ``cross_layer`` ``(P, P)`` and ``cross_modal`` ``(G, S, S)``, both identity at init.
    """

    def __init__(self, block_size: int, entries: list[tuple[int, int, int, bool]], positions: int,
                 groups: list[int], slots: int):
        super().__init__()
        b = block_size
        self.block_size = b
        self.slots = slots
        self.entries = [tuple(e) for e in entries]
        self.groups = list(groups)
        self.offsets = []
        init, pos, slot = [], [], []
        for p, s0, n, orth in self.entries:
            self.offsets.append(len(pos))
            init.append(torch.zeros(n, b, b) if orth else torch.eye(b).expand(n, b, b).clone())
            pos += [p] * n
            slot += list(range(s0, s0 + n))
        self.blocks = nn.Parameter(torch.cat(init))
        self.cross_layer = nn.Parameter(torch.eye(positions))
        self.cross_modal = nn.Parameter(torch.eye(slots).repeat(max(self.groups) + 1, 1, 1))
        self.register_buffer("_pos", torch.tensor(pos, dtype=torch.long), persistent=False)
        self.register_buffer("_slot", torch.tensor(slot, dtype=torch.long), persistent=False)

    def target_blocks(self, index: int) -> torch.Tensor:
        """The relation-mixed blocks ``A_t`` ``(n, b, b)`` of target ``index`` (before Cayley for text)."""
        p, s0, n, _ = self.entries[index]
        b = self.block_size
        # both relations are linear, so A_t[s] = sum_j W_m[s, slot_j] W_l[p, pos_j] B_j over the real blocks j:
        # one (n, N) coefficient matrix times the (N, b*b) blocks (a GEMM; padded entries never materialise)
        modal = self.cross_modal[self.groups[p], s0:s0 + n].index_select(1, self._slot)  # (n, N)
        layer = self.cross_layer[p].index_select(0, self._pos)  # (N,)
        return ((modal * layer) @ self.blocks.flatten(1)).view(n, b, b)


class HCLIPAdapter(nn.Module):
    """Parametrization ``W (out, in) -> W`` with rows ``[start, stop)`` replaced by ``W[rows] @ R^T`` (POP).

    Args:
        in_features: input width ``in``; a multiple of ``block_size``.
        rows: ``(start, stop)`` rows (neurons) to transform; the rest of ``W`` is returned unchanged.
        block_size: ``b``.
        orthogonal: Cayley-orthogonal blocks (text tower) or free blocks initialised to I (image tower).
        bank: the shared :class:`DCRC` producing the blocks, or None (own parameters: the strict upper
            triangle of each skew generator for ``orthogonal``, ``n (b (b - 1) / 2)`` elements, else ``n b^2``).
        index: this target's index in ``bank``.
        owner: whether this adapter registers ``bank`` as its submodule (exactly one adapter does, so the
            shared parameters appear once in ``state_dict``, ``parameters()`` and ``.to()``).

    Raises:
        OpenTransError: ``block_size < 2`` or not dividing ``in_features``.
    """

    def __init__(self, in_features: int, rows: tuple[int, int], block_size: int, orthogonal: bool,
                 bank: DCRC | None = None, index: int = 0, owner: bool = False):
        super().__init__()
        if block_size < 2 or in_features % block_size:
            raise OpenTransError(f"H-CLIP block size {block_size}: must be >= 2 and divide the input width "
                                 f"{in_features}")
        self.rows = tuple(rows)
        self.block_size = block_size
        self.blocks = in_features // block_size
        self.orthogonal = orthogonal
        self.index = index
        self.__dict__["_bank"] = bank  # a plain reference: not a submodule, not in state_dict
        if bank is not None and owner:
            self.dcrc = bank
        if bank is None:
            b = block_size
            if orthogonal:
                iu = torch.triu_indices(b, b, offset=1)
                self.register_buffer("_iu", iu[0] * b + iu[1], persistent=False)  # flat (b*b) positions
                self.skew = nn.Parameter(torch.zeros(self.blocks, iu.shape[1]))
            else:
                self.free = nn.Parameter(torch.eye(b).expand(self.blocks, b, b).clone())

    def transform_blocks(self) -> torch.Tensor:
        """The blocks ``R_k`` ``(n, b, b)`` of ``R`` (orthogonal for a text target)."""
        bank = self.__dict__["_bank"]
        if bank is not None:
            a = bank.target_blocks(self.index)
            return _cayley(0.5 * (a - a.transpose(1, 2))) if self.orthogonal else a
        if not self.orthogonal:
            return self.free
        b = self.block_size
        q = torch.zeros(self.blocks, b * b, dtype=self.skew.dtype, device=self.skew.device)
        q = q.index_copy(1, self._iu, self.skew).view(self.blocks, b, b)  # strict upper triangle
        return _cayley(q - q.transpose(1, 2))

    def transform(self) -> torch.Tensor:
        """The full block-diagonal ``R`` ``(in, in)``."""
        return torch.block_diag(*self.transform_blocks().unbind(0))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        r = self.transform_blocks().to(weight.dtype)  # (n, b, b)
        start, stop = self.rows
        rows = weight[start:stop]
        o = rows.shape[0]
        new = torch.einsum("okj,kij->oki", rows.reshape(o, self.blocks, self.block_size), r).reshape(o, -1)
        if start == 0 and stop == weight.shape[0]:
            return new
        return torch.cat([weight[:start], new, weight[stop:]], dim=0)


def _clip_of(model: nn.Module) -> tuple[nn.Module, str]:
    return (model.clip, "clip.") if hasattr(model, "clip") else (model, "")


def tower_targets(model: nn.Module, tower: str) -> list[str]:
    """Every Linear and every Q/K/V slice (``<mha>.in_proj_weight[q|k|v]``) of one CLIP tower, in module order.

    Args:
        model: an :class:`~opentrans.models.segmentor.OpenVocabSegmentor` (names start with ``clip.``) or an
            ``open_clip.CLIP``.
        tower: ``image`` (``clip.visual``) or ``text`` (``clip.transformer``).

    Raises:
        OpenTransError: an unknown tower.
    """
    clip, prefix = _clip_of(model)
    if tower not in TOWERS:
        raise OpenTransError(f"unknown tower '{tower}'; choose image or text")
    root = "visual" if tower == "image" else ("transformer" if hasattr(clip, "transformer") else "text")
    names = []
    for name, mod in getattr(clip, root).named_modules():
        full = f"{prefix}{root}.{name}" if name else f"{prefix}{root}"
        if has_fused_qkv(mod):
            names += [f"{full}.in_proj_weight[{t}]" for t in "qkv"]
        elif isinstance(mod, nn.Linear):
            names.append(full)
    return names


def _position_key(name: str, tower_prefix: str) -> tuple[int, str]:
    m = _LAYER.search(name)
    if m:
        return int(m[1]), m[2]
    return -1, name[len(tower_prefix):]


def add_hclip(seg: nn.Module, image_targets: list[str] | None = None, text_targets: list[str] | None = None,
              block_size: int = 128, dcrc: bool = True, seed: int = 0) -> AdapterReport:
    """Register H-CLIP on both towers of ``seg``: free POP blocks on ``image_targets``, Cayley-orthogonal POP
    blocks on ``text_targets``, and (``dcrc``) the shared DCRC relations producing all blocks (module notes).

    The adapted original weights are frozen; set the rest of the model's ``requires_grad`` yourself. At init
    every ``R`` is the identity, so the adapted model computes exactly what the original did.

    Args:
        seg: an :class:`~opentrans.models.segmentor.OpenVocabSegmentor` (or an ``open_clip.CLIP``).
        image_targets / text_targets: layer names (a Linear, or ``<mha>.in_proj_weight[q|k|v]``) inside
            ``clip.visual`` / the text transformer; None = every Linear and Q/K/V slice of that tower
            (:func:`tower_targets`); ``[]`` = none in that tower.
        block_size: ``b``, the POP block size (the paper: 128); must divide every target's input width.
        dcrc: produce the blocks with the DCRC cross-layer/cross-modal relations (True) or give each target
            its own blocks (False, POP alone).
        seed: unused by the identity initialisation (kept so every adapter takes a seed); recorded nowhere.

    Returns:
        :class:`~opentrans.finetune.adapters.common.AdapterReport` with ``kind="hclip"``, the image then the
        text targets, the trainable element count (blocks + relation maps) and the adapted weight elements.

    Raises:
        OpenTransError: no targets, a bad or duplicate target, a target outside its tower, or a block size that
            is < 2 or does not divide a target's input width (the message names it). Nothing is registered then.
    """
    del seed  # the initialisation (identity transforms) is deterministic
    clip, prefix = _clip_of(seg)
    lists = {}
    for tower, given in (("image", image_targets), ("text", text_targets)):
        lists[tower] = tower_targets(seg, tower) if given is None else list(given)
    roots = {"image": f"{prefix}visual.",
             "text": f"{prefix}{'transformer' if hasattr(clip, 'transformer') else 'text'}."}
    names = lists["image"] + lists["text"]
    if not names:
        raise OpenTransError("no H-CLIP targets given")
    if len(set(names)) != len(names):
        raise OpenTransError("H-CLIP targets contain duplicates")
    info = []  # (name, tower, in_features, rows)
    for tower in TOWERS:
        for name in lists[tower]:
            if not name.startswith(roots[tower]):
                raise OpenTransError(f"H-CLIP {tower} target '{name}' is not inside the {tower} tower "
                                     f"({roots[tower]}...)")
            module, pname, rows = resolve_target(seg, name)
            width = getattr(module, pname).shape[1]
            if block_size < 2 or width % block_size:
                raise OpenTransError(f"H-CLIP block size {block_size}: must be >= 2 and divide the input width "
                                     f"{width} of '{name}'")
            info.append((name, tower, width, rows))

    bank = None
    if dcrc:
        keys: list[tuple[int, str]] = []
        for name, tower, _, _ in info:
            key = _position_key(name, roots[tower])
            if key not in keys:
                keys.append(key)
        keys.sort(key=lambda k: k[0])  # stable: roles keep their module order within a layer
        layers = sorted({k[0] for k in keys})
        groups = [layers.index(k[0]) for k in keys]
        width_of = {t: max([w // block_size for _, tt, w, _ in info if tt == t], default=0) for t in TOWERS}
        slot0 = {"text": 0, "image": width_of["text"]}
        entries = [(keys.index(_position_key(name, roots[tower])), slot0[tower], width // block_size,
                    tower == "text") for name, tower, width, _ in info]
        bank = DCRC(block_size, entries, len(keys), groups, width_of["text"] + width_of["image"])

    adapters = iter([HCLIPAdapter(width, rows, block_size, tower == "text", bank, i, owner=i == 0)
                     for i, (_, tower, width, rows) in enumerate(info)])
    registered = register(seg, names, lambda _w, _rows: next(adapters))
    unique = {id(p): p for a in registered for p in a.parameters()}
    return AdapterReport("hclip", tuple(names), sum(p.numel() for p in unique.values()),
                         sum((rows[1] - rows[0]) * width for _, _, width, rows in info))
