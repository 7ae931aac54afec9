"""The CPU's instruction-set architecture (ISA), read once, for every decision and record that depends on it.

Which build is fastest and how INT8 must be quantised depend on the CPU:

* **VNNI** (``avx512_vnni``, ``avx_vnni`` or AMX ``amx_int8``): u8 x s8 products are accumulated in int32.
  Without it (AVX2 only) x86 int8 kernels use ``vpmaddubsw``, which adds the products in pairs in **int16 and
  saturates**: a layer whose 8-bit weights use the full range can overflow. NNCF's ``OverflowFix`` keeps such
  weights within 7 bits; its default fixes only the first layer, which is not enough for a ViT (measured on an
  AMD EPYC without VNNI: tiny-ViT INT8 pixel agreement 84.9 % without, 98.1 % with the fix on every layer).
* **native bf16** (``avx512_bf16`` or AMX ``amx_bf16``): elsewhere bf16 is emulated and several times slower
  than fp32 (torch bf16 autocast of ViT-B-16 on that AMD CPU: 7.3 s vs 1.0 s fp32).

:func:`cpu_isa` reads ``/proc/cpuinfo`` (Linux). Where it cannot be read the ISA is *unknown*: decisions then
take the choice that is safe on every x86 CPU (overflow fix on, no bf16) and records say ``unknown``.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from pathlib import Path

from opentrans.errors import OpenTransError

#: ISA flags recorded in manifests, build.json and bench headers (Linux /proc/cpuinfo names).
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
#: ``--cpu-isa`` choices: ``native`` = the CPU this runs on, ``portable`` = safe on any x86-64 CPU (AVX2 without
#: VNNI included), ``vnni`` = a target CPU with VNNI (int32 accumulation) whatever this one has.
CPU_ISA_MODES = ("native", "portable", "vnni")
_VNNI = ("avx512_vnni", "avx_vnni", "amx_int8")
_BF16 = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class CpuIsa:
    """What one CPU offers for inference.

    Attributes:
        model: the CPU's model name (``AMD EPYC``, ``Intel(R) Xeon(R) ...``) or ``unknown``.
        flags: the :data:`ISA_FLAGS` it has, in that order; None when they could not be read.
    """

    model: str
    flags: tuple[str, ...] | None

    @property
    def known(self) -> bool:
        """Whether the flags were read."""
        return self.flags is not None

    @property
    def vnni(self) -> bool:
        """int8 dot products accumulate in int32 (VNNI or AMX); False when unknown."""
        return bool(self.flags) and any(f in self.flags for f in _VNNI)

    @property
    def native_bf16(self) -> bool:
        """bf16 arithmetic in hardware (avx512_bf16 or AMX); False when unknown."""
        return bool(self.flags) and any(f in self.flags for f in _BF16)

    @property
    def amx(self) -> bool:
        """Intel AMX tiles (int8 and bf16 matrix units)."""
        return bool(self.flags) and "amx_tile" in self.flags

    def summary(self) -> str:
        """One line for report headers, e.g. ``AMD EPYC (avx2, fma; no VNNI, no native bf16)``."""
        if not self.known:
            return f"{self.model} (ISA unknown)"
        traits = ", ".join(self.flags) or "no AVX2"
        notes = [] if self.vnni else ["no VNNI"]
        notes += [] if self.native_bf16 else ["no native bf16"]
        return f"{self.model} ({traits}{'; ' + ', '.join(notes) if notes else ''})"

    def to_json(self) -> dict:
        """``{"cpu", "isa", "vnni", "native_bf16", "amx"}`` for manifests and build.json (``isa`` None: unknown)."""
        return {"cpu": self.model, "isa": None if self.flags is None else list(self.flags), "vnni": self.vnni,
                "native_bf16": self.native_bf16, "amx": self.amx}


def parse_cpuinfo(text: str) -> CpuIsa:
    """The :class:`CpuIsa` of the first processor in a ``/proc/cpuinfo`` text.

    A text without a ``flags`` line gives ``flags=None`` (unknown).
    """
    model, flags = "unknown", None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model == "unknown":
            model = value.strip()
        elif key == "flags" and flags is None:
            present = set(value.split())
            flags = tuple(f for f in ISA_FLAGS if f in present)
        if model != "unknown" and flags is not None:
            break
    return CpuIsa(model=model, flags=flags)


@functools.lru_cache(maxsize=1)
def cpu_isa() -> CpuIsa:
    """The ISA of the CPU this process runs on (read once; see the module docstring)."""
    path = Path("/proc/cpuinfo")
    if path.exists():
        return parse_cpuinfo(path.read_text(errors="replace"))
    return CpuIsa(model=platform.processor() or "unknown", flags=None)


def check_cpu_isa_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`CPU_ISA_MODES`.

    Raises:
        OpenTransError: any other value.
    """
    if mode not in CPU_ISA_MODES:
        raise OpenTransError(f"--cpu-isa {mode}: choose one of {', '.join(CPU_ISA_MODES)}")
    return mode


def int8_overflow_fix(mode: str, isa: CpuIsa | None = None) -> str:
    """NNCF overflow-fix policy for INT8 weights built for ``--cpu-isa mode``: ``"enable"`` (every layer's
    weights within 7 bits: safe without VNNI) or ``"first_layer_only"`` (NNCF's default: full 8-bit weights elsewhere,
    right for VNNI/AMX CPUs).

    ``native`` follows ``isa`` (default: :func:`cpu_isa`); an unknown ISA gets ``"enable"``.

    Raises:
        OpenTransError: an unknown ``mode``.
    """
    check_cpu_isa_mode(mode)
    if mode == "portable":
        return "enable"
    if mode == "vnni":
        return "first_layer_only"
    return "first_layer_only" if (isa or cpu_isa()).vnni else "enable"
