"""Which int8 and bf16 kernel kind this process runs, and each kind's operand types.

  kind     A (activations)        B (packed weight)     k per lane  instruction                 ISA
  vnni     uint8 (x/s + zp)       int8                  4           vpdpbusd (u8 x s8 -> i32)   AVX-512 VNNI
  madd     int16 (x/s + zp - zp)  int16 (int8 values)   2           vpmaddwd + vpaddd (exact)   AVX2, SSE2, AVX-512
  dpbf16   bf16 (x rounded)       bf16                  2           vdpbf16ps (-> f32)          AVX-512 BF16
  widen    float32 (x)            bf16                  1           bf16 << 16, vfmadd (f32)    any

By default each precision runs the first kind of its pair this CPU and ISA (isa.py, VITNP_ISA) support.
Two environment variables, read once at import, override that (for tests and comparisons):

  VITNP_INT8_KERNEL   vnni | madd | auto (default)      the int8 kind
  VITNP_BF16_KERNEL   dpbf16 | widen | auto (default)   the bf16 kind

A kind the CPU cannot run, or any other value, is an isa.IsaError naming the variable.
"""
from __future__ import annotations

import os

import numpy as np

from .. import isa

GROUP = {"vnni": 4, "madd": 2, "dpbf16": 2, "widen": 1}  # k values per 32-bit lane
A_DTYPE = {"vnni": np.uint8, "madd": np.int16, "dpbf16": np.uint16, "widen": np.float32}
B_DTYPE = {"vnni": np.int8, "madd": np.int16, "dpbf16": np.uint16, "widen": np.uint16}
INT8_KINDS = ("vnni", "madd")
DESCRIPTIONS = {
    "vnni": "int8 u8 x s8 dot products (AVX-512 VNNI vpdpbusd), int32 accumulation",
    "madd": "int8 values as int16 pairs (vpmaddwd), exact int32 accumulation",
    "dpbf16": "bf16 x bf16 dot products (AVX-512 BF16 vdpbf16ps), float32 accumulation",
    "widen": "bf16 weights widened to float32 in registers, float32 FMA",
}
# precision -> (environment variable, preferred kind, the kind every ISA runs)
CHOICES = {"int8": ("VITNP_INT8_KERNEL", "vnni", "madd"), "bf16": ("VITNP_BF16_KERNEL", "dpbf16", "widen")}


def supported_kinds() -> set:
    """The kernel kinds code generated in this process may use (honours VITNP_ISA)."""
    kinds = {"madd", "widen"}  # plain vector integer / float IR: every ISA
    if isa.ISA == "avx512" and isa.is_x86():
        if isa.has("avx512vnni"):
            kinds.add("vnni")
        if isa.has("avx512bf16"):
            kinds.add("dpbf16")
    return kinds


def choose(precision: str, environ=os.environ) -> str:
    """The kind `precision` ("int8" or "bf16") runs: environ's override if set, else the preferred kind where
    supported, else the one every ISA runs."""
    variable, preferred, fallback = CHOICES[precision]
    kinds = supported_kinds()
    wanted = environ.get(variable, "").strip().lower()
    if wanted and wanted != "auto":
        if wanted not in (preferred, fallback):
            raise isa.IsaError(f"{variable}={wanted!r} is not one of {preferred}, {fallback} (or auto)")
        if wanted not in kinds:
            raise isa.IsaError(f"{variable}={wanted}: not available with ISA {isa.ISA} on this CPU")
        return wanted
    return preferred if preferred in kinds else fallback


INT8_KIND = choose("int8")
BF16_KIND = choose("bf16")
KIND = {"int8": INT8_KIND, "bf16": BF16_KIND}  # precision -> the kind this process runs
