"""Exceptions with messages meant for people.

Every error vitnp raises on purpose derives from VitnpError, so the CLI and the
server can tell "the user gave us something wrong" (print the message, map it
to a status) from a bug (log the traceback, answer a generic 500).
"""


class VitnpError(Exception):
    """Base class of the errors vitnp raises on purpose."""


class ImageError(VitnpError, ValueError):
    """An input could not be read or decoded as an image."""


class ParameterError(VitnpError, ValueError):
    """A call parameter (top_k, function_to_apply, batch size, ...) is invalid."""


class ConfigError(VitnpError, ValueError):
    """config.json / preprocessor_config.json is missing, malformed or unsupported."""


class CheckpointError(VitnpError, ValueError):
    """model.safetensors is missing, malformed or does not match config.json."""


class ModelNotFoundError(VitnpError, LookupError):
    """The model id / directory does not exist (locally or on the Hub)."""


class OfflineError(VitnpError, ConnectionError):
    """The Hub cannot be reached and the files are not in the local cache."""


class QueueFullError(VitnpError):
    """A served model's request queue is full; the client should retry later."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class ModelLoadingError(VitnpError):
    """A served model is being loaded on demand; the client should retry after estimated_time seconds."""

    def __init__(self, model: str, estimated_time: float):
        super().__init__(f"Model {model} is currently loading")
        self.model = model
        self.estimated_time = estimated_time


class ModelUnavailableError(VitnpError):
    """A model a server was asked to load on demand exists but cannot be served (not a supported checkpoint,
    or broken)."""
