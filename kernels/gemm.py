"""Numba single-precision GEMM with fused epilogues: out (=|+=) epilogue(x @ w_t + bias).

x (M, K) and out (M, N) are float32 C-contiguous; w_t is the (K, N) float32 weight (transposed nn.Linear
weight).  Epilogue codes: EPILOGUE_NONE (out = xw + b), EPILOGUE_GELU (out = gelu(xw + b)),
EPILOGUE_ADD (out += xw + b).
"""
import numpy as np
from numba import njit, prange

from .elementwise import gelu64

EPILOGUE_NONE = 0
EPILOGUE_GELU = 1
EPILOGUE_ADD = 2
EPILOGUES = {"none": EPILOGUE_NONE, "gelu": EPILOGUE_GELU, "add": EPILOGUE_ADD}


@njit(cache=True, fastmath=True, parallel=True)
def gemm_simple(x, w_t, bias, has_bias, out, epilogue):
    rows, depth = x.shape
    cols = w_t.shape[1]
    for i in prange(rows):
        acc = np.zeros(cols, np.float32)
        for k in range(depth):
            a = x[i, k]
            for j in range(cols):
                acc[j] += a * w_t[k, j]
        finish_row(acc, bias, has_bias, out[i], epilogue)


@njit(cache=True, fastmath=True, inline="always")
def finish_row(acc, bias, has_bias, out_row, epilogue):
    """Apply bias and epilogue to one accumulated row segment and store it."""
    n = acc.shape[0]
    if has_bias:
        for j in range(n):
            acc[j] += bias[j]
    if epilogue == EPILOGUE_GELU:
        for j in range(n):
            out_row[j] = np.float32(gelu64(np.float64(acc[j])))
    elif epilogue == EPILOGUE_ADD:
        for j in range(n):
            out_row[j] += acc[j]
    else:
        for j in range(n):
            out_row[j] = acc[j]


@njit(cache=True, fastmath=True, parallel=True)
def apply_epilogue_inplace(out, bias, has_bias, epilogue):
    """For the BLAS path: out already holds x @ w_t; add bias and apply GELU in one pass."""
    rows, cols = out.shape
    for i in prange(rows):
        if epilogue == EPILOGUE_GELU:
            if has_bias:
                for j in range(cols):
                    out[i, j] = np.float32(gelu64(np.float64(out[i, j] + bias[j])))
            else:
                for j in range(cols):
                    out[i, j] = np.float32(gelu64(np.float64(out[i, j])))
        elif has_bias:
            for j in range(cols):
                out[i, j] += bias[j]


@njit(cache=True, fastmath=True, parallel=True)
def add_product_inplace(out, product, bias, has_bias):
    """For the BLAS path's residual epilogue: out += product + bias."""
    rows, cols = out.shape
    for i in prange(rows):
        if has_bias:
            for j in range(cols):
                out[i, j] += product[i, j] + bias[j]
        else:
            for j in range(cols):
                out[i, j] += product[i, j]


def gemm(x, w_t, bias, out, epilogue):
    """Numba GEMM entry point (bias may be None)."""
    has_bias = bias is not None
    gemm_simple(x, w_t, bias if has_bias else _NO_BIAS, has_bias, out, EPILOGUES[epilogue])


_NO_BIAS = np.zeros(1, np.float32)
