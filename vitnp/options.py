"""The settings values every entry point shares, each validated once: engine options, serving options, Ray
options, and the two commands' settings (classify files, serve over HTTP) that hold them.

The library (`vitnp.load`), the CLI, the server and Ray all build one of these and pass it on; a default or a
rule about which combinations make sense is written here and nowhere else.  Invalid values raise
ParameterError with a message that names the option.  vitnp.cli turns a command line into these values;
nothing past it sees argv.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from .errors import ParameterError
from .postprocess import DEFAULT_TOP_K

BACKENDS = ("auto", "numba", "blas")
PRECISIONS = ("fp32", "bf16", "int8")
# The kernels' ISA classes (vitnp.kernels.isa.ISAS; repeated here so that validating options never loads the
# kernels). "auto" is the widest the host runs.
ISAS = ("auto", "avx512", "avx2", "generic")
DEFAULT_MODEL = "google/vit-base-patch16-224"
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
# Which roles are float32 layers per precision (vitnp.layers); under int8 every projection is an int8 GEMM.
FLOAT32_LAYERS = {"fp32": "all", "bf16": "heads", "int8": "none"}


def _positive_int(name: str, value, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ParameterError(f"{name} must be a positive integer, got {value!r}")
    return value


def _non_negative_int(name: str, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ParameterError(f"{name} must be a non-negative integer, got {value!r}")
    return value


def _number(name: str, value, positive: bool, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 \
            or (positive and value == 0):
        kind = "positive" if positive else "non-negative"
        raise ParameterError(f"{name} must be a finite {kind} number, got {value!r}")
    return float(value)


def _choice(name: str, value, choices: tuple):
    if value not in choices:
        raise ParameterError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


@dataclass(frozen=True)
class EngineOptions:
    """How the engine computes: GEMM backend, weight precision, compute threads, kernel ISA.

    backend: "auto" (time per layer shape on first use, keep the faster: Numba or BLAS for a float32 layer, its
        int8 / bf16 kernel or float32 for a reduced-precision one; the rule is in vitnp.layers), "numba" or
        "blas" (float32 layers on that GEMM, reduced-precision layers always on their own kernel).  With
        precision "int8" (no float32 layer) "blas" would choose nothing and is refused.
    precision: "fp32" (parity with transformers), "bf16" or "int8" (docs/precision.md).
    threads: compute threads per forward pass (None: Numba's default, all cores or NUMBA_NUM_THREADS).
    isa: "auto" (the widest the CPU runs) or a narrower class; the same as VITNP_ISA, which it sets when the
        kernels have not been loaded yet in this process.
    """

    backend: str = "auto"
    precision: str = "fp32"
    threads: int | None = None
    isa: str = "auto"

    def __post_init__(self):
        _choice("backend", self.backend, BACKENDS)
        _choice("precision", self.precision, PRECISIONS)
        _positive_int("threads", self.threads, allow_none=True)
        _choice("isa", self.isa, ISAS)
        if FLOAT32_LAYERS[self.precision] == "none" and self.backend == "blas":
            raise ParameterError(
                f"backend {self.backend!r} has no effect with precision {self.precision!r}: every layer runs the "
                f"{self.precision} GEMM (auto: or float32 where faster; numba: always {self.precision})")

    def with_fixed_layout(self) -> EngineOptions:
        """The same options with a backend whose weight layout never changes after loading ("auto" may re-lay a
        layer out, or move a reduced-precision one to float32, on its first timed decision): what weights shared
        read-only between processes need.  Numba is what auto picks on ViT shapes."""
        if self.backend != "auto":
            return self
        return EngineOptions("numba", self.precision, self.threads, self.isa)

    def with_threads(self, threads: int | None) -> EngineOptions:
        return EngineOptions(self.backend, self.precision, threads, self.isa)


@dataclass(frozen=True)
class ServingOptions:
    """How the server batches, queues and limits requests (the same under `vitnp serve` and `--ray`)."""

    max_batch_size: int = 8          # images per forward pass
    max_wait_ms: float = 5.0         # how long a forward pass waits for its batch to fill
    max_queue: int = 64              # images per model admitted but not yet computed; past it, 429
    max_body_mb: float = 20.0        # largest request body
    body_timeout: float = 30.0       # seconds a client may take to send its body
    cache_size: int = 1024           # results kept in the LRU result cache (0: none)
    decode_threads: int = 2          # threads decoding and preprocessing images
    max_image_pixels: int | None = None  # largest width x height accepted (None: the decoder's default)
    graceful_timeout: float = 30.0   # on SIGTERM / Ctrl-C, seconds in-flight requests get to finish
    warmup: bool = True              # compile and touch every batch size's buffers before serving
    load_timeout: float = 60.0       # seconds a request waits for a model that is loading (then 503)
    request_timeout: float | None = None  # seconds a request may stay queued before it is dropped (503)
    failure_memory: float = 60.0     # seconds a failed model lookup / load is answered from memory
    hub_timeout: float = 10.0        # seconds a Hub lookup of an on-demand model may take

    def __post_init__(self):
        _positive_int("max_batch_size", self.max_batch_size)
        _number("max_wait_ms", self.max_wait_ms, positive=False)
        _positive_int("max_queue", self.max_queue)
        _number("max_body_mb", self.max_body_mb, positive=True)
        _number("body_timeout", self.body_timeout, positive=True)
        _non_negative_int("cache_size", self.cache_size)
        _positive_int("decode_threads", self.decode_threads)
        _positive_int("max_image_pixels", self.max_image_pixels, allow_none=True)
        _number("graceful_timeout", self.graceful_timeout, positive=True)
        _number("load_timeout", self.load_timeout, positive=False)
        _number("request_timeout", self.request_timeout, positive=True, allow_none=True)
        _number("failure_memory", self.failure_memory, positive=False)
        _number("hub_timeout", self.hub_timeout, positive=True)

    @property
    def max_wait_s(self) -> float:
        return self.max_wait_ms / 1000.0

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def warmup_batch_sizes(self) -> tuple[int, ...]:
        """The batch sizes a served model is warmed up for: a lone request, and a full batch."""
        return (1, self.max_batch_size) if self.max_batch_size > 1 else (1,)


@dataclass(frozen=True)
class RayOptions:
    """Running a command on Ray (`--ray`): which cluster, and how many model actors or Serve replicas."""

    address: str | None = None               # an existing cluster (default: start a local one)
    workers: int | None = None               # `classify --ray`: model actors (None: 1)
    replicas: int = 1                        # `serve --ray`: a fixed number of replicas
    autoscale: tuple[int, int] | None = None  # `serve --ray`: scale between (min, max) replicas instead

    def __post_init__(self):
        _positive_int("workers", self.workers, allow_none=True)
        _positive_int("replicas", self.replicas)
        if self.autoscale is not None:
            lo, hi = self.autoscale
            if _positive_int("autoscale minimum", lo) > _positive_int("autoscale maximum", hi):
                raise ParameterError(f"autoscale needs 1 <= MIN <= MAX, got {lo}:{hi}")


@dataclass(frozen=True)
class ClassifyOptions:
    """`vitnp classify`: which images, which model, what to print (or, with ray, which file to write)."""

    inputs: tuple[str, ...]
    model: str = DEFAULT_MODEL
    revision: str | None = None
    token: str | None = None
    cache_dir: str | None = None
    top_k: int = DEFAULT_TOP_K
    function_to_apply: str | None = None
    batch_size: int = 8                      # images per forward pass
    json: bool = False                       # one JSON object per image instead of a table
    output: str | None = None                # with ray: the .parquet / .jsonl file written
    engine: EngineOptions = field(default_factory=EngineOptions)
    ray: RayOptions | None = None            # run on Ray Data

    def __post_init__(self):
        _positive_int("top_k", self.top_k)
        _positive_int("batch_size", self.batch_size)


@dataclass(frozen=True)
class ServerOptions:
    """`vitnp serve`: the models, the HTTP endpoint and its access token, and how the models compute and are
    served; with ray, as a Ray Serve application."""

    models: tuple[str, ...] = ()             # [NAME=]MODEL: Hub id, directory or bundled:<name>
    load_on_demand: bool = False             # load other Hub ids / bundled models on their first request
    revision: str | None = None              # Hub revision of the Hub models
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None                 # required as 'Authorization: Bearer <token>' (None: no auth)
    log_level: str = "info"
    engine: EngineOptions = field(default_factory=EngineOptions)
    serving: ServingOptions = field(default_factory=ServingOptions)
    ray: RayOptions | None = None            # serve with Ray Serve
    log_format: str = "text"                 # "text", or "json": one JSON object per line
    cors_allow_origins: tuple[str, ...] = ()  # origins browser pages may call from ("*": any; none: no CORS)
    keep_alive_timeout: float = 5.0          # seconds an idle keep-alive connection stays open
    header_timeout: float = 10.0             # seconds a connection has to send a whole request head
    max_connections: int | None = 1000       # open connections (or requests) past which new requests get 503

    def __post_init__(self):
        _choice("log_level", self.log_level, LOG_LEVELS)
        _choice("log_format", self.log_format, LOG_FORMATS)
        for origin in self.cors_allow_origins:
            _origin(origin)
        _number("keep_alive_timeout", self.keep_alive_timeout, positive=True)
        _number("header_timeout", self.header_timeout, positive=True)
        _positive_int("max_connections", self.max_connections, allow_none=True)


def _origin(value):
    """A CORS origin as browsers send it: "*", or scheme://host[:port] with no path."""
    if value == "*":
        return value
    scheme, sep, rest = value.partition("://") if isinstance(value, str) else ("", "", "")
    if scheme not in ("http", "https") or not sep or not rest or "/" in rest or value != value.strip():
        raise ParameterError(f"cors_allow_origins: {value!r} is not an origin: write * or scheme://host[:port], "
                             "e.g. https://app.example.com (no path, no trailing slash)")
    return value


def defaults(options_class) -> dict:
    """{field name: default} of a settings class: what the command-line parsers show and start from."""
    return {f.name: f.default for f in fields(options_class)}
