"""On-disk memory of the "auto" backend's per-shape decisions, so only a machine's first process pays the timing.

A float32 layer's decision (Numba or BLAS) is filed under its shape "rows x K x N"; a reduced-precision layer's
(its own kernel or float32) under "kind:rows x K x N", kind naming the int8 / bf16 kernel it races.

A decision is valid only for the machine and set-up it was measured on, so it is filed under a key naming the CPU,
the ISA the kernels were built for, the thread count, the BLAS build numpy uses and the pool-wait settings. The file lives in the kernels' cache
directory (cachedir.cache_root()); delete it to time again. Any I/O problem just means timing
again: the store is an optimisation, never a failure.
"""
import json
import os
import tempfile
import threading

from . import cachedir

FILE_NAME = "gemm-auto.json"
# Read by the thread pools when they start: they decide how long idle workers spin, which the timings include.
_POOL_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OPENBLAS_THREAD_TIMEOUT", "OPENBLAS_CORETYPE")
_lock = threading.Lock()
_memo = {}


def cache_path():
    return os.path.join(cachedir.cache_root(), FILE_NAME)


def machine_key(threads, isa):
    if "key" not in _memo:
        from threadpoolctl import threadpool_info

        cpu = ""
        try:
            with open("/proc/cpuinfo") as f:
                cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
        except OSError:
            pass
        import numpy

        # numpy's own BLAS only (the one np.matmul calls): other libraries may load theirs at any time (Numba
        # imports SciPy's while it sets up), which must not change the key between runs.
        pools = [i for i in threadpool_info() if i.get("user_api") == "blas"]
        # numpy wheels keep their BLAS in numpy.libs/ (or inside the package); a system numpy links its own.
        own = [i for i in pools if os.path.basename(os.path.dirname(i.get("filepath") or "")).startswith("numpy")
               or (i.get("filepath") or "").startswith(os.path.dirname(numpy.__file__))]
        blas = sorted(f"{i.get('internal_api')}-{i.get('version')}-{i.get('architecture')}"
                      for i in (own or pools))
        _memo["key"] = f"{cpu}|{os.cpu_count()} cpus|{','.join(blas)}"
    waits = ",".join(f"{name}={os.environ.get(name, '')}" for name in _POOL_SETTINGS)
    return f"{_memo['key']}|isa={isa}|threads={threads}|{waits}"


def _shape_key(shape):
    """(rows, K, N) -> "RxKxN"; (kind, rows, K, N) -> "kind:RxKxN"."""
    if isinstance(shape[0], str):
        return f"{shape[0]}:" + "x".join(map(str, shape[1:]))
    return "x".join(map(str, shape))


def _read():
    """The stored decisions; re-read only when the file changed (a model's ~50 layers each ask at load)."""
    path = cache_path()
    try:
        stamp = os.stat(path)
        stamp = (path, stamp.st_mtime_ns, stamp.st_size)
        if _memo.get("stamp") == stamp:
            return _memo["data"]
        with open(path) as f:
            data = json.load(f)
        data = data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}
    _memo["stamp"], _memo["data"] = stamp, data
    return data


def choices_for(machine, k, n):
    """The set of float32 backends stored for this machine and any (rows, k, n)."""
    suffix = f"x{k}x{n}"
    return {entry.get("backend") for shape, entry in _read().get(machine, {}).items()
            if shape.endswith(suffix) and shape.count("x") == 2 and ":" not in shape and isinstance(entry, dict)}


def load(machine, shape, choices):
    """(choice, {candidate: seconds}) stored for this machine and shape (see _shape_key), or None; a stored
    choice not among `choices` counts as none."""
    entry = _read().get(machine, {}).get(_shape_key(shape))
    if not isinstance(entry, dict) or entry.get("backend") not in choices:
        return None
    timings = entry.get("seconds") if isinstance(entry.get("seconds"), dict) else {}
    return entry["backend"], timings


def save(machine, shape, choice, timings):
    with _lock:
        data = json.loads(json.dumps(_read()))  # a private copy: the memo is shared
        data.setdefault(machine, {})[_shape_key(shape)] = {"backend": choice, "seconds": timings}
        path = cache_path()
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, path)  # atomic: concurrent processes never read a half-written file
        except OSError:
            pass
