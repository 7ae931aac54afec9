"""Layer-wise finetuning guided by heavy-tailed spectral analysis (the ``analyze`` and ``finetune`` stages).

OpenTrans (Xu, Chen, Zhao & Wei, "Transferable and Principled Efficiency for Open-Vocabulary
Segmentation", CVPR 2024, arXiv:2404.07448) measures, for each layer of the CLIP image encoder, the
power-law exponent alpha of its weight matrix's eigenvalue spectrum (Martin & Mahoney's heavy-tailed
self-regularisation, computed with weightwatcher). Heavy-tailed layers (alpha below the median) count as
well trained and stay frozen; the rest are finetuned with the segmentation head.

* :mod:`~opentrans.finetune.spectral`: :func:`analyze_spectrum`, :func:`layer_alphas`, :func:`write_alpha_report`.
* :mod:`~opentrans.finetune.freeze`: :func:`freeze_plan`, :func:`head_only_plan`, :func:`apply_freeze_plan`,
  :func:`gradient_free_parameters`.
* :mod:`~opentrans.finetune.trainer`: :func:`train_segmentor`.
* :mod:`~opentrans.finetune.stage`: :func:`analyze_stage`, :func:`finetune_stage`.
"""

from opentrans.finetune.freeze import (
    FreezePlan,
    apply_freeze_plan,
    freeze_plan,
    gradient_free_parameters,
    head_only_plan,
)
from opentrans.finetune.spectral import LayerAlpha, SpectralReport, analyze_spectrum, layer_alphas, write_alpha_report
from opentrans.finetune.stage import analyze_stage, finetune_stage
from opentrans.finetune.trainer import train_segmentor

__all__ = [
    "FreezePlan",
    "LayerAlpha",
    "SpectralReport",
    "analyze_spectrum",
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
