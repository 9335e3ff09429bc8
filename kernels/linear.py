"""Linear layer (x @ W^T + b) computed by a Numba GEMM or by NumPy/BLAS; "auto" asks kernels.autotune which."""
import operator
import threading

import numpy as np

from . import _aligned, autotune
from . import gemm as _gemm
from .elementwise import check_f32_contiguous

BACKENDS = ("auto", "numba", "blas")  # the kernels' list; vitnp.options validates the user-facing one
K_BY_N = "k_by_n"   # (K, N) C-contiguous: read by BLAS and (in place) by the Numba GEMM
PANELS = "panels"   # gemm.pack_weight layout: Numba GEMM only
LAYOUTS = {"numba": PANELS, "blas": K_BY_N}  # the layout each backend reads fastest
_PACKABLE = (np.dtype(np.float32),)  # Numba has no float16 arithmetic: those go through a float32 transpose
_local = threading.local()


class Linear:
    """y = x @ W^T + b for a torch-layout weight W (N, K).

    The layer holds exactly one float32 copy of the weight, in the layout its backend reads fastest:
      * "blas": (K, N) C-contiguous, which numpy's matmul hands to sgemm without copying;
      * "numba": the GEMM micro-kernel's panel layout (gemm.pack_weight: NR-column panels, each stored
        k row after k row), so every B panel streams sequentially from DRAM instead of as 128-byte runs
        4-12 KiB apart (ViT-B fc1 at batch 1: 15% faster);
      * "auto": the backend per row count is autotune's decision, and so is the layout the weight is in
        (autotune.AutoBackend: packed at load like "numba", or (K, N) when this machine's stored decisions
        for the shape include BLAS; once BLAS is chosen it stays (K, N), which the Numba GEMM reads too).
    """

    def __init__(self, weight, bias=None, backend="auto"):
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
        weight = np.asarray(weight)
        if weight.ndim != 2 or weight.dtype.kind != "f":
            raise TypeError(f"weight must be a 2-D float array (out_features, in_features), got "
                            f"{weight.dtype} {weight.shape}")
        self.out_features, self.in_features = weight.shape
        self.backend = backend
        self.auto = autotune.AutoBackend(self.in_features, self.out_features) if backend == "auto" else None
        # (layout, array) swapped as one attribute, so a concurrent call sees a consistent pair.  Laid out
        # straight from (N, K) for the backend it starts with: each weight is laid out at load, never in the
        # middle of a forward pass (but for an auto layer's first BLAS decision).
        start = backend if self.auto is None else self.auto.starting_backend()
        if LAYOUTS[start] == PANELS:
            self._weight = (PANELS, _gemm.pack_weight_nk(weight) if weight.dtype in _PACKABLE
                            else _gemm.pack_weight(_transpose_to_f32(weight)))
        else:
            self._weight = (K_BY_N, _transpose_to_f32(weight))
        if bias is None:
            self.bias = None
        else:
            bias = np.asarray(bias)
            if bias.shape != (self.out_features,):
                raise ValueError(f"bias must have shape ({self.out_features},), got {bias.shape}")
            self.bias = np.ascontiguousarray(bias, dtype=np.float32)

    def backend_for(self, rows):
        """The backend used for an input with `rows` rows (for auto: autotune's decision, timed on first use)."""
        return self.backend if self.auto is None else self.auto.backend_for(self, rows)

    # -- layout ----------------------------------------------------------------------------------
    def laid_out_for(self, backend):
        """Whether the weight is in the layout `backend` reads fastest."""
        return self._weight[0] == LAYOUTS[backend]

    def lay_out_for(self, backend):
        """Convert the weight to the layout `backend` reads fastest (the old copy is dropped: one copy held)."""
        layout, array = self._weight
        if layout == PANELS and backend == "blas":
            self._weight = (K_BY_N, _gemm.unpack_weight(array, self.in_features, self.out_features))
        elif layout == K_BY_N and backend == "numba":
            self._weight = (PANELS, _gemm.pack_weight(array))
        else:
            return
        del array
        _aligned.return_freed_memory()

    def _adapt_layout(self, choice):
        """What a decision for `choice` does to an auto layer's weight (autotune.AutoBackend.follow)."""
        self.auto.follow(self, choice)

    # -- compute ---------------------------------------------------------------------------------
    column_step = _gemm.NR  # a column range starts on a multiple of this (a whole panel of the packed weight)

    def __call__(self, x, out, epilogue="none", columns=None):
        """out (=|+=) epilogue(x @ W^T + b); with columns=(start, stop), only out[:, start:stop] is computed
        and the rest of out is left as it is (start a multiple of column_step)."""
        columns = check_layer_call(self, x, out, epilogue, _gemm.EPILOGUES, columns)
        self.run(self.backend_for(x.shape[0]), x, out, epilogue, columns)
        return out

    def run(self, backend, x, out, epilogue="none", columns=None):
        """The product with `backend`, arguments unchecked (__call__ checks them; autotune times this)."""
        layout, array = self._weight
        if layout == PANELS:
            _gemm.gemm_packed(x, array, self.out_features, self.bias, out, epilogue, columns)
        elif backend == "numba":
            _gemm.gemm(x, array, self.bias, out, epilogue, columns)
        else:
            self._run_blas(array, x, out, epilogue, columns)

    @property
    def weight_layout(self):
        return self._weight[0]

    @property
    def weight_array(self):
        """The one weight-sized array the layer holds (layout: `weight_layout`)."""
        return self._weight[1]

    def dense_weight(self):
        """The (N, K) float32 weight, as a new array (for tests and diagnostics)."""
        layout, array = self._weight
        if layout == PANELS:
            array = _gemm.unpack_weight(array, self.in_features, self.out_features)
        return np.ascontiguousarray(array.T)

    def _run_blas(self, weight_t, x, out, epilogue, columns=None):
        has_bias = self.bias is not None
        bias = self.bias if has_bias else _gemm.NO_BIAS
        start, stop = (0, self.out_features) if columns is None else columns
        if columns is not None:  # (K, N) and (M, N) column slices: strided, still sgemm's operands as they are
            weight_t = weight_t[:, start:stop]
        if epilogue == "add":
            product = _blas_scratch((out.shape[0], stop - start))
            np.matmul(x, weight_t, out=product)
            _gemm.add_product_inplace(out, product, bias, has_bias, start)
        else:
            np.matmul(x, weight_t, out=out if columns is None else out[:, start:stop])
            if has_bias or epilogue == "gelu":
                _gemm.apply_epilogue_inplace(out, bias, has_bias, _gemm.EPILOGUES[epilogue], start, stop)

    def report(self):
        """Shapes, backend setting and, for auto, the per-row-count choices and timings seen so far."""
        shapes = autotune.decisions(self.in_features, self.out_features)
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "backend": self.backend, "auto_choices": shapes,
                "weight_layout": self.weight_layout, "weight_bytes": int(self.weight_array.nbytes)}

    def __repr__(self):
        return f"Linear(in_features={self.in_features}, out_features={self.out_features}, backend={self.backend!r})"


