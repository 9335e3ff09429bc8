"""ONNX Runtime limited to its AVX2 kernels on an AVX-512 machine, for like-for-like `--isa avx2` runs.

ONNX Runtime's kernel library (MLAS) picks its kernels once, from the CPUID instruction, when it loads
(`MLAS_PLATFORM::MLAS_PLATFORM` in onnxruntime/core/mlas/lib/platform.cpp), and reads no environment variable.
The Linux kernel can hide CPUID bits from a process only through CPUID faulting, which virtual machines such as
ours lack (`arch_prctl(ARCH_SET_CPUID, 0)` fails with ENODEV).  So this module copies the installed onnxruntime
package into the benchmark cache and changes two instructions in the copy's Python extension, the conditional
jumps that skip MLAS's set-up of
  * its AVX-512 kernels when CPUID.(EAX=7):EBX bit 16 (AVX512F) is clear, and
  * its AVX-VNNI int8 kernels (256-bit VNNI, which Zen 5 and Alder Lake have and AVX2 CPUs such as Zen 3
    and Skylake lack) when CPUID.(EAX=7,ECX=1):EAX bit 4 is clear;
both become unconditional.  MLAS then keeps the AVX2/FMA3 kernels it chose just before, exactly as on an AVX2 CPU.
The installed package is never touched.

Each jump is found by its instruction bytes: `test $0x10000, <reg>; je <skip>` followed within a few bytes by
`test $0xe0, %al` (the XCR0 check that the OS saves AVX-512 state), and `mov $7, %eax; mov $1, %ecx; cpuid;
test $0x10, %al; je <skip>`.  A build where either is not found exactly once is refused with a message rather
than guessed at.

`mlas_vector_width()` checks the result from the outside: MLAS's NCHWc block size is the number of float lanes
of the kernels it chose (16 for AVX-512, 8 for AVX2), and ONNX Runtime writes it into the weights of a
convolution it optimises.

`path_entries(isa)` is what a script hands to common.reexec_without_blas_overrides so that its `--isa avx2` child
imports the copy; `mlas_summary()` is what it records about the ONNX Runtime it imports.

    python benchmarks/ort_isa.py          # build (or reuse) the AVX2 copy and print both libraries' widths
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

LIMITED = ("avx2",)  # the ISAs this module can limit ONNX Runtime to

# test $0x10000, r32 (REX.B optional; ModRM 0xc0-0xc7 = register direct, /0) ; je rel8 | je rel32 ;
# then, within 12 bytes, test $0xe0, %al
_AVX512F_BRANCH = re.compile(rb"\x41?\xf7[\xc0-\xc7]\x00\x00\x01\x00(\x74.|\x0f\x84....).{0,12}?\xa8\xe0", re.S)
# mov $7, %eax ; mov $1, %ecx ; cpuid ; test $0x10, %al ; je rel8 | je rel32
_AVXVNNI_BRANCH = re.compile(rb"\xb8\x07\x00\x00\x00\xb9\x01\x00\x00\x00\x0f\xa2\xa8\x10(\x74.|\x0f\x84....)", re.S)
_BRANCHES = {"AVX512F": _AVX512F_BRANCH, "AVX-VNNI": _AVXVNNI_BRANCH}
_READY = ".vitnp-patched"


class OrtPatchError(RuntimeError):
    pass


def installed_package() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not spec.origin:
        raise OrtPatchError("onnxruntime is not installed (pip install -e '.[bench]')")
    return Path(spec.origin).parent


def _extension(package: Path) -> Path:
    found = sorted((package / "capi").glob("onnxruntime_pybind11_state*.so"))
    if len(found) != 1:
        raise OrtPatchError(f"expected one onnxruntime_pybind11_state*.so in {package / 'capi'}, found {len(found)}")
    return found[0]


def patch_branches(data: bytearray) -> dict[str, int]:
    """Make MLAS's AVX512F and AVX-VNNI branches always skip; returns the file offset of each changed jump.
    Nothing is changed unless both are found exactly once."""
    jumps = {}
    for feature, pattern in _BRANCHES.items():
        matches = list(pattern.finditer(data))
        if len(matches) != 1:
            raise OrtPatchError(f"found the {feature} check {len(matches)} times in ONNX Runtime's extension "
                                f"(expected once): this onnxruntime build cannot be limited to AVX2 here")
        jumps[feature] = matches[0].start(1)
    for jump in jumps.values():
        if data[jump] == 0x74:                      # je rel8 -> jmp rel8
            data[jump] = 0xEB
        else:                                       # je rel32 (0f 84 rel32) -> nop; jmp rel32, same end address
            data[jump:jump + 2] = b"\x90\xe9"
    return jumps


def avx2_copy(cache_dir: Path) -> Path:
    """A directory to put first on sys.path: it holds an `onnxruntime` package whose MLAS uses AVX2 at most
    (no AVX-512, no AVX-VNNI).

    Built once per onnxruntime version under cache_dir.
    """
    from importlib.metadata import version

    source = installed_package()
    root = cache_dir / f"onnxruntime-{version('onnxruntime')}-avx2"
    if (root / _READY).exists():
        return root
    staging = root.with_name(root.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging / "onnxruntime", ignore=shutil.ignore_patterns("__pycache__"))
    extension = _extension(staging / "onnxruntime")
    data = bytearray(extension.read_bytes())
    jumps = patch_branches(data)
    extension.write_bytes(bytes(data))
    (staging / _READY).write_text("".join(f"{feature} branch made unconditional at file offset {offset:#x} of "
                                          f"{extension.name}\n" for feature, offset in jumps.items()))
    shutil.rmtree(root, ignore_errors=True)
    staging.rename(root)
    return root


_WIDTH_PROBE = r"""
import tempfile, os, onnx, onnxruntime as ort
from onnx import helper, numpy_helper, TensorProto
import numpy as np
w = np.zeros((8, 8, 3, 3), np.float32)
graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "probe",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16, 16])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 16, 16])], [numpy_helper.from_array(w, "w")])
opts = ort.SessionOptions()
opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
opts.log_severity_level = 3
with tempfile.TemporaryDirectory() as tmp:
    opts.optimized_model_filepath = os.path.join(tmp, "optimised.onnx")
    ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString(),
                         opts, providers=["CPUExecutionProvider"])
    reordered = [list(t.dims) for t in onnx.load(opts.optimized_model_filepath).graph.initializer]
