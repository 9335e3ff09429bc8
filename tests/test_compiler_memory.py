"""LLVM's code pages are unmapped once a model's kernels are in the process (kernels.compiler_memory): only pages
that hold the file's own bytes, never one the process wrote; the model still computes transformers' logits after
it, and a later compile maps LLVM back and works."""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

from vitnp.kernels.compiler_memory import unmap_file_pages

PAGE = mmap.PAGESIZE
pytestmark = pytest.mark.skipif(not os.path.exists("/proc/self/pagemap"), reason="Linux page map only")


def resident_pages(mapping: mmap.mmap, pages: int) -> list[bool]:
    """Whether each page of `mapping` is mapped into this process (present in its page map)."""
    address = np.frombuffer(mapping, np.uint8).ctypes.data
    with open("/proc/self/pagemap", "rb", buffering=0) as pagemap:
        pagemap.seek(address // PAGE * 8)
        entries = np.frombuffer(pagemap.read(pages * 8), np.uint64)
    return [bool(e >> np.uint64(63)) for e in entries]


def test_only_the_files_own_pages_are_unmapped_and_written_pages_keep_their_bytes(tmp_path):
    path = tmp_path / "library.bin"
    contents = bytes(range(256)) * (4 * PAGE // 256)  # four pages
    path.write_bytes(contents)
    with open(path, "r+b") as f:
        mapping = mmap.mmap(f.fileno(), len(contents), flags=mmap.MAP_PRIVATE)
    try:
        assert mapping[:] == contents  # every page read, so mapped
        mapping[PAGE + 10:PAGE + 15] = b"WRITE"  # page 1 becomes the process's own copy
        assert all(resident_pages(mapping, 4))

        released = unmap_file_pages(path)

        assert released >= 3 * PAGE
        assert resident_pages(mapping, 4) == [False, True, False, False]
        expected = bytearray(contents)
        expected[PAGE + 10:PAGE + 15] = b"WRITE"
        assert mapping[:] == bytes(expected)  # the written page kept its bytes, the others read back the file's
        assert path.read_bytes() == contents  # a private mapping never writes the file
    finally:
        mapping.close()


def test_unmapping_a_file_that_is_not_mapped_releases_nothing(tmp_path):
    path = tmp_path / "unmapped.bin"
    path.write_bytes(b"x" * PAGE)
    assert unmap_file_pages(path) == 0


# Loads a model (which unmaps LLVM's pages once its kernels are in), reports how much of LLVM's library is still
# mapped, the model's logits, and whether a function compiled afterwards (LLVM mapped back on demand) is right.
AFTER_LOAD = r"""
import json, sys
import numpy as np
import vitnp
from vitnp.kernels.compiler_memory import compiler_library

def llvm_resident_mb():
    library, total, current = compiler_library(), 0, None
    for line in open("/proc/self/smaps"):
        fields = line.split()
        if "-" in fields[0] and not fields[0].endswith(":"):
            current = fields[5] if len(fields) > 5 else None
        elif fields[0] == "Rss:" and current == library:
            total += int(fields[1])
    return total / 1024

import numba
numba.njit(lambda x: x + 1)(1)  # Numba's code generator at work, as on any first call
before = llvm_resident_mb()
clf = vitnp.load(sys.argv[1], progress=False)
after = llvm_resident_mb()
pixels = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
logits = clf.logits(pixels)
compiled_later = numba.njit(lambda a: (a * 2.0).sum())(np.arange(10.0))
print(json.dumps({"before_mb": before, "after_mb": after, "logits": logits.tolist(),
                  "compiled_later": compiled_later}))
"""


def test_loading_a_model_unmaps_llvm_and_the_model_still_matches_transformers(tiny_vit, tmp_path):
    script = tmp_path / "after_load.py"
    script.write_text(AFTER_LOAD)
    done = subprocess.run([sys.executable, str(script), str(tiny_vit)], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "VITNP_CACHE_DIR": str(tmp_path / "cache")})
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["before_mb"] > 20, "LLVM's library was barely mapped to begin with: nothing to measure"
    assert result["after_mb"] < result["before_mb"] / 4
    assert result["compiled_later"] == 90.0

    pixels = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    model = transformers.AutoModelForImageClassification.from_pretrained(tiny_vit).eval()
    with torch.no_grad():
        expected = model(pixel_values=torch.from_numpy(pixels)).logits.numpy()
    np.testing.assert_allclose(np.array(result["logits"], np.float32), expected, atol=1e-4, rtol=0)
