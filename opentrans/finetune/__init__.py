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

The names below are imported on first use, so reading :mod:`opentrans.finetune.options` (the CLI does, to build
its flags) does not load the stage.
"""

from opentrans.registry import lazy_exports

_EXPORTS = {
    "FreezePlan": "opentrans.finetune.freeze",
    "apply_freeze_plan": "opentrans.finetune.freeze",
    "freeze_plan": "opentrans.finetune.freeze",
    "gradient_free_parameters": "opentrans.finetune.freeze",
    "head_only_plan": "opentrans.finetune.freeze",
    "trainable_param_count": "opentrans.finetune.freeze",
    "LayerAlpha": "opentrans.analyze.spectral",
    "PowerLawFit": "opentrans.analyze.spectral",
    "SpectralReport": "opentrans.analyze.spectral",
    "analyze_model": "opentrans.analyze.spectral",
    "analyze_opentrans": "opentrans.analyze.spectral",
    "analyze_opentrans_qkv": "opentrans.analyze.spectral",
    "analyze_spectrum": "opentrans.analyze.spectral",
    "analyze_weightwatcher": "opentrans.analyze.spectral",
    "authors_layers": "opentrans.analyze.spectral",
    "esd": "opentrans.analyze.spectral",
    "fit_power_law": "opentrans.analyze.spectral",
    "fit_power_law_authors": "opentrans.analyze.spectral",
    "layer_alphas": "opentrans.analyze.spectral",
    "write_alpha_report": "opentrans.analyze.spectral",
    "write_esd_plot": "opentrans.analyze.spectral",
    "analyze_stage": "opentrans.analyze.stage",
    "finetune_stage": "opentrans.finetune.stage",
    "train_segmentor": "opentrans.finetune.trainer",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
