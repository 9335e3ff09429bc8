"""Numba single-precision GEMM with fused epilogues: out (=|+=) epilogue(x @ w_t + bias).

x (M, K) and out (M, N) are float32 C-contiguous; the weight is the (K, N) transposed nn.Linear weight,
packed once (pack_weight / pack_weight_nk) into the micro-kernel's panel layout.  Epilogues: "none"
(out = xw + b), "gelu" (out = gelu(xw + b)), "add" (out += xw + b).

Structure (one parallel region per call, one task per worker, BLIS-like inside a task):
  * The output is cut into a grid of worker tasks, along N when M < N (duplicating the cheap A reads)
    and along M otherwise (duplicating the B reads).
  * A task walks K in KC slabs; for each NR-column panel of B (L1-resident) every MR-row panel of its
    rows passes over it, A read in place from x (only a ragged last row panel is packed, zero-padded).
  * The LLVM micro-kernel accumulates an MR x NR tile in vector registers and adds it into `out`; after
    the last slab the epilogue (bias, GELU) is applied to each row panel while it is still in cache.

There is one driver, on packed weights: a (K, N) weight (gemm()) is packed per call into scratch, so a
first run compiles one parallel GEMM kernel and nothing else compiles later.
"""
import threading

import numpy as np
from numba import get_num_threads, njit

from . import _aligned, parallel
from ._aligned import aligned_empty
from ._microkernel import make_microkernel
from .elementwise import gelu_inplace_serial
from .isa import SPEC
from .tiling import cdiv, task_bounds, task_count

EPILOGUE_NONE = 0
EPILOGUE_GELU = 1
EPILOGUE_ADD = 2
EPILOGUES = {"none": EPILOGUE_NONE, "gelu": EPILOGUE_GELU, "add": EPILOGUE_ADD}

MR = SPEC.gemm_mr  # micro-tile rows and columns for this ISA (isa.py): AVX-512 12 x 32 (24 of 32 zmm
NR = SPEC.gemm_nr  # registers accumulate), AVX2 6 x 16 (12 of 16 ymm)
KC = 256     # K slab: an A sliver (MR x KC) is 6-12 KiB, an NR panel of B 16-32 KiB: both stay in L1
PANEL_OUTER_MAX_ROWS = 256  # pre-packed weight: rows per panel-outer pass (its A rows stay in L2)
LINE = 16              # float32 per cache line
PF_SHIFT_MIN = 3       # prefetch a new line at most every 8 k steps

MR_MID, MR_SMALL = SPEC.gemm_row_variants[1:]
_micro = make_microkernel(MR, NR, SPEC.lanes, prefetch_b=True)
_micro_mid = make_microkernel(MR_MID, NR, SPEC.lanes, prefetch_b=True)
_micro_small = make_microkernel(MR_SMALL, NR, SPEC.lanes, prefetch_b=True)


@njit(cache=True, fastmath=True, inline="always")
def _pack_a(x_flat, depth, r0, rows, k0, kc, a_buf):
    """a_buf[panel][p][i] = x[r0 + panel*MR + i, k0 + p], zero rows past `rows`."""
    for panel in range(cdiv(rows, MR)):
        base = panel * kc * MR
        row = r0 + panel * MR
        valid = min(MR, r0 + rows - row)
        if valid == MR:
            src = row * depth + k0
            for p in range(kc):
                for i in range(MR):
                    a_buf[base + p * MR + i] = x_flat[src + i * depth + p]
        else:
            for i in range(valid):
                src = (row + i) * depth + k0
                for p in range(kc):
                    a_buf[base + p * MR + i] = x_flat[src + p]
            for i in range(valid, MR):
                for p in range(kc):
                    a_buf[base + p * MR + i] = 0.0


