"""QLinear: a Linear layer whose weight is held in reduced precision (int8 or bf16), same call as Linear.

    layer = QLinear(weight (N, K), bias, precision="int8", backend="numba" | "auto")
    layer(x, out, epilogue="none" | "gelu" | "add")

int8: the weight is quantised once here (symmetric, per output channel) and the activations per row at
run time; bf16: the weight is rounded to bfloat16 once.  The kernels are in qgemm/.

With backend="auto" the layer runs, per row count, its kernel where that is clearly faster than the float32
GEMM, else the float32 GEMM (autotune.AutoPrecision, timed in context on this CPU; the bar: REDUCED_MIN_GAIN).
The float32 path multiplies by exactly the weight the reduced kernel multiplies by (qgemm.unpack: the bf16
values, or the int8 values times their scales), in float32 with unrounded activations, so it is never less
accurate than the kernel it replaces. The layer holds one weight: the first row count float32 wins for replaces
the reduced weight by that float32 copy, and the layer stays float32 from then on (it is at least as accurate,
and it was faster for a shape the layer runs), so a weight is never converted back and forth and never held
twice.
"""
from __future__ import annotations

import math
import threading

import numpy as np

from . import autotune, isa
from . import qgemm
from ._aligned import return_freed_memory
from .linear import Linear, check_layer_call

REDUCED = ("bf16", "int8")  # the precisions QLinear holds a weight in
BACKENDS = ("numba", "auto")  # numba: always the reduced kernel; auto: that where clearly faster, else float32
FLOAT32 = autotune.FLOAT32
_switch_lock = threading.Lock()


def describe_kernel(precision: str) -> str:
    """What the GEMM of `precision` ("fp32" or one of REDUCED) computes with in this process."""
    if precision == "fp32":
        return "float32 GEMM"
    if precision not in REDUCED:
        raise ValueError(f"precision must be fp32 or one of {REDUCED}, got {precision!r}")
    return qgemm.DESCRIPTIONS[qgemm.KIND[precision]]


