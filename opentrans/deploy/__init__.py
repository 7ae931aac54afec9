"""Deploy: export the image graph to ONNX, convert or quantise it for a target, check parity, publish.

* :func:`export_onnx`: the fp32 ONNX image graph (``images`` (B,3,H,W), ``text_embeds`` (C,D) -> ``logits``).
* :func:`quantize_openvino_int8`: NNCF post-training INT8 of the OpenVINO graph.
* :mod:`opentrans.deploy.targets`: ``onnx``, ``openvino``, ``jetson``, ``nvidia``; :func:`load_runner`,
  :func:`read_build`, :func:`source_model_dir`.
* :func:`deploy_stage`: the ``opentrans deploy`` stage.

Heavy back ends (OpenVINO, NNCF, TensorRT) are imported only when a target that needs them is used.
"""

from opentrans.deploy.export import export_onnx
from opentrans.deploy.quantize import quantize_openvino_int8
from opentrans.deploy.stage import PARITY_THRESHOLDS, deploy_stage
from opentrans.deploy.targets import PRECISIONS, TARGETS, load_runner, read_build, source_model_dir

__all__ = ["PARITY_THRESHOLDS", "PRECISIONS", "TARGETS", "deploy_stage", "export_onnx", "load_runner",
           "quantize_openvino_int8", "read_build", "source_model_dir"]
