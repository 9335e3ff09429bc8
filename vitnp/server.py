"""HTTP server speaking the Hugging Face Inference API image-classification protocol.

    vitnp serve --model google/vit-base-patch16-224 --port 8000

    from huggingface_hub import InferenceClient
    InferenceClient("http://127.0.0.1:8000").image_classification("cats.jpg")

Classification: POST /, POST /models/{model_id}, POST /hf-inference/models/{model_id}.  A body that is valid
JSON is {"inputs": "<base64 image>" | ["<base64>", ...], "parameters": {...}, "options": {...}} (a list of
inputs is answered with a list of lists); any other body is the raw image, whatever its Content-Type.
`?top_k=` and `?function_to_apply=` in the query apply too (JSON parameters win).
Operators: GET / (what this is), /health (= /health/live), /health/live, /health/ready, /metrics, /info,
/models, /openapi.json (vitnp.openapi describes every route).

This module is the HTTP layer only: it reads and checks requests, and maps the service's results and errors
(vitnp.batching, vitnp.errors) to responses; it never touches pixel arrays.  Every request gets an id
(x-request-id, echoed or generated), one access-log line (vitnp.logs) and one `request_finished` on the
service's metrics.  `run_server` runs it under uvicorn for `vitnp serve` (vitnp.cli reads the command line);
Ray Serve replicas run `create_app`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import contextlib
import hmac
import json
import logging
import math
import re
import sys
import time
import uuid
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import logs
from .batching import InferenceService
from .errors import (
    DeadlineExceededError,
    HubUnreachableError,
    ImageError,
    ModelLoadFailedError,
    ModelLoadingError,
    ModelNotFoundError,
    ModelUnavailableError,
    NonFiniteScoresError,
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
# Past this, a JSON body is parsed on the HTTP layer's own threads instead of the event loop.
PARSE_OFF_LOOP_BYTES = 1 * MB
PARSE_THREADS = 2
# An over-limit body is still read (and discarded) up to this multiple of the limit, so that ordinary
# clients, which send the whole body before reading the answer, see the 413 instead of a reset connection.
DRAIN_FACTOR = 2
# The protocol's JSON is 3 levels deep; a number (or a query-string top_k) is a few characters.
MAX_JSON_DEPTH = 32
MAX_NUMBER_CHARS = 64
TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"0", "false", "no", "off"}
INTEGER = re.compile(r"[+-]?[0-9]+")
# An x-request-id a client sends is echoed if it is 1-128 printable ASCII characters, else a new one is made.
CLIENT_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")
GENERIC_500 = "Internal server error: the request could not be completed (details are in the server log)"
CLASSIFY_ROUTES = ("/", "/models/{model_id}", "/hf-inference/models/{model_id}")
# The route label of a request no route matched (metrics never carry a raw path).
UNMATCHED_ROUTE = "unmatched"
# Response headers a browser page may read when CORS is on.
EXPOSED_HEADERS = ("x-request-id", "x-compute-time", "x-compute-type", "x-cache", "retry-after")
# While draining on SIGTERM, how often the server looks whether the requests in flight have finished.
DRAIN_POLL_S = 0.05


class HTTPError(Exception):
    """A request the HTTP layer refuses before it reaches the service."""

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


@dataclass
class ClassifyRequest:
    """What a classification request asks for, as sent (parameters are validated by the service, per model)."""

    images: list[bytes]
    listed: bool                   # "inputs" was a list: the answer is a list of lists
    top_k: object = None
    function_to_apply: object = None
    wait_for_model: bool | None = None  # from "options" in the body (the x-wait-for-model header wins)
    use_cache: bool | None = None       # from "options" in the body (the x-use-cache header wins)
    not_json: str | None = None    # why the body was not JSON, when it could have been meant as JSON


class JSONLimitError(ValueError):
    """A JSON body nested too deep or holding an over-long number."""


def bounded_number(text: str):
    if len(text) > MAX_NUMBER_CHARS:
        raise JSONLimitError(f"request body holds a number of {len(text)} characters; the limit is "
                             f"{MAX_NUMBER_CHARS}")
    return float(text) if any(c in text for c in ".eE") else int(text)


def json_depth_exceeds(value, limit: int) -> bool:
    """Whether a parsed JSON value nests containers deeper than limit."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def may_be_json(body: bytes, content_type: str) -> bool:
    """Worth trying as JSON: said to be JSON, or starting like a JSON object or array (no image format
    does)."""
    if content_type.split(";")[0].strip().lower() in ("application/json", "text/json"):
        return True
    return body.lstrip()[:1] in (b"{", b"[")


