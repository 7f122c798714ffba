"""The operations listener of ``im gateway`` and ``im transfer`` (config ``ops``): HTTP/1.1 with
``GET /metrics``, ``GET /health/live`` and ``GET /health/ready`` (docs/operations.md). HTTPS only when
the process has a certificate (the ``tls`` section), with the context current at each handshake, so a
reloaded certificate is served to new connections; the handshake must end within :data:`HEAD_TIMEOUT`.

Why not uvicorn: these roles serve no HTTP otherwise, and three fixed answers need no framework. One
request per connection (``Connection: close``), the request head bounded (:data:`MAX_HEAD` bytes, else
431) and read within :data:`HEAD_TIMEOUT` seconds; a malformed request gets 400 and the listener carries on.
Not authenticated: bind it to a private interface.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from collections.abc import Awaitable, Callable

from im.observability import metrics

log = logging.getLogger(__name__)

#: ``ready()`` answers (ready, details): details go into the JSON body of ``/health/ready``.
#: (im.observability.health.Readiness.check is one.)
ReadyCheck = Callable[[], Awaitable[tuple[bool, dict[str, object]]]]

MAX_HEAD = 8192
HEAD_TIMEOUT = 5.0
#: A readiness check that takes longer answers 503.
READY_TIMEOUT = 5.0

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


class OpsServer:
    """``start`` binds (port 0: a free one, then in :attr:`port`/:attr:`url`), ``stop`` closes; a role lists
    it as its first lifecycle part, so it answers (``/health/ready`` 503) while the role drains."""

    def __init__(
        self, host: str, port: int, metrics: bool, ready: ReadyCheck, tls: Callable[[], ssl.SSLContext] | None = None
    ) -> None:
        self.host = host
        self.port = port
        self.metrics = metrics
        self.ready = ready
        self.tls = tls
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    async def start(self) -> None:
        context = self._context()
        if context is None:
            self._server = await asyncio.start_server(self._serve, self.host, self.port, limit=MAX_HEAD)
        else:
            self._server = await asyncio.start_server(
                self._serve, self.host, self.port, limit=MAX_HEAD, ssl=context, ssl_handshake_timeout=HEAD_TIMEOUT
            )
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("operations listener on %s (/metrics, /health/live, /health/ready)", self.url)

    def _context(self) -> ssl.SSLContext | None:
        """The listener's context: it holds no certificate itself, but hands each handshake to the one
        ``tls`` gives at that moment (OpenSSL's server-name callback runs on every ClientHello, with or
        without SNI), so a reloaded certificate is served without rebinding. The protocol versions and
        options are the listener's own (set before the callback runs): copied from the first context."""
        current = self.tls
        if current is None:
            return None
        first = current()
        base = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)  # versions and options come from here
        base.minimum_version = first.minimum_version
        base.options |= first.options

        def choose(conn: ssl.SSLObject, _name: str | None, _base: ssl.SSLContext) -> None:
            conn.context = current()

        base.sni_callback = choose
        return base

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 2.0)
        self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            status, ctype, body = await self._answer(reader)
            head = (
                f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
                f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Cache-Control: no-store\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode("ascii") + body)
            await asyncio.wait_for(writer.drain(), HEAD_TIMEOUT)
            if status >= 400:  # unread bytes would make the close a reset that can drop the answer
                writer.write_eof()
                await asyncio.wait_for(_discard(reader, 64 * 1024), 1.0)
        except (OSError, TimeoutError, asyncio.CancelledError):
            pass  # the client went away or stalled: nothing to answer
        except Exception:  # a bug here must not end the listener
            log.exception("operations listener: answering failed")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)
            if task is not None:
                self._handlers.discard(task)

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[int, str, bytes]:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
        except asyncio.LimitOverrunError:
            return _text(431, "request head too large")
        except asyncio.IncompleteReadError:
            return _text(400, "incomplete request")
        except TimeoutError:
            return _text(408, "request head not received in time")
        if len(head) > MAX_HEAD:
            return _text(431, "request head too large")
        try:
            line = head.split(b"\r\n", 1)[0].decode("ascii")
            method, target, version = line.split(" ")
        except (UnicodeDecodeError, ValueError):
            return _text(400, "malformed request line")
        if not version.startswith("HTTP/1.") or not target.startswith("/"):
            return _text(400, "malformed request line")
        path = target.split("?", 1)[0]
        if path not in ("/metrics", "/health/live", "/health/ready"):
            return _text(404, "not found")
        if method != "GET":
            return _text(405, "only GET")
        if path == "/health/live":
            return _json(200, {"status": "alive"})
        if path == "/health/ready":
            return await self._ready()
        text = metrics.render() if self.metrics else None
        if text is None:
            return _text(404, "metrics are off (metrics.enabled=false)")
        return 200, metrics.CONTENT_TYPE, text

    async def _ready(self) -> tuple[int, str, bytes]:
        try:
            ok, details = await asyncio.wait_for(self.ready(), READY_TIMEOUT)
        except Exception as exc:  # a check that raises or hangs means not ready
            return _json(503, {"ready": False, "error": f"{type(exc).__name__}: {exc}"[:300]})
        return _json(200 if ok else 503, {"ready": ok, **details})


async def _discard(reader: asyncio.StreamReader, limit: int) -> None:
    """Read and drop what the client still sends, up to ``limit`` bytes or its end of stream."""
    while limit > 0:
        chunk = await reader.read(min(limit, 16384))
        if not chunk:
            return
        limit -= len(chunk)


def _text(status: int, message: str) -> tuple[int, str, bytes]:
    return status, "text/plain; charset=utf-8", (message + "\n").encode()


def _json(status: int, body: dict[str, object]) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(body, default=str).encode()
