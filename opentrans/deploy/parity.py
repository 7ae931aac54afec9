"""The one parity gate of a deploy build: the bounds an artifact must meet against PyTorch fp32, for the image
graph (per precision), the text graph and the Jetson bundle's on-device check, and the function that applies them.

Bounds are ``{figure: (op, bound)}`` with op ``<=`` (an upper bound, e.g. ``max_abs_diff``) or ``>=`` (a lower
bound, e.g. ``cosine``, ``pixel_agreement`` in %); figures come from :func:`opentrans.inference.evaluate.agreement` (image)
and :func:`opentrans.deploy.text_graph.text_parity` (text). The measurements behind each bound are in
docs/quantization.md ("Parity thresholds").
"""

from __future__ import annotations

from typing import Mapping

#: A pixel is "decided" where the reference's top-1 class leads its top-2 by at least this cosine gap (logits:
#: ``DECIDED_COSINE_GAP * logit_scale``). Measured 2026-11-30 on an AMD EPYC (avx2, fma): on CamVid-trained
#: ViT-B-32 (benchmarks/train_reference.py, 2x pruned + recovery) INT8 builds keep 99.998-100 % of the pixels with a
#: gap >= 0.007-0.017 (92-97 % of all pixels), and so do the random-init tiny ViT/RN INT8 builds (100 %, 66-100 % of
#: their pixels); the flips sit among near-ties. docs/quantization.md, "Parity thresholds".
DECIDED_COSINE_GAP = 0.01

#: Image-graph gates per precision, against PyTorch fp32 on real validation images. ``teacher_miou`` and
#: ``decided_pixels_pct`` are reported, not gated; ``decided_agreement`` is gated where at least 1 % of the pixels
#: are decided (else None: too few to judge, e.g. flat random-init logits).
PARITY_THRESHOLDS: dict[str, dict[str, tuple[str, float]]] = {
    "fp32": {"max_abs_diff": ("<=", 1e-3), "cosine": (">=", 0.99999), "pixel_agreement": (">=", 99.5)},
    "fp16": {"max_abs_diff": ("<=", 0.5), "cosine": (">=", 0.999), "pixel_agreement": (">=", 97.0),
             "decided_agreement": (">=", 99.9)},
    "int8": {"cosine": (">=", 0.99), "pixel_agreement": (">=", 90.0), "decided_agreement": (">=", 99.9)},
}
# bf16 (``--precision auto`` on CPUs with native bf16: the fp32 IR run with OpenVINO's bf16 hint): 8 significant
# bits, fewer than fp16's 11 (measured max |diff| 3e-2 on ViT-B-32); the fp16 gate applies.
PARITY_THRESHOLDS["bf16"] = PARITY_THRESHOLDS["fp16"]

#: Text-graph gate (fp32 everywhere: the text graph is never quantised). Embeddings are unit vectors; measured max
#: |diff| 1e-7..6e-7 (tiny ViT/RN, ONNX Runtime and OpenVINO f32) on CamVid's class embeddings.
TEXT_PARITY: dict[str, tuple[str, float]] = {"max_abs_diff": ("<=", 1e-4), "cosine": (">=", 0.99999)}

#: The Jetson bundle's ``runner.py check`` (engine on the device against PyTorch fp32, written to ``bundle.json``):
#: fp32 engines run in TF32 on Ampere/Orin by default (10-bit mantissa), hence bounds looser than the build
#: machine's fp32 gate; fp16 and int8 are the image gates above. Text embeddings come from an fp32 (TF32) engine.
DEVICE_CHECK = {
    "image": {
        "fp32": {"max_abs_diff": ("<=", 0.1), "cosine": (">=", 0.9999), "pixel_agreement": (">=", 99.0)},
        "fp16": PARITY_THRESHOLDS["fp16"],
        "int8": PARITY_THRESHOLDS["int8"],
    },
    "text": {"max_abs_diff": ("<=", 5e-3), "cosine": (">=", 0.9999)},
}


def missed_bounds(figures: Mapping[str, float], bounds: Mapping[str, tuple[str, float]], prefix: str = "",
                  skip_missing: bool = False) -> list[str]:
    """The ``bounds`` that ``figures`` miss, as ``"cosine 0.95 < 0.99"`` strings (each after ``prefix``); empty
    when all pass. A figure absent from ``figures`` is a KeyError unless ``skip_missing``; a figure that is None
    (``decided_agreement`` with too few decided pixels) is not gated."""
    failures = []
    for key, (op, bound) in bounds.items():
        if skip_missing and key not in figures:
            continue
        value = figures[key]
        if value is None:
            continue
        if not (value <= bound if op == "<=" else value >= bound):
            failures.append(f"{prefix}{key} {value:.6g} {'>' if op == '<=' else '<'} {bound:g}")
    return failures


def check_parity(figures: Mapping[str, float], precision: str) -> list[str]:
    """The image-graph thresholds of ``precision`` that ``figures`` (from :func:`opentrans.inference.evaluate.agreement`)
    miss; empty when all pass."""
    return missed_bounds(figures, PARITY_THRESHOLDS[precision])


def decided_margin(segmentor) -> float:
    """The decided-pixel margin in logits of ``segmentor`` (:data:`DECIDED_COSINE_GAP` times its logit scale)."""
    return DECIDED_COSINE_GAP * float(segmentor.logit_scale().detach())


def device_tolerances() -> dict:
    """:data:`DEVICE_CHECK` as ``bundle.json`` stores it (``[op, bound]`` lists)."""
    def plain(bounds):
        return {k: [op, bound] for k, (op, bound) in bounds.items()}

    return {"image": {p: plain(b) for p, b in DEVICE_CHECK["image"].items()}, "text": plain(DEVICE_CHECK["text"])}