def parse_body(body: bytes, content_type: str) -> ClassifyRequest:
    """A request body -> what it asks for.  Not valid JSON: the body is the raw image."""
    if not body:
        raise HTTPError(400, "request body is empty: send image bytes, or JSON "
                             '{"inputs": "<base64 image>", "parameters": {...}}')
    if not may_be_json(body, content_type):
        return ClassifyRequest([body], listed=False)
    try:
        payload = json.loads(body, parse_int=bounded_number, parse_float=bounded_number)
    except JSONLimitError as e:
        raise HTTPError(400, str(e)) from None
    except RecursionError:
        raise HTTPError(400, f"JSON body is nested deeper than {MAX_JSON_DEPTH} levels") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return ClassifyRequest([body], listed=False, not_json=str(e))
    if json_depth_exceeds(payload, MAX_JSON_DEPTH):
        raise HTTPError(400, f"JSON body is nested deeper than {MAX_JSON_DEPTH} levels")
    return parse_json_payload(payload)


def parse_json_payload(payload) -> ClassifyRequest:
    if not isinstance(payload, dict):
        raise HTTPError(400, 'JSON body must be an object: {"inputs": "<base64 image>", "parameters": {...}}')
    inputs = payload.get("inputs", payload.get("image"))
    if inputs is None:
        raise HTTPError(400, 'JSON body has no "inputs" (a base64-encoded image, or a list of them)')
    if isinstance(inputs, list):
        if not inputs:
            raise HTTPError(400, '"inputs" is an empty list')
        for i, item in enumerate(inputs):
            if not isinstance(item, str):
                raise HTTPError(400, f'"inputs"[{i}] must be a base64-encoded image string, got '
                                     f"{type(item).__name__}")
        images, listed = [decode_base64_image(item, f'"inputs"[{i}]') for i, item in enumerate(inputs)], True
    elif isinstance(inputs, str):
        images, listed = [decode_base64_image(inputs, '"inputs"')], False
    else:
        raise HTTPError(400, f'"inputs" must be a base64-encoded image string or a list of them, got '
                             f"{type(inputs).__name__}")
    parameters = json_object(payload, "parameters")
    options = json_object(payload, "options")
    return ClassifyRequest(images, listed, parameters.get("top_k"), parameters.get("function_to_apply"),
                           wait_for_model=option_flag(options, "wait_for_model"),
                           use_cache=option_flag(options, "use_cache"))


def json_object(payload: dict, key: str) -> dict:
    value = payload.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise HTTPError(400, f'"{key}" must be an object, got {type(value).__name__}')
    return value


def option_flag(options: dict, name: str) -> bool | None:
    value = options.get(name)
    if value is None or isinstance(value, bool):
        return value
    raise HTTPError(400, f'"options": "{name}" must be true or false, got {value!r}')


