"""vitnp: Vision Transformer (ViT / DeiT) image classification in NumPy + Numba.

    import vitnp
    clf = vitnp.load("google/vit-base-patch16-224")
    clf.classify("cats.jpg")   # [{"label": ..., "score": ...}, ...]
"""

from . import errors
from .classifier import Classifier, classify, load
from .errors import (
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
