"""64-byte aligned arrays: packed weights, scratch panels, score blocks.

NumPy's large allocations come from malloc/mmap at 16 bytes past a 64-byte boundary, so every zmm load
of a packed panel would straddle two cache lines.

Buffers of MAPPED_MIN_BYTES and more (every ViT-B weight) are mapped directly, page-aligned: NumPy asks Linux for
transparent huge pages on its own allocations of that size, and on the virtual machines measured (Firecracker
guests) the first touch of a huge page costs far more than that of 512 small pages (ViT-B's 344 MB of packed
weights took 1.3-2.3 s to load on huge pages, 0.8-1.1 s on small ones), while the forward pass ran no faster on
them.  A direct mapping gets small pages unless the system sets transparent huge pages to "always".
"""
import ctypes
import mmap

import numpy as np

ALIGN_BYTES = 64
MAPPED_MIN_BYTES = 1 << 22  # NumPy's huge-page threshold


def empty(shape, dtype=np.float32):
    """np.empty(shape, dtype), C-contiguous; mapped directly (page-aligned) when it is MAPPED_MIN_BYTES or more."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    if count * dtype.itemsize < MAPPED_MIN_BYTES:
        return np.empty(shape, dtype)
    # private anonymous memory, unmapped when the array (its only owner) is freed
    mapped = mmap.mmap(-1, count * dtype.itemsize, flags=mmap.MAP_PRIVATE)
    return np.frombuffer(mapped, dtype, count).reshape(shape)


def aligned_empty(rows, row_elements, dtype=np.float32):
    """(rows, row_elements') array with every row starting on a 64-byte boundary (row_elements' >=
    row_elements, rounded up to whole cache lines)."""
    dtype = np.dtype(dtype)
    per_line = ALIGN_BYTES // dtype.itemsize
    row_elements = max(per_line, -(-row_elements // per_line) * per_line)
    count = rows * row_elements
    if count * dtype.itemsize >= MAPPED_MIN_BYTES:
        return empty((rows, row_elements), dtype)
    raw = np.empty(count + per_line, dtype)
    shift = (-raw.ctypes.data % ALIGN_BYTES) // dtype.itemsize
    return raw[shift:shift + count].reshape(rows, row_elements)


def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc
    except (AttributeError, OSError, TypeError):  # no such function, or no C library to ask
        return None


_MALLOC_TRIM = _malloc_trim()


def return_freed_memory() -> bool:
    """Hand the C heap's free pages back to the OS (glibc's malloc_trim; False where there is none).  Call it after
    replacing a weight by another copy: the old copy's allocations under MAPPED_MIN_BYTES sit inside malloc's heap,
    whose free pages still count in the process's RSS (on the AVX2 build, ~48 MB after a bf16 ViT-B's layers moved
    to float32)."""
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True

