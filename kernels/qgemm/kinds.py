"""Which int8 and bf16 kernel kind this process runs, and each kind's operand types.

  kind      A (activations)        B (packed weight)     k per lane  instruction                 ISA
  amx-int8  uint8 (x/s + zp)       int8                  4           tdpbusd (u8 x s8 -> i32)    AMX-INT8
  vnni      uint8 (x/s + zp)       int8                  4           vpdpbusd (u8 x s8 -> i32)   AVX-512 VNNI
  madd      int16 (x/s + zp - zp)  int16 (int8 values)   2           vpmaddwd + vpaddd (exact)   AVX2, SSE2, AVX-512
  amx-bf16  bf16 (x rounded)       bf16                  2           tdpbf16ps (-> f32)          AMX-BF16
  dpbf16    bf16 (x rounded)       bf16                  2           vdpbf16ps (-> f32)          AVX-512 BF16
  widen     float32 (x)            bf16                  1           bf16 << 16, vfmadd (f32)    any

By default each precision runs the first kind of its row this CPU and ISA (isa.py, VITNP_ISA) support: the
AMX kind where the CPU has AMX and Linux grants the tile state (amx.py), else the AVX-512 kind, else the kind
every ISA runs.  Two environment variables, read once at import, override that (for tests and comparisons,
e.g. the AVX-512 kernels measured on an AMX machine):

  VITNP_INT8_KERNEL   amx | vnni | madd | auto (default)      the int8 kind
  VITNP_BF16_KERNEL   amx | dpbf16 | widen | auto (default)   the bf16 kind

A kind the CPU cannot run, or any other value, is an isa.IsaError naming the variable (for amx: why not).
REASON says why each precision runs its kind.
"""
from __future__ import annotations

import os
import warnings

import numpy as np

from .. import amx, isa

GROUP = {"amx-int8": 4, "vnni": 4, "madd": 2, "amx-bf16": 2, "dpbf16": 2, "widen": 1}  # k values per 32-bit lane
A_DTYPE = {"amx-int8": np.uint8, "vnni": np.uint8, "madd": np.int16, "amx-bf16": np.uint16, "dpbf16": np.uint16,
           "widen": np.float32}
B_DTYPE = {"amx-int8": np.int8, "vnni": np.int8, "madd": np.int16, "amx-bf16": np.uint16, "dpbf16": np.uint16,
           "widen": np.uint16}
INT8_KINDS = ("vnni", "madd", "amx-int8")
AMX_KINDS = {"int8": "amx-int8", "bf16": "amx-bf16"}  # precision -> its AMX kind
TILE_ROWS = 16   # rows of a tile register (A: activation rows; B: k groups; C: output rows)
TILE_BYTES = 64  # bytes per tile row: 16 float32 / int32 outputs, 32 bf16 or 64 int8 k values of A
# k values the packed weight and A are padded to: a whole tile of k for the AMX kinds, a group for the others
K_ALIGN = {kind: TILE_ROWS * group if kind in AMX_KINDS.values() else group for kind, group in GROUP.items()}
DESCRIPTIONS = {
    "amx-int8": "int8 u8 x s8 tile dot products (AMX tdpbusd), int32 accumulation",
    "vnni": "int8 u8 x s8 dot products (AVX-512 VNNI vpdpbusd), int32 accumulation",
    "madd": "int8 values as int16 pairs (vpmaddwd), exact int32 accumulation",
    "amx-bf16": "bf16 x bf16 tile dot products (AMX tdpbf16ps), float32 accumulation",
    "dpbf16": "bf16 x bf16 dot products (AVX-512 BF16 vdpbf16ps), float32 accumulation",
    "widen": "bf16 weights widened to float32 in registers, float32 FMA",
}
# precision -> (environment variable, preferred AVX-512 kind, the kind every ISA runs); AMX_KINDS comes first
CHOICES = {"int8": ("VITNP_INT8_KERNEL", "vnni", "madd"), "bf16": ("VITNP_BF16_KERNEL", "dpbf16", "widen")}


def padded_k(kind: str, k: int) -> int:
    """k rounded up to kind's K_ALIGN: the packed weight's and the A operand's k extent."""
    align = K_ALIGN[kind]
    return -(-k // align) * align


def supported_kinds() -> set:
    """The kernel kinds code generated in this process may use (honours VITNP_ISA; AMX only once granted)."""
    kinds = {"madd", "widen"}  # plain vector integer / float IR: every ISA
    if isa.ISA == "avx512" and isa.is_x86():
        if isa.has("avx512vnni"):
            kinds.add("vnni")
        if isa.has("avx512bf16"):
            kinds.add("dpbf16")
        kinds.update(kind for precision, kind in AMX_KINDS.items() if amx.usable(precision))
    return kinds


def choose(precision: str, environ=os.environ) -> str:
    """The kind `precision` ("int8" or "bf16") runs: environ's override if set, else the AMX kind where
    usable, else the preferred AVX-512 kind where supported, else the one every ISA runs."""
    return choose_with_reason(precision, environ)[0]


def choose_with_reason(precision: str, environ=os.environ) -> tuple:
    """(choose(precision, environ), why that kind)."""
    variable, preferred, fallback = CHOICES[precision]
    amx_kind = AMX_KINDS[precision]
    kinds = supported_kinds()
    wanted = environ.get(variable, "").strip().lower()
    if wanted and wanted != "auto":
        if wanted in ("amx", amx_kind):
            usable, reason = amx.status(precision)
            if not usable:
                raise isa.IsaError(f"{variable}={wanted}: not available: {reason}")
            return amx_kind, f"forced by {variable}={wanted}"
        if wanted not in (preferred, fallback):
            raise isa.IsaError(f"{variable}={wanted!r} is not one of {preferred}, {fallback}, amx (or auto)")
        if wanted not in kinds:
            raise isa.IsaError(f"{variable}={wanted}: not available with ISA {isa.ISA} on this CPU")
        return wanted, f"forced by {variable}={wanted}"
    usable, reason = amx.status(precision)
    if usable:
        return amx_kind, reason
    kind = preferred if preferred in kinds else fallback
    if amx.cpu_has(precision):  # the CPU has AMX but Linux refused it: say so once, run the AVX-512 kernel
        warnings.warn(f"{precision} runs {kind}, not {amx_kind}: {reason}", RuntimeWarning, stacklevel=2)
    return kind, f"AMX not used: {reason}"


_CHOSEN = {precision: choose_with_reason(precision) for precision in CHOICES}
KIND = {precision: kind for precision, (kind, _) in _CHOSEN.items()}  # precision -> the kind this process runs
REASON = {precision: why for precision, (_, why) in _CHOSEN.items()}  # precision -> why it runs that kind
INT8_KIND = KIND["int8"]
BF16_KIND = KIND["bf16"]
