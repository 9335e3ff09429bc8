"""The model's projection layers: which layer each role gets under the engine options, built in one place.

A role is a float32 `Linear` running the options' GEMM backend, or a `QLinear` holding its weight in the options'
precision; options.FLOAT32_LAYERS says which roles stay float32 per precision (fp32: all; bf16: the classifier
heads; int8: none, it quantises the heads too, as ONNX Runtime's quantize_dynamic does: measured within the
accuracy targets, and it keeps ViT-B's CLI under 300 MB).  The warm-up compiles the kernels the same rule picks.

A reduced precision never costs speed: with the "auto" backend (the default) each QLinear runs, per row count, its
int8 / bf16 kernel where that is clearly faster than the float32 GEMM on this CPU, else the float32 GEMM
(autotune.REDUCED_MIN_GAIN; timed in context like the float32 auto backend's Numba-or-BLAS choice, stored per
machine, reported by Classifier.backend_report()), because the precision is a ceiling on the error, not a request
for a kernel: the float32 path multiplies by the same reduced weight with unrounded activations, so it is at least
as accurate, and where it is faster (bf16 without AVX512_BF16, or on a CPU whose bf16 unit is slow) it is the
better answer to what was asked. With an explicit backend ("numba" or "blas") every reduced layer runs its reduced
kernel, exactly as asked (what benchmarks of a kernel, and weights shared read-only between processes, need). A
layer moves to float32 at most once and holds one weight at any time (kernels.qlinear).

    layer = build("fc1", weight, bias, options)        # weight (N, K); for "qkv" the list [q, k, v]
    groups = kernel_groups(options)                    # what vitnp.kernels.warmup compiles for a model
"""

from __future__ import annotations

from typing import Union

import numpy as np

from .kernels import warmup
from .kernels.linear import Linear
from .kernels.qlinear import QLinear
from .options import FLOAT32_LAYERS, EngineOptions

ENCODER_ROLES = ("qkv", "attn_out", "fc1", "fc2")  # per encoder block: fused q|k|v, attention output, MLP
ROLES = ("patch_embed", *ENCODER_ROLES, "head")
# What the forward pass runs besides its projections (vitnp.model: attention, LayerNorm).
FORWARD_GROUPS = ("attention", "layernorm")

Layer = Union[Linear, QLinear]


def is_float32(role: str, precision: str) -> bool:
    """Whether `role` is a float32 Linear (else a QLinear in `precision`)."""
    if role not in ROLES:
        raise ValueError(f"unknown layer role {role!r}; expected one of {ROLES}")
    kept = FLOAT32_LAYERS[precision]
    return kept == "all" or (kept == "heads" and role == "head")


def build(role: str, weight, bias, options: EngineOptions) -> Layer:
    """The layer for `role`: y = x @ W^T + b with W (N, K) any float array, or, for "qkv", a list of the query,
    key and value weights stacked along N.  A read-only view of a memory-mapped tensor is read in place (a
    reduced-precision layer quantises / rounds it without a float32 copy) and never retained, so the caller may
    release its pages as soon as this returns."""
    parts = list(weight) if isinstance(weight, (list, tuple)) else None
    if is_float32(role, options.precision):
        return Linear(np.concatenate(parts) if parts else weight, bias, backend=options.backend)
    return QLinear(parts or weight, bias, precision=options.precision, backend=reduced_backend(options))


def reduced_backend(options: EngineOptions) -> str:
    """A QLinear's backend under these options: "auto" (its kernel or float32, the faster) only with the auto
    backend, else "numba" (its kernel, always)."""
    return "auto" if options.backend == "auto" else "numba"


def kernel_groups(options: EngineOptions) -> tuple[str, ...]:
    """The vitnp.kernels.warmup groups a model built with these options runs, in role order."""
    groups = {}
    for role in ROLES:
        if is_float32(role, options.precision):
            groups.update(dict.fromkeys(warmup.LINEAR_GROUPS[options.backend]))
        else:
            groups.update(dict.fromkeys(warmup.QLINEAR_GROUPS[options.precision]))
            if reduced_backend(options) == "auto":  # it times (and may run) the float32 GEMM
                groups.update(dict.fromkeys(warmup.LINEAR_GROUPS["auto"]))
    return (*groups, *FORWARD_GROUPS)
