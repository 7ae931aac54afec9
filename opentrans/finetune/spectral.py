"""Moved: the heavy-tail spectral analysis lives in :mod:`opentrans.analyze.spectral` (analyze is a lower layer
than finetune). This alias keeps ``from opentrans.finetune.spectral import ...`` working for callers outside the
finetune package (benchmarks, older notebooks); new code imports :mod:`opentrans.analyze.spectral`."""

from opentrans.analyze.spectral import *  # noqa: F401,F403
from opentrans.analyze.spectral import (  # noqa: F401  (private helpers some callers use)
    _import_weightwatcher,
    _short,
)
