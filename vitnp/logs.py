"""Logging for `vitnp serve` (and its Ray replicas): one handler on the root logger, text or JSON lines, every
line carrying the id of the request it was written for, control characters escaped.

    logs.configure("info", "json")
    token = logs.REQUEST_ID.set("4f3c...")      # the HTTP layer does this per request
    log.info("...")                              # -> {"time": ..., "request_id": "4f3c...", "message": "..."}

The request id is a context variable: asyncio tasks inherit it, and work handed to a thread pool carries it when
it runs under `run_with_context` (what every pool serving a request does), so the service's threads log with the
id of the request they work for.  A record may carry structured fields in `extra={"fields": {...}}` (the access
log does): JSON lines hold them as keys, text lines as `key=value`.

Anything logged may hold text a client chose (a path, a header, a model id): every control character (C0, DEL,
C1, and the Unicode line and paragraph separators) is written as an escape, so no client can start a line of
its own in the log.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("vitnp_request_id", default=None)
FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# C0 controls, DEL, C1 controls, and the characters some readers take as line breaks.
CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape(text: str) -> str:
    """text with every control character written as a Python-style escape (\\n, \\x1b, \\u2028)."""
    return CONTROL_CHARACTERS.sub(_escape_one, text) if CONTROL_CHARACTERS.search(text) else text


def _escape_one(match: re.Match) -> str:
    return match.group().encode("unicode_escape").decode("ascii")


def run_with_context(fn, *args):
    """A callable that runs fn(*args) in a copy of the caller's context (request id included): what to hand a
    thread pool, e.g. `loop.run_in_executor(pool, run_with_context(decode, data))`."""
    context = contextvars.copy_context()
    return lambda: context.run(fn, *args)


class TextFormatter(logging.Formatter):
    """`time LEVEL logger [request id]: message key=value ...`; a traceback follows on lines indented by 4
    spaces (so no line of it can pass for a record of its own), its control characters other than newlines
    escaped."""

    def __init__(self):
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        message = record.message
        fields = getattr(record, "fields", None)
        if fields:
            message += "".join(f" {key}={_text_value(value)}" for key, value in fields.items())
        request_id = REQUEST_ID.get()
        name = f"{record.name} [{request_id}]" if request_id else record.name
        return escape(f"{record.asctime} {record.levelname} {name}: {message}")

    def formatException(self, ei) -> str:
        return _indented(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _indented(stack_info)


def _indented(text: str) -> str:
    return "\n".join("    " + escape(line) for line in text.splitlines())


def _text_value(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    text = str(value)
    return json.dumps(text) if (not text or " " in text or '"' in text) else text


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (ISO 8601, UTC), level, logger, request_id (when set), message, the
    record's fields, and exception (the traceback) when there is one.  json.dumps escapes every control
    character, and non-ASCII text is written as \\u escapes too."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                    + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
        }
        request_id = REQUEST_ID.get()
        if request_id:
            out["request_id"] = request_id
        out["message"] = record.getMessage()
        fields = getattr(record, "fields", None)
        if fields:
            for key, value in fields.items():
                out.setdefault(key, value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str)


def formatter(fmt: str) -> logging.Formatter:
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    return JsonFormatter() if fmt == "json" else TextFormatter()


def configure(level: str, fmt: str = "text") -> None:
    """One stderr handler on the root logger in this format ("text" or "json") at this level ("debug",
    "info", ...), replacing the root's handlers; uvicorn's loggers write through it too (run uvicorn with
    log_config=None)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(fmt))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        uvicorn_log = logging.getLogger(name)
        uvicorn_log.handlers.clear()
        uvicorn_log.propagate = True