@njit(cache=True, fastmath=True, inline="always")
def _micro_rows(rows, a_buf, a_off, b, b_off, ldb, out_flat, c_off, ldc, kc, accumulate, cols,
                pf_off=-1, pf_shift=63):
    """The micro-kernel for a row panel of `rows` <= MR rows: a shorter kernel for the ragged last
    panel (e.g. 197 = 16*12 + 5 rows) wastes less work on the zero padding."""
    if pf_off < 0:  # no prefetch wanted: re-touch the panel's first line (already cached)
        pf_off = b_off
    if rows > MR_MID:
        _micro(a_buf, a_off, 1, MR, b, b_off, ldb, out_flat, c_off, ldc, kc, accumulate, rows, cols,
               pf_off, pf_shift)
    elif rows > MR_SMALL:
        _micro_mid(a_buf, a_off, 1, MR, b, b_off, ldb, out_flat, c_off, ldc, kc, accumulate, rows, cols,
                   pf_off, pf_shift)
    else:
        _micro_small(a_buf, a_off, 1, MR, b, b_off, ldb, out_flat, c_off, ldc, kc, accumulate, rows, cols,
                     pf_off, pf_shift)


@njit(cache=True, fastmath=True, inline="always")
def _add_bias_serial(out_row, bias_row):
    for j in range(out_row.size):
        out_row[j] += bias_row[j]


@njit(cache=True, fastmath=True, inline="always")
def _finish_tile(out_flat, ldc, row, rows, col, cols, bias, has_bias, epilogue):
    """Bias and GELU on out[row:row+rows, col:col+cols] right after its last K slab (still in L1/L2)."""
    for i in range(rows):
        start = (row + i) * ldc + col
        segment = out_flat[start:start + cols]
        if has_bias:
            _add_bias_serial(segment, bias[col:col + cols])
        if epilogue == EPILOGUE_GELU:
            gelu_inplace_serial(segment)


