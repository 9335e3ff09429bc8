"""QLinear: a Linear layer whose weight is held in reduced precision (int8 or bf16), same call as Linear.

    layer = QLinear(weight (N, K), bias, precision="int8")
    layer(x, out, epilogue="none" | "gelu" | "add")

int8: the weight is quantised once here (symmetric, per output channel) and the activations per row at
run time; bf16: the weight is rounded to bfloat16 once.  The kernels are in qgemm/.
"""
from __future__ import annotations

import numpy as np

from . import isa
from . import qgemm
from .linear import check_layer_call

REDUCED = ("bf16", "int8")  # the precisions QLinear holds a weight in


def describe_kernel(precision: str) -> str:
    """What the GEMM of `precision` ("fp32" or one of REDUCED) computes with in this process."""
    if precision == "fp32":
        return "float32 GEMM"
    if precision not in REDUCED:
        raise ValueError(f"precision must be fp32 or one of {REDUCED}, got {precision!r}")
    return qgemm.DESCRIPTIONS[qgemm.KIND[precision]]


class QLinear:
    """y = x @ W^T + b with W held as int8 (per-channel scales) or bf16, in its kernel's panel layout."""

    backend = "numba"

    def __init__(self, weight, bias=None, precision="int8", packed=None):
        """`packed`: an already-built qgemm.PackedWeight (e.g. read from the on-disk cache) instead of weight."""
        if precision not in REDUCED:
            raise ValueError(f"precision must be one of {REDUCED}, got {precision!r}")
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
        self.packed = packed
        self.kind = packed.kind
        self.out_features, self.in_features = packed.out_features, packed.in_features

    @property
    def bias(self):
        return self.packed.bias[:self.out_features] if self.has_bias else None

    column_step = qgemm.NR  # a column range starts on a whole panel

    def __call__(self, x, out, epilogue="none", columns=None):
        """As Linear.__call__ (columns=(start, stop): only out[:, start:stop] is computed)."""
        columns = check_layer_call(self, x, out, epilogue, qgemm.EPILOGUES, columns)
        qgemm.qgemm(x, self.packed, out, epilogue, columns)
        return out

    def dequantized_weight(self) -> np.ndarray:
        """The (N, K) float32 weight this layer effectively multiplies by (for tests and diagnostics)."""
        return qgemm.unpack(self.packed)

    def report(self):
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.has_bias,
                "backend": "numba", "precision": self.precision, "kernel": self.kind,
                "kernel_description": qgemm.DESCRIPTIONS[self.kind], "isa": isa.ISA,
                "weight_layout": f"{self.kind} panels {qgemm.NR} columns x {qgemm.GROUP[self.kind]} k",
                "weight_bytes": self.packed.nbytes}

    def __repr__(self):
        return (f"QLinear(in_features={self.in_features}, out_features={self.out_features}, "
                f"precision={self.precision!r}, kernel={self.kind!r})")
