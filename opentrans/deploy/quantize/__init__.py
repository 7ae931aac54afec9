"""Quantisation of the image graph: NNCF INT8 (OpenVINO FakeQuantize or ONNX Q/DQ), accuracy control, fp16.

Activations are calibrated on real images (by default the training split of the deploy dataset, or any
``--calib-data``, see :mod:`opentrans.deploy.calibration`). Choices that matter:

* **SmoothQuant alpha** (ViTs only: NNCF applies SmoothQuant with ``model_type=TRANSFORMER``). NNCF's default
  for MatMuls is 0.95; for CLIP image towers a smaller migration strength is reported to keep accuracy
  better (0.95 hurt, 0.6 better, see ``docs/pitfalls.md``), so the default here is
  :data:`DEFAULT_SMOOTH_QUANT_ALPHA` = 0.6. ``-1`` turns SmoothQuant off.
* **The class-similarity path stays fp32.** ``text_embeds`` is a graph input that changes with the class
  list on the device; quantising the similarity MatMul would freeze activation ranges measured for the
  calibration classes. Every operation reachable from ``text_embeds`` (its L2 normalisation, the similarity
  MatMul, logit scale, reshape and upsampling) is put in NNCF's ignored scope, so only the image encoder is
  INT8. The cost is one (B*h*w, D) x (D, C) fp32 MatMul. The same holds for the ONNX Q/DQ graph
  (:func:`quantize_onnx_qdq`) shipped to TensorRT.
* **Ignored scopes** (``--ignore-ops``): regular expressions (``re.search`` on operation names such as
  ``/resblocks.0/mlp/c_fc/MatMul``; the ONNX node name and the OpenVINO friendly name coincide) of further
  operations to keep in floating point, e.g. the layers at the top of a sensitivity report
  (:mod:`opentrans.deploy.sensitivity`).
* **Accuracy control** (:func:`quantize_openvino_accuracy_control`): NNCF quantises everything, measures the
  drop of a metric (mIoU on labels, or argmax agreement with the fp32 PyTorch model) on validation images with
  the compiled INT8 artifact, and reverts the most harmful layers to floating point until the drop is within
  ``max_drop``. Which layers were reverted is found by comparing the fully quantised model with the returned one
  (:func:`quantized_ops`), not by parsing NNCF's log.

fp16 (:func:`convert_onnx_fp16`): ONNX Runtime's ``float16`` converter, inputs and outputs kept float32.

One back end per module, as NNCF lays out its own: :mod:`.common` (defaults, option checks, calibration dataset,
accuracy-control metrics), :mod:`.openvino_backend` (FakeQuantize PTQ, accuracy control) and :mod:`.onnx_backend`
(Q/DQ PTQ, fp16). This package re-exports their public names.
"""

from opentrans.deploy.quantize.common import (  # noqa: F401 - re-exported
    DEFAULT_SMOOTH_QUANT_ALPHA,
    DROP_METRICS,
    LAYER_TYPES,
    OVERFLOW_FIXES,
    check_ignore_patterns,
    check_overflow_fix,
    check_smooth_quant_alpha,
    drop_metric,
    match_ignored,
)
from opentrans.deploy.quantize.onnx_backend import (  # noqa: F401 - re-exported
    convert_onnx_fp16,
    image_layers,
    qdq_layers,
    quantize_onnx_model,
    quantize_onnx_qdq,
    text_path_nodes,
)
from opentrans.deploy.quantize.openvino_backend import (  # noqa: F401 - re-exported
    quantize_openvino_accuracy_control,
    quantize_openvino_int8,
    quantized_ops,
    text_path_ops,
)
