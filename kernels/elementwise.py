"""Row-wise and element-wise float32 kernels: erf, GELU, LayerNorm, softmax.

Transcendentals are written as polynomials because this Numba build has no SVML: a libm call per element
blocks LLVM's loop vectoriser, while a polynomial becomes straight-line FMAs on zmm registers.
"""
import math

import numpy as np
from numba import njit, prange

from ._intrinsics import EXP_CONSTANTS, exp2_int_float32, maxnum_float32

# erf(x) ~= x * P(x^2) on [-4, 4] (odd Chebyshev fit of degree 33, monomial form); |erf(x)| rounds to 1.0f
# beyond 4 (erfc(4) = 1.5e-8).  Evaluated in float64 so the approximation, not the arithmetic, bounds
# the error: ~1.1e-8 absolute against math.erf.
_ERF_CLAMP = 4.0
_ERF_C0 = 1.1283791003038375
_ERF_C1 = -0.3761255111233317
_ERF_C2 = 0.11283446181863008
_ERF_C3 = -0.026859745230068725
_ERF_C4 = 0.005217097652081891
_ERF_C5 = -0.0008500995743887024
_ERF_C6 = 0.00011831152379914283
_ERF_C7 = -1.4159425168294491e-05
_ERF_C8 = 1.4507083108630976e-06
_ERF_C9 = -1.2544096348513896e-07
_ERF_C10 = 8.958959010790883e-09
_ERF_C11 = -5.143269627738134e-10
_ERF_C12 = 2.2954845382924722e-11
_ERF_C13 = -7.621393159657643e-13
_ERF_C14 = 1.7624810880485746e-14
_ERF_C15 = -2.5239241234386994e-16
_ERF_C16 = 1.6806846274960205e-18

_INV_SQRT2 = 0.7071067811865476


@njit(cache=True, fastmath=True, inline="always")
def erf64(x):
    """Branch-free erf approximation of a float64 (max abs error ~1.1e-8).

    Exactly +-1 from |x| >= 4 on, so GELU's negative tail x*(1+erf) is exactly -0 there, as in float32
    torch, instead of |x| times the polynomial's residual.
    """
    if x >= _ERF_CLAMP:
        return 1.0
    if x <= -_ERF_CLAMP:
        return -1.0
    t = x
    z = t * t
    p = _ERF_C16
    p = p * z + _ERF_C15
    p = p * z + _ERF_C14
    p = p * z + _ERF_C13
    p = p * z + _ERF_C12
    p = p * z + _ERF_C11
    p = p * z + _ERF_C10
    p = p * z + _ERF_C9
    p = p * z + _ERF_C8
    p = p * z + _ERF_C7
    p = p * z + _ERF_C6
    p = p * z + _ERF_C5
    p = p * z + _ERF_C4
    p = p * z + _ERF_C3
    p = p * z + _ERF_C2
    p = p * z + _ERF_C1
    p = p * z + _ERF_C0
    return t * p


# exp(x) for float32: x = n*ln2 + r with |r| <= ln2/2, exp(r) by a degree-6 Taylor/minimax polynomial,
# 2^n assembled from its exponent bits.  Inputs below -87 flush to ~1e-38 (fine for softmax weights).
# The constants are _intrinsics.EXP_CONSTANTS, shared with the vector exp of the attention softmax.
_EXP_LO = np.float32(EXP_CONSTANTS["lo"])
_EXP_HI = np.float32(EXP_CONSTANTS["hi"])
_LOG2E = np.float32(EXP_CONSTANTS["log2e"])
_LN2 = 0.6931471805599453
_EXP_P6, _EXP_P5, _EXP_P4, _EXP_P3, _EXP_P2, _EXP_P1, _EXP_P0 = (np.float32(c) for c in EXP_CONSTANTS["poly"])


@njit(cache=True, fastmath=True, inline="always")
def _exp_reduced(r):
    """exp(r) for |r| <= ln2/2: the polynomial of every float32 exp here."""
    p = _EXP_P6
    p = p * r + _EXP_P5
    p = p * r + _EXP_P4
    p = p * r + _EXP_P3
    p = p * r + _EXP_P2
    p = p * r + _EXP_P1
    p = p * r + _EXP_P0
    return p


@njit(cache=True, fastmath=True, inline="always")
def exp32(x):
    """Vectorisable float32 exp (a few ulp)."""
    x = min(max(x, _EXP_LO), _EXP_HI)
    n = np.floor(x * _LOG2E + np.float32(0.5))
    # The reduction in float64: under fastmath LLVM may fold a float32 Cody-Waite split (x - n*ln2_hi -
    # n*ln2_lo) back into x - n*ln2 where there is no FMA to contract it first (SSE2: 4e-6 relative error).
    r = np.float32(np.float64(x) - np.float64(n) * _LN2)
    return _exp_reduced(r) * exp2_int_float32(n)


@njit(cache=True, fastmath=True)
def _erf_flat(x, out):
    for i in range(x.size):
        out[i] = np.float32(erf64(np.float64(x[i])))


