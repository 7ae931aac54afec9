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

The names below are imported on first use, so reading :mod:`opentrans.analyze.options` (the CLI does, to build
its flags) does not load torch.
"""

from opentrans.registry import lazy_exports

_EXPORTS = {"AnalyzeOptions": "opentrans.analyze.options", "LayerAlpha": "opentrans.analyze.spectral",
            "SpectralReport": "opentrans.analyze.spectral", "analyze_model": "opentrans.analyze.spectral",
            "analyze_stage": "opentrans.analyze.stage"}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
