"""Give back the memory that LLVM's code holds once every kernel a model runs is in the process.

Numba's code generator is llvmlite's shared library (~180 MB on disk).  Importing Numba and then compiling or
merely loading cached kernels touches about 67 MB of its code and read-only data, and those pages stay mapped:
a sixth of a float32 ViT-B process's resident memory, though a forward pass never runs LLVM.
`release_compiler_code()` unmaps them.  They are the library file's own bytes, so they stay in the OS page cache
(shared with every other process that maps the file) and a later compile maps them back on first touch.

Only pages that still are the file's bytes are unmapped: a page of a private mapping that the process wrote (the
dynamic linker's relocated pointer tables) is the process's own copy, and discarding it would lose the writes.
The kernel's page map (/proc/self/pagemap) tells the two apart.  Linux only: elsewhere nothing is released.
"""
from __future__ import annotations

import ctypes
import logging
import os
import sys

import numpy as np

_log = logging.getLogger("vitnp")
_MADV_DONTNEED = 4
_PRESENT = np.uint64(1 << 63)
_FILE_PAGE = np.uint64(1 << 61)  # a page of the file (or shared memory), not the process's own copy


def _madvise():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise.restype = ctypes.c_int
    return libc.madvise


def unmap_file_pages(path: str | os.PathLike) -> int:
    """Unmap the resident pages of this process's private mappings of the file at `path` that hold the file's
    own bytes (never a page the process wrote).  Returns the bytes unmapped (0 where the OS offers no page map)."""
    target = os.path.realpath(path)
    page = os.sysconf("SC_PAGE_SIZE")
    released = 0
    try:
        maps = open("/proc/self/maps")
        pagemap = open("/proc/self/pagemap", "rb", buffering=0)
    except OSError:
        return 0
    with maps, pagemap:
        madvise = _madvise()
        for line in maps:
            fields = line.split(maxsplit=5)
            # address range, permissions (rwxp: p = private), offset, device, inode, path
            if len(fields) < 6 or fields[1][3] != "p" or fields[5].rstrip("\n") != target:
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            pagemap.seek(start // page * 8)
            entries = np.frombuffer(pagemap.read((end - start) // page * 8), np.uint64)
            if entries.size != (end - start) // page:
                continue
            unmappable = ((entries & _PRESENT) != 0) & ((entries & _FILE_PAGE) != 0)
            edges = np.flatnonzero(np.diff(unmappable.astype(np.int8), prepend=0, append=0))
            for first, last in zip(edges[::2].tolist(), edges[1::2].tolist()):
                if madvise(start + first * page, (last - first) * page, _MADV_DONTNEED) == 0:
                    released += (last - first) * page
    return released


def compiler_library() -> str | None:
    """The path of the LLVM library Numba compiles with, when it is loaded in this process."""
    ffi = sys.modules.get("llvmlite.binding.ffi")
    try:
        return ffi.lib._name if ffi is not None else None
    except Exception:  # llvmlite's private attribute moved: nothing to release
        return None


def release_compiler_code() -> int:
    """Unmap LLVM's code pages (see the module's docstring); call it once the kernels a model runs are compiled
    or loaded.  Returns the bytes unmapped."""
    library = compiler_library()
    released = unmap_file_pages(library) if library else 0
    _log.debug("vitnp: unmapped %.0f MB of LLVM's code (%s)", released / 2**20, library)
    return released
