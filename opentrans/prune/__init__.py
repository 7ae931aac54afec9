"""Pruning of the CLIP image encoder: structured (torch-pruning) and OpenTrans IMP (unstructured), and the
``prune`` stage.

:func:`prune_structured` removes MLP hidden channels of a ViT or Bottleneck-internal channels of a
ModifiedResNet, whole attention heads and residual width in place (``structures=``); :func:`taylor_scores` is its
Taylor importance; :func:`apply_kept_indices` re-applies pruned shapes; :func:`count_encoder_cost` gives the
encoder's GMACs and M params;
:func:`prune_stage` runs the whole stage into an output directory (model, reports, manifest).

:func:`imp_stage` runs OpenTrans iterative magnitude pruning (global L1, ``rate`` of the remaining weights per
round, label-free distillation recovery, resumable, masks after every round; by default the authors' targets,
every Conv2d but the first, or ours with ``targets="extended"``); :func:`apply_masks` transfers
its masks to a fresh model of the same architecture.
"""

from opentrans.prune.imp import apply_masks, artifact_masks, imp_targets, keep_masked_zeros, read_masks, save_masks
from opentrans.prune.imp_stage import imp_stage
from opentrans.prune.stage import prune_stage
from opentrans.prune.structured import (
    IMPORTANCES,
    STRUCTURES,
    apply_kept_indices,
    count_encoder_cost,
    prunable_widths,
    prune_structured,
    structure_sizes,
    taylor_scores,
    validate_prune_options,
)

__all__ = [
    "IMPORTANCES",
    "STRUCTURES",
    "apply_kept_indices",
    "artifact_masks",
    "keep_masked_zeros",
    "structure_sizes",
    "taylor_scores",
    "apply_masks",
    "imp_stage",
    "imp_targets",
    "read_masks",
    "save_masks",
    "count_encoder_cost",
    "prunable_widths",
    "prune_stage",
    "prune_structured",
    "validate_prune_options",
]
