"""``deploy --precision auto``: measure which precision is fastest on this CPU instead of guessing.

Which build is fastest depends on the ISA (:mod:`opentrans.hardware`): on an Intel AMX CPU OpenVINO INT8 ran
ViT-B-16 2.75x faster than torch fp32, on an AMD EPYC with AVX2 only it was no faster than OpenVINO fp32 (int8
without VNNI has no faster dot product, and the quantise/dequantise work remains). ``auto`` therefore builds the
candidates that make sense on this CPU (:func:`auto_candidates`), checks each against PyTorch with its own parity
gate, times the passing ones side by side (interleaved rounds, batch 1, same thread settings as their runners
use in deployment) and keeps the fastest (:func:`choose`). fp32 is always a candidate and must pass, so the kept
build is never slower than fp32 in the measurement that chose it. The decision table is written to
``decision.json`` (:data:`DECISION_FILE`) and into ``build.json`` and the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from opentrans.errors import OpenTransError

AUTO = "auto"
DECISION_FILE = "decision.json"
#: Timed rounds per candidate (each round runs every candidate once, the order reversed every other round).
AUTO_ROUNDS = 10
AUTO_WARMUP = 2


@dataclass(frozen=True)
class Candidate:
    """One precision ``auto`` tries.

    Attributes:
        precision: the name in the decision table and build.json: ``fp32``, ``bf16`` or ``int8``.
        build_precision: what the target builds (``bf16`` is the fp32 IR compiled with a bf16 inference hint).
        inference_precision: OpenVINO ``INFERENCE_PRECISION_HINT`` to compile with (``f32``, ``bf16``), or None for
            targets without one.
    """

    precision: str
    build_precision: str
    inference_precision: str | None


def auto_candidates(target: str, native_bf16: bool) -> list[Candidate]:
    """The candidates for ``target`` on a CPU with (``native_bf16``) or without native bf16: fp32; bf16 for
    openvino where the CPU has native bf16 (elsewhere it is emulated and slower than fp32); int8.

    Raises:
        OpenTransError: ``target`` is not a CPU target (onnx, openvino).
    """
    from opentrans.deploy.targets.base import cpu_targets

    if target not in cpu_targets():
        raise OpenTransError(f"--precision auto: measures builds on this CPU, so it applies to --target "
                             f"{' or '.join(cpu_targets())} (asked: {target})")
    hint = "f32" if target == "openvino" else None
    candidates = [Candidate("fp32", "fp32", hint)]
    if target == "openvino" and native_bf16:
        candidates.append(Candidate("bf16", "fp32", "bf16"))
    candidates.append(Candidate("int8", "int8", hint))
    return candidates


def choose(rows: list[dict[str, Any]]) -> str:
    """Fill in each row's ``kept`` and ``why`` and return the kept precision: the fastest row that passed its
    parity gate.

    Args:
        rows: one per candidate, with ``precision``, ``passed`` (bool), ``failures`` (list of str) and
            ``median_ms`` (None for a row that failed its gate and was not timed).

    Raises:
        OpenTransError: the fp32 row failed its gate (the export itself is wrong; nothing is kept).
    """
    fp32 = next(r for r in rows if r["precision"] == "fp32")
    if not fp32["passed"]:
        raise OpenTransError(f"--precision auto: the fp32 build failed its parity check ({'; '.join(fp32['failures'])})")
    best = min((r for r in rows if r["passed"]), key=lambda r: r["median_ms"])
    for r in rows:
        r["kept"] = r is best
        if r is best:
            r["why"] = "fastest build that passed its parity gate"
        elif not r["passed"]:
            r["why"] = "failed its parity gate: " + "; ".join(r["failures"])
        else:
            r["why"] = f"slower than {best['precision']} ({r['median_ms']:.1f} vs {best['median_ms']:.1f} ms)"
    return best["precision"]


def decision_markdown(decision: dict[str, Any]) -> str:
    """The decision table as Markdown (for the card): candidate, median ms, parity figures, kept or why not."""
    lines = [f"Precision chosen by `--precision auto` on {decision['cpu']} ({decision['rounds']} interleaved rounds, "
             f"batch 1): **{decision['kept']}**", "",
             "| candidate | median ms | pixel agreement % | decided agreement % | cosine | max abs diff | kept |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in decision["candidates"]:
        ms = "" if r["median_ms"] is None else f"{r['median_ms']:.1f}"
        f = r["figures"]
        decided = f.get("decided_agreement")  # None: too few decided pixels; absent: a decision made before it
        lines.append(f"| {r['precision']} | {ms} | {f['pixel_agreement']:.2f} | "
                     f"{'n/a' if decided is None else f'{decided:.3f}'} | {f['cosine']:.6f} | "
                     f"{f['max_abs_diff']:.3g} | {'yes' if r['kept'] else 'no: ' + r['why']} |")
    return "\n".join(lines) + "\n"
