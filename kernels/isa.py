"""The vector instruction set the kernels are built for, chosen once per process.

Every register-tiled kernel (GEMM micro-kernel, attention, column softmax) is generated for one vector width,
and its tile shape must fit that ISA's register file:

  avx512   16 float32 lanes, 32 zmm registers: GEMM tile 12 x 32 (24 accumulators)
  avx2      8 lanes (AVX2 + FMA), 16 ymm registers: GEMM tile 6 x 16 (12 accumulators, 2 B loads, 1 broadcast)
  generic   4 lanes, 16 xmm registers: GEMM tile 4 x 8; plain SSE2 on x86-64 (any other CPU: whatever LLVM
            targets), correct everywhere, fast nowhere

The host's ISA is detected from LLVM's view of the CPU.  VITNP_ISA=avx512|avx2|generic forces one; forcing a
narrower ISA than the host's also makes Numba generate code for a CPU of that class (NUMBA_CPU_NAME /
NUMBA_CPU_FEATURES), so e.g. the AVX2 build can be tested and benchmarked on an AVX-512 machine exactly as an
AVX2-only CPU would run it.  That has to happen before Numba compiles or loads anything in the process, which
is why this module is imported first by the kernels package.  Numba's on-disk cache keys each entry by CPU
name and features, so the variants never mix.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

ISAS = ("avx512", "avx2", "generic")
ENV_VAR = "VITNP_ISA"


@dataclass(frozen=True)
class IsaSpec:
    name: str
    lanes: int              # float32 per vector register
    gemm_mr: int            # GEMM micro-tile rows
    gemm_nr: int            # GEMM micro-tile columns (a multiple of lanes)
    gemm_row_variants: tuple  # shorter kernels for a ragged last row panel (descending, first = gemm_mr)
    attn_key_rows: int      # keys per S^T micro-tile
    attn_query_block: int   # queries per block = S^T micro-tile width
    attn_out_rows: int      # queries per micro-tile of O
    cpu_name: str           # what Numba is told when this ISA is forced below the host's
    cpu_features: str


SPECS = {
    "avx512": IsaSpec("avx512", 16, 12, 32, (12, 8, 4), 12, 32, 8, "skylake-avx512",
                      "+avx512f,+avx512bw,+avx512dq,+avx512vl,+avx2,+fma"),
    # Zen 3 is the AVX2-only CPU this variant is tuned on; its LLVM name also sets the scheduling model.
    "avx2": IsaSpec("avx2", 8, 6, 16, (6, 4, 2), 6, 16, 6, "znver3",
                    "+avx2,+fma,+f16c,+bmi,+bmi2,+lzcnt,+popcnt,-avx512f"),
    "generic": IsaSpec("generic", 4, 4, 8, (4, 2, 1), 4, 8, 4, "x86-64", "+sse2"),
}


class IsaError(RuntimeError):
    """VITNP_ISA names an unknown ISA or one this CPU cannot execute, or came too late to take effect."""


def host_features() -> set:
    import llvmlite.binding as llvm

    try:
        llvm.initialize_native_target()
    except RuntimeError:
        pass
    return {name for name, on in llvm.get_host_cpu_features().items() if on}


def host_cpu_name() -> str:
    import llvmlite.binding as llvm

    return llvm.get_host_cpu_name()


def host_isa(features=None) -> str:
    """The widest ISA whose kernels this CPU executes."""
    features = host_features() if features is None else set(features)
    if {"avx512f", "avx512vl", "avx512bw", "avx512dq", "fma"} <= features:
        return "avx512"
    if {"avx2", "fma"} <= features:
        return "avx2"
    return "generic"


def is_x86() -> bool:
    import platform

    return platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


def _choose() -> tuple[str, bool]:
    """(isa, forced below the host) from VITNP_ISA and the host."""
    detected = host_isa()
    wanted = os.environ.get(ENV_VAR, "").strip().lower()
    if not wanted or wanted == "auto":
        return detected, False
    if wanted not in ISAS:
        raise IsaError(f"{ENV_VAR}={wanted!r} is not one of {', '.join(ISAS)} (or auto)")
    if ISAS.index(wanted) < ISAS.index(detected):
        raise IsaError(f"{ENV_VAR}={wanted}: this CPU ({host_cpu_name()}) cannot execute {wanted} code; "
                       f"the widest it runs is {detected}")
    return wanted, wanted != detected


def _retarget_numba(spec: IsaSpec) -> None:
    """Point Numba's code generator at a CPU of the forced ISA's class (before its first compile)."""
    if not is_x86():
        return  # the CPU names above are x86's; elsewhere the host target already is what runs
    os.environ["NUMBA_CPU_NAME"] = spec.cpu_name
    os.environ["NUMBA_CPU_FEATURES"] = spec.cpu_features
    import numba
    from numba.core import registry

    numba.config.CPU_NAME = spec.cpu_name
    numba.config.CPU_FEATURES = spec.cpu_features
    context = registry.cpu_target.__dict__.get("_toplevel_target_context")
    if context is not None and context.codegen()._get_host_cpu_name() != spec.cpu_name:
        raise IsaError(f"{ENV_VAR}={spec.name} must be set before anything is compiled with Numba in this "
                       f"process (set it in the environment, or import vitnp first)")


ISA, FORCED = _choose()
SPEC = SPECS[ISA]
if FORCED:
    _retarget_numba(SPEC)


def has(feature: str) -> bool:
    """Whether code generated in this process may use an LLVM CPU feature ("avx512vnni", "avx512bf16",
    "avxvnni", ...): the host's features, or under a forced narrower ISA only those of its CPU class."""
    if FORCED:
        return f"+{feature}" in SPEC.cpu_features.split(",")
    return feature in _host_features_once()


_host_cache = []


def _host_features_once() -> set:
    if not _host_cache:
        _host_cache.append(host_features())
    return _host_cache[0]


def cpu_model() -> str:
    """The CPU's marketing name ("AMD EPYC 9B45", "Intel(R) Xeon(R) ..."), or LLVM's name for it."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or host_cpu_name()


def describe() -> dict:
    """What runs: the ISA, why, and the CPU Numba generates code for."""
    import numba

    return {"isa": ISA, "forced": bool(os.environ.get(ENV_VAR, "").strip()) and
            os.environ.get(ENV_VAR, "").strip().lower() != "auto",
            "host_isa": host_isa(), "cpu_model": cpu_model(), "host_cpu": host_cpu_name(),
            "codegen_cpu": numba.config.CPU_NAME or host_cpu_name(),
            "gemm_tile": f"{SPEC.gemm_mr}x{SPEC.gemm_nr}", "vector_lanes": SPEC.lanes}
