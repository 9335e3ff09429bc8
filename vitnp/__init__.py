"""vitnp: Vision Transformer (ViT / DeiT) image classification in NumPy + Numba.

    import vitnp
    clf = vitnp.load("google/vit-base-patch16-224")
    clf.classify("cats.jpg")   # [{"label": ..., "score": ...}, ...]
"""

import os

# Thread-pool waiting, read when the libraries load, hence set before anything imports numpy or numba (a user's
# own setting wins). Numba's OpenMP workers spin briefly between kernels: a forward pass launches ~100 parallel
# regions back to back, and sleeping after each (OMP_WAIT_POLICY=passive) cost 100 vs 80 ms at batch 1 on ViT-B.
# The spin is kept short, and OpenBLAS's workers (which spin ~60 ms by default) sleep almost at once, so neither
# pool holds the cores the other needs next when a forward pass mixes them (BLAS-backed layers).
os.environ.setdefault("GOMP_SPINCOUNT", "30000")
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from . import errors  # noqa: E402
from .errors import (  # noqa: E402
    CheckpointError,
    ConfigError,
    ImageError,
    ModelNotFoundError,
    OfflineError,
    ParameterError,
    VitnpError,
)

__version__ = "0.1.0"


def __getattr__(name):
    # The engine (numba, the kernels, the ISA choice) loads on first use, so `vitnp --help` and the CLI's
    # own error handling come first.
    if name in ("Classifier", "classify", "load"):
        from . import classifier

        return getattr(classifier, name)
    if name in _SUBMODULES:  # `import vitnp; vitnp.kernels...` as before the engine loaded lazily
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'vitnp' has no attribute {name!r}")


_SUBMODULES = ("kernels", "classifier", "config", "weights", "model", "preprocess", "postprocess", "hub",
               "options", "files", "startup", "batching", "registry", "server", "cli", "ray")

__all__ = [
    "Classifier", "classify", "load", "errors", "VitnpError", "ImageError", "ParameterError", "ConfigError",
    "CheckpointError", "ModelNotFoundError", "OfflineError", "__version__",
]
