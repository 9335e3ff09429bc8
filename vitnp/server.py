"""HTTP server speaking the Hugging Face Inference API image-classification protocol.

    vitnp serve --model google/vit-base-patch16-224 --port 8000

    from huggingface_hub import InferenceClient
    InferenceClient("http://127.0.0.1:8000").image_classification("cats.jpg")

Routes: POST /, POST /models/{model_id}, POST /hf-inference/models/{model_id}, GET /health, GET /models.
A body is raw image bytes (any Content-Type or none) or JSON {"inputs": "<base64>", "parameters": {...}}.

This module is the HTTP layer only: it reads and checks requests, and maps the batching layer's results and
errors (vitnp.batching) to responses. It never touches pixel arrays.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import hmac
import json
import logging
import math
import os
import sys
import time

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .batching import (
    BatchingOptions,
    InferenceService,
    ModelLoadingError,
    ModelRegistry,
    ModelUnavailableError,
    QueueFullError,
)
from .cli import positive_int
from .errors import ImageError, ModelNotFoundError, OfflineError, ParameterError, VitnpError

log = logging.getLogger("vitnp.server")
access_log = logging.getLogger("vitnp.access")

DEFAULT_TOKEN_ENV = "VITNP_API_TOKEN"
MB = 1024 * 1024
# Past this, a JSON body is parsed off the event loop.
PARSE_OFF_LOOP_BYTES = 1 * MB
# An over-limit body is still read (and discarded) up to this multiple of the limit, so that ordinary
# clients, which send the whole body before reading the answer, see the 413 instead of a reset connection.
DRAIN_FACTOR = 2
TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"0", "false", "no", "off"}
GENERIC_500 = "Internal server error: the request could not be completed (details are in the server log)"


class HTTPError(Exception):
    """A request the HTTP layer refuses before it reaches the batching layer."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


# --------------------------------------------------------------------------- request parsing


async def read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The whole body, or HTTPError 413 (over limit) / 408 (client too slow)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit * DRAIN_FACTOR:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0

    async def receive_all() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size <= limit:
                chunks.append(chunk)
            elif size > limit * DRAIN_FACTOR:
                return

    try:
        await asyncio.wait_for(receive_all(), timeout)
    except asyncio.TimeoutError:
        raise HTTPError(408, f"request body not received within {timeout:g} seconds") from None
    except ClientDisconnect:
        # Nobody will read the answer; the status is for the access log.
        raise HTTPError(400, "client disconnected before sending the whole body") from None
    if size > limit:
        raise _too_large(limit)
    return b"".join(chunks)


def _too_large(limit: int) -> HTTPError:
    return HTTPError(413, f"request body is larger than the limit of {limit / MB:g} MB")


def looks_like_json(body: bytes, content_type: str) -> bool:
    if content_type.split(";")[0].strip().lower() in ("application/json", "text/json"):
        return True
    # No image format starts with "{": clients that send JSON without saying so are still understood.
    return body.lstrip()[:1] == b"{"


def parse_json_request(body: bytes) -> tuple[bytes, object, object]:
    """JSON body -> (image bytes, top_k, function_to_apply) as given (validated later, per model)."""
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HTTPError(400, f"request body is not valid JSON ({e})") from None
    if not isinstance(payload, dict):
        raise HTTPError(400, 'JSON body must be an object: {"inputs": "<base64 image>", "parameters": {...}}')
    inputs = payload.get("inputs", payload.get("image"))
    if inputs is None:
        raise HTTPError(400, 'JSON body has no "inputs" (base64-encoded image)')
    if not isinstance(inputs, str):
        raise HTTPError(400, f'"inputs" must be a base64-encoded image string, got {type(inputs).__name__}')
    parameters = payload.get("parameters")
    if parameters is None:
        parameters = {}
    if not isinstance(parameters, dict):
        raise HTTPError(400, f'"parameters" must be an object, got {type(parameters).__name__}')
    return decode_base64_image(inputs), parameters.get("top_k"), parameters.get("function_to_apply")


