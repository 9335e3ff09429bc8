"""The reduced-precision GEMM call: out (=|+=) epilogue(dequant(A_q @ B_q) + bias), epilogue "none" | "gelu" |
"add".  Prepares A in the weight kind's format, cuts the output into tasks and runs them in parallel."""
from __future__ import annotations

import threading

import numpy as np
from numba import get_num_threads, njit, types
from numba.extending import intrinsic

from .. import parallel
from .._aligned import aligned_empty
from ..elementwise import gelu_inplace_serial
from ..tiling import cdiv, task_bounds, task_count
from . import tiles
from .codegen import MR, NR, micro_rows
from .kinds import A_DTYPE, AMX_KINDS, INT8_KINDS, KIND, padded_k
from .pack import PackedWeight
from .quantize import bf16_rows, bf16_rows_serial, copy_rows, quantize_rows, quantize_rows_serial

EPILOGUES = {"none": 0, "gelu": 1, "add": 2}
A_BLOCK_BYTES = 192 * 1024   # rows of quantised A per block: the block stays in L2 while all column panels pass
TASKS_PER_WORKER = 4  # enough tasks that a stalled worker's share is picked up by the others
# Activations up to this many elements are prepared on the calling thread: one vectorised pass over a
# (197, 3072) activation takes ~80 us, while starting and joining a parallel region costs 10-100 us on an idle
# machine and ~1 ms when other processes share the cores (measured), and a ViT-B forward has 48 of them.
SERIAL_PREPARE_MAX = 1 << 20


@intrinsic
def _fetch_add(typingctx, counter, value):
    """Atomically counter[0] += value; returns the old value."""
    if not (isinstance(counter, types.Array) and counter.dtype == types.int64 and value == types.int64):
        return None

    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        return builder.atomic_rmw("add", data, args[1], "monotonic")
    return types.int64(counter, value), codegen


@njit(cache=True, inline="always")
def _claim_block(counter, rows_total, c_begin, c_end, task_rows, task_cols):
    """The next task's output block (r0, r1, c0, c1), handed out through the atomic counter (r0 = -1 when
    none is left): a worker that the OS deschedules (other processes on the cores) delays one task, not a
    fixed share of the GEMM."""
    task = _fetch_add(counter, 1)
    if task >= task_count(rows_total, c_end - c_begin, task_rows, task_cols):
        return -1, -1, -1, -1
    r0, r1, c0, c1 = task_bounds(task, rows_total, c_end - c_begin, task_rows, task_cols)
    return r0, r1, c0 + c_begin, c1 + c_begin


@njit(cache=True, inline="always")
def _gelu_block(c_flat, cols_total, r0, r1, c0, c1):
    for i in range(r0, r1):
        gelu_inplace_serial(c_flat[i * cols_total + c0:i * cols_total + c1])


