"""Which int8 weight range a CPU gets: a pure function of its architecture and feature flags."""

from __future__ import annotations

from polyray.backends.cpu import cpu_flags, weight_bits_for

INTEL_VNNI = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni\nmodel name\t: Xeon\n"
AMD_AVX2 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx avx2 fma\n"


def test_flags_come_from_the_first_flags_line() -> None:
    assert cpu_flags(INTEL_VNNI) == {"fpu", "sse2", "avx2", "avx512f", "avx512bw", "avx512_vnni"}
    assert cpu_flags("processor : 0\n") == frozenset()


def test_x86_without_vnni_gets_seven_bit_weights() -> None:
    assert weight_bits_for("x86_64", cpu_flags(AMD_AVX2)) == 7
    assert weight_bits_for("x86_64", frozenset()) == 7


def test_vnni_amx_and_other_architectures_get_eight_bits() -> None:
    assert weight_bits_for("x86_64", cpu_flags(INTEL_VNNI)) == 8
    assert weight_bits_for("x86_64", frozenset({"avx2", "avx_vnni"})) == 8
    assert weight_bits_for("AMD64", frozenset({"amx_int8"})) == 8
    assert weight_bits_for("aarch64", frozenset()) == 8