@njit(cache=True, fastmath=True, inline="always")
def _run_task_panel_outer(x_flat, w_packed, bias, has_bias, out_flat, depth, cols_total, epilogue,
                          r0, r1, c0, c1, a_buf):
    """A task of few rows on a pre-packed weight, BLIS order: each B panel (KC x NR, 32 KiB) is loaded
    once and kept in L1 while all the task's row panels (A slab, L2) pass over it; the micro-kernel
    meanwhile prefetches the next panel (contiguous in the packed layout) into L2, a few lines per call
    (measured neutral in the ViT-B forward: the hardware prefetcher already follows the panel stream;
    the gain over the row-panel-outer order comes from the L1-resident B panel).

    Full MR-row panels of A are read in place from x (k contiguous within each row): with a column split
    every worker would otherwise pack all of A, which for fc2 of ViT-B (K=3072) took 0.3 of 2.7 ms.
    Only the ragged last row panel is packed (zero rows), because the micro-kernel reads all MR rows."""
    rows = r1 - r0
    row_panels = cdiv(rows, MR)
    full_row_panels = rows // MR
    ragged_rows = rows - full_row_panels * MR
    padded_cols = cdiv(cols_total, NR) * NR
    col_panels = cdiv(c1 - c0, NR)
    pf_shift = PF_SHIFT_MIN
    while (KC >> (pf_shift + 1)) * row_panels >= 2 * KC:  # sparsest prefetch whose calls still cover a panel
        pf_shift += 1
    for k0 in range(0, depth, KC):
        kc = min(KC, depth - k0)
        accumulate = k0 > 0 or epilogue == EPILOGUE_ADD
        if ragged_rows:
            _pack_a(x_flat, depth, r0 + full_row_panels * MR, ragged_rows, k0, kc, a_buf)
        slab = k0 * padded_cols
        for jp in range(col_panels):
            col = c0 + jp * NR
            cols = min(NR, c1 - col)
            b_off = slab + (col // NR) * kc * NR
            next_off = b_off + kc * NR  # next panel of this slab, or the first of the next slab
            for rp in range(row_panels):
                row = r0 + rp * MR
                pf_off = next_off + rp * (kc >> pf_shift) * LINE
                if rp < full_row_panels:  # A read in place: rows of x, k contiguous
                    _micro(x_flat, row * depth + k0, depth, 1, w_packed, b_off, NR, out_flat,
                           row * cols_total + col, cols_total, kc, accumulate, MR, cols, pf_off, pf_shift)
                else:
                    _micro_rows(ragged_rows, a_buf, 0, w_packed, b_off, NR, out_flat,
                                row * cols_total + col, cols_total, kc, accumulate, cols, pf_off, pf_shift)
    if has_bias or epilogue == EPILOGUE_GELU:
        for rp in range(row_panels):
            row = r0 + rp * MR
            _finish_tile(out_flat, cols_total, row, min(MR, r1 - row), c0, c1 - c0, bias, has_bias, epilogue)


@njit(cache=True, fastmath=True)
def _gemm_task(worker, workers, x, w_packed, bias, has_bias, out, epilogue, row_split, col_split, a_bufs, c_begin,
               c_end):
    """One worker's tasks (parallel.run) on a pack_weight() weight, for output columns [c_begin, c_end)
    (c_begin a multiple of NR: a whole panel)."""
    rows, depth = x.shape
    cols = out.shape[1]
    x_flat = x.reshape(-1)
    out_flat = out.reshape(-1)
    tasks = task_count(rows, c_end - c_begin, row_split, col_split)
    for task in range(worker, tasks, workers):
        r0, r1, c0, c1 = task_bounds(task, rows, c_end - c_begin, row_split, col_split)
        c0, c1 = c0 + c_begin, c1 + c_begin
        # Many rows: row chunks of <= PANEL_OUTER_MAX_ROWS, each the panel-outer order (its A rows stay in L2
        # while every B panel passes through L1 once); the pre-packed weight is streamed once per chunk from
        # L3 (ViT-B's largest is 9 MiB).  Chunks are whole micro-panels.
        chunks = cdiv(r1 - r0, PANEL_OUTER_MAX_ROWS)
        chunk_rows = cdiv(cdiv(r1 - r0, chunks), MR) * MR
        for q0 in range(r0, r1, chunk_rows):
            _run_task_panel_outer(x_flat, w_packed, bias, has_bias, out_flat, depth, cols, epilogue,
                                  q0, min(q0 + chunk_rows, r1), c0, c1, a_bufs[worker])


# The BLAS path's epilogues run serially on the calling thread on purpose: right after sgemm returns,
# OpenBLAS's worker threads keep spinning on the other cores for tens of milliseconds, and a parallel
# Numba region started then would share its cores with them (measured: 3x slower than serial).


@njit(cache=True, fastmath=True)
def apply_epilogue_inplace(out, bias, has_bias, epilogue, c_begin, c_end):
    """For the BLAS path: out[:, c_begin:c_end] already holds x @ w_t; add bias and apply GELU in one pass."""
    rows, cols = out.shape
    _finish_tile(out.reshape(-1), cols, 0, rows, c_begin, c_end - c_begin, bias, has_bias, epilogue)


@njit(cache=True, fastmath=True)
def _add_rows_serial(out_row, product_row, bias, has_bias):
    if has_bias:
        for j in range(out_row.size):
            out_row[j] += product_row[j] + bias[j]
    else:
        for j in range(out_row.size):
            out_row[j] += product_row[j]


@njit(cache=True, fastmath=True)
def add_product_inplace(out, product, bias, has_bias, c_begin):
    """For the BLAS path's residual epilogue: out[:, c_begin:c_begin + product.shape[1]] += product + bias."""
    c_end = c_begin + product.shape[1]
    for i in range(out.shape[0]):
        _add_rows_serial(out[i, c_begin:c_end], product[i], bias[c_begin:c_end] if has_bias else bias, has_bias)


NO_BIAS = np.zeros(1, np.float32)
_local = threading.local()


def _round_up(a, b):
    return -(-a // b) * b


def plan(rows, cols, workers):
    """(row_split, col_split): one task per worker, cutting the dimension whose duplicate packing is cheaper.

    Cutting N makes every worker pack all rows of A (rows*K extra); cutting M makes every worker read all
    of B (K*cols extra).  Each part is rounded to whole micro-tiles.
    """
    if workers <= 1:
        return rows, cols
    if rows < cols or rows < 2 * MR * workers:
        return rows, max(NR, _round_up(-(-cols // workers), NR))
    return _round_up(-(-rows // workers), MR), cols


def _finish_empty(out, bias, epilogue):
    product = np.zeros(out.shape, np.float32) if bias is None else np.broadcast_to(bias, out.shape)
    if epilogue == "add":
        out += product
    else:
        out[...] = product
        if epilogue == "gelu":
            for row in out:  # rows of a column range are contiguous; the whole may not be
                gelu_inplace_serial(row)


def _a_buffers(workers, depth):
    """Grow-only scratch for the calling Python thread: per worker, one packed MR-row panel of A per K slab."""
    size = MR * min(KC, depth)
    bufs = getattr(_local, "a_panels", None)
    if bufs is None or bufs.shape[0] != workers or bufs.shape[1] < size:
        bufs = _local.a_panels = aligned_empty(workers, size)
    return bufs


def _weight_scratch(depth, cols):
    """Grow-only buffer for the calling Python thread that a (K, N) weight is packed into by gemm()."""
    padded = cdiv(cols, NR) * NR
    buf = getattr(_local, "packed_weight", None)
    if buf is None or buf.size < depth * padded:
        buf = _local.packed_weight = aligned_empty(1, depth * padded)[0]
    return padded, buf[:depth * padded]


def gemm(x, w_t, bias, out, epilogue, columns=None):
    """out (=|+=) epilogue(x @ w_t + bias) for a (K, N) float32 C-contiguous weight (bias may be None); with
    columns=(start, stop), start a multiple of NR, only out[:, start:stop] is computed and nothing else is
    written.  The weight is packed into this thread's scratch on every call (a layer that runs the Numba GEMM
    often holds its weight packed: gemm_packed)."""
    depth, cols = w_t.shape
    if x.shape[0] and depth and cols:
        padded, packed = _weight_scratch(depth, cols)
        _pack_panels(read_only(w_t), padded, packed)
    else:
        packed = NO_BIAS  # nothing is read from it
    gemm_packed(x, packed, cols, bias, out, epilogue, columns)


def pack_weight(w_t):
    """(K, N) weight -> the micro-kernel's B layout, flat, 64-byte aligned: K is cut into the GEMM's KC
    slabs and each slab is stored as NR-column panels, each panel k row after k row (columns past N are
    zero): element (k, n) of slab s = k // KC sits at s*KC*Np + (n // NR)*kc*NR + (k % KC)*NR + n % NR,
    Np = N rounded up to NR, kc = that slab's depth.

    The micro-kernel then streams each B panel sequentially, and a worker's share of a slab is one
    contiguous run, instead of 128-byte pieces of w_t rows 3-12 KiB apart.  (Panels spanning all of K
    were tried: with K=3072 the panels start 384 KiB apart, all on the same L2 sets, and fc2 got slower.)
    """
    padded, packed = panel_buffer(*w_t.shape)
    _pack_panels(read_only(w_t), padded, packed)
    return packed


def panel_buffer(depth, cols):
    """(N rounded up to NR, a 64-byte aligned flat buffer for the packed (K, N) weight)."""
    padded = cdiv(cols, NR) * NR
    return padded, aligned_empty(1, max(1, depth * padded))[0]




@njit(cache=True)
def _pack_panels(w_t, padded, packed):
    depth, cols = w_t.shape
    packed[:] = 0.0
    for k0 in range(0, depth, KC):
        kc = min(KC, depth - k0)
        for panel in range(padded // NR):
            base = k0 * padded + panel * kc * NR
            c0 = panel * NR
            for p in range(kc):
                for j in range(min(NR, cols - c0)):
                    packed[base + p * NR + j] = w_t[k0 + p, c0 + j]


def pack_weight_nk(weight):
    """pack_weight() of weight.T, read straight from an (N, K) float32 nn.Linear weight (any
    strides, read-only memory maps included): one pass, no transposed copy, the panels split between the
    threads (a model's load is mostly this copy, and the first touch of its pages)."""
    cols, depth = weight.shape
    padded, packed = panel_buffer(depth, cols)
    parallel.run(_pack_panels_nk_task, get_num_threads(), read_only(weight), padded, packed)
    return packed


def read_only(array):
    """A read-only view of `array`: the packers only read their source, and a checkpoint's memory map is
    read-only, so every weight is passed as one (one compiled specialisation instead of two)."""
    view = array.view()
    view.setflags(write=False)
    return view


@njit(cache=True)
def _pack_panels_nk_task(worker, workers, weight, padded, packed):
    """Worker `worker`'s share of the panels (a contiguous run of them, every k slab)."""
    cols, depth = weight.shape
    panels = padded // NR
    first = panels * worker // workers
    last = panels * (worker + 1) // workers
    for k0 in range(0, depth, KC):
        kc = min(KC, depth - k0)
        for panel in range(first, last):
            base = k0 * padded + panel * kc * NR
            c0 = panel * NR
            width = min(NR, cols - c0)
            # 16 k steps at a time: one cache line of each of the panel's NR weight rows is read, and the
            # 16 x NR block written is contiguous (k by k), so both sides stay in L1.
            for p0 in range(0, kc, LINE):
                p1 = min(p0 + LINE, kc)
                for j in range(width):
                    row = weight[c0 + j]
                    for p in range(p0, p1):
                        packed[base + p * NR + j] = row[k0 + p]
            for p in range(kc):  # the last panel's columns past N
                for j in range(width, NR):
                    packed[base + p * NR + j] = 0.0


@njit(cache=True)
def _unpack_panels(packed, w_t):
    depth, cols = w_t.shape
    padded = cdiv(cols, NR) * NR
    for k0 in range(0, depth, KC):
        kc = min(KC, depth - k0)
        for panel in range(padded // NR):
            base = k0 * padded + panel * kc * NR
            c0 = panel * NR
            for p in range(kc):
                for j in range(min(NR, cols - c0)):
                    w_t[k0 + p, c0 + j] = packed[base + p * NR + j]


def unpack_weight(packed, depth, cols):
    """pack_weight's inverse: the (K, N) float32 C-contiguous weight."""
    w_t = _aligned.empty((depth, cols))
    _unpack_panels(packed, w_t)
    return w_t


def gemm_packed(x, packed, cols, bias, out, epilogue, columns=None):
    """gemm() with the weight already in pack_weight()'s panel layout (`cols` = N); columns=(start, stop)
    as in gemm(), start a multiple of NR."""
    rows, depth = x.shape
    c_begin, c_end = (0, cols) if columns is None else columns
    if c_begin % NR:
        raise ValueError(f"gemm_packed: the first column ({c_begin}) must start a {NR}-column panel")
    cols = c_end - c_begin
    if rows == 0 or cols == 0:
        return
    if depth == 0:
        _finish_empty(out[:, c_begin:c_end], None if bias is None else bias[c_begin:c_end], epilogue)
        return
    workers = get_num_threads()
    row_split, col_split = plan(rows, cols, workers)
    a_bufs = _a_buffers(workers, depth)
    has_bias = bias is not None
    parallel.run(_gemm_task, workers, x, packed, bias if has_bias else NO_BIAS, has_bias, out, EPILOGUES[epilogue],
                 row_split, col_split, a_bufs, c_begin, c_end)


# The dispatchers whose compiled presence (in this process or Numba's disk cache) shows a path is ready.
FLOAT32_KERNELS = (_gemm_task, _pack_panels, _pack_panels_nk_task)  # the pre-packed float32 GEMM
BLAS_EPILOGUE_KERNELS = (apply_epilogue_inplace, add_product_inplace, _unpack_panels)  # the BLAS path's own
