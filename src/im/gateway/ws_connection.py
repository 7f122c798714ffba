"""The WebSocket gateway: :class:`WsConnection`, the pump around the sans-I/O :mod:`im.gateway.ws_protocol`.

One WebSocket message carries one protocol frame: text for JSON, binary for MessagePack; messages over
``max_frame_bytes`` are answered with ``too_large`` and the connection stays open; over four times that,
close 1009 without buffering, as is a message in more than ``max_fragments`` frames (see
:mod:`im.gateway.ws_protocol` for what a connection can make the server hold). It costs about what the TCP
transport costs per idle connection (about 3 KiB, against 10.6 KiB for picows, which this replaced): no
per-connection read buffer (the event loop hands over each read as ``bytes``), and the sans-I/O protocol
keeps a buffer only while a frame is incomplete.

Closing: after the last close frame (ours or the echo of the client's) the server half-closes (FIN) and
keeps reading, discarding, until the client closes its side; it aborts after ``close_timeout`` (the
half-close of :class:`~im.gateway.pump.SocketConnection`). Closing at once could reset the connection under
data the client is still sending and lose the close frame.
"""

from __future__ import annotations

import asyncio
import logging

from im.gateway.hub import ConnectionHub, Hub
from im.gateway.pump import SocketConnection
from im.gateway.ws_protocol import (
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
from im.net import Admission, Listener, Ticket, TlsAccept, bind, refusal_503
from im.observability.metrics import METRICS

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


class WsConnection(SocketConnection):
    """One WebSocket connection: asyncio I/O in, :class:`ServerProtocol` events to the session, frames out.

    The hub sees the connection only once the upgrade is accepted; until then the handshake timer
    (``handshake_timeout``) is the only clock on it.
    """

    __slots__ = ("_handshake_timeout", "_open", "proto")
    transport_label = "ws"

    def __init__(
        self,
        hub: ConnectionHub,
        settings: WsSettings,
        *,
        handshake_timeout: float,
        close_timeout: float,
        admission: Admission,
    ) -> None:
        super().__init__(hub, admission, close_timeout=close_timeout)
        self.proto = ServerProtocol(settings)
        self._open = False  # data frames may be written (upgrade done, no close frame seen or sent)
        self._handshake_timeout = handshake_timeout

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Only while handshaking or closing: drop the connection if the peer stalls. Armed here, not when
        # the protocol is made: over TLS that happens before the TLS handshake, which has its own timeout.
        self.start_timer(self._handshake_timeout)
        super().connection_made(transport)

    # --- SocketConnection --------------------------------------------------------------------------

    def shed(self, reason: str) -> None:
        """No handshake: an HTTP 503 to the upgrade request."""
        self.write_raw(refusal_503(reason))

    def admitted(self, ticket: Ticket) -> None:
        """Nothing yet: a refused connection still gets its handshake (within ``handshake_timeout``),
        then close 1013 (on :class:`Opened`)."""

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
                self.cancel_timer()
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
            self.write_raw(out)
            if self._open and self.buffered() > self.send_limit():
                # Pongs to a client that sends pings and never reads: the same rule as for frames.
                log.info("closing slow consumer (pongs unread) uid=%s", self.session.uid)
                METRICS.slow_consumers += 1
                self.run(self.session.close(ErrorCode.SLOW_CONSUMER, "too far behind; resume from cursors"))
        if proto.state is State.CLOSED:
            self.half_close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._open = False
        super().connection_lost(exc)

    # --- Connection --------------------------------------------------------------------------------

    def write(self, frames: list[bytes], binary: bool) -> None:
        if self._open:
            assert self.transport is not None
            self.transport.write(encode_frames(frames, binary))

    def close_transport(self, code: ErrorCode, reason: str = "") -> None:
        """Send the close frame for ``code`` and half-close at once: the client's close frame is read
        (and dropped) meanwhile."""
        if self._open:
            self._open = False
            self.proto.close(_CLOSE_CODES.get(code, CloseCode.POLICY_VIOLATION), reason or code.value)
            self.write_raw(self.proto.data_to_send())
            self.half_close(resume_reading=True)  # our FIN now; the client's close frame is read (and dropped)


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
    tls: TlsAccept | None = None,
) -> Listener:
    """Listen for chat connections at ``ws://host:port/ws`` (``wss://`` with ``tls``), on asyncio's own
    transports.

    ``settings`` overrides the WebSocket limits, which default to the hub's: messages up to
    ``max_frame_bytes``, refused with 1009 over four times that or in more than ``max_fragments``
    frames. The opening handshake must finish within ``hub.limits.auth_timeout``. ``admission`` caps
    connections: a refused one is closed with 1013 (try again later) right after its handshake.
    """
    limits = hub.limits
    ws_settings = settings or WsSettings(path=path, max_message=limits.max_frame_bytes, max_fragments=max_fragments)
    handshake_timeout = limits.auth_timeout

    def connection() -> WsConnection:
        nonlocal ws_settings
        if settings is None and ws_settings.max_message != limits.max_frame_bytes:  # changed live: new connections
            ws_settings = WsSettings(path=path, max_message=limits.max_frame_bytes, max_fragments=max_fragments)
        return WsConnection(
            hub, ws_settings, handshake_timeout=handshake_timeout, close_timeout=close_timeout, admission=admission
        )

    return Listener(bind(host, port, backlog=backlog), connection, name="websocket", tls=tls).start()