class QLinear:
    """y = x @ W^T + b with W held as int8 (per-channel scales) or bf16, in its kernel's panel layout (or, for
    an auto layer that the float32 GEMM is faster for, as the float32 Linear of the same values)."""

    def __init__(self, weight, bias=None, precision="int8", packed=None, backend="numba"):
        """`packed`: an already-built qgemm.PackedWeight (e.g. read from the on-disk cache) instead of weight."""
        if precision not in REDUCED:
            raise ValueError(f"precision must be one of {REDUCED}, got {precision!r}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r} for a reduced-precision layer; expected one of {BACKENDS}")
        self.precision = precision
        if packed is None:
            # one (N, K) array, or a list of row blocks stacked along N (a fused q|k|v from three tensors)
            parts = [np.asarray(w) for w in weight] if isinstance(weight, (list, tuple)) else [np.asarray(weight)]
            for part in parts:
                if part.ndim != 2 or part.dtype.kind != "f" or part.shape[1] != parts[0].shape[1]:
                    raise TypeError(f"weight must be a 2-D float array (out_features, in_features) or a list of "
                                    f"them with equal in_features, got {part.dtype} {part.shape}")
            weight = parts if len(parts) > 1 else parts[0]
            n_out = sum(p.shape[0] for p in parts)
            if bias is not None:
                bias = np.asarray(bias)
                if bias.shape != (n_out,):
                    raise ValueError(f"bias must have shape ({n_out},), got {bias.shape}")
                bias = np.ascontiguousarray(bias, dtype=np.float32)
            pack = qgemm.pack_int8 if precision == "int8" else qgemm.pack_bf16
            packed = pack(weight, bias, qgemm.KIND[precision])
            self.has_bias = bias is not None
        else:
            self.has_bias = bool(np.any(packed.bias))
        # (path, what computes it) swapped as one attribute: (precision, PackedWeight) or (FLOAT32, Linear)
        self._held = (precision, packed)
        self.kind = packed.kind
        self.out_features, self.in_features = packed.out_features, packed.in_features
        self.backend = backend
        self.auto = (autotune.AutoPrecision(self.kind, self.in_features, self.out_features)
                     if backend == "auto" else None)
        # a column range starts on a whole panel, of either path's weight when the layer may switch
        self.column_step = qgemm.NR if self.auto is None else math.lcm(qgemm.NR, Linear.column_step)

    @property
    def path(self) -> str:
        """What computes this layer now: its precision, or FLOAT32 (an auto layer the float32 GEMM won for)."""
        return self._held[0]

    @property
    def packed(self):
        """The reduced-precision weight (a qgemm.PackedWeight), or None once the layer runs float32."""
        path, held = self._held
        return held if path != FLOAT32 else None

    @property
    def bias(self):
        path, held = self._held
        if path == FLOAT32:
            return held.bias
        return held.bias[:self.out_features] if self.has_bias else None

    def __call__(self, x, out, epilogue="none", columns=None):
        """As Linear.__call__ (columns=(start, stop): only out[:, start:stop] is computed)."""
        columns = check_layer_call(self, x, out, epilogue, qgemm.EPILOGUES, columns)
        if self.auto is not None and self.path != FLOAT32 and self.auto.path_for(self, x.shape[0]) == FLOAT32:
            self.use_float32()
        path, held = self._held
        if path == FLOAT32:
            held.run(held.backend_for(x.shape[0]), x, out, epilogue, columns)
        else:
            qgemm.qgemm(x, held, out, epilogue, columns)
        return out

    def use_float32(self):
        """Replace the reduced weight by the float32 Linear (auto backend) of the values it stands for."""
        with _switch_lock:
            path, held = self._held
            if path != FLOAT32:
                bias = held.bias[:self.out_features] if self.has_bias else None
                self._held = (FLOAT32, Linear(qgemm.unpack(held), bias, backend="auto"))
                del held
                return_freed_memory()

    def race_candidates(self, weight):
        """{path: run(x, out)} for autotune's race on `weight` (N, K) float32 of this layer's shape: this
        precision's kernel, and the float32 Linear with the auto backend (which decides Numba or BLAS itself)."""
        reduced = QLinear(weight, self.bias, self.precision)
        float32 = Linear(weight, self.bias, backend="auto")
        return {self.precision: lambda x, out: reduced(x, out), FLOAT32: lambda x, out: float32(x, out)}

    def dequantized_weight(self) -> np.ndarray:
        """The (N, K) float32 weight this layer effectively multiplies by (for tests and diagnostics)."""
        path, held = self._held
        return held.dense_weight() if path == FLOAT32 else qgemm.unpack(held)

    def report(self):
        path, held = self._held
        report = {"in_features": self.in_features, "out_features": self.out_features, "bias": self.has_bias,
                  "backend": self.backend, "precision": self.precision, "kernel": self.kind,
                  "kernel_description": qgemm.DESCRIPTIONS[self.kind], "isa": isa.ISA, "path": path}
        if self.auto is not None:
            report["path_choices"] = autotune.path_decisions(self.kind, self.in_features, self.out_features)
        if path == FLOAT32:
            float32 = held.report()
            report.update(weight_layout=f"float32 {float32['weight_layout']}", weight_bytes=float32["weight_bytes"],
                          float32_choices=float32["auto_choices"])
        else:
            report.update(weight_layout=f"{self.kind} panels {qgemm.NR} columns x {qgemm.GROUP[self.kind]} k",
                          weight_bytes=held.nbytes)
        return report

    def __repr__(self):
        return (f"QLinear(in_features={self.in_features}, out_features={self.out_features}, "
                f"precision={self.precision!r}, kernel={self.kind!r}"
                + (f", backend='auto', path={self.path!r})" if self.auto is not None else ")"))
