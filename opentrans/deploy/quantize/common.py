"""Shared pieces of the NNCF quantisation back ends: defaults, option checks, the calibration dataset and the
accuracy-control metrics (see :mod:`opentrans.deploy.quantize`)."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from contextlib import contextmanager

import numpy as np

from opentrans.errors import OpenTransError

DEFAULT_SMOOTH_QUANT_ALPHA = 0.6
#: Metrics ``--drop-metric`` accepts for accuracy-controlled quantisation (both in percent).
DROP_METRICS = ("agreement", "miou")
#: Operation types whose inputs a quantised layer has (OpenVINO and ONNX names).
LAYER_TYPES = ("MatMul", "Convolution", "Conv", "Gemm", "ScaledDotProductAttention")
_LOW_PRECISION = ("i8", "u8", "i4", "u4")
#: NNCF ``OverflowFix`` policies (values of ``nncf.OverflowFix``): ``enable`` keeps every layer's INT8 weights
#: within 7 bits, so that CPUs without VNNI, whose int8 kernels add u8 x s8 products in pairs in int16, cannot
#: saturate; ``first_layer_only`` (NNCF's default) only the first convolution's. Chosen per build by
#: :func:`opentrans.hardware.int8_overflow_fix` from ``--cpu-isa``.
OVERFLOW_FIXES = ("enable", "first_layer_only", "disable")


def check_smooth_quant_alpha(alpha: float) -> float:
    """``alpha`` if it is a valid SmoothQuant alpha: in (0, 1], or -1 (off).

    Raises:
        OpenTransError: any other value.
    """
    if alpha != -1 and not 0 < alpha <= 1:
        raise OpenTransError(f"--smooth-quant-alpha {alpha}: choose a value in (0, 1], or -1 to disable")
    return float(alpha)


def check_ignore_patterns(patterns: Sequence[str] | None) -> list[str]:
    """The ``--ignore-ops`` patterns as a list, each checked to be a valid regular expression.

    Raises:
        OpenTransError: a pattern that does not compile.
    """
    out = []
    for p in patterns or ():
        try:
            re.compile(p)
        except re.error as exc:
            raise OpenTransError(f"--ignore-ops {p!r}: not a regular expression ({exc})") from None
        out.append(str(p))
    return out


def match_ignored(names: Iterable[str], patterns: Sequence[str]) -> list[str]:
    """The ``names`` that any of ``patterns`` matches (``re.search``), in order.

    Raises:
        OpenTransError: a pattern that matches none of ``names`` (a typo would otherwise silently quantise
            everything).
    """
    names = list(names)
    hits: list[str] = []
    for p in patterns:
        matched = [n for n in names if re.search(p, n)]
        if not matched:
            raise OpenTransError(f"--ignore-ops {p!r}: matches no operation of the image graph "
                                 f"(names look like {names[len(names) // 2] if names else '?'})")
        hits.extend(m for m in matched if m not in hits)
    return hits


@contextmanager
def _quiet_nncf():
    """NNCF logs one INFO line per ignored node; keep warnings."""
    import nncf

    level = nncf.nncf_logger.level
    nncf.nncf_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        nncf.nncf_logger.setLevel(level)


def check_overflow_fix(overflow_fix: str) -> str:
    """``overflow_fix`` if it is one of :data:`OVERFLOW_FIXES`.

    Raises:
        OpenTransError: any other value.
    """
    if overflow_fix not in OVERFLOW_FIXES:
        raise OpenTransError(f"overflow fix {overflow_fix!r}: choose one of {', '.join(OVERFLOW_FIXES)}")
    return overflow_fix


def _advanced(smooth_quant_alpha: float, overflow_fix: str):
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        AdvancedSmoothQuantParameters,
        OverflowFix,
    )

    return AdvancedQuantizationParameters(
        smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=float(smooth_quant_alpha)),
        overflow_fix=OverflowFix(check_overflow_fix(overflow_fix)))


def _calibration_dataset(calib_images: Iterable[np.ndarray], text_embeds: np.ndarray, subset_size: int | None):
    import nncf

    if subset_size is not None and subset_size < 1:
        raise OpenTransError(f"--calib-size {subset_size}: must be at least 1")
    images = [np.ascontiguousarray(x, dtype=np.float32) for x in calib_images]
    if not images:
        raise OpenTransError("no calibration images")
    text = np.ascontiguousarray(text_embeds, dtype=np.float32)
    size = len(images) if subset_size is None else subset_size
    return nncf.Dataset(images, lambda x: {"images": x, "text_embeds": text}), size


def drop_metric(metric: str, num_classes: int, ignore_index: int = 255):
    """The ``metric_fn`` of :func:`quantize_openvino_accuracy_control` for ``--drop-metric``.

    * ``agreement``: items ``(image float32 (1,3,H,W), reference labels int (H,W))`` where the labels are the fp32
      PyTorch model's argmax at the network's resolution; metric = % of pixels whose argmax matches (100 for the
      fp32 graph itself), per item the image's %.
    * ``miou``: items ``(image, mask int (h0,w0))`` with dataset labels; logits are resized to the mask; metric =
      mIoU (%) over all items' pixels, per item the image's own mIoU (%).

    Raises:
        OpenTransError: an unknown metric.
    """
    import torch

    from opentrans.inference.evaluate import predict_labels
    from opentrans.metrics import ConfusionMatrix

    if metric not in DROP_METRICS:
        raise OpenTransError(f"--drop-metric {metric}: choose {', '.join(DROP_METRICS)}")

    def agreement(infer, items):
        per = [100.0 * float((infer(img)[0].argmax(0) == np.asarray(ref)).mean()) for img, ref in items]
        return float(np.mean(per)), per

    def miou(infer, items):
        total, per = ConfusionMatrix(num_classes, ignore_index), []
        for img, mask in items:
            mask = torch.as_tensor(np.asarray(mask), dtype=torch.int64)
            pred = predict_labels(infer(img), tuple(mask.shape))[0]
            one = ConfusionMatrix(num_classes, ignore_index)
            one.update(pred, mask)
            total.update(pred, mask)
            per.append(100.0 * float(np.nan_to_num(one.miou())))
        return 100.0 * float(np.nan_to_num(total.miou())), per

    return agreement if metric == "agreement" else miou
