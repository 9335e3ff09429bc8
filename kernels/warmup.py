"""Compile the kernels a model needs before it runs, in parallel processes when they are not cached yet.

Numba compiles one function at a time under a global lock, and a cold start is almost all LLVM time spent on a
handful of big parallel kernels (the GEMM driver, attention).  Each compiled kernel lands in Numba's on-disk
cache, keyed by source file, signature and target CPU, so on a first run the kernel groups are compiled by
worker processes side by side (one per core) and the calling process then only loads them from disk.  Warm
runs do not start any process: `cold_groups` reads the cache index files to see what is missing.

A group is compiled by calling its kernels on tiny arrays of the same types the real calls use (float32,
C-contiguous; read-only where the weights come straight from the checkpoint's memory map), which produces
exactly the signatures that later calls look up.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

_log = logging.getLogger("vitnp")
GROUPS = ("gemm", "attention", "layernorm", "blas_epilogues", "int8", "bf16")
# The groups a layer's GEMM runs: a float32 Linear by its backend ("auto" may run either, and re-lays a weight
# out between them), a QLinear by its precision.
LINEAR_GROUPS = {"numba": ("gemm",), "blas": ("blas_epilogues",), "auto": ("gemm", "blas_epilogues")}
QLINEAR_GROUPS = {"int8": ("int8",), "bf16": ("bf16",)}


def _rand(*shape):
    return np.random.default_rng(0).standard_normal(shape, dtype=np.float32)


def _warm_gemm():
    from .linear import Linear

    x = _rand(5, 24)
    layer = Linear(_rand(40, 24), _rand(40), backend="numba")
    unbiased = Linear(_rand(40, 24), None, backend="numba")
    for epilogue in ("none", "gelu", "add"):
        layer(x, np.zeros((5, 40), np.float32), epilogue)
        unbiased(x, np.zeros((5, 40), np.float32), epilogue)
    # A (K, N) weight is packed from that layout: an auto layer that went BLAS when Numba is chosen for
    # another batch size, and a float16 weight.
    from . import gemm

    gemm.pack_weight(_rand(24, 40))


def _warm_reduced(precision):
    from . import qgemm
    from .qlinear import QLinear

    def mapped(rows):  # weights come from the checkpoint's read-only memory map
        w = _rand(rows, 24)
        w.setflags(write=False)
        return w

    layers = [QLinear(mapped(16), _rand(16), precision=precision),
              QLinear([mapped(16), mapped(16), mapped(16)], _rand(48), precision=precision)]  # fused q|k|v
    for rows in (5, qgemm.SERIAL_PREPARE_MAX // 24 + 16):  # activations prepared serially, and in parallel
        x = _rand(rows, 24)
        for layer in layers:
            for epilogue in ("none", "gelu", "add"):
                layer(x, np.zeros((rows, layer.out_features), np.float32), epilogue)
    # the unpacker: the auto backend's layers move to float32 where that is faster on this CPU
    qgemm.unpack(layers[0].packed)


def _warm_blas_epilogues():
    from . import gemm
    from .linear import Linear

    x = _rand(5, 24)
    layer = Linear(_rand(40, 24), _rand(40), backend="blas")
    for epilogue in ("none", "gelu", "add"):
        layer(x, np.zeros((5, 40), np.float32), epilogue)
    gemm.unpack_weight(gemm.panel_buffer(24, 40)[1], 24, 40)  # compiles the unpacker (contents immaterial)


def _warm_attention():
    from .mha import attention

    attention(_rand(1, 5, 3 * 8), np.empty((1, 5, 8), np.float32), 2)


def _warm_layernorm():
    from .elementwise import layernorm

    layernorm(_rand(3, 8), _rand(8), _rand(8), 1e-6, np.empty((3, 8), np.float32))


_WARMERS = {"gemm": _warm_gemm, "attention": _warm_attention, "layernorm": _warm_layernorm,
            "blas_epilogues": _warm_blas_epilogues, "int8": lambda: _warm_reduced("int8"),
            "bf16": lambda: _warm_reduced("bf16")}


def _dispatchers(group):
    from . import elementwise, gemm, mha

    if group in ("int8", "bf16"):
        from . import qgemm

        return qgemm.kernels_for(group)
    return {"gemm": gemm.FLOAT32_KERNELS, "attention": mha.KERNELS, "layernorm": elementwise.LAYERNORM_KERNELS,
            # auto packs at load and unpacks a layer whose decision is BLAS: the BLAS path's kernels too
            "blas_epilogues": gemm.BLAS_EPILOGUE_KERNELS}[group]


def _cached_for_this_cpu(dispatcher) -> bool:
    """Whether Numba's disk cache holds machine code of this function for the CPU and features this process
    generates code for (any signature: each group has one)."""
    from numba.core.registry import cpu_target

    cache = getattr(dispatcher, "_cache", None)
    if cache is None or not hasattr(cache, "_cache_file"):
        return False
    try:
        index = cache._cache_file._load_index()
    except Exception:  # an unreadable index is a cold cache, never an error
        return False
    magic = cpu_target.target_context.codegen().magic_tuple()
    return any(isinstance(key, tuple) and len(key) > 1 and key[1] == magic for key in index)


def cold_groups(groups=GROUPS) -> list[str]:
    """The groups whose kernels are neither compiled in this process nor in the disk cache for this CPU."""
    cold = []
    for group in groups:
        for dispatcher in _dispatchers(group):
            if not dispatcher.overloads and not _cached_for_this_cpu(dispatcher):
                cold.append(group)
                break
    return cold


# CPU seconds of each group's cold compile (Zen 5, AVX-512; AVX2 within 10%), to split the groups evenly
# between processes.
_COST = {"gemm": 3.2, "attention": 2.4, "layernorm": 1.0, "blas_epilogues": 1.5, "int8": 6.0, "bf16": 4.5}


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, where the OS reports one)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def compile_groups(groups, processes=None, on_done=None) -> dict:
    """Compile (or load) every kernel of `groups`.  When two or more are cold, this process compiles the
    biggest share while up to `processes` - 1 helper processes (default: one per core) compile the rest into
    the disk cache, from which this process then loads them.  on_done(group, seconds) is called as each
    cold group finishes.  Returns {group: seconds}.  What a helper fails to do (say, the cache is not
    writable) is simply done here afterwards.

    Helpers are fresh interpreters importing this module as this process did (see _HELPER), not
    multiprocessing children, so a caller's unguarded script is never re-imported in them.
    """
    groups = list(groups)
    cold = sorted(cold_groups(groups), key=lambda g: -_COST[g])
    seconds = {}
    shares = [[] for _ in range(max(1, min(len(cold), processes or usable_cores())))]
    for group in cold:  # greedy: each group to the least loaded process; shares[0] is this process
        min(shares, key=lambda share: sum(_COST[g] for g in share)).append(group)
    lock = threading.Lock()

    def report(group, took):
        with lock:
            seconds[group] = took
            if on_done:
                on_done(group, took)

    def run_here(group, timed):
        start = time.perf_counter()
        _WARMERS[group]()
        if timed:
            report(group, time.perf_counter() - start)

    helper_groups = {group for share in shares[1:] for group in share}
    helpers = [helper for helper in (_start_helper(share, report) for share in shares[1:] if share) if helper]
    for group in groups:  # this process's share, and the warm groups (loaded from the cache)
        if group not in helper_groups:
            run_here(group, timed=group in cold)
    for helper in helpers:
        _finish_helper(*helper)
    for group in groups:  # load what the helpers compiled, or compile here what they could not
        if group in helper_groups:
            run_here(group, timed=group not in seconds)
    return seconds


# A helper imports this module exactly as this process did: the same sys.path (with the current directory made
# absolute), not `python -m`'s, which puts the working directory first, where a source checkout's vitnp/
# (without its kernels, which are installed from another directory) would shadow the installed package.  It runs
# only these kernels, none of which uses np.linalg, so it skips Numba's import of SciPy's BLAS wrappers for it.
_HELPER = ("import importlib, json, sys; sys.path[:] = json.loads(sys.argv[1]); "
           "sys.modules.setdefault('scipy.linalg', None); "
           "sys.exit(importlib.import_module(sys.argv[2]).main(sys.argv[3:]))")


def _start_helper(share, report):
    from . import cachedir
    from .threads import get_num_threads

    # The helper writes where this process reads: its cache root (this process's own when the user's is not
    # writable).
    env = {**os.environ, cachedir.ENV_VAR: cachedir.root_in_use()}
    path = json.dumps([os.path.abspath(entry) if entry in ("", ".") else entry for entry in sys.path])
    errors = tempfile.TemporaryFile("w+")  # a file: a chatty helper can never block on a full pipe
    try:
        process = subprocess.Popen([sys.executable, "-c", _HELPER, path, __name__, "--threads",
                                    str(get_num_threads()), *share], stdout=subprocess.PIPE, stderr=errors,
                                   stdin=subprocess.DEVNULL, env=env, text=True)
    except OSError as e:
        errors.close()
        _log.warning("vitnp: could not start a kernel-compiling helper process (%s); compiling here", e)
        return None

    def read():
        for line in process.stdout:
            parts = line.split()
            if len(parts) == 3 and parts[0] == "compiled" and parts[1] in _WARMERS:
                report(parts[1], float(parts[2]))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return process, reader, errors


def _finish_helper(process, reader, errors):
    """Wait for a helper; a failed one is logged (its groups are then compiled here)."""
    process.wait()
    reader.join()
    if process.returncode:
        errors.seek(0)
        last = (errors.read().strip().splitlines() or ["no message"])[-1]
        _log.warning("vitnp: a kernel-compiling helper process failed (exit code %s: %s); compiling its "
                     "groups here", process.returncode, last)
    errors.close()


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Compile kernel groups into Numba's disk cache.")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("groups", nargs="+", choices=GROUPS)
    args = parser.parse_args(argv)
    if args.threads:
        from .threads import set_num_threads

        set_num_threads(args.threads)
    for group in args.groups:
        start = time.perf_counter()
        _WARMERS[group]()
        print(f"compiled {group} {time.perf_counter() - start:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
