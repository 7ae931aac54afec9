"""H-CLIP: parameter-efficient finetuning of both CLIP towers in hyperspherical space.

Peng, Xu, Zeng, Huang, Wang, Shen, "Parameter-efficient Fine-tuning in Hyperspherical Space for
Open-vocabulary Semantic Segmentation" (H-CLIP), CVPR 2025, arXiv:2405.18840, Sec. 3 (the issue cites
eqs. 5-20). The paper's text past the abstract was not reachable offline; the computation below is the one of
the authors' released code, github.com/SJTU-DeepVisionLab/H-CLIP at commit
d92c35d25303e805491c629f079ca72a34d7609d, ``cat_seg/third_party/oft_se_qkv_relation_vision_train_ortho_relation_
free_half.py`` (``oft_forward`` l. 24-51, ``oft_forward_vision`` l. 73-107, the ``OFTLinearLayer_*`` classes
l. 141-654) and ``cat_seg/third_party/model_oft_relation_both_free_half.py`` (the shared tensors and relation maps, l. 338-377),
which is what the published numbers come from. Paper equation numbers are therefore not quoted one by one.

Notation: a target is a weight ``W0`` ``(out, in)`` (a Linear, or the Q/K/V row block of a fused attention
in-projection); ``b`` is the block size; a block-diagonal ``R = diag(R_1, ..., R_n)`` with ``R_k`` ``(b, b)``.

**POP, partial orthogonal fine-tuning**, as the authors' code computes it (``pop="authors"``, the default)::

    Q, K, V:   W' = W0 R        R (in, in),   n = in / b      (torch.mm(q_proj_weight, block_diag), l. 206-212, 343-349)
    out_proj:  W' = R W0        R (out, out), n = out / b     (torch.mm(block_diag(R), fix_filt), l. 470, l. 590)

Any other Linear given as a target (an extension: the authors adapt only Q, K, V and ``out_proj``) is treated
like Q/K/V (``W0 R``).

* Text tower (orthogonal): ``R_k = (I - S_k)(I + S_k)^-1`` with ``S_k = (A_k - A_k^T) / 2`` (the authors'
  ``cayley_batch``, l. 376-386). ``R`` is orthogonal, so ``W0 R`` keeps all pairwise angles and norms of the
  rows of Q, K, V (the text *neurons*) and with them the hyperspherical energy
  ``HE(W) = sum_{i != j} 1 / ||w_i/|w_i| - w_j/|w_j|||`` (:func:`~opentrans.finetune.adapters.oft.
  hyperspherical_energy`), and ``R W0`` keeps those of the columns of ``out_proj``. ``A_k = 0`` at init
  (``R = I``).
* Image tower (unconstrained): ``R_k = A_k``, a free ``b x b`` matrix initialised to the identity (the
  authors' ``OFTLinearLayer_both_relation_in`` / ``OFTLinearLayer_both_relation``: no Cayley;
  ``attn_layer_R_v = eye``).

``pop="rows"`` is **ours**, not the authors': every target uses ``W' = W0 R^T`` (``R^T`` acting on every row
``w_i``), so the energy of the rows (neurons) of *every* adapted text layer is kept, ``out_proj`` included. For
Q/K/V this is an equivalent reparametrisation of the authors' form (``R^T`` is again a Cayley/free block
matrix) but not the same transform for the same parameters; for ``out_proj`` it is a different transform
(input side instead of output side; not equivalent).

**DCRC, dual cross-relation communication** (with ``dcrc=True``). All blocks ``A`` of all adapted targets of
both towers are stacked into one tensor ``T`` of shape ``(P, S, b, b)`` (the authors' ``attn_layer_R``
``(b, b, 4 L, 10)``): ``P`` positions, one per (layer index, role) such as ``(3, "attn.in_proj_weight[q]")``,
shared by the two towers, so the text and image Q of block 3 sit at the same position (the authors'
``4 l + {q, k, v, out_proj}``); ``S = S_t + S_v`` slots, the text target's ``n`` blocks at slots ``0..S_t-1``
and the image target's at ``S_t..S-1`` (the authors: 4 text + 6 image blocks of 128 for ViT-B/16, read as
``[:, :, :4]`` and ``[:, :, -6:]``). Two learnable bias-free linear relation maps (the authors' ``net_l_R`` and
``net_m_R``, identity at init) produce each target's blocks::

    T_l[p]      = sum_p' W_l[p, p'] T[p']                      cross-layer relation over all positions
    A_t[s]      = sum_s' W_m^(g(p))[s, s'] T_l[p, s']           cross-modal relation over the slots of both towers

with ``W_l`` ``(P, P)``, one ``W_m^(g)`` ``(S, S)`` per layer index ``g`` of the output position (the authors'
``net_m_R[int((count - 4) / 4)]``), and the target reading the rows ``s`` of its own tower's slots. The text
blocks are then skew-symmetrised and Cayley-transformed as above, so DCRC never breaks the text tower's
orthogonality; the image blocks are used as they are. Positions/slots of ``T`` where a tower has no block (a
role one tower lacks, a narrower target) are fixed zeros, not parameters.

**Default targets** (``default_targets="attention"``, the authors'): Q, K, V and ``out_proj`` of every block of
both towers. With ViT-B/16 and ``b = 128`` the trainable count is the authors' code's:
``480 * 128^2 + 48^2 + 12 * 10^2 = 7,867,824`` = 5.26 % of CLIP ViT-B/16's 149,620,737 parameters. The paper
states 5.63 M trainable parameters, "about 4 %" (5.63 M is 3.76 %), which is consistent with itself but not
with the released code; we follow the code. ``default_targets="all"`` (ours) adds every other Linear (the MLP
``c_fc``/``c_proj``: 17.7 M for ViT-B/16). Positions are keyed by ``(layer index, role)``, so any Linear or
Q/K/V slice can be a target; targets with more blocks widen ``S``. The DCRC adds ``N^2 b^2`` multiply-adds per
forward for all ``N`` blocks, recomputed per target like the authors' code recomputes the relations in every
block.

The adapters are ``torch.nn.utils.parametrize`` parametrizations, so the adapted model runs unchanged code and
:func:`~opentrans.finetune.adapters.common.merge_adapters` folds them into plain weights.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from opentrans.errors import OpenTransError
from opentrans.models.attention import has_fused_qkv
from opentrans.finetune.adapters.common import (
    ADAPTERS,
    AdapterKind,
    AdapterReport,
    adapter_module,
    cayley,
    register,
    resolve_target,
)

_LAYER = re.compile(r"(?:^|\.)resblocks\.(\d+)\.(.+)$")
TOWERS = ("image", "text")
#: ``pop`` choices of :func:`add_hclip`: the authors' sides (default) or ours (``W0 R^T`` everywhere).
POP_MODES = ("authors", "rows")
#: ``default_targets`` choices: Q, K, V, out_proj of every block (the authors') or every Linear too (ours).
DEFAULT_TARGETS = ("attention", "all")
#: :class:`HCLIPAdapter` sides: ``W0 R`` (input), ``R W0`` (output), ``W0 R^T`` (input-transposed, ours).
SIDES = ("input", "output", "input-transposed")


def _cayley(skew: torch.Tensor) -> torch.Tensor:
    """The authors' ``(I - S)(I + S)^-1`` for skew-symmetric ``S`` ``(n, b, b)`` (their ``cayley_batch``), i.e.
    :func:`~opentrans.finetune.adapters.common.cayley` of ``-S``: orthogonal blocks ``(n, b, b)``."""
    return cayley(-skew)


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


@adapter_module
class HCLIPAdapter(nn.Module):
    """Parametrization ``W (out, in) -> W`` with rows ``[start, stop)`` replaced by their POP transform.

    ``side`` (module notes): ``input`` ``W[rows] @ R`` with ``R`` ``(in, in)`` (the authors' Q/K/V),
    ``output`` ``R @ W[rows]`` with ``R`` ``(stop - start, stop - start)`` (the authors' ``out_proj``), or
    ``input-transposed`` ``W[rows] @ R^T`` (ours, ``pop="rows"``).

    Args:
        in_features: input width ``in``.
        rows: ``(start, stop)`` rows (neurons) to transform; the rest of ``W`` is returned unchanged.
        block_size: ``b``; must divide ``in`` (input sides) or ``stop - start`` (output side).
        orthogonal: Cayley-orthogonal blocks (text tower) or free blocks initialised to I (image tower).
        bank: the shared :class:`DCRC` producing the blocks, or None (own parameters: the strict upper
            triangle of each skew generator for ``orthogonal``, ``n (b (b - 1) / 2)`` elements, else ``n b^2``).
        index: this target's index in ``bank``.
        owner: whether this adapter registers ``bank`` as its submodule (exactly one adapter does, so the
            shared parameters appear once in ``state_dict``, ``parameters()`` and ``.to()``).
        side: one of :data:`SIDES`.

    Raises:
        OpenTransError: an unknown side, ``block_size < 2`` or not dividing the transformed width.
    """

    def __init__(self, in_features: int, rows: tuple[int, int], block_size: int, orthogonal: bool,
                 bank: DCRC | None = None, index: int = 0, owner: bool = False, side: str = "input"):
        super().__init__()
        if side not in SIDES:
            raise OpenTransError(f"unknown H-CLIP side '{side}'; choose one of {', '.join(SIDES)}")
        width = rows[1] - rows[0] if side == "output" else in_features
        if block_size < 2 or width % block_size:
            raise OpenTransError(f"H-CLIP block size {block_size}: must be >= 2 and divide the "
                                 f"{'output' if side == 'output' else 'input'} width {width}")
        self.rows = tuple(rows)
        self.side = side
        self.block_size = block_size
        self.blocks = width // block_size
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
        """The full block-diagonal ``R`` ``(in, in)`` (``(stop - start, stop - start)`` for the output side)."""
        return torch.block_diag(*self.transform_blocks().unbind(0))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        r = self.transform_blocks().to(weight.dtype)  # (n, b, b)
        start, stop = self.rows
        rows = weight[start:stop]
        o, b, n = rows.shape[0], self.block_size, self.blocks
        if self.side == "input":  # W R: new[o, k, j] = sum_i W[o, k, i] R_k[i, j]
            new = torch.einsum("oki,kij->okj", rows.reshape(o, n, b), r).reshape(o, -1)
        elif self.side == "output":  # R W: new[k, i, c] = sum_j R_k[i, j] W[k, j, c]
            new = torch.einsum("kij,kjc->kic", r, rows.reshape(n, b, -1)).reshape(o, -1)
        else:  # W R^T: new[o, k, i] = sum_j W[o, k, j] R_k[i, j]
            new = torch.einsum("okj,kij->oki", rows.reshape(o, n, b), r).reshape(o, -1)
        if start == 0 and stop == weight.shape[0]:
            return new
        return torch.cat([weight[:start], new, weight[stop:]], dim=0)


def _clip_of(model: nn.Module) -> tuple[nn.Module, str]:
    return (model.clip, "clip.") if hasattr(model, "clip") else (model, "")


def tower_targets(model: nn.Module, tower: str, kind: str = "attention") -> list[str]:
    """The default H-CLIP targets of one CLIP tower, in module order.

    Args:
        model: an :class:`~opentrans.models.segmentor.OpenVocabSegmentor` (names start with ``clip.``) or an
            ``open_clip.CLIP``.
        tower: ``image`` (``clip.visual``) or ``text`` (``clip.transformer``).
        kind: ``attention`` (the authors'): the Q/K/V slices (``<mha>.in_proj_weight[q|k|v]``) and the
            ``out_proj`` of every fused attention; ``all`` (ours): every Q/K/V slice and every Linear.

    Raises:
        OpenTransError: an unknown tower or kind.
    """
    clip, prefix = _clip_of(model)
    if tower not in TOWERS:
        raise OpenTransError(f"unknown tower '{tower}'; choose image or text")
    if kind not in DEFAULT_TARGETS:
        raise OpenTransError(f"unknown H-CLIP default targets '{kind}'; choose one of {', '.join(DEFAULT_TARGETS)}")
    root = "visual" if tower == "image" else ("transformer" if hasattr(clip, "transformer") else "text")
    names = []
    for name, mod in getattr(clip, root).named_modules():
        full = f"{prefix}{root}.{name}" if name else f"{prefix}{root}"
        if has_fused_qkv(mod):
            names += [f"{full}.in_proj_weight[{t}]" for t in "qkv"]
            if kind == "attention":
                names.append(f"{full}.out_proj")
        elif isinstance(mod, nn.Linear) and kind == "all":
            names.append(full)
    return names


def _position_key(name: str, tower_prefix: str) -> tuple[int, str]:
    m = _LAYER.search(name)
    if m:
        return int(m[1]), m[2]
    return -1, name[len(tower_prefix):]


def _side(name: str, pop: str) -> str:
    """The :class:`HCLIPAdapter` side of target ``name`` under ``pop`` (module notes)."""
    if pop == "rows":
        return "input-transposed"
    return "output" if name.endswith("out_proj") else "input"


def add_hclip(seg: nn.Module, image_targets: list[str] | None = None, text_targets: list[str] | None = None,
              block_size: int = 128, dcrc: bool = True, pop: str = "authors",
              default_targets: str = "attention") -> AdapterReport:
    """Register H-CLIP on both towers of ``seg``: free POP blocks on ``image_targets``, Cayley-orthogonal POP
    blocks on ``text_targets``, and (``dcrc``) the shared DCRC relations producing all blocks (module notes).

    The adapted original weights are frozen; set the rest of the model's ``requires_grad`` yourself. At init
    every ``R`` is the identity, so the adapted model computes exactly what the original did.

    Args:
        seg: an :class:`~opentrans.models.segmentor.OpenVocabSegmentor` (or an ``open_clip.CLIP``).
        image_targets / text_targets: layer names (a Linear, or ``<mha>.in_proj_weight[q|k|v]``) inside
            ``clip.visual`` / the text transformer; None = that tower's ``default_targets``
            (:func:`tower_targets`); ``[]`` = none in that tower.
        block_size: ``b``, the POP block size (the authors: 128); must divide every target's transformed width
            (the input width; the output width of an ``out_proj`` under ``pop="authors"``).
        dcrc: produce the blocks with the DCRC cross-layer/cross-modal relations (True, the authors') or give
            each target its own blocks (False, POP alone).
        pop: ``authors`` (default): ``W0 R`` for Q/K/V and other Linears, ``R W0`` for ``out_proj``, as the
            authors' code; ``rows`` (ours): ``W0 R^T`` for every target.
        default_targets: ``attention`` (default, the authors': Q, K, V, out_proj of every block) or ``all``
            (ours: every Linear and Q/K/V slice); used for a tower whose target list is None.

    Returns:
        :class:`~opentrans.finetune.adapters.common.AdapterReport` with ``kind="hclip"``, the image then the
        text targets, the trainable element count (blocks + relation maps) and the adapted weight elements.

    Raises:
        OpenTransError: an unknown ``pop``/``default_targets``, no targets, a bad or duplicate target, a target
            outside its tower, or a block size that is < 2 or does not divide a target's transformed width (the
            message names it). Nothing is registered then.
    """
    if pop not in POP_MODES:
        raise OpenTransError(f"unknown H-CLIP pop '{pop}'; choose one of {', '.join(POP_MODES)}")
    clip, prefix = _clip_of(seg)
    lists = {}
    for tower, given in (("image", image_targets), ("text", text_targets)):
        lists[tower] = tower_targets(seg, tower, default_targets) if given is None else list(given)
    roots = {"image": f"{prefix}visual.",
             "text": f"{prefix}{'transformer' if hasattr(clip, 'transformer') else 'text'}."}
    names = lists["image"] + lists["text"]
    if not names:
        raise OpenTransError("no H-CLIP targets given")
    if len(set(names)) != len(names):
        raise OpenTransError("H-CLIP targets contain duplicates")
    info = []  # (name, tower, in_features, rows, side, blocks)
    for tower in TOWERS:
        for name in lists[tower]:
            if not name.startswith(roots[tower]):
                raise OpenTransError(f"H-CLIP {tower} target '{name}' is not inside the {tower} tower "
                                     f"({roots[tower]}...)")
            module, pname, rows = resolve_target(seg, name)
            side = _side(name, pop)
            in_width = getattr(module, pname).shape[1]
            width = rows[1] - rows[0] if side == "output" else in_width
            if block_size < 2 or width % block_size:
                raise OpenTransError(f"H-CLIP block size {block_size}: must be >= 2 and divide the "
                                     f"{'output' if side == 'output' else 'input'} width {width} of '{name}'")
            info.append((name, tower, in_width, rows, side, width // block_size))

    bank = None
    if dcrc:
        keys: list[tuple[int, str]] = []
        for name, tower, *_ in info:
            key = _position_key(name, roots[tower])
            if key not in keys:
                keys.append(key)
        keys.sort(key=lambda k: k[0])  # stable: roles keep their module order within a layer
        layers = sorted({k[0] for k in keys})
        groups = [layers.index(k[0]) for k in keys]
        width_of = {t: max([n for _, tt, _, _, _, n in info if tt == t], default=0) for t in TOWERS}
        slot0 = {"text": 0, "image": width_of["text"]}
        entries = [(keys.index(_position_key(name, roots[tower])), slot0[tower], n, tower == "text")
                   for name, tower, _, _, _, n in info]
        bank = DCRC(block_size, entries, len(keys), groups, width_of["text"] + width_of["image"])

    adapters = iter([HCLIPAdapter(width, rows, block_size, tower == "text", bank, i, owner=i == 0, side=side)
                     for i, (_, tower, width, rows, side, _) in enumerate(info)])
    registered = register(seg, names, lambda _w, _rows: next(adapters))
    unique = {id(p): p for a in registered for p in a.parameters()}
    return AdapterReport("hclip", tuple(names), sum(p.numel() for p in unique.values()),
                         sum((rows[1] - rows[0]) * width for _, _, width, rows, _, _ in info))


def _add_from_options(seg: nn.Module, targets: list[str], options) -> AdapterReport:
    """``--adapter hclip``: :func:`add_hclip` on the plan's trainable layers (its default image targets when the
    plan has none) with ``--adapter-options`` as keyword options.

    Raises:
        OpenTransError: an option :func:`add_hclip` does not take, or any of its refusals.
    """
    try:
        return add_hclip(seg, image_targets=targets or None, **(options.adapter_options or {}))
    except TypeError as exc:
        raise OpenTransError(f"--adapter-options {options.adapter_options}: {exc}") from None


ADAPTERS.add("hclip", AdapterKind("hclip", _add_from_options, takes_options=True, order=3))
