"""HTTP server speaking the Hugging Face Inference API image-classification protocol.

    vitnp serve --model google/vit-base-patch16-224 --port 8000

    from huggingface_hub import InferenceClient
    InferenceClient("http://127.0.0.1:8000").image_classification("cats.jpg")

Routes: POST /, POST /models/{model_id}, POST /hf-inference/models/{model_id}, GET /health, GET /models.
A body is raw image bytes (any Content-Type or none) or JSON {"inputs": "<base64>", "parameters": {...}}.

This module is the HTTP layer only: it reads and checks requests, and maps the batching layer's results and
errors (vitnp.batching, vitnp.errors) to responses. It never touches pixel arrays.  `run_server` runs it for
`vitnp serve` from a ServerOptions (vitnp.cli reads the command line); Ray Serve replicas run `create_app`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import json
import logging
import math
import sys
import time

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .batching import InferenceService
from .errors import (
    ImageError,
    ModelLoadingError,
    ModelNotFoundError,
    ModelUnavailableError,
    OfflineError,
    ParameterError,
    QueueFullError,
    VitnpError,
)
from .options import ServerOptions, ServingOptions
from .registry import ModelRegistry
from .startup import limit_image_pixels, name_models

log = logging.getLogger("vitnp.server")
access_log = logging.getLogger("vitnp.access")

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
    """Request handlers bound to one InferenceService, the access token and the HTTP limits."""

    def __init__(self, service: InferenceService, token: str | None, options: ServingOptions):
        self.service = service
        self._token = token.encode() if token else None
        self.max_body_bytes = options.max_body_bytes
        self.body_timeout = options.body_timeout

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


def create_app(service: InferenceService, token: str | None, options: ServingOptions) -> Starlette:
    """The application `vitnp serve` runs, and every Ray Serve replica too."""
    server = Server(service, token, options)

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


# --------------------------------------------------------------------------- `vitnp serve`


def run_server(options: ServerOptions) -> int:
    """`vitnp serve`: load and warm up the named models, then answer on options.host:options.port until
    SIGTERM / Ctrl-C (in-flight requests get serving.graceful_timeout seconds to finish)."""
    serving = options.serving
    try:
        models = name_models(options.models)
    except VitnpError as e:
        print(f"vitnp serve: {e}", file=sys.stderr)
        return 2
    limit_image_pixels(serving)
    registry = ModelRegistry(serving, options.engine, load_on_demand=options.load_on_demand,
                             revision=options.revision)
    for model in models:
        t0 = time.perf_counter()
        try:
            registry.add(registry.load(model))
        except VitnpError as e:
            print(f"vitnp serve: cannot load {model.spec}: {e}", file=sys.stderr)
            registry.close()
            return 2
        log.info("model %s ready (%s) in %.1fs", model.spec, ", ".join((model.name, *model.aliases)),
                 time.perf_counter() - t0)
    service = InferenceService(registry, serving)
    app = create_app(service, options.token, serving)

    import uvicorn

    uvicorn.run(app, host=options.host, port=options.port, log_level=options.log_level, access_log=False,
                timeout_graceful_shutdown=serving.graceful_timeout, timeout_keep_alive=5)
    return 0
