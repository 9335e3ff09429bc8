"""Weights in the kernels' panel layout: PackedWeight, built from float32 (pack_int8, pack_bf16) or from
already quantised values (pack_quantized), and back (unpack).

Layout: panels of NR output columns; in panel j, group p (GROUP[kind] consecutive k values), column c,
element t sits at ((j*groups + p)*NR + c)*group + t; zero past N and K.  groups covers k padded to
kinds.K_ALIGN (a group; for the AMX kinds a whole tile of k, so each 16 consecutive groups of a panel's
16-column half are one B tile: tiles.py).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .._aligned import aligned_empty
from ..tiling import cdiv
from .codegen import NR
from .kinds import B_DTYPE, BF16_KIND, GROUP, INT8_KIND, INT8_KINDS, padded_k
from .quantize import bf16_row, quantize_weight_rows


class PackedWeight:
    """A Linear's weight in one reduced-precision kernel's layout, with its column-wise epilogue terms."""

    def __init__(self, kind, n_out, k, packed, cscale, colsum, bias):
        self.kind, self.out_features, self.in_features = kind, n_out, k
        self.group = GROUP[kind]
        self.groups = padded_k(kind, k) // self.group
        self.packed, self.cscale, self.colsum, self.bias = packed, cscale, colsum, bias

    @property
    def nbytes(self):
        return int(self.packed.nbytes + self.cscale.nbytes + self.colsum.nbytes + self.bias.nbytes)


@njit(cache=True)
def _pack(q, group, packed):
    """q (N, K) -> packed (the layout above)."""
    n_out, k = q.shape
    groups = packed.size // (cdiv(n_out, NR) * NR * group)
    packed[:] = 0
    for n in range(n_out):
        j, cc = n // NR, n % NR
        base = j * groups * NR * group + cc * group
        for kk in range(k):
            p, t = kk // group, kk % group
            packed[base + p * NR * group + t] = q[n, kk]


@njit(cache=True)
def _unpack(packed, group, n_out, k, q):
    groups = packed.size // (cdiv(n_out, NR) * NR * group)
    for n in range(n_out):
        j, cc = n // NR, n % NR
        base = j * groups * NR * group + cc * group
        for kk in range(k):
            q[n, kk] = packed[base + (kk // group) * NR * group + kk % group]


def _padded(values, n_pad, dtype):
    out = np.zeros(n_pad, dtype)
    if values is not None:
        out[:len(values)] = values
    return out


def _row_parts(weight):
    """A 2-D weight, or a list of 2-D weights stacked along N (e.g. q, k, v read separately from the file)."""
    parts = list(weight) if isinstance(weight, (list, tuple)) else [weight]
    k = parts[0].shape[1]
    if any(p.ndim != 2 or p.shape[1] != k for p in parts):
        raise ValueError("weight parts must be 2-D with the same number of columns")
    return parts, sum(p.shape[0] for p in parts), k


def _panels(values, kind):
    n_out, k = values.shape
    g = GROUP[kind]
    packed = aligned_empty(1, cdiv(n_out, NR) * NR * padded_k(kind, k), B_DTYPE[kind])[0]
    _pack(values, g, packed)
    return packed


def pack_int8(weight, bias=None, kind=None):
    """(N, K) float weight (or a list of row blocks) -> PackedWeight for the int8 kernel `kind` (default:
    this CPU's).  A float32 part (e.g. a read-only view of a mapped file) is read in place, never copied."""
    kind = kind or INT8_KIND
    parts, n_out, k = _row_parts(weight)
    q = np.empty((n_out, k), np.int8)
    scale = np.empty(n_out, np.float32)
    colsum = np.empty(n_out, np.int32)
    r = 0
    for part in parts:
        n = part.shape[0]
        quantize_weight_rows(np.ascontiguousarray(part, np.float32), q[r:r + n], scale[r:r + n], colsum[r:r + n])
        r += n
    return pack_quantized(q, scale, colsum, bias, kind)


def pack_quantized(q, scale, colsum, bias, kind):
    """PackedWeight of int8 values q (N, K) with their column scales and sums (quantize_weight_rows')."""
    n_out = q.shape[0]
    n_pad = cdiv(n_out, NR) * NR
    return PackedWeight(kind, n_out, q.shape[1], _panels(q, kind), _padded(scale, n_pad, np.float32),
                        _padded(colsum, n_pad, np.int32), _padded(bias, n_pad, np.float32))


def pack_bf16(weight, bias=None, kind=None):
    """(N, K) float weight -> PackedWeight of its bfloat16 rounding for kernel `kind` (default: this CPU's)."""
    kind = kind or BF16_KIND
    parts, n_out, k = _row_parts(weight)
    bits = np.empty((n_out, k), np.uint16)
    r = 0
    for part in parts:
        n = part.shape[0]
        bf16_row(np.ascontiguousarray(part, np.float32).reshape(-1), bits[r:r + n].reshape(-1))
        r += n
    n_pad = cdiv(n_out, NR) * NR
    return PackedWeight(kind, n_out, k, _panels(bits, kind), np.zeros(n_pad, np.float32),
                        np.zeros(n_pad, np.int32), _padded(bias, n_pad, np.float32))


def unpack(weight: PackedWeight) -> np.ndarray:
    """The (N, K) float32 weight a PackedWeight stands for: int8 values times their column scale, or the
    bfloat16 values widened."""
    n, k = weight.out_features, weight.in_features
    q = np.empty((n, k), weight.packed.dtype)
    _unpack(weight.packed, weight.group, n, k, q)
    if weight.kind in INT8_KINDS:
        return (q.astype(np.float32) * weight.cscale[:n, None]).astype(np.float32)
    return (q.astype(np.uint32) << 16).view(np.float32)
