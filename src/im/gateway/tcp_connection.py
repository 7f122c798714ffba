"""The TCP gateway: length-prefixed frames around the same :class:`Connection` as WebSocket.

A pump around the sans-I/O :class:`~im.protocol.tcp_framing.TcpFramer` (docs/protocol.md, "TCP framing"),
with the server's limits: a frame whose payload is over ``max_frame_bytes`` is skipped without being
buffered and answered with ``too_large``; the connection stays usable. One over four times that is not
read at all: ``bye too_large`` and close (the stream cannot be trusted to resynchronise at that point, and
the server will not buffer it); so is ``L`` = 0 (``bye bad_frame``). An unknown encoding byte is answered
with ``bad_frame`` and the frame skipped.

Closing: ``bye``, then the half-close of :class:`~im.gateway.pump.SocketConnection` (FIN, read and drop
until the client closes its side, at most ``CLOSE_TIMEOUT`` seconds).
"""

from __future__ import annotations

from im.gateway.hub import ConnectionHub, Hub
from im.gateway.pump import CLOSE_TIMEOUT, SocketConnection
from im.model.errors import ErrorCode
from im.net import RETRY_AFTER, Admission, Listener, Ticket, TlsAccept, Verdict, bind
from im.protocol.tcp_framing import Broken, Frame, Oversized, TcpFramer, UnknownEncoding, encode_frames

__all__ = ["CLOSE_TIMEOUT", "TcpConnection", "serve_tcp"]


class TcpConnection(SocketConnection):
    """One TCP connection: reads through a :class:`TcpFramer` to the session, frames written out."""

    __slots__ = ("_framer",)
    transport_label = "tcp"

    def __init__(self, hub: ConnectionHub, admission: Admission, *, close_timeout: float = CLOSE_TIMEOUT) -> None:
        super().__init__(hub, admission, close_timeout=close_timeout)
        limit = hub.limits.max_frame_bytes
        self._framer = TcpFramer(limit, hard_limit=4 * limit)

    # --- SocketConnection --------------------------------------------------------------------------

    def shed(self, reason: str) -> None:
        """``error unavailable`` with ``retry_after`` and ``bye unavailable`` (reconnect later), written
        before the close."""
        self.session.over_cap(reason, RETRY_AFTER)
        self.write(self.session.data_to_send(), False)
        self.closed = True

    def admitted(self, ticket: Ticket) -> None:
        if ticket.verdict is Verdict.REFUSE:  # error + bye unavailable (reconnect later), the usual close
            self.run(self.session.over_cap(ticket.reason, RETRY_AFTER))
            return
        self.hub.add(self)

    def data_received(self, data: bytes) -> None:
        if self._eof_sent:
            return
        for event in self._framer.receive_data(data):
            if self.closed:
                break
            if type(event) is Frame:
                self.on_data(event.payload, event.binary)
            elif type(event) is Oversized:
                self.session.oversized(event.size)
                self.flush()
            elif type(event) is UnknownEncoding:
                self.session.refuse(ErrorCode.BAD_FRAME, event.reason)
                self.flush()
            elif type(event) is Broken:  # the framer reads nothing more
                self.run(self.session.close(event.code, event.reason, reconnect=False))

    # --- Connection --------------------------------------------------------------------------------

    def write(self, frames: list[bytes], binary: bool) -> None:
        t = self.transport
        if t is None or t.is_closing() or self._eof_sent:  # after the bye's half-close nothing more goes out
            return
        t.write(encode_frames(frames, binary))

    def close_transport(self, code: ErrorCode) -> None:
        """Half-close after what is queued (the ``bye``); a stopping server paused reads, so resume them
        to drain what the client still sends until it closes its side."""
        self.half_close(resume_reading=True)


async def serve_tcp(hub: Hub, host: str, port: int, *, admission: Admission, tls: TlsAccept | None = None) -> Listener:
    """Listen for chat connections with TCP framing at ``tcp://host:port`` (TLS only, ``tls://``, with
    ``tls``: the same frames inside the TLS stream); ``admission`` caps them."""
    return Listener(bind(host, port), lambda: TcpConnection(hub, admission), name="tcp", tls=tls).start()
