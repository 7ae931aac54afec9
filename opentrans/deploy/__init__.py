"""Deploy: export the image graph to ONNX, convert or quantise it for a target, check parity, publish.

* :func:`export_onnx`: the fp32 ONNX image graph (``images`` (B,3,H,W), ``text_embeds`` (C,D) -> ``logits``).
* :func:`quantize_openvino_int8`: NNCF post-training INT8 of the OpenVINO graph.
* :mod:`opentrans.deploy.targets`: ``onnx``, ``openvino``, ``jetson``, ``nvidia`` (the :data:`TARGETS` registry);
  :func:`load_runner`, :func:`read_build`, :func:`source_model_dir`.
* :class:`DeployOptions` (:mod:`opentrans.deploy.options`) and :func:`deploy_stage`: the ``opentrans deploy`` stage.

Heavy back ends (OpenVINO, NNCF, TensorRT) are imported only when a target that needs them is used; the names
below are imported on first use, so reading :mod:`opentrans.deploy.options` (the CLI does, to build its flags)
does not load the stage.
"""

from opentrans.registry import lazy_exports

_EXPORTS = {
    "DeployOptions": "opentrans.deploy.options",
    "export_onnx": "opentrans.deploy.export",
    "quantize_openvino_int8": "opentrans.deploy.quantize",
    "PARITY_THRESHOLDS": "opentrans.deploy.parity",
    "deploy_stage": "opentrans.deploy.stage",
    "TARGETS": "opentrans.deploy.targets",
    "load_runner": "opentrans.deploy.targets",
    "read_build": "opentrans.deploy.targets",
    "source_model_dir": "opentrans.deploy.targets",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