def erf(x, out=None):
    """Element-wise erf of a float32 array (float64 evaluation, ~1e-8 absolute error)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if out is None:
        out = np.empty_like(x)
    _erf_flat(x.reshape(-1), out.reshape(-1))
    return out


@njit(cache=True, fastmath=True)
def _exp_flat(x, out):
    for i in range(x.size):
        out[i] = exp32(x[i])


def exp(x, out=None):
    """Element-wise exp of a float32 array (the approximation softmax and attention use)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if out is None:
        out = np.empty_like(x)
    _exp_flat(x.reshape(-1), out.reshape(-1))
    return out


def erf_max_error(lo=-8.0, hi=8.0, points=400_001):
    """Max |erf approximation - math.erf| over a dense grid (the float64 evaluation erf() rounds)."""
    grid = np.linspace(lo, hi, points)
    approx = _erf64_array(grid)
    exact = np.array([math.erf(v) for v in grid.tolist()])
    return float(np.max(np.abs(approx - exact)))


@njit(cache=True, fastmath=True)
def _erf64_array(x):
    out = np.empty_like(x)
    for i in range(x.size):
        out[i] = erf64(x[i])
    return out


# ---------------------------------------------------------------------------------------------------
# GELU

_PARALLEL_CHUNK = 16384  # elements per parallel task: small enough to split a (197, 3072) activation

# Numba does not vectorise a loop written directly inside a prange body (the parfor lowering hides the
# trip count), so every parallel kernel below hands each task's slice to a serial helper.


# GELU(x) = x * Phi(x), Phi the normal CDF, from h(u) = Phi(-|x|) = erfc(u) / 2 with u = |x| / sqrt(2):
# Phi(x) = h for x < 0 and 1 - h otherwise.  h(u) = exp(-u^2) * t * Q(t) with t = 1 / (1 + 0.4 u) and
# Q of degree 10 (a minimax fit of erfcx(u) / (2t) in relative error over all of u >= 0: 6.2e-9).
# All in float32 at full vector width: about 2.5x less work than the erf polynomial in float64, and h's
# error is relative, so the negative tail x * h keeps float32 precision instead of |x| times erf's error.
_GELU_P = np.float32(0.4)
_GELU_Q = tuple(np.float32(c) for c in (
    -0.014607568820065357, 0.07022341433979118, -0.11776375966829039, 0.06878087831036336,
    -0.02344772496885745, 0.04195827184511433, 0.05950412771634095, 0.08586964651955364,
    0.10380686415718142, 0.11283793008369732, 0.11283791739602))
_GELU_Q0, _GELU_Q1, _GELU_Q2, _GELU_Q3, _GELU_Q4, _GELU_Q5, _GELU_Q6, _GELU_Q7, _GELU_Q8, _GELU_Q9, \
    _GELU_Q10 = _GELU_Q
_HALF_SQUARE_MIN = np.float32(-60.0)  # exp(-u^2) floor: keeps h and x*h normal numbers (h < 1e-27 there)
_LN2_HI = np.float32(EXP_CONSTANTS["ln2_hi"])  # ln 2 = _LN2_HI + _LN2_LO, _LN2_HI exact in 9 bits
_LN2_LO = np.float32(EXP_CONSTANTS["ln2_lo"])


@njit(cache=True, fastmath=True, inline="always")
def gelu32(x):
    """Exact-form (erf) GELU of a float32, evaluated in float32."""
    u = abs(x) * np.float32(_INV_SQRT2)
    t = np.float32(1.0) / (_GELU_P * u + np.float32(1.0))
    q = _GELU_Q0
    q = q * t + _GELU_Q1
    q = q * t + _GELU_Q2
    q = q * t + _GELU_Q3
    q = q * t + _GELU_Q4
    q = q * t + _GELU_Q5
    q = q * t + _GELU_Q6
    q = q * t + _GELU_Q7
    q = q * t + _GELU_Q8
    q = q * t + _GELU_Q9
    q = q * t + _GELU_Q10
    # exp(a) for a in [-60, 0]: a = n ln2 + r, 2^n from exponent bits.  The reduction stays in float32 (unlike
    # exp32's): where fastmath folds the split (SSE2) its relative error grows with |n|, but h, about 2^n
    # (n <= 0), shrinks faster, so GELU's absolute error does not grow.
    a = maxnum_float32(-(u * u), _HALF_SQUARE_MIN)
    n = np.floor(a * _LOG2E + np.float32(0.5))
    r = (a - n * _LN2_HI) - n * _LN2_LO
    h = (t * q) * (_exp_reduced(r) * exp2_int_float32(n))
    phi = h if x < np.float32(0.0) else np.float32(1.0) - h
    return x * phi


# Every kernel that divides is compiled with error_model="numpy": a float division then gives IEEE results (inf,
# nan) as NumPy does, and the caller's finiteness checks report them.  Numba's default checks each divisor for zero
# to raise ZeroDivisionError; that branch keeps loops from being vectorised, and under fastmath (no NaNs assumed)
# a NaN divisor can take it: raised inside a parallel region, it reaches Python as a SystemError.
@njit(cache=True, fastmath=True, error_model="numpy")
def gelu_inplace_serial(x):
    for i in range(x.size):
        x[i] = gelu32(x[i])


