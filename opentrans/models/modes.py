"""Save and restore a module's train/eval modes and its parameters' ``requires_grad`` flags around a block.

Several steps switch a model to eval mode (BatchNorm in train mode would update its running statistics) and
flip ``requires_grad`` for one pass (gradient probes, dependency tracing, distillation) and must hand the model
back exactly as they got it, also when the block raises::

    with frozen(seg):                      # eval mode, no parameter requires a gradient
        ...
    with preserved_modes(seg, train=False):  # eval mode; flags may be changed inside, restored on exit
        for p in seg.visual.parameters():
            p.requires_grad_(True)
        ...
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def preserved_modes(module: nn.Module, *, train: bool | None = None,
                    requires_grad: bool | None = None) -> Iterator[nn.Module]:
    """Within the block, ``module``'s modes and flags may change; on exit (also on an exception) every submodule's
    ``training`` mode and every parameter's ``requires_grad`` are restored to what they were on entry.

    Args:
        module: any module (its submodules and parameters are covered).
        train: if given, ``module.train(train)`` on entry (False: eval mode).
        requires_grad: if given, every parameter's ``requires_grad`` is set to it on entry.

    Yields:
        ``module``.
    """
    modes = [(m, m.training) for m in module.modules()]
    flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        if train is not None:
            module.train(train)
        if requires_grad is not None:
            for p, _ in flags:
                p.requires_grad_(requires_grad)
        yield module
    finally:
        for m, training in modes:
            m.training = training
        for p, flag in flags:
            p.requires_grad_(flag)


def frozen(module: nn.Module):
    """:func:`preserved_modes` with eval mode and no parameter requiring a gradient inside the block."""
    return preserved_modes(module, train=False, requires_grad=False)
