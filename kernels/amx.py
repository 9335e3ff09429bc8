"""Intel AMX (Advanced Matrix Extensions): whether this process may run tile instructions.

AMX is usable for a precision when both hold:
  1. the CPU has the instructions: LLVM's host feature map has amx-tile and amx-bf16 (bf16) or amx-int8
     (int8), read through isa.has (so a forced narrower VITNP_ISA turns AMX off, like every wider feature);
  2. Linux grants this process the tile register state: arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)
     returns 0.  Without that grant the first tile instruction kills the process (SIGILL), so the request is
     made once per process, before any AMX code runs; the grant covers every thread of the process.

`status(precision)` says whether AMX is usable and, when it is not, why (reported by qgemm.kinds, which
then falls back to the AVX-512 kernels).
"""
from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass

from . import isa

SYS_ARCH_PRCTL = 158           # x86-64 syscall number
ARCH_REQ_XCOMP_PERM = 0x1023   # request permission for a dynamically enabled XSAVE feature
XFEATURE_XTILEDATA = 18        # the AMX tile data state
FEATURES = {"bf16": ("amx-tile", "amx-bf16"), "int8": ("amx-tile", "amx-int8")}  # LLVM feature names


@dataclass(frozen=True)
class Permission:
    """The answer to the tile state request: granted, or refused with the errno name and why."""
    granted: bool
    reason: str


_permission: list = []  # the one request this process makes


def request_tile_permission() -> Permission:
    """Ask Linux once per process for the AMX tile state; later calls return the first answer."""
    if not _permission:
        _permission.append(_request())
    return _permission[0]


def _request() -> Permission:
    if not isa.is_x86() or not os.uname().sysname == "Linux":
        return Permission(False, "the AMX permission request exists on x86-64 Linux only")
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        result = libc.syscall(ctypes.c_long(SYS_ARCH_PRCTL), ctypes.c_long(ARCH_REQ_XCOMP_PERM),
                              ctypes.c_long(XFEATURE_XTILEDATA))
    except (OSError, AttributeError) as exc:
        return Permission(False, f"arch_prctl could not be called: {exc}")
    if result == 0:
        return Permission(True, "arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) granted the tile state")
    code = ctypes.get_errno()
    name = errno.errorcode.get(code, str(code))
    return Permission(False, f"Linux refused the AMX tile state: arch_prctl(ARCH_REQ_XCOMP_PERM, "
                             f"XFEATURE_XTILEDATA) failed with {name} ({os.strerror(code)})")


def cpu_has(precision: str) -> bool:
    """Whether code generated in this process may use `precision`'s AMX instructions (CPU feature flags)."""
    return isa.ISA == "avx512" and isa.is_x86() and all(isa.has(f) for f in FEATURES[precision])


def status(precision: str) -> tuple[bool, str]:
    """(usable, reason) for `precision` ("bf16" or "int8") in this process; asks for the tile state (once)
    only when the CPU has the instructions."""
    if not cpu_has(precision):
        if isa.FORCED:
            return False, f"{isa.ENV_VAR}={isa.ISA} is forced, which has no AMX"
        needed = "+".join(FEATURES[precision])
        return False, f"this CPU has no AMX ({needed} missing from its feature flags)"
    permission = request_tile_permission()
    return permission.granted, permission.reason


def usable(precision: str) -> bool:
    return status(precision)[0]
