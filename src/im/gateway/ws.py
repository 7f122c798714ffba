"""The WebSocket transport on a plain :class:`asyncio.Protocol`: a pump around :mod:`im.gateway.websocket`.

One WebSocket message carries one protocol frame: text for JSON, binary for MessagePack; messages over
``max_frame_bytes`` are answered with ``too_large`` and the connection stays open; over four times that,
close 1009 without buffering, as is a message in more than ``max_fragments`` frames (see
:mod:`im.gateway.websocket` for what a connection can make the server hold). It costs about what the TCP
transport costs per idle connection (about 3 KiB, against 10.6 KiB for picows, which this replaced): no
per-connection read buffer (the event loop hands over each read as ``bytes``), and the sans-I/O protocol
keeps a buffer only while a frame is incomplete.

Closing: after the last close frame (ours or the echo of the client's) the server half-closes (FIN) and
keeps reading, discarding, until the client closes its side; it aborts after ``close_timeout``. Closing at
once could reset the connection under data the client is still sending and lose the close frame.
"""

from __future__ import annotations

import asyncio
import logging
import socket

from im.gateway.hub import Connection, Hub
from im.gateway.websocket import (
    CloseCode,
    Closed,
    Message,
    Opened,
    Oversized,
    Rejected,
    ServerProtocol,
    State,
    WsSettings,
    encode_frames,
)
from im.model.errors import ErrorCode
from im.net import Admission, Listener, Ticket, Verdict, bind, refusal_503

log = logging.getLogger(__name__)

WS_PATH = "/ws"

_CLOSE_CODES = {
    ErrorCode.SHUTDOWN: CloseCode.GOING_AWAY,
    ErrorCode.SLOW_CONSUMER: CloseCode.TRY_AGAIN_LATER,
    ErrorCode.AUTH_FAILED: CloseCode.POLICY_VIOLATION,
    ErrorCode.AUTH_TIMEOUT: CloseCode.POLICY_VIOLATION,
    ErrorCode.IDLE_TIMEOUT: CloseCode.GOING_AWAY,
    ErrorCode.REPLACED: CloseCode.POLICY_VIOLATION,
    ErrorCode.UNAVAILABLE: CloseCode.TRY_AGAIN_LATER,
    ErrorCode.TOO_LARGE: CloseCode.MESSAGE_TOO_BIG,
}


