"""What the CPU's integer kernels can do, read once from ``/proc/cpuinfo``.

ONNX Runtime's x86 int8 GEMM multiplies uint8 activations by int8 weights. With VNNI (AVX-512
VNNI, AVX-VNNI) or AMX the products are summed straight into int32. On plain AVX2 the kernel uses
``vpmaddubsw``, which adds *pairs* of u8 × s8 products into a saturating int16: two products of
255 × 127 overflow it, and the clipped sums show up as lost accuracy on long inputs (measured on
an AMD EPYC with AVX2 only: probe min cosine 0.984 for a 256-token input with 8-bit weights).
Weights quantized to 7 bits (|w| ≤ 63) keep every pair sum within int16, which is what
onnxruntime's ``reduce_range`` is for; the int8 build uses them for its per-tensor layers on such
CPUs (``quantize.quantize_int8`` has the measurements). Other architectures (ARM's ``sdot``/``smmla``) accumulate in
int32 and need no headroom.
"""

from __future__ import annotations

import functools
import platform

_WIDE_INT8_FLAGS = frozenset({"avx512_vnni", "avx512vnni", "avx_vnni", "amx_int8"})


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The feature flags of the first processor listed in a ``/proc/cpuinfo`` text."""
    for line in cpuinfo.splitlines():
        if line.startswith("flags") and ":" in line:
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def weight_bits_for(machine: str, flags: frozenset[str]) -> int:
    """Per-tensor int8 layers' weight bits: 8 where products accumulate in int32; 7 on x86 without VNNI or AMX."""
    if machine.lower() not in ("x86_64", "amd64", "i686", "i386"):
        return 8
    return 8 if flags & _WIDE_INT8_FLAGS else 7


@functools.cache
def int8_weight_bits() -> int:
    """Weight bits for this machine's int8 builds (a model's ``int8_weight_bits`` overrides it:
    ``[[models]]`` or ``$POLYRAY_INT8_WEIGHT_BITS``, read by ``polyray.config``)."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = cpu_flags(fh.read())
    except OSError:
        flags = frozenset()
    return weight_bits_for(platform.machine(), flags)
