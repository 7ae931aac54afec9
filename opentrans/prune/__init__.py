"""Pruning of the CLIP image encoder: structured (torch-pruning) and OpenTrans IMP (unstructured), and the
``prune`` stage.

:func:`prune_structured` removes MLP hidden channels of a ViT or Bottleneck-internal channels of a
ModifiedResNet, whole attention heads and residual width in place (``structures=``); its importance criteria are
plug-ins of :data:`opentrans.prune.importances.IMPORTANCES`; :func:`apply_kept_indices` re-applies pruned
shapes; :func:`count_encoder_cost` (from :mod:`opentrans.models.cost`) gives the encoder's GMACs and M params;
:func:`prune_stage` runs the whole stage into an output directory (model, reports, manifest).

:func:`imp_stage` runs OpenTrans iterative magnitude pruning (global L1, ``rate`` of the remaining weights per
round, label-free distillation recovery, resumable, masks after every round; by default the authors' targets,
every Conv2d but the first, or ours with ``targets="extended"``); :func:`apply_masks` (from
:mod:`opentrans.models.masks`) transfers its masks to a fresh model of the same architecture.

The options of both are :class:`~opentrans.prune.options.StructuredOptions` and
:class:`~opentrans.prune.options.ImpOptions`. The names below are imported on first use, so importing
``opentrans.prune.options`` (the CLI does) does not load torch.
"""

from __future__ import annotations

from opentrans.registry import lazy_exports

#: public name -> module it lives in
_EXPORTS = {
    "IMPORTANCES": "opentrans.prune.importances",
    "STRUCTURES": "opentrans.prune.options",
    "StructuredOptions": "opentrans.prune.options",
    "ImpOptions": "opentrans.prune.options",
    "validate_prune_options": "opentrans.prune.structured",
    "apply_kept_indices": "opentrans.prune.structured",
    "structure_sizes": "opentrans.prune.structured",
    "taylor_scores": "opentrans.prune.structured",
    "prunable_widths": "opentrans.prune.structured",
    "prune_structured": "opentrans.prune.structured",
    "count_encoder_cost": "opentrans.models.cost",
    "apply_masks": "opentrans.models.masks",
    "artifact_masks": "opentrans.models.masks",
    "keep_masked_zeros": "opentrans.models.masks",
    "imp_targets": "opentrans.models.masks",
    "read_masks": "opentrans.models.masks",
    "save_masks": "opentrans.models.masks",
    "imp_stage": "opentrans.prune.imp_stage",
    "prune_stage": "opentrans.prune.stage",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