@njit(cache=True)
def _qgemm_task(worker, workers, a, lda, groups, b, group, c, rows_total, cols_total, rscale, rzp, cscale, colsum,
                bias, epilogue, task_rows, task_cols, counter, c_begin, c_end):
    """One worker's part (parallel.run) of the tasks of task_rows x task_cols (whole micro-tiles) over output
    columns [c_begin, c_end) (c_begin a multiple of NR).  Per task: column panels outer (one B panel stays
    in L1/L2), row panels inner (the task's rows of A, at most A_BLOCK_BYTES, stay in L2); GELU on the
    task's block right after."""
    c_flat = c.reshape(-1)
    panel = groups * NR * group
    while True:
        r0, r1, c0, c1 = _claim_block(counter, rows_total, c_begin, c_end, task_rows, task_cols)
        if r0 < 0:
            break
        for col in range(c0, c1, NR):
            for row in range(r0, r1, MR):
                micro_rows(a, row * lda, lda, b, (col // NR) * panel, c_flat, row * cols_total + col, cols_total,
                           groups, min(MR, r1 - row), min(NR, c1 - col), epilogue == 2, rscale, rzp, row, cscale,
                           colsum, bias, col)
        if epilogue == 1:
            _gelu_block(c_flat, cols_total, r0, r1, c0, c1)


@njit(cache=True)
def _amx_task(worker, workers, a, lda, groups, b, group, c, rows_total, cols_total, rscale, rzp, cscale, colsum,
              bias, epilogue, task_rows, task_cols, counter, c_begin, c_end):
    """_qgemm_task for the AMX kinds (tiles.py): blocks of tiles.MR rows, the tile configuration loaded once
    per task and the tiles released after it."""
    c_flat = c.reshape(-1)
    panel = groups * NR * group
    while True:
        r0, r1, c0, c1 = _claim_block(counter, rows_total, c_begin, c_end, task_rows, task_cols)
        if r0 < 0:
            break
        tiles.configure()
        for col in range(c0, c1, NR):
            for row in range(r0, r1, tiles.MR):
                rows = min(tiles.MR, r1 - row)
                cols = min(NR, c1 - col)
                b_off = (col // NR) * panel
                if rows > tiles.TILE_ROWS:
                    tiles.tile_kernel(a, row * lda, lda, b, b_off, c_flat, row * cols_total + col, cols_total, groups,
                                      rows, cols, epilogue == 2, rscale, rzp, row, cscale, colsum, bias, col)
                else:
                    tiles.tile_kernel_short(a, row * lda, lda, b, b_off, c_flat, row * cols_total + col, cols_total,
                                            groups, rows, cols, epilogue == 2, rscale, rzp, row, cscale, colsum, bias,
                                            col)
        tiles.release()
        if epilogue == 1:
            _gelu_block(c_flat, cols_total, r0, r1, c0, c1)


def kernels_for(precision: str) -> tuple:
    """The dispatchers whose compiled presence shows this precision's GEMM is ready: the int8 and bf16
    GEMMs share one driver (with different operand types), so each one's activation-preparing kernel
    tells them apart."""
    if precision not in KIND:
        raise ValueError(f"precision must be int8 or bf16, got {precision!r}")
    tasks = _amx_task if KIND[precision] in AMX_KINDS.values() else _qgemm_task
    if precision == "int8":
        return (tasks, quantize_rows)
    return (tasks, copy_rows if KIND[precision] == "widen" else bf16_rows)


_local = threading.local()


def _scratch(name, rows, cols, dtype):
    """Grow-only per-thread buffer (rows, cols) of dtype, 64-byte aligned."""
    key = (name, np.dtype(dtype).str)
    bufs = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = {}
    buf = bufs.get(key)
    if buf is None or buf.size < rows * cols:
        buf = bufs[key] = aligned_empty(1, rows * cols, dtype)[0]
    return buf[:rows * cols].reshape(rows, cols)


def plan(rows, cols, row_bytes, workers, mr=MR):
    """(task_rows, task_cols): row blocks whose A slab fits A_BLOCK_BYTES, columns cut so that there are
    about TASKS_PER_WORKER tasks per worker (whole micro-tiles of mr rows, at least two column panels each)."""
    block = max(mr, (A_BLOCK_BYTES // max(1, row_bytes)) // mr * mr)
    task_rows = min(block, cdiv(rows, mr) * mr)
    row_tasks = cdiv(rows, task_rows)
    panels = cdiv(cols, NR)
    col_tasks = max(1, min(cdiv(panels, 2), cdiv(TASKS_PER_WORKER * workers, row_tasks))) if workers > 1 else 1
    return task_rows, cdiv(panels, col_tasks) * NR


_NO_ROW_TERMS = np.zeros(1, np.float32), np.zeros(1, np.int32)  # the bf16 kinds have no row scales


def row_block(kind) -> int:
    """Rows per micro-kernel call of `kind`: A's rows are padded to a multiple of it."""
    return tiles.MR if kind in AMX_KINDS.values() else MR


def prepare_a(x, kind):
    """x (M, K) float32 -> (A operand with rows padded to row_block(kind) and K to kinds.K_ALIGN, row scales,
    zero points)."""
    rows, k = x.shape
    mr = row_block(kind)
    rows_pad = cdiv(max(rows, 1), mr) * mr
    kp = padded_k(kind, k)
    a = _scratch("a", rows_pad, kp, A_DTYPE[kind])
    serial = rows_pad * kp <= SERIAL_PREPARE_MAX
    if kind in INT8_KINDS:
        scale = _scratch("scale", 1, rows_pad, np.float32)[0]
        zp = _scratch("zp", 1, rows_pad, np.int32)[0]
        (quantize_rows_serial if serial else quantize_rows)(x, a, scale, zp, kind == "madd")
        return a, scale, zp
    if kind == "widen":
        copy_rows(x, a)
    else:
        (bf16_rows_serial if serial else bf16_rows)(x, a)
    return (a, *_NO_ROW_TERMS)


def qgemm(x, weight: PackedWeight, out, epilogue="none", columns=None):
    """out (=|+=) epilogue(x @ W^T + bias) with a reduced-precision weight (x, out float32 C-contiguous);
    columns=(start, stop), start a multiple of NR: only out[:, start:stop] is computed."""
    rows, k = x.shape
    n = weight.out_features
    c_begin, c_end = (0, n) if columns is None else columns
    if rows == 0 or c_end == c_begin:
        return
    a, rscale, rzp = prepare_a(x, weight.kind)
    lda = a.shape[1]
    workers = get_num_threads()
    task_rows, task_cols = plan(rows, c_end - c_begin, lda * a.itemsize, workers, row_block(weight.kind))
    counter = _scratch("counter", 1, 1, np.int64)[0]
    counter[0] = 0
    task = _amx_task if weight.kind in AMX_KINDS.values() else _qgemm_task
    parallel.run(task, workers, a.reshape(-1), lda, weight.groups, weight.packed, weight.group, out, rows, n, rscale,
                 rzp, weight.cscale, weight.colsum, weight.bias, EPILOGUES[epilogue], task_rows, task_cols, counter,
                 c_begin, c_end)
