"""Structured pruning of the CLIP image encoder (torch-pruning) and the ``prune`` stage.

:func:`prune_structured` removes MLP hidden channels of a ViT or Bottleneck-internal channels of a
ModifiedResNet in place; :func:`count_encoder_cost` gives the encoder's GMACs and M params;
:func:`prune_stage` runs the whole stage into an output directory (model, reports, manifest).
"""

from opentrans.prune.stage import prune_stage
from opentrans.prune.structured import (
    IMPORTANCES,
    count_encoder_cost,
    current_sparsity,
    original_widths,
    prunable_widths,
    prune_structured,
    validate_prune_options,
)

__all__ = [
    "IMPORTANCES",
    "count_encoder_cost",
    "current_sparsity",
    "original_widths",
    "prunable_widths",
    "prune_stage",
    "prune_structured",
    "validate_prune_options",
]