@njit(cache=True, fastmath=True, parallel=True)
def _gelu_flat(x):
    n = x.size
    chunks = (n + _PARALLEL_CHUNK - 1) // _PARALLEL_CHUNK
    for c in prange(chunks):
        start = c * _PARALLEL_CHUNK
        gelu_inplace_serial(x[start:min(start + _PARALLEL_CHUNK, n)])


def gelu_erf(x):
    """In-place exact GELU x*0.5*(1+erf(x/sqrt(2))) of a float32 C-contiguous array; returns x."""
    check_f32_contiguous(x, "x")
    _gelu_flat(x.reshape(-1))
    return x


def gelu_max_error(lo=-16.0, hi=16.0, points=400_001):
    """Max |gelu_erf(x) - GELU(x)| / max(1, |x|) over a dense float32 grid, GELU(x) = x * erfc(-x/sqrt2) / 2
    in float64 (math.erfc, exact in the negative tail too).  Measures the kernel itself, float32 rounding
    included; the error is scaled by max(1, |x|) because a float32 result is only good to |x| * 2^-24."""
    grid = np.linspace(lo, hi, points, dtype=np.float32)
    approx = gelu_erf(grid.copy()).astype(np.float64)
    exact_x = grid.astype(np.float64)
    exact = np.array([0.5 * v * math.erfc(-v * _INV_SQRT2) for v in exact_x.tolist()])
    return float(np.max(np.abs(approx - exact) / np.maximum(1.0, np.abs(exact_x))))


# ---------------------------------------------------------------------------------------------------
# LayerNorm


@njit(cache=True, fastmath=True, error_model="numpy")
def layernorm_row(x, gamma, beta, eps, out):
    width = x.size
    # Sums in float64: with a large common offset (|mean| >> std) a float32 mean is off by more than
    # the spread it is subtracted from.
    total = 0.0
    for j in range(width):
        total += x[j]
    mean = total / width
    sq = 0.0
    for j in range(width):
        d = x[j] - mean
        sq += d * d
    inv_std = 1.0 / np.sqrt(sq / width + eps)
    for j in range(width):
        out[j] = np.float32((x[j] - mean) * inv_std) * gamma[j] + beta[j]


@njit(cache=True, fastmath=True, parallel=True)
def _layernorm_rows(x, gamma, beta, eps, out):
    for r in prange(x.shape[0]):
        layernorm_row(x[r], gamma, beta, eps, out[r])


def layernorm(x, gamma, beta, eps, out):
    """Row LayerNorm of x (M, D) into out (may be x itself); biased variance, as torch does."""
    check_f32_contiguous(x, "x")
    check_f32_contiguous(out, "out")
    if x.ndim != 2 or out.shape != x.shape or gamma.shape != (x.shape[1],) or beta.shape != (x.shape[1],):
        raise ValueError(f"layernorm: shapes x{x.shape} out{out.shape} gamma{gamma.shape} beta{beta.shape}")
    _layernorm_rows(x, np.asarray(gamma, np.float32), np.asarray(beta, np.float32), float(eps), out)
    return out


# ---------------------------------------------------------------------------------------------------
# Softmax


@njit(cache=True, fastmath=True, error_model="numpy")
def softmax_row(x, out):
    """out = softmax(x) for one row (out may be x); returns nothing."""
    width = x.size
    top = x[0]
    for j in range(1, width):
        top = maxnum_float32(top, x[j])
    total = np.float32(0.0)
    for j in range(width):
        e = exp32(x[j] - top)
        out[j] = e
        total += e
    inv_total = np.float32(1.0) / total
    for j in range(width):
        out[j] *= inv_total


@njit(cache=True, fastmath=True, parallel=True)
def _softmax_rows(x, out):
    for r in prange(x.shape[0]):
        softmax_row(x[r], out[r])


def softmax_rows(x, out):
    """Numerically stable softmax of each row of x (M, N) into out (may be x itself)."""
    check_f32_contiguous(x, "x")
    check_f32_contiguous(out, "out")
    if x.ndim != 2 or out.shape != x.shape:
        raise ValueError(f"softmax_rows: shapes x{x.shape} out{out.shape}")
    _softmax_rows(x, out)
    return out


def check_f32_contiguous(a, name):
    if not isinstance(a, np.ndarray) or a.dtype != np.float32 or not a.flags.c_contiguous:
        got = f"{a.dtype} {'C' if a.flags.c_contiguous else 'non-C'}-contiguous" if isinstance(a, np.ndarray) else type(a).__name__
        raise TypeError(f"{name} must be a float32 C-contiguous ndarray, got {got}")


# The dispatchers whose compiled presence (in this process or Numba's disk cache) shows layernorm is ready.
LAYERNORM_KERNELS = (_layernorm_rows,)