def decode_base64_image(text: str, what: str) -> bytes:
    if text.startswith(("http://", "https://")):
        raise HTTPError(400, f"{what} is a URL; this server does not fetch URLs: send the image bytes or "
                             "base64-encoded image data")
    if text.startswith("data:"):
        text = text.partition(",")[2]
    text = "".join(text.split())
    altchars = b"-_" if ("-" in text or "_" in text) else None
    text += "=" * (-len(text) % 4)
    try:
        data = base64.b64decode(text, altchars=altchars, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPError(400, f"{what} is not valid base64") from None
    if not data:
        raise HTTPError(400, f"{what} is empty")
    return data


def query_parameters(request: Request) -> tuple[object, object]:
    """(top_k, function_to_apply) from the query string, as given (None when absent); a top_k made of digits
    is an integer, anything else is passed on for the service to refuse with its own message."""
    top_k = request.query_params.get("top_k")
    if top_k is not None:
        if len(top_k) > MAX_NUMBER_CHARS:
            raise HTTPError(400, f"top_k in the query has {len(top_k)} characters; the limit is {MAX_NUMBER_CHARS}")
        if INTEGER.fullmatch(top_k.strip()):
            top_k = int(top_k)
    return top_k, request.query_params.get("function_to_apply")


def header_flag(request: Request, name: str) -> bool | None:
    """A true/false header: None when absent."""
    value = request.headers.get(name)
    if value is None:
        return None
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


def retry_after(seconds: float) -> dict:
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def error_for(exc: BaseException) -> JSONResponse:
    """Map an error from the service to the protocol's status and body (vitnp.errors says which status each
    error is)."""
    if isinstance(exc, HTTPError):
        return error_response(exc.status, exc.message, exc.headers)
    if isinstance(exc, ModelLoadingError):
        return error_response(503, str(exc), retry_after(exc.estimated_time), estimated_time=exc.estimated_time)
    if isinstance(exc, DeadlineExceededError):
        return error_response(503, str(exc), retry_after(exc.retry_after))
    if isinstance(exc, QueueFullError):
        return error_response(429, str(exc), retry_after(exc.retry_after))
    if isinstance(exc, HubUnreachableError):
        return error_response(502, str(exc), retry_after(exc.retry_after))
    if isinstance(exc, (ImageError, ParameterError, ModelUnavailableError)):
        return error_response(400, str(exc))
    if isinstance(exc, (ModelNotFoundError, OfflineError)):
        return error_response(404, str(exc))
    if isinstance(exc, (ModelLoadFailedError, NonFiniteScoresError)):
        return error_response(500, str(exc))
    log.error("request failed", exc_info=exc)
    return error_response(500, GENERIC_500)


# --------------------------------------------------------------------------- the application


class Server:
    """Request handlers bound to one InferenceService, the access token and the HTTP limits; counts the
    requests in flight."""

    def __init__(self, service: InferenceService, token: str | None, options: ServingOptions):
        self.service = service
        self._token = token.encode() if token else None
        self.max_body_bytes = options.max_body_bytes
        self.body_timeout = options.body_timeout
        self.in_flight = 0
        self._parse_pool = concurrent.futures.ThreadPoolExecutor(PARSE_THREADS, thread_name_prefix="vitnp-parse")

    def authorize(self, request: Request) -> None:
        if self._token is None:
            return
        given = bearer_token(request)
        # compare_digest takes the same time wherever the first difference is.
        if given is None or not hmac.compare_digest(given.encode(), self._token):
            raise HTTPError(401, "Invalid or missing token: send 'Authorization: Bearer <token>'",
                            {"WWW-Authenticate": "Bearer"})

    async def classify(self, request: Request) -> Response:
        state = request.scope["state"]
        model = request.path_params.get("model_id")
        if model is not None:
            model = model.strip("/")
        state["model"] = model or self.service.registry.default
        parsed = None
        deadline = self.service.deadline()
        try:
            self.authorize(request)
            body = await read_body(request, self.max_body_bytes, self.body_timeout)
            use_cache = header_flag(request, "x-use-cache")
            wait_for_model = header_flag(request, "x-wait-for-model")
            query_top_k, query_function = query_parameters(request)
            parsed = await self._parse(body, request.headers.get("content-type", ""))
            state["images"] = len(parsed.images)
            results = await self.service.classify(
                model, parsed.images,
                parsed.top_k if parsed.top_k is not None else query_top_k,
                parsed.function_to_apply if parsed.function_to_apply is not None else query_function,
                use_cache=(use_cache if use_cache is not None else parsed.use_cache) is not False,
                wait_for_model=wait_for_model if wait_for_model is not None else parsed.wait_for_model,
                deadline=deadline)
        except Exception as e:  # noqa: BLE001 - every failure becomes a JSON error, never a traceback
            if isinstance(e, ImageError) and parsed is not None and parsed.not_json is not None:
                e = HTTPError(400, f"request body is neither valid JSON ({parsed.not_json}) nor an image ({e})")
            served = self.service.registry.lookup(state["model"]) if state["model"] else None
            if served is not None:
                state["served_model"] = served.name
            return error_for(e)
        hits = sum(r.cache_hit for r in results)
        cache = "hit" if hits == len(results) else "miss" if hits == 0 else "partial"
        state.update(model=results[0].model, batch_size=max(r.batch_size for r in results), cache=cache,
                     served_model=results[0].model)
        predictions = [r.predictions for r in results] if parsed.listed else results[0].predictions
        return JSONResponse(predictions, headers={
            "x-compute-time": f"{max(r.compute_seconds for r in results):.3f}",
            "x-compute-type": "cpu",
            "x-cache": cache,
        })

    async def _parse(self, body: bytes, content_type: str) -> ClassifyRequest:
        if len(body) > PARSE_OFF_LOOP_BYTES and may_be_json(body, content_type):
            return await asyncio.get_running_loop().run_in_executor(
                self._parse_pool, logs.run_with_context(parse_body, body, content_type))
        return parse_body(body, content_type)

    async def root(self, request: Request) -> Response:
        from . import __version__

        return JSONResponse({
            "name": "vitnp",
            "version": __version__,
            "description": "ViT / DeiT image classification over HTTP, speaking the Hugging Face Inference API "
                           "image-classification protocol",
            "classify": "POST / (default model) or POST /models/{model_id}: raw image bytes, or JSON "
                        '{"inputs": "<base64>", "parameters": {"top_k": 5}}',
            "docs": "/openapi.json",
            "health": {"live": "/health/live", "ready": "/health/ready"},
            "info": "/info",
            "models": "/models",
            "metrics": "/metrics",
        })

    async def live(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        ready, reason = self.service.readiness()
        if not ready:
            return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)
        return JSONResponse({"status": "ready"})

    async def models(self, request: Request) -> Response:
        try:
            self.authorize(request)
        except HTTPError as e:
            return error_for(e)
        return JSONResponse(self.service.models())

    async def info(self, request: Request) -> Response:
        try:
            self.authorize(request)
        except HTTPError as e:
            return error_for(e)
        return JSONResponse(self.service.info())

    async def metrics(self, request: Request) -> Response:
        try:
            self.authorize(request)
        except HTTPError as e:
            return error_for(e)
        body, content_type = self.service.metrics.render()
        return Response(body, media_type=content_type)

    async def openapi(self, request: Request) -> Response:
        from . import __version__
        from .openapi import document

        return JSONResponse(document(__version__))

    def close(self) -> None:
        self._parse_pool.shutdown(wait=True)


async def _http_exception(request: Request, exc: HTTPException) -> Response:
    return error_response(exc.status_code, exc.detail or "error", getattr(exc, "headers", None))


async def _unhandled(request: Request, exc: Exception) -> Response:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, GENERIC_500)


