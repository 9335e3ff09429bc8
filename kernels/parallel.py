"""One parallel launcher for every multi-threaded kernel.

A kernel's parallel part is a serial *task* function, `task(worker, workers, *args)`, that does worker
`worker`'s share of the work; `run(task, workers, *args)` calls it once per worker from a prange loop.
The launcher calls the task through its address (a Numba first-class function), so the task's code is
optimised and emitted once.  Inlined into a prange loop instead, it would be compiled three times over
(the task itself, the loop's gufunc, and the function the gufunc is linked into: Numba re-optimises and
re-emits every callee in each library that links it), which doubled the cold compile of each kernel group.
"""
from __future__ import annotations

import threading

import numpy as np
from numba import njit, prange, typeof
from numba.core.types.function_type import CompileResultWAP


@njit(cache=True, parallel=True)
def _launch(task, workers, *args):
    for worker in prange(workers):
        task(np.int64(worker), np.int64(workers), *args)


_addresses: dict = {}
_addresses_lock = threading.Lock()


def _type_key(arg):
    # What Numba's type of an argument depends on, read in a microsecond (numba.typeof takes ~4).
    if isinstance(arg, np.ndarray):
        flags = arg.flags
        return arg.dtype.num, arg.ndim, flags.c_contiguous, flags.writeable, flags.aligned
    return type(arg)


def task_address(task, args):
    """The task's compiled function for these argument types (compiled, or loaded from the disk cache, on
    first use), as a first-class function value the launcher can call."""
    key = (task, tuple(_type_key(arg) for arg in args))
    address = _addresses.get(key)
    if address is None:
        from numba import types

        signature = (types.int64, types.int64, *(typeof(arg) for arg in args))
        with _addresses_lock:
            task.compile(signature)
            address = _addresses[key] = CompileResultWAP(task.overloads[signature])
    return address


def run(task, workers: int, *args) -> None:
    """task(worker, workers, *args) for worker in range(workers), one per thread."""
    _launch(task_address(task, args), workers, *args)
