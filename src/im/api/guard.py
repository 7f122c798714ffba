"""The HTTP listener's own limits, around uvicorn's h11 protocol: admission, head and body timeouts,
header count.

uvicorn (0.54, h11: httptools is not installed) bounds the head's size (``h11_max_incomplete_event_size``)
and idle keep-alive connections (``timeout_keep_alive``), but nothing else: a head sent one byte at a
time, or a body that stops half-way, held its connection forever. :func:`guarded_protocol` makes a
subclass of its protocol that adds, per connection:

- admission (:class:`im.net.Admission`): over a cap, ``503 unavailable`` with ``Retry-After`` and
  ``Connection: close``, written before the request is read;
- the head timeout: a request head must be complete within ``head_timeout`` seconds of the connection's
  start or of the previous response's end, else the connection is closed;
- the body timeout: while a request body is being read, ``body_timeout`` seconds without a byte from
  the client close the connection (time the server itself stopped reading does not count);
- a response sent before its request body was read whole (413, 401, ...): the rest of the body is read
  and discarded (so that a client that sends its whole body before reading gets the answer rather than
  a reset), for at most ``body_timeout`` seconds and ``DRAIN_MAX_BYTES`` bytes, then the connection is
  closed.

:class:`HeaderLimit` answers requests with more than ``max_headers`` header fields ``431 too_large``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, ClassVar

import h11
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from im.net import Admission, Ticket, Verdict, refusal_503
from im.throttled_log import ThrottledLog

#: Seconds a refused connection is kept half-closed so that the client reads the 503 before the close.
REFUSAL_LINGER = 2.0
#: Bytes of an unwanted request body read and discarded after an early answer, before closing instead.
DRAIN_MAX_BYTES = 64 * 1024 * 1024


#: uvicorn writes a warning per malformed request ("Invalid HTTP request received.", an unsupported
#: upgrade): a client can send those at will, so they are counted into one line per window.
_malformed = ThrottledLog(logging.getLogger("im.api"), "malformed HTTP requests")


class _ClientErrorLogger:
    """uvicorn's protocol logger with its warnings (each about what one client sent) throttled; the
    rest (levels, errors, trace lines) goes to uvicorn's logger unchanged."""

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger

    @property
    def level(self) -> int:
        return self._logger.level

    def warning(self, msg: object, *args: object, **_: object) -> None:
        _malformed.hit(str(msg) % args if args else str(msg))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._logger, name)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with admission and the head and body timeouts (set by
    :func:`guarded_protocol`)."""

    admission: ClassVar[Admission]
    head_timeout: ClassVar[float]
    body_timeout: ClassVar[float]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.logger = _ClientErrorLogger(self.logger)  # type: ignore[assignment]
        self._ticket: Ticket | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._phase = ""  # "head": waiting for a head; "body": reading a body; "drain": discarding one
        self._drained = 0

    # --- admission -----------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        ticket = self._ticket = self.admission.admit(transport.get_extra_info("peername"))
        if not ticket.admitted:
            self.transport = transport
            transport.write(refusal_503(ticket.reason))
            if ticket.verdict is Verdict.REFUSE and transport.can_write_eof():
                transport.write_eof()  # then read (and drop) until the client closes, at most REFUSAL_LINGER
                self._timer = self.loop.call_later(REFUSAL_LINGER, transport.abort)
            else:
                transport.close()
            return
        super().connection_made(transport)
        self._wait_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        ticket = self._ticket
        if ticket is not None:
            self.admission.release(ticket)
            if not ticket.admitted:
                return
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._ticket is None or not self._ticket.admitted:
            return
        if self._phase == "drain":
            self._drained += len(data)
            if self._drained > DRAIN_MAX_BYTES:
                self._expired()
                return
        super().data_received(data)
        self._track()

    # --- timeouts ------------------------------------------------------------------------------------

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing():
            self._cancel()
        elif self.conn.their_state is h11.SEND_BODY:
            # Answered before the body was read whole: uvicorn reads and drops the rest; bound that.
            self._phase = "drain"
            self._drained = 0
            self._arm(self.body_timeout, self._expired)
        else:
            self._track()

    def _track(self) -> None:
        """Arm the timer that fits the client's state (after each read and each response)."""
        state = self.conn.their_state
        if state is h11.IDLE:
            if self._phase != "head":
                self._wait_head()
        elif state is h11.SEND_BODY:
            if self._phase == "drain":
                return  # its own deadline, armed once
            self._phase = "body"
            self._arm(self.body_timeout, self._body_expired)  # again on every read
        elif self._phase:
            self._phase = ""
            self._cancel()

    def _wait_head(self) -> None:
        self._phase = "head"
        self._arm(self.head_timeout, self._expired)

    def _body_expired(self) -> None:
        self._timer = None
        if self.flow is not None and self.flow.read_paused:
            self._arm(self.body_timeout, self._body_expired)  # the server stopped reading, not the client
        else:
            self._expired()

    def _expired(self) -> None:
        self._timer = None
        self._phase = ""
        if not self.transport.is_closing():
            self.transport.close()

    def _arm(self, delay: float, callback: Any) -> None:
        self._cancel()
        self._timer = self.loop.call_later(delay, callback)

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def guarded_protocol(admission: Admission, *, head_timeout: float, body_timeout: float) -> type[GuardedH11Protocol]:
    """The protocol class for ``uvicorn.Config(http=...)``, bound to these limits."""
    return type(
        "BoundGuardedH11Protocol",
        (GuardedH11Protocol,),
        {"admission": admission, "head_timeout": head_timeout, "body_timeout": body_timeout},
    )


class HeaderLimit:
    """Answer requests with more than ``max_headers`` header fields, or a head (request line and fields)
    over ``max_head_bytes``, ``431 too_large`` (and close). While a head is incomplete, h11 buffers at
    most ``max_head_bytes`` of it (400 past that); a head that arrived whole in one read is measured here."""

    def __init__(self, app: ASGIApp, *, max_headers: int, max_head_bytes: int) -> None:
        self.app = app
        self.max_headers = max_headers
        self.max_head_bytes = max_head_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope["headers"]
        problem = ""
        if len(headers) > self.max_headers:
            problem = f"at most {self.max_headers} header fields"
        elif len(scope["raw_path"]) + len(scope["query_string"]) + sum(len(n) + len(v) + 4 for n, v in headers) > (
            self.max_head_bytes
        ):
            problem = f"request heads are limited to {self.max_head_bytes} bytes"
        if problem:
            body = json.dumps({"code": "too_large", "message": problem})
            await send(
                {
                    "type": "http.response.start",
                    "status": 431,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
                }
            )
            await send({"type": "http.response.body", "body": body.encode()})
            return
        await self.app(scope, receive, send)
