"""One parallel launcher for every kernel whose parallel body is heavy code.

Such a kernel's parallel part is a serial *task* function, `task(worker, workers, *args)`, that does worker
`worker`'s share of the work; `run(task, workers, *args)` calls it once per worker from a prange loop.
The launcher calls the task through its address, so the task's code is optimised and emitted once.
Written as a prange loop around the heavy code, it would be compiled three times over (the callee, the
loop's gufunc, and the function the gufunc is linked into: Numba re-optimises and re-emits every callee in
each library that links it), which doubled the cold compile of the GEMM and attention kernels.  Light loops
(a LayerNorm row, a chunk of GELU) keep their own prange loop: their bodies cost little to compile twice.
"""
from __future__ import annotations

import threading

import numpy as np
from numba import njit, prange, typeof, types
from numba.extending import intrinsic


@intrinsic
def _call_task(typingctx, address, *args):
    """Call the Numba-compiled function at `address` (an int64) with args, by Numba's own calling convention
    (the arguments as the callee's compiled code takes them).  Tasks return nothing and raise nothing."""
    signature = types.void(address, types.StarArgTuple.from_types(args))

    def codegen(context, builder, sig, llargs):
        callee_args = tuple(sig.args[1].types)
        values = [builder.extract_value(llargs[1], i) for i in range(len(callee_args))]
        fnty = context.call_conv.get_function_type(types.void, callee_args)
        pointer = builder.inttoptr(llargs[0], fnty.as_pointer())
        context.call_conv.call_function(builder, pointer, types.void, callee_args, values)
        return context.get_dummy_value()
    return signature, codegen


@njit(cache=True, parallel=True)
def _launch(address, workers, *args):
    for worker in prange(workers):
        _call_task(address, np.int64(worker), np.int64(workers), *args)


_addresses: dict = {}
_addresses_lock = threading.Lock()


def _type_key(arg):
    """What Numba's type of an argument depends on, read in about a microsecond (numba.typeof takes several):
    an array's dtype, dimensions, layout and flags; a scalar's class (and, for an int, whether it fits int64);
    anything else by its Numba type itself."""
    if isinstance(arg, np.ndarray):
        flags = arg.flags
        return arg.dtype, arg.ndim, flags.c_contiguous, flags.f_contiguous, flags.writeable, flags.aligned
    if type(arg) is int:
        return int, -2**63 <= arg < 2**63
    if isinstance(arg, (float, bool, np.generic)):
        return type(arg)
    return typeof(arg)


def task_address(task, args) -> int:
    """The address of the task's compiled function for these argument types (compiled, or loaded from the
    disk cache, on first use)."""
    key = (task, tuple(_type_key(arg) for arg in args))
    address = _addresses.get(key)
    if address is None:
        signature = (types.int64, types.int64, *(typeof(arg) for arg in args))
        with _addresses_lock:
            task.compile(signature)
            compiled = task.overloads[signature]
            address = _addresses[key] = compiled.library.get_pointer_to_function(compiled.fndesc.llvm_func_name)
    return address


def run(task, workers: int, *args) -> None:
    """task(worker, workers, *args) for worker in range(workers), one per thread."""
    _launch(task_address(task, args), workers, *args)
