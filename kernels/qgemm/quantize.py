"""Operands in the kernels' number formats: activation rows quantised to u8 / int16 (int8 kinds) or rounded
to bfloat16 bits, and weights quantised to int8 per output channel.

int8 activations: row i is quantised asymmetrically, u = clip(rint(x / s_i) + zp_i, 0, 255) (details at
row_scale_zero_point); weights symmetrically per output channel, q = clip(rint(w / c_n), -127, 127).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .._intrinsics import maxnum_float32, minnum_float32, rint_float32

_EXACT_FAST = {"nnan", "ninf", "nsz"}  # lets LLVM vectorise min/max reductions; arithmetic stays exact


@njit(cache=True, fastmath=_EXACT_FAST)
def _row_range(x):
    lo = np.float32(0.0)
    hi = np.float32(0.0)
    for k in range(x.size):
        lo = minnum_float32(lo, x[k])
        hi = maxnum_float32(hi, x[k])
    return lo, hi


@njit(cache=True, fastmath=_EXACT_FAST)
def _quantize_into(x, inv, offset, lo, hi, q):
    """q[k] = clip(rint(x[k] * inv) + offset, lo, hi), vectorised (vroundps, vcvtps2dq, vpminsd/vpmaxsd)."""
    for k in range(x.size):
        u = np.int32(rint_float32(x[k] * inv)) + offset
        q[k] = min(max(u, lo), hi)


@njit(cache=True)
def row_scale_zero_point(x):
    """Asymmetric uint8 quantisation of one row: the range [min(x, 0), max(x, 0)] over 255 steps.
    scale = (hi - lo) / 255 (1 if the row is all zeros), zp = rint(-lo / scale) (as -lo * (1/scale)),
    u = clip(rint(x * (1/scale)) + zp, 0, 255); all in float32.  Returns (scale, 1/scale, zp)."""
    lo, hi = _row_range(x)
    scale = (hi - lo) / np.float32(255.0)
    if not scale > 0:
        scale = np.float32(1.0)
    inv = np.float32(1.0) / scale
    zp = np.int32(rint_float32(-lo * inv))
    zp = min(max(zp, np.int32(0)), np.int32(255))
    return scale, inv, zp


@njit(cache=True)
def _quantize_row_into(x, qa, scale_out, zp_out, i, kind_madd):
    """Row i of A for the integer kernels: u8 u (vnni) or int16 u - zp (madd); padding columns zero."""
    k = x.size
    scale, inv, zp = row_scale_zero_point(x)
    if kind_madd:  # clip(rint(x/s) + zp, 0, 255) - zp == clip(rint(x/s), -zp, 255 - zp)
        _quantize_into(x, inv, np.int32(0), np.int32(-zp), np.int32(255 - zp), qa[:k])
    else:
        _quantize_into(x, inv, zp, np.int32(0), np.int32(255), qa[:k])
    for j in range(k, qa.size):
        qa[j] = 0
    scale_out[i] = scale
    zp_out[i] = zp


@njit(cache=True)
def _quantize_row_or_pad(x, qa, scale_out, zp_out, i, kind_madd):
    if i < x.shape[0]:
        _quantize_row_into(x[i], qa[i], scale_out, zp_out, i, kind_madd)
    else:
        qa[i, :] = 0
        scale_out[i] = 0.0
        zp_out[i] = 0


@njit(cache=True, parallel=True)
def quantize_rows(x, qa, scale_out, zp_out, kind_madd):
    """Every row of qa (rows past x's zero, scale 0): x's rows quantised, in parallel."""
    for i in prange(qa.shape[0]):
        _quantize_row_or_pad(x, qa, scale_out, zp_out, i, kind_madd)


@njit(cache=True)
def quantize_rows_serial(x, qa, scale_out, zp_out, kind_madd):
    """quantize_rows on the calling thread."""
    for i in range(qa.shape[0]):
        _quantize_row_or_pad(x, qa, scale_out, zp_out, i, kind_madd)


@njit(cache=True)
def bf16_row(x, out):
    """float32 -> bfloat16 bits, round to nearest even (NaN kept a NaN); padding zero."""
    bits = x.view(np.uint32)
    for j in range(x.size):
        b = bits[j]
        if (b & 0x7FFFFFFF) > 0x7F800000:
            out[j] = np.uint16((b >> 16) | 0x40)
        else:
            out[j] = np.uint16((b + 0x7FFF + ((b >> 16) & 1)) >> 16)
    for j in range(x.size, out.size):
        out[j] = 0


@njit(cache=True)
def _bf16_row_or_pad(x, out, i):
    if i < x.shape[0]:
        bf16_row(x[i], out[i])
    else:
        out[i, :] = 0


@njit(cache=True, parallel=True)
def bf16_rows(x, out):
    """Every row of out: x's rows as bfloat16 bits (rows and columns past x's zero), in parallel."""
    for i in prange(out.shape[0]):
        _bf16_row_or_pad(x, out, i)


@njit(cache=True)
def bf16_rows_serial(x, out):
    """bf16_rows on the calling thread."""
    for i in range(out.shape[0]):
        _bf16_row_or_pad(x, out, i)


@njit(cache=True)
def copy_rows(x, out):
    """x into the top-left corner of out, the rest zero (the widen kind's float32 A operand)."""
    rows, k = x.shape
    for i in range(out.shape[0]):
        if i < rows:
            out[i, :k] = x[i]
            out[i, k:] = 0.0
        else:
            out[i, :] = 0.0


@njit(cache=True)
def quantize_weight_rows(w, q, scale, colsum):
    """Symmetric per-output-channel int8: scale_n = max|w[n]| / 127 (1 if all zero), q = rint(w / scale)."""
    n_out, k = w.shape
    for n in range(n_out):
        m = np.float32(0.0)
        for j in range(k):
            v = abs(w[n, j])
            if v > m:
                m = v
        s = m / np.float32(127.0)
        if not s > 0:
            s = np.float32(1.0)
        total = 0
        for j in range(k):
            v = np.int32(np.rint(w[n, j] / s))
            v = min(max(v, -127), 127)
            q[n, j] = v
            total += v
        scale[n] = s
        colsum[n] = total
