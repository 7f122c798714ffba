"""One log format for every line a process writes, uvicorn's included (docs/operations.md, "Logs").

``logs.format``:

- ``text``: one line per record: time (UTC), level, node, role, logger, message, then ``trace=… span=…``
  when a span is current, then the traceback (if any) on the following lines;
- ``json``: one object per line: ``ts`` (RFC 3339, UTC), ``level``, ``logger``, ``message``, ``node``,
  ``role``, ``trace_id``/``span_id`` (when a span is current), ``exc`` (the formatted traceback, when
  there is one) and the ``extra`` fields the record carries.

:func:`setup` is called once at process start by the command that runs a role: it replaces the root
logger's handlers with one handler on stderr and lets every other logger (uvicorn's, aiormq's, ...)
propagate to it. uvicorn is started with ``log_config=None`` (im.api.server), so it installs no handler of
its own.

Trace ids are read, never made: OpenTelemetry's current span, only when its context is valid (the
tracing setup installs the provider; with tracing off every span is invalid and nothing is added).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import IO, Any, Literal

from opentelemetry import trace

from im.throttled_log import ThrottledLog

__all__ = ["ImFormatter", "setup"]

#: The attributes every LogRecord has: anything else on a record came from ``extra=``.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime", "taskName"}


def _utc(created: float) -> str:
    """RFC 3339 UTC with milliseconds: ``2026-12-05T13:04:05.123Z``."""
    seconds = int(created)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{int((created - seconds) * 1000):03d}Z"


def current_ids() -> tuple[str, str] | None:
    """(trace id, span id) in hex of the current span, when one with a valid context is current."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


class ImFormatter(logging.Formatter):
    """Formats a record as one text line or one JSON object, naming this process's node and role."""

    def __init__(self, fmt: Literal["text", "json"] = "text", *, node: str = "", role: str = "") -> None:
        super().__init__()
        self.kind = fmt
        self.node = node or "-"
        self.role = role or "-"

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        exc = ""
        if record.exc_info:
            exc = self.formatException(record.exc_info)
        elif record.exc_text:
            exc = record.exc_text
        if record.stack_info:
            exc = f"{exc}\n{self.formatStack(record.stack_info)}" if exc else self.formatStack(record.stack_info)
        ids = current_ids()
        if self.kind == "json":
            out: dict[str, Any] = {
                "ts": _utc(record.created),
                "level": record.levelname,
                "logger": record.name,
                "message": message,
                "node": self.node,
                "role": self.role,
            }
            if ids is not None:
                out["trace_id"], out["span_id"] = ids
            if exc:
                out["exc"] = exc
            for key, value in record.__dict__.items():
                if key not in _STANDARD and key not in out and not key.startswith("_"):
                    out[key] = value
            return json.dumps(out, default=str, ensure_ascii=False)
        line = f"{_utc(record.created)} {record.levelname} {self.node} {self.role} {record.name}: {message}"
        if ids is not None:
            line += f" trace={ids[0]} span={ids[1]}"
        return f"{line}\n{exc}" if exc else line


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a record is emitted, not the object it was at setup: a
    command run in-process (tests, an embedding program) may replace stderr and close the old one."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> IO[str]:
        return sys.stderr

    @stream.setter
    def stream(self, value: IO[str]) -> None:
        pass


def setup(
    *,
    level: str = "info",
    fmt: Literal["text", "json"] = "text",
    role: str = "",
    node: str = "",
    client_error_interval: float = 10.0,
    stream: IO[str] | None = None,
) -> logging.Handler:
    """Route every logger of the process into one handler with :class:`ImFormatter` (called once at
    start; calling it again replaces the handler). ``client_error_interval``: the window of the counted
    lines of client-caused errors (:class:`im.throttled_log.ThrottledLog`). Returns the handler."""
    ThrottledLog.default_window = client_error_interval
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_im_logs", False):
            root.removeHandler(old)
            old.close()
    handler: logging.Handler = logging.StreamHandler(stream) if stream is not None else _StderrHandler()
    handler._im_logs = True  # type: ignore[attr-defined]  # ours, replaced by the next setup()
    handler.setFormatter(ImFormatter(fmt, node=node, role=role))
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Loggers configured elsewhere with their own handlers (uvicorn's defaults, if anything set them up)
    # write through ours instead: one format for every line.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
    # aiormq logs every dropped broker connection with a traceback; the relay and the consumer already
    # log the outage (and their reconnects) in one line each.
    logging.getLogger("aiormq").setLevel(logging.ERROR)
    # asyncpg's pool writes a traceback each time it fails to reconnect while PostgreSQL is away; the
    # readiness report says so in one line ("not ready (store: ...)") and again when it is back.
    logging.getLogger("asyncpg.pool").setLevel(logging.ERROR)
    return handler
