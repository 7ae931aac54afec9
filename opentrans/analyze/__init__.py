"""Heavy-tailed spectral analysis of CLIP's towers (the ``analyze`` stage), the layer below ``finetune``.

OpenTrans (Xu, Chen, Zhao & Wei, "Transferable and Principled Efficiency for Open-Vocabulary
Segmentation", CVPR 2024, arXiv:2404.07448) measures, for each layer of the CLIP image encoder, the
power-law exponent alpha of its weight matrix's eigenvalue spectrum (Martin & Mahoney's heavy-tailed
self-regularisation, computed with weightwatcher); :mod:`opentrans.finetune` freezes by it.

* :mod:`~opentrans.analyze.spectral`: :func:`analyze_model` (the OpenTrans authors' estimator and layer set,
  our Q/K/V-split variant ``opentrans-qkv`` and/or weightwatcher, registered in ``SPECTRAL_ESTIMATORS``;
  image/text towers), :func:`analyze_opentrans`, :func:`authors_layers`, :func:`fit_power_law_authors`,
  :func:`analyze_opentrans_qkv`, :func:`fit_power_law`, :func:`analyze_weightwatcher`, :func:`esd`,
  :func:`analyze_spectrum`, :func:`layer_alphas`, :func:`write_alpha_report`, :func:`write_esd_plot`.
* :mod:`~opentrans.analyze.options`: :class:`AnalyzeOptions`.
* :mod:`~opentrans.analyze.stage`: :func:`analyze_stage`.
"""

from opentrans.analyze.options import AnalyzeOptions
from opentrans.analyze.spectral import LayerAlpha, SpectralReport, analyze_model
from opentrans.analyze.stage import analyze_stage

__all__ = ["AnalyzeOptions", "LayerAlpha", "SpectralReport", "analyze_model", "analyze_stage"]
