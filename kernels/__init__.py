"""Numba/NumPy float32 kernels: GEMM-backed Linear (its "auto" backend choice: autotune), LayerNorm, exact GELU,
softmax, multi-head attention.

Nothing here knows about Vision Transformers.  Every Numba function compiles lazily on first call
(and is cached on disk), so importing this package is cheap.
"""
from . import isa  # first: a forced ISA must re-target Numba before anything compiles
from . import cachedir

cachedir.install_locator()  # before any kernel module defines a cached function
from .mha import attention
from .elementwise import erf, erf_max_error, exp, gelu_erf, gelu_max_error, layernorm, softmax_rows
from .linear import Linear
from .threads import get_num_threads, set_num_threads

__all__ = ["isa", "attention", "erf", "erf_max_error", "exp", "gelu_erf", "gelu_max_error", "layernorm", "softmax_rows", "Linear",
           "get_num_threads", "set_num_threads"]