print(os.path.dirname(ort.__file__))
print(max(dims[0] for dims in reordered))
"""


def mlas_vector_width(path_entry: Path | None = None) -> tuple[int, str]:
    """(float lanes of the kernels MLAS chose, the onnxruntime package it came from), in a child process with
    path_entry first on sys.path.  The lanes are MLAS's NCHWc block size: 16 with AVX-512, 8 with AVX2/AVX."""
    env = dict(os.environ)
    if path_entry is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(path_entry), env.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, "-c", _WIDTH_PROBE], env=env, capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise OrtPatchError(f"probing ONNX Runtime's kernel width failed:\n{out.stderr.strip()[-2000:]}")
    package, lanes = out.stdout.split()[-2:]
    return int(lanes), package


def path_entries(isa: str) -> list[Path]:
    """Directories to put first on an `--isa` child's sys.path: the AVX2 copy for avx2 (built here, once), else
    none.  Exits with a message when this onnxruntime build cannot be patched."""
    if isa not in LIMITED or not common.package_version("onnxruntime"):
        return []
    try:
        copy = avx2_copy(common.default_cache_dir())
    except OrtPatchError as exc:
        sys.exit(f"error: {exc}")
    print(f"[bench] ONNX Runtime limited to AVX2: {copy}", flush=True)
    return [copy]


def mlas_summary() -> dict | None:
    """Which onnxruntime this process's children import and how wide its MLAS kernels are (None without ORT)."""
    if not common.package_version("onnxruntime"):
        return None
    try:
        lanes, package = mlas_vector_width()
    except (OrtPatchError, OSError, subprocess.SubprocessError) as exc:
        return {"error": str(exc)}
    return {"package": package, "float_lanes": lanes,
            "isa": {16: "avx512", 8: "avx2 or avx"}.get(lanes, "sse or other")}


def main() -> int:
    try:
        copy = avx2_copy(common.default_cache_dir())
        for label, entry in (("installed", None), ("AVX2 copy", copy)):
            lanes, package = mlas_vector_width(entry)
            print(f"{label}: {package}: MLAS kernels use {lanes} float lanes "
                  f"({'AVX-512' if lanes == 16 else 'AVX2/AVX' if lanes == 8 else 'SSE or other'})")
    except OrtPatchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