class WsConnection(asyncio.Protocol, Connection):
    """One WebSocket connection: asyncio I/O in, :class:`ServerProtocol` events to the session, frames out.

    The hub sees the connection only once the upgrade is accepted; until then the handshake timer
    (``handshake_timeout``) is the only clock on it.
    """

    __slots__ = ("_admission", "_close_timeout", "_eof_sent", "_open", "_ticket", "_timer", "proto", "transport")

    def __init__(
        self, hub: Hub, settings: WsSettings, *, handshake_timeout: float, close_timeout: float, admission: Admission
    ) -> None:
        Connection.__init__(self, hub)
        self._admission = admission
        self._ticket: Ticket | None = None
        self.proto = ServerProtocol(settings)
        self.transport: asyncio.Transport | None = None
        self._open = False  # data frames may be written (upgrade done, no close frame seen or sent)
        self._eof_sent = False
        self._close_timeout = close_timeout
        # Only while handshaking or closing: drop the connection if the peer stalls.
        self._timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(handshake_timeout, self._expire)

    # --- asyncio.Protocol --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport subclass
        ticket = self._ticket = self._admission.admit(transport.get_extra_info("peername"))
        if ticket.verdict is Verdict.SHED:  # no handshake: an HTTP 503 to the upgrade request, close
            self._cancel_timer()
            transport.write(refusal_503(ticket.reason))  # type: ignore[attr-defined]  # a stream transport
            transport.close()
            return
        # A refused connection still gets its handshake (within handshake_timeout), then close 1013.
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        proto = self.proto
        proto.receive_data(data)
        for event in proto.events_received():
            if type(event) is Message:
                self.on_data(event.data, event.binary)
            elif type(event) is Oversized:
                self.session.oversized(event.size)
                self.flush()
            elif type(event) is Opened:
                self._cancel_timer()
                self._open = True
                if self._ticket is not None and not self._ticket.admitted:
                    self.close_transport(ErrorCode.UNAVAILABLE, self._ticket.reason)
                    break
                self.hub.add(self)
            elif type(event) is Closed:
                self._open = False
                if event.code not in (CloseCode.NORMAL, CloseCode.GOING_AWAY, CloseCode.NO_STATUS):
                    log.debug("websocket closed: %s %s", event.code, event.reason)
            elif type(event) is Rejected:
                log.debug("websocket handshake refused: %s %s", event.status, event.reason)
        out = proto.data_to_send()
        if out:
            self._write_raw(out)
            if self._open and self.buffered() > self.send_limit():
                # Pongs to a client that sends pings and never reads: the same rule as for frames.
                log.info("closing slow consumer (pongs unread) uid=%s", self.session.uid)
                self.run(self.session.close(ErrorCode.SLOW_CONSUMER, "too far behind; resume from cursors"))
        if proto.state is State.CLOSED:
            self._shut_down()

    def eof_received(self) -> bool | None:
        return None  # the client closed its side: close ours (after what is queued is written)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        if self._ticket is not None:
            self._admission.release(self._ticket)
        self._open = False
        self.on_closed()

    def pause_writing(self) -> None:  # the hub's buffer check handles slow consumers
        pass

    def resume_writing(self) -> None:
        pass

    # --- Connection --------------------------------------------------------------------------------

    def write(self, frames: list[bytes], binary: bool) -> None:
        if self._open:
            assert self.transport is not None
            self.transport.write(encode_frames(frames, binary))

    def close_transport(self, code: ErrorCode, reason: str = "") -> None:
        if self._open:
            self._open = False
            self.proto.close(_CLOSE_CODES.get(code, CloseCode.POLICY_VIOLATION), reason or code.value)
            self._write_raw(self.proto.data_to_send())
            self._shut_down()  # our FIN goes now; the client's close frame is read (and dropped) meanwhile

    def buffered(self) -> int:
        return self.transport.get_write_buffer_size() if self.transport is not None else 0

    def pause_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    # --- closing -----------------------------------------------------------------------------------

    def _write_raw(self, data: bytes) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            t.write(data)

    def _shut_down(self) -> None:
        """Half-close after what is queued, and give the client ``close_timeout`` to close its side."""
        t = self.transport
        if t is None or t.is_closing() or self._eof_sent:
            return
        self._eof_sent = True
        self._cancel_timer()
        if t.can_write_eof():
            t.write_eof()
            t.resume_reading()  # a stopping server paused reads: read the client's close (as tcp.py does)
            self._timer = asyncio.get_running_loop().call_later(self._close_timeout, self._expire)
        else:
            t.close()

    def _expire(self) -> None:
        self._timer = None
        if self.transport is not None:
            self.transport.abort()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


async def serve_websocket(
    hub: Hub,
    host: str,
    port: int,
    *,
    admission: Admission,
    path: str = WS_PATH,
    settings: WsSettings | None = None,
    max_fragments: int = 256,
    close_timeout: float = 5.0,
    backlog: int = 4096,
) -> Listener:
    """Listen for chat connections at ``ws://host:port/ws``, on asyncio's own transports.

    ``settings`` overrides the WebSocket limits, which default to the hub's: messages up to
    ``max_frame_bytes``, refused with 1009 over four times that or in more than ``max_fragments``
    frames. The opening handshake must finish within ``hub.limits.auth_timeout``. ``admission`` caps
    connections: a refused one is closed with 1013 (try again later) right after its handshake.
    """
    limits = hub.limits
    ws_settings = settings or WsSettings(path=path, max_message=limits.max_frame_bytes, max_fragments=max_fragments)
    handshake_timeout = limits.auth_timeout

    def connection() -> WsConnection:
        return WsConnection(
            hub, ws_settings, handshake_timeout=handshake_timeout, close_timeout=close_timeout, admission=admission
        )

    return Listener(bind(host, port, backlog=backlog), connection, name="websocket").start()