def request_id(scope) -> str:
    """The client's x-request-id when it is a sane one, else a new one."""
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            text = value.decode("latin-1")
            if CLIENT_REQUEST_ID.fullmatch(text):
                return text
            break
    return uuid.uuid4().hex


class RequestContext:
    """ASGI middleware, outermost: gives every request an id (x-request-id in, or a new one; on every response
    and, through logs.REQUEST_ID, on every log line written for it), counts the requests in flight, answers
    an error that escaped the handlers with a generic 500, and writes one access-log line and one
    `request_finished` per request."""

    def __init__(self, app, server: Server):
        self.app = app
        self.server = server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        rid = request_id(scope)
        token = logs.REQUEST_ID.set(rid)
        state = scope.setdefault("state", {})
        status = 500
        started = False
        rid_header = (b"x-request-id", rid.encode())

        async def send_with_id(message):
            nonlocal status, started
            if message["type"] == "http.response.start":
                status = message["status"]
                started = True
                message["headers"] = [*message.get("headers", ()), rid_header]
            await send(message)

        self.server.in_flight += 1
        try:
            await self.app(scope, receive, send_with_id)
        except Exception as e:  # noqa: BLE001 - a bug: logged, answered with a generic 500
            log.error("unhandled error on %s %s", scope["method"], scope["path"], exc_info=e)
            if not started:
                await error_response(500, GENERIC_500)(scope, receive, send_with_id)
        finally:
            self.server.in_flight -= 1
            self.finished(scope, state, status, time.perf_counter() - t0)
            logs.REQUEST_ID.reset(token)

    def finished(self, scope, state: dict, status: int, seconds: float) -> None:
        route = scope.get("route")
        template = route.path.replace("{model_id:path}", "{model_id}") if route is not None else UNMATCHED_ROUTE
        images = state.get("images", 0)
        client = scope.get("client")
        access_log.info('%s "%s %s"', f"{client[0]}:{client[1]}" if client else "-", scope["method"],
                        scope["path"], extra={"fields": {
                            "model": state.get("model"), "status": status, "batch": state.get("batch_size"),
                            "cache": state.get("cache"), "images": images, "latency": round(seconds, 6),
                            "route": template}})
        # Only a model this server serves names a metrics series: a client cannot make up label values.
        self.server.service.metrics.request_finished(state.get("served_model"), template, status, seconds,
                                                     images)


