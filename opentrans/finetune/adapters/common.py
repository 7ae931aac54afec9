"""Target resolution, registration, counting and merging shared by the adapters, and the adapter registry.

:data:`ADAPTERS` maps each ``--adapter`` name to an :class:`AdapterKind` that knows how to add itself to a
segmentor from the finetune options; every adapter module of this package registers its own kind (this module
imports none of them), so a new adapter is one new file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from opentrans.errors import OpenTransError
from opentrans.models.attention import QKV_SLICE, has_fused_qkv
from opentrans.registry import Registry

if TYPE_CHECKING:
    from opentrans.finetune.options import FinetuneOptions



@dataclass(frozen=True)
class AdapterReport:
    """What :func:`~opentrans.finetune.adapters.add_lora` / :func:`~opentrans.finetune.adapters.add_oft` did.

    Attributes:
        kind: ``lora``, ``oft`` or ``hclip`` (:func:`~opentrans.finetune.adapters.add_hclip`).
        targets: adapted layer names, in the order given.
        trainable_params: elements of the adapter parameters (what training updates).
        adapted_params: elements of the frozen weights they adapt (rows of a Q/K/V slice only).
    """

    kind: str
    targets: tuple[str, ...]
    trainable_params: int
    adapted_params: int


def cayley(skew: torch.Tensor) -> torch.Tensor:
    """The Cayley transform ``(I + Q)(I - Q)^-1`` of skew-symmetric blocks ``Q`` ``(n, b, b)``: orthogonal blocks
    ``(n, b, b)``, the identity at ``Q = 0``. The one implementation behind OFT (Qiu et al. 2023, eq. 4, this sign)
    and H-CLIP (whose code writes ``(I - S)(I + S)^-1``, i.e. ``cayley(-S)``)."""
    eye = torch.eye(skew.shape[-1], dtype=skew.dtype, device=skew.device).expand_as(skew)
    return torch.linalg.solve(eye - skew, eye + skew, left=False)


#: Adapter module classes (registered with :func:`adapter_module`): what :func:`adapter_parameters` collects.
ADAPTER_MODULES: list[type[nn.Module]] = []


def adapter_module(cls: type[nn.Module]) -> type[nn.Module]:
    """Class decorator: mark an adapter parametrization class so :func:`adapter_parameters` finds its parameters."""
    ADAPTER_MODULES.append(cls)
    return cls


def resolve_target(model: nn.Module, name: str) -> tuple[nn.Module, str, tuple[int, int]]:
    """``(module, parameter name, (row start, row stop))`` of an adapter target.

    Raises:
        OpenTransError: ``name`` is neither a Linear module nor a Q/K/V slice of a fused in-projection.
    """
    m = QKV_SLICE.match(name)
    path = m["mha"] if m else name
    try:
        module = model.get_submodule(path)
    except AttributeError:
        module = None
    if m and module is not None and has_fused_qkv(module):
        e = module.in_proj_weight.shape[0] // 3
        i = "qkv".index(m["tag"])
        return module, "in_proj_weight", (i * e, (i + 1) * e)
    if not m and isinstance(module, nn.Linear):
        return module, "weight", (0, module.out_features)
    raise OpenTransError(f"adapter target '{name}' is not a Linear module or a Q/K/V slice "
                         "(<mha>.in_proj_weight[q|k|v]) of this model")


def register(model: nn.Module, names: list[str], make) -> list[nn.Module]:
    """Resolve every name first (nothing changes on a bad name), then register ``make(weight, rows)`` on each.

    The adapted original weight is frozen (``requires_grad=False``); the adapter's own parameters train.

    Raises:
        OpenTransError: no targets, duplicates, or a bad target (see :func:`resolve_target`).
    """
    if not names:
        raise OpenTransError("no adapter targets given")
    if len(set(names)) != len(names):
        raise OpenTransError("adapter targets contain duplicates")
    resolved = [resolve_target(model, n) for n in names]
    adapters = [make(getattr(module, pname).detach(), rows) for module, pname, rows in resolved]
    for (module, pname, _), adapter in zip(resolved, adapters):
        parametrize.register_parametrization(module, pname, adapter)
        module.parametrizations[pname].original.requires_grad_(False)
    return adapters


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters of every adapter registered on ``model`` (not the frozen originals)."""
    unique = {}  # H-CLIP's shared DCRC parameters are reachable from one adapter only, but stay safe: each once
    for m in model.modules():
        if isinstance(m, tuple(ADAPTER_MODULES)):
            for p in m.parameters():
                unique.setdefault(id(p), p)
    return list(unique.values())


def merge_adapters(model: nn.Module) -> int:
    """Fold every parametrization on ``model`` into a plain weight (``W <- f(W0; theta)``, chained adapters on
    one weight, e.g. LoRA on Q and on V of one in-projection, applied in registration order); returns how
    many adapters were folded. Afterwards the state dict has its original keys again."""
    merged = 0
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for pname in list(module.parametrizations.keys()):
                merged += len(module.parametrizations[pname])
                with torch.no_grad():
                    parametrize.remove_parametrizations(module, pname, leave_parametrized=True)
    return merged


@dataclass(frozen=True)
class AdapterKind:
    """One ``--adapter`` choice (an entry of :data:`ADAPTERS`).

    Attributes:
        name: the ``--adapter`` value.
        add: ``add(seg, targets, options) -> AdapterReport``: register the adapter on ``seg`` (every CLIP weight
            already frozen) from :class:`~opentrans.finetune.options.FinetuneOptions`; ``targets`` are the Linear /
            Q/K/V layers the freeze plan marks trainable (maybe empty). None: no adapter (``none``).
        needs_plan: the adapter adapts the plan's trainable layers, so it needs a heavy-tail plan with at least one
            such layer (``--no-freeze-heavy-tail`` is refused).
        takes_options: it accepts ``--adapter-options`` (a JSON object of keyword options).
        settings: ``settings(options) -> dict``: its size settings for the report (``rank``, ``block``).
        order: position in the ``--adapter`` choices (then by name).
    """

    name: str
    add: Callable[[nn.Module, list[str], "FinetuneOptions"], AdapterReport] | None
    needs_plan: bool = False
    takes_options: bool = False
    settings: Callable[["FinetuneOptions"], dict[str, Any]] = field(default=lambda options: {})
    order: int = 100


#: ``--adapter`` name -> :class:`AdapterKind`; each module of :mod:`opentrans.finetune.adapters` registers its own.
ADAPTERS: Registry[AdapterKind] = Registry("adapter", plugins="opentrans.finetune.adapters")


def adapter_names() -> list[str]:
    """The ``--adapter`` choices, in :attr:`AdapterKind.order` (``none``, ``lora``, ``oft``, ``hclip``, then any
    plug-in by name)."""
    return [name for name, _ in sorted(ADAPTERS.items(), key=lambda item: (item[1].order, item[0]))]
