"""vitnp: Vision Transformer (ViT / DeiT) image classification in NumPy + Numba.

    import vitnp
    clf = vitnp.load("google/vit-base-patch16-224")
    clf.classify("cats.jpg")   # [{"label": ..., "score": ...}, ...]
"""

import os

# Numba's OpenMP pool and OpenBLAS's pool take turns layer by layer; by default each spins for a while after its
# work (OpenBLAS ~60 ms), stealing the cores the other pool needs next: measured 3.4x slower forward passes.
# Both are read when the libraries load, hence before anything imports numpy or numba. setdefault: a user's own
# setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from . import errors  # noqa: E402
from .classifier import Classifier, classify, load  # noqa: E402
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
__all__ = [
    "Classifier", "classify", "load", "errors", "VitnpError", "ImageError", "ParameterError", "ConfigError",
    "CheckpointError", "ModelNotFoundError", "OfflineError", "__version__",
]