def create_app(service: InferenceService, token: str | None, options: ServingOptions,
               cors_allow_origins: tuple[str, ...] = ()) -> Starlette:
    """The application `vitnp serve` runs, and every Ray Serve replica too.  cors_allow_origins: the origins
    browser pages may call it from ("*": any; empty: no CORS headers).  app.state.server is the Server."""
    server = Server(service, token, options)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        # uvicorn calls this after in-flight requests have finished: stop the engine workers.
        service.close()
        server.close()

    routes = [
        Route("/", server.classify, methods=["POST"]),
        Route("/models/{model_id:path}", server.classify, methods=["POST"]),
        Route("/hf-inference/models/{model_id:path}", server.classify, methods=["POST"]),
        Route("/", server.root, methods=["GET"]),
        Route("/health", server.live, methods=["GET"]),
        Route("/health/live", server.live, methods=["GET"]),
        Route("/health/ready", server.ready, methods=["GET"]),
        Route("/models", server.models, methods=["GET"]),
        Route("/info", server.info, methods=["GET"]),
        Route("/metrics", server.metrics, methods=["GET"]),
        Route("/openapi.json", server.openapi, methods=["GET"]),
    ]
    middleware = [Middleware(RequestContext, server=server)]
    if cors_allow_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(cors_allow_origins),
                                     allow_methods=["GET", "POST"], allow_headers=["*"],
                                     expose_headers=list(EXPOSED_HEADERS), max_age=600))
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                    exception_handlers={HTTPException: _http_exception, Exception: _unhandled})
    app.state.server = server
    return app


# --------------------------------------------------------------------------- `vitnp serve`


def header_deadline_protocol(base, header_timeout: float):
    """A uvicorn HTTP protocol class that also closes a connection that has not sent a whole request head
    within header_timeout seconds of opening, or of its previous response.  uvicorn's own keep-alive timer
    runs only between a response and the next request's first byte, so a client that connects and sends
    nothing, or half a head, would hold its connection for ever."""

    class HeaderDeadlineProtocol(base):
        head_timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self.arm_head_timer()

        def on_response_complete(self):
            super().on_response_complete()
            self.arm_head_timer()

        def connection_lost(self, exc):
            if self.head_timer is not None:
                self.head_timer.cancel()
            super().connection_lost(exc)

        def arm_head_timer(self):
            if self.head_timer is not None:
                self.head_timer.cancel()
            if not self.transport.is_closing():
                self.head_timer = self.loop.call_later(header_timeout, self.head_timeout, self.cycle)

        def head_timeout(self, cycle):
            # The head arrived if a new request cycle began since the timer was armed.
            if self.cycle is cycle and (cycle is None or cycle.response_complete) \
                    and not self.transport.is_closing():
                log.info("closing a connection from %s: no complete request head within %g seconds",
                         "%s:%d" % self.client if self.client else "-", header_timeout)
                self.transport.close()

    return HeaderDeadlineProtocol