def decode_base64_image(text: str) -> bytes:
    if text.startswith(("http://", "https://")):
        raise HTTPError(400, '"inputs" is a URL; this server does not fetch URLs: send the image bytes or '
                             "base64-encoded image data")
    if text.startswith("data:"):
        text = text.partition(",")[2]
    text = "".join(text.split())
    altchars = b"-_" if ("-" in text or "_" in text) else None
    text += "=" * (-len(text) % 4)
    try:
        data = base64.b64decode(text, altchars=altchars, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPError(400, '"inputs" is not valid base64') from None
    if not data:
        raise HTTPError(400, '"inputs" is empty')
    return data


def header_flag(request: Request, name: str, default: bool) -> bool:
    value = request.headers.get(name)
    if value is None:
        return default
    word = value.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise HTTPError(400, f"header {name} must be true or false, got {value!r}")


def bearer_token(request: Request) -> str | None:
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        return None
    return credentials.strip()


# --------------------------------------------------------------------------- responses


def error_response(status: int, message: str, headers: dict | None = None, **extra) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


def error_for(exc: BaseException) -> JSONResponse:
    """Map an error from the batching layer to the protocol's status and body."""
    if isinstance(exc, HTTPError):
        return error_response(exc.status, exc.message, exc.headers)
    if isinstance(exc, ModelLoadingError):
        retry = str(max(1, math.ceil(exc.estimated_time)))
        return error_response(503, str(exc), {"Retry-After": retry}, estimated_time=exc.estimated_time)
    if isinstance(exc, QueueFullError):
        return error_response(429, str(exc), {"Retry-After": str(max(1, math.ceil(exc.retry_after)))})
    if isinstance(exc, (ImageError, ParameterError, ModelUnavailableError)):
        return error_response(400, str(exc))
    if isinstance(exc, (ModelNotFoundError, OfflineError)):
        return error_response(404, str(exc))
    log.error("request failed", exc_info=exc)
    return error_response(500, GENERIC_500)


# --------------------------------------------------------------------------- the application


class Server:
    """Request handlers bound to one InferenceService and the HTTP limits."""

    def __init__(self, service: InferenceService, token: str | None = None, max_body_bytes: int = 20 * MB,
                 body_timeout: float = 30.0):
        self.service = service
        self._token = token.encode() if token else None
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout

    def authorize(self, request: Request) -> None:
        if self._token is None:
            return
        given = bearer_token(request)
        # compare_digest takes the same time wherever the first difference is.
        if given is None or not hmac.compare_digest(given.encode(), self._token):
            raise HTTPError(401, "Invalid or missing token: send 'Authorization: Bearer <token>'",
                            {"WWW-Authenticate": "Bearer"})

    async def classify(self, request: Request) -> Response:
        model = request.path_params.get("model_id")
        if model is not None:
            model = model.strip("/")
        request.state.model = model or self.service.registry.default
        try:
            self.authorize(request)
            body = await read_body(request, self.max_body_bytes, self.body_timeout)
            use_cache = header_flag(request, "x-use-cache", True)
            wait_for_model = header_flag(request, "x-wait-for-model", False)
            image, top_k, function_to_apply = await self._parse(body, request.headers.get("content-type", ""))
            result = await self.service.classify(model, image, top_k, function_to_apply,
                                                 use_cache=use_cache, wait_for_model=wait_for_model)
        except Exception as e:  # noqa: BLE001 - every failure becomes a JSON error, never a traceback
            return error_for(e)
        request.state.model = result.model
        request.state.batch_size = result.batch_size
        request.state.cache = "hit" if result.cache_hit else "miss"
        return JSONResponse(result.predictions, headers={
            "x-compute-time": f"{result.compute_seconds:.3f}",
            "x-compute-type": "cpu",
            "x-cache": request.state.cache,
        })

    async def _parse(self, body: bytes, content_type: str) -> tuple[bytes, object, object]:
        if not body:
            raise HTTPError(400, "request body is empty: send image bytes, or JSON "
                                 '{"inputs": "<base64 image>", "parameters": {...}}')
        if not looks_like_json(body, content_type):
            return body, None, None
        if len(body) > PARSE_OFF_LOOP_BYTES:
            return await asyncio.get_running_loop().run_in_executor(None, parse_json_request, body)
        return parse_json_request(body)

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def models(self, request: Request) -> Response:
        try:
            self.authorize(request)
        except HTTPError as e:
            return error_for(e)
        return JSONResponse(self.service.models())


async def _http_exception(request: Request, exc: HTTPException) -> Response:
    return error_response(exc.status_code, exc.detail or "error", getattr(exc, "headers", None))


async def _unhandled(request: Request, exc: Exception) -> Response:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, GENERIC_500)


