"""Post-training INT8 quantisation of the OpenVINO image graph with NNCF.

Activations are calibrated on real images (the training split of the deploy dataset). Two choices matter:

* **SmoothQuant alpha** (ViTs only: NNCF applies SmoothQuant with ``model_type=TRANSFORMER``). NNCF's default
  for MatMuls is 0.95; for CLIP image towers a smaller migration strength is reported to keep accuracy
  better (0.95 hurt, 0.6 better, see ``docs/pitfalls.md``), so the default here is
  :data:`DEFAULT_SMOOTH_QUANT_ALPHA` = 0.6. ``-1`` turns SmoothQuant off.
* **The class-similarity path stays fp32.** ``text_embeds`` is a graph input that changes with the class
  list on the device; quantising the similarity MatMul would freeze activation ranges measured for the
  calibration classes. Every operation reachable from ``text_embeds`` (its L2 normalisation, the similarity
  MatMul, logit scale, reshape and upsampling) is put in NNCF's ignored scope, so only the image encoder is
  INT8. The cost is one (B*h*w, D) x (D, C) fp32 MatMul.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np

DEFAULT_SMOOTH_QUANT_ALPHA = 0.6


def text_path_ops(ov_model) -> list[str]:
    """Friendly names of every operation of ``ov_model`` that depends on its ``text_embeds`` input.

    Raises:
        OpenTransError: the model has no ``text_embeds`` input.
    """
    from opentrans.errors import OpenTransError

    starts = [p for p in ov_model.get_parameters() if "text_embeds" in p.output(0).get_names()]
    if not starts:
        raise OpenTransError("the OpenVINO model has no 'text_embeds' input; is it an OpenTrans image graph?")
    seen: dict[str, object] = {}
    stack = [starts[0]]
    while stack:
        node = stack.pop()
        for out in node.outputs():
            for target in out.get_target_inputs():
                consumer = target.get_node()
                name = consumer.get_friendly_name()
                if name not in seen and consumer.get_type_name() != "Result":
                    seen[name] = consumer
                    stack.append(consumer)
    return sorted(seen)


def quantize_openvino_int8(ov_model, calib_images: Iterable[np.ndarray], text_embeds: np.ndarray,
                           model_type_transformer: bool, subset_size: int,
                           smooth_quant_alpha: float = DEFAULT_SMOOTH_QUANT_ALPHA):
    """INT8 post-training quantisation (NNCF, symmetric/"performance" preset) of an fp32 OpenVINO image graph.

    Args:
        ov_model: ``openvino.Model`` with inputs ``images`` (B,3,H,W) and ``text_embeds`` (C,D).
        calib_images: calibration images, each float32 (1,3,H,W), normalised like the model's input; at least
            ``subset_size`` of them are used if there are that many.
        text_embeds: float32 (C,D) class embeddings fed with every calibration image (the path they feed is
            not quantised, see the module docstring).
        model_type_transformer: True for ViT image towers (enables NNCF's transformer scheme and SmoothQuant).
        subset_size: number of calibration samples NNCF reads.
        smooth_quant_alpha: SmoothQuant migration strength for MatMuls in (0, 1], or -1 to disable; ignored
            when ``model_type_transformer`` is False.

    Returns:
        A new ``openvino.Model`` with FakeQuantize operations on the image encoder.

    Raises:
        OpenTransError: ``subset_size`` < 1, an alpha outside (0, 1] other than -1, no calibration images,
            or a model without a ``text_embeds`` input.
    """
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    from opentrans.errors import OpenTransError

    if subset_size < 1:
        raise OpenTransError(f"--calib-size {subset_size}: must be at least 1")
    if smooth_quant_alpha != -1 and not 0 < smooth_quant_alpha <= 1:
        raise OpenTransError(f"--smooth-quant-alpha {smooth_quant_alpha}: choose a value in (0, 1], or -1 to disable")
    images = [np.ascontiguousarray(x, dtype=np.float32) for x in calib_images]
    if not images:
        raise OpenTransError("no calibration images")
    text = np.ascontiguousarray(text_embeds, dtype=np.float32)
    dataset = nncf.Dataset(images, lambda x: {"images": x, "text_embeds": text})
    advanced = AdvancedQuantizationParameters(
        smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=float(smooth_quant_alpha)))
    level = nncf.nncf_logger.level
    nncf.nncf_logger.setLevel(logging.WARNING)  # one INFO line per ignored node otherwise; warnings still show
    try:
        return nncf.quantize(
            ov_model, dataset,
            model_type=nncf.ModelType.TRANSFORMER if model_type_transformer else None,
            subset_size=int(subset_size),
            ignored_scope=nncf.IgnoredScope(names=text_path_ops(ov_model)),
            advanced_parameters=advanced,
        )
    finally:
        nncf.nncf_logger.setLevel(level)
