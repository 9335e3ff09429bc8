"""Exceptions with messages meant for people.

Every error vitnp raises on purpose derives from VitnpError, so the CLI and the
server can tell "the user gave us something wrong" (print the message, map it
to a status) from a bug (log the traceback, answer a generic 500).

The HTTP status each one maps to is in its docstring ("HTTP 404"); a subclass maps as its own
docstring says, before its base class.
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
    """The model id / directory does not exist (locally or on the Hub). HTTP 404."""


class ModelNotCachedError(ModelNotFoundError):
    """A server in offline mode (HF_HUB_OFFLINE) was asked for a Hub model its cache does not hold. HTTP 404."""


class OfflineError(VitnpError, ConnectionError):
    """The Hub cannot be reached and the files are not in the local cache. HTTP 404 (a library / CLI error;
    a server answers HubUnreachableError instead)."""


class HubUnreachableError(OfflineError):
    """A server could not reach the Hub (or not in time) to look up a model its cache does not hold. HTTP 502,
    with Retry-After: the failure is remembered for a while (ServingOptions.failure_memory)."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class QueueFullError(VitnpError):
    """A served model's request queue is full (or too many model lookups are under way); the client should
    retry after retry_after seconds. HTTP 429 with Retry-After."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class NonFiniteScoresError(VitnpError, ArithmeticError):
    """A model's scores for an image are not finite numbers: its weights overflow float32 on that image (the
    model's failure, not the request's). HTTP 500 with the message; the other images of a batch are unaffected."""

    def __init__(self):
        super().__init__("the model's scores are not finite numbers (NaN or infinity): its weights overflow "
                         "float32 on this image")


class ModelLoadingError(VitnpError):
    """A served model is still loading (the request did not wait, or waited --load-timeout seconds); the
    client should retry after estimated_time seconds. HTTP 503 with {"estimated_time": ...} in the body and
    Retry-After."""

    def __init__(self, model: str, estimated_time: float):
        super().__init__(f"Model {model} is currently loading")
        self.model = model
        self.estimated_time = estimated_time


class ModelUnavailableError(VitnpError):
    """A model a server was asked to load on demand exists but cannot be served (not a supported checkpoint,
    or a malformed one; the message says which). HTTP 400."""


class ModelLoadFailedError(VitnpError):
    """Loading a model failed unexpectedly (the traceback is in the server log); remembered like every load
    failure, so the model is not loaded again on every request. HTTP 500."""


class DeadlineExceededError(VitnpError):
    """A request was still queued at its deadline (--request-timeout) and was dropped from the queue.
    HTTP 503 with Retry-After."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after