def uvicorn_server_class():
    """uvicorn.Server that loads the startup models once the port is open (liveness answers at once, readiness
    once they are served), and drains on the first SIGTERM / Ctrl-C: readiness turns 503 at once while the
    port stays open and the requests in flight finish (up to the graceful timeout), then uvicorn's own
    graceful shutdown runs.  A second signal hands over to uvicorn at once."""
    import uvicorn

    class VitnpServer(uvicorn.Server):
        def __init__(self, config, http: Server, models: list, graceful_timeout: float):
            super().__init__(config)
            self.http = http
            self.models = models
            self.graceful_timeout = graceful_timeout
            self.drain_started: float | None = None
            self.load_error: BaseException | None = None

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            if not self.should_exit:
                self.http.service.registry.start(self.models).add_done_callback(self.startup_loaded)

        def startup_loaded(self, future: asyncio.Future) -> None:
            if future.cancelled() or future.exception() is None:
                return
            self.load_error = future.exception()
            self.should_exit = True

        def handle_exit(self, sig, frame):
            if self.drain_started is not None:
                return super().handle_exit(sig, frame)
            self.drain_started = time.monotonic()
            self.http.service.drain()
            log.info("draining: readiness is off; waiting for %d request(s) in flight", self.http.in_flight)

        async def on_tick(self, counter: int) -> bool:
            if self.drain_started is not None and not self.should_exit:
                if self.http.in_flight == 0 or time.monotonic() - self.drain_started > self.graceful_timeout:
                    self.should_exit = True
            return await super().on_tick(counter)

        async def main_loop(self) -> None:
            # uvicorn looks at its tick every 0.1 s; draining ends sooner when it looks more often.
            counter = 0
            while not await self.on_tick(counter):
                counter = (counter + 1) % 864000
                await asyncio.sleep(DRAIN_POLL_S if self.drain_started is not None else 0.1)

    return VitnpServer


def run_server(options: ServerOptions) -> int:
    """`vitnp serve`: open the port on options.host:options.port, load and warm up the named models, and answer
    until SIGTERM / Ctrl-C (drained as uvicorn_server_class says; in-flight requests get
    serving.graceful_timeout seconds to finish).  A startup model that fails to load stops the server (2)."""
    serving = options.serving
    try:
        models = name_models(options.models)
    except VitnpError as e:
        print(f"vitnp serve: {e}", file=sys.stderr)
        return 2
    limit_image_pixels(serving)
    registry = ModelRegistry(serving, options.engine, load_on_demand=options.load_on_demand,
                             revision=options.revision)
    service = InferenceService(registry, serving)
    app = create_app(service, options.token, serving, options.cors_allow_origins)

    import uvicorn
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    config = uvicorn.Config(
        app, host=options.host, port=options.port, log_level=options.log_level, log_config=None,
        access_log=False, timeout_graceful_shutdown=serving.graceful_timeout,
        timeout_keep_alive=options.keep_alive_timeout, limit_concurrency=options.max_connections,
        http=header_deadline_protocol(AutoHTTPProtocol, options.header_timeout))
    server = uvicorn_server_class()(config, app.state.server, models, serving.graceful_timeout)
    server.run()
    if server.load_error is not None:
        spec = next((m.spec for m in models if registry.lookup(m.name) is None), "a model")
        if not isinstance(server.load_error, VitnpError):
            log.error("loading %s failed", spec, exc_info=server.load_error)
        print(f"vitnp serve: cannot load {spec}: {server.load_error}", file=sys.stderr)
        return 2
    return 0
