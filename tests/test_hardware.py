"""CPU ISA detection (opentrans.hardware) on the /proc/cpuinfo texts of the two kinds of CPU we build on."""

from __future__ import annotations

import pytest

from opentrans.errors import OpenTransError
from opentrans.hardware import CPU_ISA_MODES, check_cpu_isa_mode, cpu_isa, int8_overflow_fix, parse_cpuinfo

# Abridged /proc/cpuinfo of the two machine kinds of this project (flags lines as the kernel prints them).
AMD_AVX2 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu vme sse sse2 ssse3 fma cx16 sse4_1 sse4_2 avx f16c avx2 bmi1 bmi2 sha_ni vaes vpclmulqdq rdpid fsrm
"""
INTEL_AMX = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu sse sse2 ssse3 fma avx f16c avx2 avx512f avx512dq avx512bw avx512vl avx512_bf16 avx512_vnni \
avx_vnni amx_bf16 amx_tile amx_int8
processor\t: 1
model name\t: something else
flags\t\t: fpu
"""


def test_parse_avx2_only_cpu():
    isa = parse_cpuinfo(AMD_AVX2)
    assert isa.model == "AMD EPYC"
    assert isa.flags == ("avx2", "fma")
    assert (isa.vnni, isa.native_bf16, isa.amx) == (False, False, False)
    assert isa.summary() == "AMD EPYC (avx2, fma; no VNNI, no native bf16)"
    assert isa.to_json()["isa"] == ["avx2", "fma"]


def test_parse_amx_cpu_reads_first_processor_only():
    isa = parse_cpuinfo(INTEL_AMX)
    assert isa.model.startswith("Intel(R) Xeon(R)")
    assert set(isa.flags) == {"avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile",
                              "amx_int8", "amx_bf16"}
    assert (isa.vnni, isa.native_bf16, isa.amx) == (True, True, True)
    assert "no VNNI" not in isa.summary()


def test_unknown_isa_is_treated_as_the_safe_case():
    isa = parse_cpuinfo("model name\t: mystery\n")
    assert not isa.known and not isa.vnni and not isa.native_bf16
    assert isa.summary() == "mystery (ISA unknown)"
    assert isa.to_json()["isa"] is None
    assert int8_overflow_fix("native", isa) == "enable"


@pytest.mark.parametrize(("mode", "cpu", "expected"), [
    ("native", AMD_AVX2, "enable"),  # int16 pair sums saturate without VNNI: every layer within 7 bits
    ("native", INTEL_AMX, "first_layer_only"),
    ("portable", INTEL_AMX, "enable"),
    ("portable", AMD_AVX2, "enable"),
    ("vnni", AMD_AVX2, "first_layer_only"),
])
def test_int8_overflow_fix_per_mode(mode, cpu, expected):
    assert int8_overflow_fix(mode, parse_cpuinfo(cpu)) == expected


def test_unknown_mode_is_one_line_error():
    with pytest.raises(OpenTransError, match="--cpu-isa avx9: choose one of native, portable, vnni"):
        check_cpu_isa_mode("avx9")
    assert CPU_ISA_MODES == ("native", "portable", "vnni")


def test_this_machine_is_read():
    isa = cpu_isa()
    assert isa is cpu_isa()  # read once
    assert isa.model
