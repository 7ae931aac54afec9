"""Layer-wise finetuning guided by heavy-tailed spectral analysis (the ``finetune`` stage).

OpenTrans (Xu, Chen, Zhao & Wei, "Transferable and Principled Efficiency for Open-Vocabulary
Segmentation", CVPR 2024, arXiv:2404.07448) measures, for each layer of the CLIP image encoder, the
power-law exponent alpha of its weight matrix's eigenvalue spectrum (Martin & Mahoney's heavy-tailed
self-regularisation, computed with weightwatcher). Heavy-tailed layers (alpha below the median) count as
well trained and stay frozen; the rest are finetuned with the segmentation head.

* :mod:`opentrans.analyze.spectral` (the layer below; re-exported here): :func:`analyze_model` (the OpenTrans
  authors' estimator and layer set, our Q/K/V-split variant ``opentrans-qkv`` and/or weightwatcher; image/text
  towers), :func:`analyze_opentrans`, :func:`authors_layers`, :func:`fit_power_law_authors`,
  :func:`analyze_opentrans_qkv`, :func:`fit_power_law`, :func:`analyze_weightwatcher`, :func:`esd`,
  :func:`analyze_spectrum`, :func:`layer_alphas`, :func:`write_alpha_report`, :func:`write_esd_plot`.
* :mod:`~opentrans.finetune.freeze`: :func:`freeze_plan` (median, fraction, inverse, random),
  :func:`head_only_plan`, :func:`apply_freeze_plan` (Q/K/V slices via row-masked gradients),
  :func:`gradient_free_parameters`, :func:`trainable_param_count`.
* :mod:`~opentrans.finetune.trainer`: :func:`train_segmentor` (AdamW + poly, gradient accumulation, bf16
  autocast, checkpoint/resume).
* :mod:`~opentrans.finetune.losses`: cross-entropy, focal, Dice, focal + Dice.
* :mod:`~opentrans.finetune.adapters`: LoRA and OFT, mergeable into plain weights.
* :mod:`~opentrans.finetune.stage`: :func:`finetune_stage` (:func:`opentrans.analyze.stage.analyze_stage` is
  re-exported here).
"""

from opentrans.finetune.freeze import (
    FreezePlan,
    apply_freeze_plan,
    freeze_plan,
    gradient_free_parameters,
    head_only_plan,
)
from opentrans.finetune.freeze import trainable_param_count
from opentrans.analyze.spectral import (
    LayerAlpha,
    PowerLawFit,
    SpectralReport,
    analyze_model,
    analyze_opentrans,
    analyze_opentrans_qkv,
    analyze_spectrum,
    analyze_weightwatcher,
    authors_layers,
    esd,
    fit_power_law,
    fit_power_law_authors,
    layer_alphas,
    write_alpha_report,
    write_esd_plot,
)
from opentrans.analyze.stage import analyze_stage
from opentrans.finetune.stage import finetune_stage
from opentrans.finetune.trainer import train_segmentor

__all__ = [
    "FreezePlan",
    "LayerAlpha",
    "PowerLawFit",
    "SpectralReport",
    "analyze_model",
    "analyze_opentrans",
    "analyze_opentrans_qkv",
    "analyze_spectrum",
    "analyze_weightwatcher",
    "authors_layers",
    "esd",
    "fit_power_law",
    "fit_power_law_authors",
    "trainable_param_count",
    "write_esd_plot",
    "analyze_stage",
    "apply_freeze_plan",
    "finetune_stage",
    "freeze_plan",
    "gradient_free_parameters",
    "head_only_plan",
    "layer_alphas",
    "train_segmentor",
    "write_alpha_report",
]
