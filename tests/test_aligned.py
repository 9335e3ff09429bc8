"""kernels._aligned: every row on a 64-byte boundary; weight-sized buffers mapped with small pages (not NumPy's
transparent-huge-page advice), and given back when dropped."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from vitnp.kernels import _aligned
from vitnp.kernels._aligned import ALIGN_BYTES, MAPPED_MIN_BYTES, aligned_empty, empty


def mapping_flags(array: np.ndarray) -> list[str] | None:
    """The VmFlags of the mapping that holds `array`'s first byte (None where /proc/self/smaps is absent)."""
    if not os.path.exists("/proc/self/smaps"):
        return None
    address, inside = array.ctypes.data, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and not fields[0].endswith(":"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                inside = start <= address < end
            elif inside and fields[0] == "VmFlags:":
                return fields[1:]
    return None


@pytest.mark.parametrize("rows, row_elements, dtype", [(3, 5, np.float32), (7, 100, np.int8), (1, 1, np.uint16),
                                                       (768, 1536, np.float32), (4, MAPPED_MIN_BYTES, np.int8)])
def test_rows_start_on_cache_lines_and_hold_what_is_written(rows, row_elements, dtype):
    array = aligned_empty(rows, row_elements, dtype)
    itemsize = np.dtype(dtype).itemsize
    assert array.dtype == dtype and array.shape[0] == rows
    assert array.shape[1] >= row_elements and (array.shape[1] * itemsize) % ALIGN_BYTES == 0
    assert array.ctypes.data % ALIGN_BYTES == 0 and array.flags.c_contiguous and array.flags.writeable
    values = (np.arange(array.size) % 97).astype(dtype).reshape(array.shape)
    array[...] = values
    np.testing.assert_array_equal(array, values)


def test_weight_sized_buffers_are_private_and_not_advised_to_huge_pages():
    size = 4 * MAPPED_MIN_BYTES // 4  # float32 elements: 4x the threshold in bytes
    ours = empty((size,))
    ours[:] = 1.0
    assert ours.shape == (size,) and ours.dtype == np.float32 and ours.ctypes.data % 4096 == 0
    flags = mapping_flags(ours)
    if flags is None:
        pytest.skip("no /proc/self/smaps on this OS")
    assert "hg" not in flags  # VM_HUGEPAGE: madvise(MADV_HUGEPAGE) was not asked for
    assert "sh" not in flags  # private memory: a fork() copies it, as NumPy's own would be


def resident_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def test_a_dropped_buffer_gives_its_memory_back():
    buffer = empty((64 << 20,), np.uint8)
    buffer[:] = 1  # every page touched
    before = resident_mb()
    del buffer
    gc.collect()
    assert before - resident_mb() > 60


@pytest.mark.skipif(_aligned._MALLOC_TRIM is None, reason="the C library has no malloc_trim (not glibc)")
def test_return_freed_memory_gives_freed_heap_pages_back(tmp_path):
    # A fresh process whose allocator this test sets up: 1 MiB chunks from the heap (mmap threshold 8 MiB), and
    # free() never shrinking the heap by itself (trim threshold 1 GiB), so freed chunks stay resident until
    # something returns them.
    script = textwrap.dedent("""
        import ctypes
        import numpy as np
        from vitnp.kernels import _aligned

        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        libc = ctypes.CDLL(None)
        assert libc.mallopt(M_MMAP_THRESHOLD, 8 << 20) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)

        def rss():
            return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) * 1024

        chunks = [np.ones(1 << 20, np.uint8) for _ in range(96)]
        held = rss()
        del chunks
        freed = rss()
        assert _aligned.return_freed_memory()
        print(held - freed, freed - rss())
    """)
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    by_free, by_trim = map(int, run.stdout.split())
    assert by_free < 16 << 20, "the chunks did not stay in the heap when freed: the test's premise failed"
    assert by_trim > 64 << 20