class AccessLog:
    """ASGI middleware: one 'vitnp.access' line per request (method, path, model, status, batch, latency)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = 500
        scope.setdefault("state", {})

        async def send_and_record(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            state = scope["state"]
            client = scope.get("client")
            access_log.info(
                '%s "%s %s" model=%s status=%d batch=%s cache=%s latency=%.4fs',
                f"{client[0]}:{client[1]}" if client else "-", scope["method"], scope["path"],
                state.get("model") or "-", status, state.get("batch_size", "-"), state.get("cache", "-"),
                time.perf_counter() - t0,
            )


def create_app(service: InferenceService, token: str | None = None, max_body_bytes: int = 20 * MB,
               body_timeout: float = 30.0) -> Starlette:
    server = Server(service, token, max_body_bytes, body_timeout)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        # uvicorn calls this after in-flight requests have finished: stop the engine workers.
        service.close()

    routes = [
        Route("/", server.classify, methods=["POST"]),
        Route("/models/{model_id:path}", server.classify, methods=["POST"]),
        Route("/hf-inference/models/{model_id:path}", server.classify, methods=["POST"]),
        Route("/health", server.health, methods=["GET"]),
        Route("/models", server.models, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: _http_exception, Exception: _unhandled})
    app.add_middleware(AccessLog)
    return app


# --------------------------------------------------------------------------- command line


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = _non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _replica_range(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition(":")
    try:
        lo_n, hi_n = int(lo), int(hi)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX replicas, got {text!r}") from None
    if not sep or lo_n < 1 or hi_n < lo_n:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX with 1 <= MIN <= MAX, got {text!r}")
    return lo_n, hi_n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vitnp serve",
        description="Serve ViT/DeiT image classifiers over HTTP with the Hugging Face Inference API protocol "
                    "(POST /models/<id>, POST /, GET /health, GET /models).",
    )
    p.add_argument("--model", "-m", action="append", default=[], metavar="[NAME=]MODEL",
                   help="Hub id, local directory or bundled:<name>; repeat for several models. Loaded and warmed "
                        "up before the port opens; the first is the default for POST /. NAME=DIR serves a "
                        "directory as /models/NAME (a directory also answers to its own directory name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--max-batch-size", type=positive_int, default=8, help="images per forward pass (default 8)")
    p.add_argument("--max-wait-ms", type=_non_negative_float, default=5.0,
                   help="how long a forward pass waits for its batch to fill (default 5 ms)")
    p.add_argument("--max-queue", type=positive_int, default=64,
                   help="requests per model waiting for the engine before new ones get 429 (default 64)")
    p.add_argument("--load-on-demand", action="store_true",
                   help="load other Hub ids / bundled models on their first request (503 + estimated_time "
                        "while loading)")
    p.add_argument("--token-env", metavar="VAR",
                   help=f"require 'Authorization: Bearer <token>' with the token in environment variable VAR "
                        f"(default: {DEFAULT_TOKEN_ENV} if set, else no authentication)")
    p.add_argument("--max-body-mb", type=_positive_float, default=20.0, help="largest request body (default 20 MB)")
    p.add_argument("--max-image-pixels", type=positive_int, default=None,
                   help="largest image (width x height) accepted; bigger ones get 400 (default: Pillow's "
                        "decompression-bomb limit, about 89 million)")
    p.add_argument("--revision", help="Hub revision for the Hub models (default: main)")
    p.add_argument("--cache-size", type=int, default=1024,
                   help="results kept in the LRU result cache (default 1024; 0 disables it)")
    p.add_argument("--threads", type=positive_int, help="compute threads per forward pass (default: all cores)")
    p.add_argument("--decode-threads", type=positive_int, default=2,
                   help="threads decoding and preprocessing images (default 2)")
    p.add_argument("--backend", choices=["auto", "numba", "blas"], default="auto", help="GEMM backend")
    p.add_argument("--precision", choices=["fp32", "bf16", "int8"], default="fp32",
                   help="weights in float32 (default: parity with transformers), bfloat16, or int8 with dynamic "
                        "activation quantisation (see docs/precision.md)")
    p.add_argument("--body-timeout", type=_positive_float, default=30.0,
                   help="seconds a client may take to send its body (default 30)")
    p.add_argument("--graceful-timeout", type=_positive_float, default=30.0,
                   help="on SIGTERM/Ctrl-C, seconds to let in-flight requests finish (default 30)")
    r = p.add_argument_group("Ray Serve (pip install 'vitnp[ray]')")
    r.add_argument("--ray", action="store_true",
                   help="serve with Ray Serve (same protocol): a local Ray cluster, or the one at --ray-address")
    r.add_argument("--ray-address", metavar="ADDR", help="address of an existing Ray cluster")
    r.add_argument("--replicas", type=positive_int, default=1, metavar="N", help="with --ray: replicas (default 1)")
    r.add_argument("--autoscale", type=_replica_range, metavar="MIN:MAX",
                   help="with --ray: autoscale between MIN and MAX replicas on ongoing requests")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="log level (default info; the access log is logger vitnp.access at info)")
    return p


def split_model_arg(arg: str) -> tuple[str | None, str]:
    """'NAME=MODEL' -> (NAME, MODEL); a plain MODEL -> (None, MODEL). NAME must be a valid Hub id."""
    from .hub import is_hub_id

    name, sep, spec = arg.partition("=")
    if sep and name and spec and is_hub_id(name) and not os.path.exists(arg):
        return name, spec
    return None, arg


def resolve_token(token_env: str | None) -> str | None:
    if token_env:
        token = os.environ.get(token_env, "")
        if not token:
            raise ParameterError(f"--token-env {token_env}: environment variable {token_env} is not set or empty")
        return token
    return os.environ.get(DEFAULT_TOKEN_ENV) or None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.model and not args.load_on_demand:
        print("vitnp serve: give at least one --model (or --load-on-demand)", file=sys.stderr)
        return 2
    try:
        token = resolve_token(args.token_env)
    except ParameterError as e:
        print(f"vitnp serve: {e}", file=sys.stderr)
        return 2
    if args.ray:
        from .ray import run_serve

        return run_serve(args, token)
    if args.ray_address or args.autoscale or args.replicas != 1:
        print("vitnp serve: --ray-address, --replicas and --autoscale go with --ray", file=sys.stderr)
        return 2
    if args.max_image_pixels is not None:
        from PIL import Image

        # vitnp.preprocess.load_image refuses anything above Pillow's limit with an ImageError (400).
        Image.MAX_IMAGE_PIXELS = args.max_image_pixels

    options = BatchingOptions(args.max_batch_size, args.max_wait_ms / 1000.0, args.max_queue)
    registry = ModelRegistry(options, load_on_demand=args.load_on_demand, revision=args.revision,
                             threads=args.threads, backend=args.backend, precision=args.precision)
    for arg in args.model:
        alias, spec = split_model_arg(arg)
        t0 = time.perf_counter()
        try:
            worker = registry.load_startup_model(spec, alias)
        except VitnpError as e:
            print(f"vitnp serve: cannot load {spec}: {e}", file=sys.stderr)
            registry.close()
            return 2
        names = ", ".join((worker.name, *worker.aliases))
        log.info("model %s ready (%s) in %.1fs", spec, names, time.perf_counter() - t0)
    service = InferenceService(registry, cache_size=args.cache_size, decode_threads=args.decode_threads)
    app = create_app(service, token, int(args.max_body_mb * MB), args.body_timeout)

    import uvicorn

    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                timeout_graceful_shutdown=args.graceful_timeout, timeout_keep_alive=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
