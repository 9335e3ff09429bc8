"""64-byte aligned scratch arrays.

NumPy's large allocations come from malloc/mmap at 16 bytes past a 64-byte boundary, so every zmm load
of a packed panel would straddle two cache lines.  Packed panels and score blocks live in these instead.
"""
import numpy as np

ALIGN_BYTES = 64


def aligned_empty(rows, row_elements, dtype=np.float32):
    """(rows, row_elements') array with every row starting on a 64-byte boundary (row_elements' >=
    row_elements, rounded up to whole cache lines)."""
    itemsize = np.dtype(dtype).itemsize
    per_line = ALIGN_BYTES // itemsize
    row_elements = max(per_line, -(-row_elements // per_line) * per_line)
    raw = np.empty(rows * row_elements + per_line, dtype)
    shift = (-raw.ctypes.data % ALIGN_BYTES) // itemsize
    return raw[shift:shift + rows * row_elements].reshape(rows, row_elements)