def check_layer_call(layer, x, out, epilogue, epilogues, columns=None):
    """The checks every layer call makes (Linear and QLinear alike); errors name the layer's class.
    Returns the column range as (start, stop) ints, or None for all columns."""
    name = type(layer).__name__
    check_f32_contiguous(x, "x")
    check_f32_contiguous(out, "out")
    if x.ndim != 2 or x.shape[1] != layer.in_features:
        raise ValueError(f"{name}: x must be (M, {layer.in_features}), got {x.shape}")
    if out.shape != (x.shape[0], layer.out_features):
        raise ValueError(f"{name}: out must be {(x.shape[0], layer.out_features)}, got {out.shape}")
    if epilogue not in epilogues:
        raise ValueError(f"unknown epilogue {epilogue!r}; expected one of {tuple(epilogues)}")
    if np.may_share_memory(x, out):
        raise ValueError(f"{name}: out must not overlap x (the product is written while x is read)")
    if columns is None:
        return None
    try:
        start, stop = (operator.index(v) for v in columns)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: columns must be a (start, stop) pair of ints, got {columns!r}") from None
    if not 0 <= start <= stop <= layer.out_features or start % layer.column_step:
        raise ValueError(f"{name}: columns must satisfy 0 <= start <= stop <= {layer.out_features} with start a "
                         f"multiple of {layer.column_step}, got {columns!r}")
    return start, stop


def _transpose_to_f32(weight):
    """(N, K) any-float (possibly read-only mmap) -> (K, N) float32 C-contiguous, without a float32 temp."""
    n, k = weight.shape
    out = _aligned.empty((k, n))
    block = 256  # transposing in tiles keeps both source rows and destination rows cache-resident
    for r in range(0, n, block):
        np.copyto(out[:, r:r + block], weight[r:r + block].T, casting="same_kind")
    return out


def _blas_scratch(shape):
    """Grow-only per-thread buffer for the BLAS path's residual product."""
    size = shape[0] * shape[1]
    buf = getattr(_local, "product", None)
    if buf is None or buf.size < size:
        buf = np.empty(size, np.float32)
        _local.product = buf
    return buf[:size].reshape(shape)
