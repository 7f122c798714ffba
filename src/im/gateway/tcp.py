"""The TCP transport: length-prefixed frames around the same :class:`Connection` as WebSocket.

Wire format (docs/protocol.md, "TCP framing"), both directions::

    +-----------------------+-----------+-------------------------+
    | length L (u32, BE)    | encoding  | payload (L - 1 bytes)   |
    +-----------------------+-----------+-------------------------+
                              0x01 JSON, 0x02 MessagePack

A frame whose payload is over ``max_frame_bytes`` is skipped and answered with ``too_large``; the
connection stays usable. One over four times that is not read at all: ``bye too_large`` and close (the
stream cannot be trusted to resynchronise at that point, and the server will not buffer it).
"""

from __future__ import annotations

import asyncio
import socket

from im.gateway.hub import Connection, Hub
from im.model.errors import ErrorCode
from im.net import Admission, Listener, Ticket, Verdict, bind

JSON_KIND = 0x01
MSGPACK_KIND = 0x02
_HEADER = 5
#: Seconds a closing connection waits for the client to close its side before it is aborted.
CLOSE_TIMEOUT = 5.0


def frame(payload: bytes, binary: bool) -> bytes:
    """One TCP frame around an encoded protocol frame."""
    return (len(payload) + 1).to_bytes(4, "big") + (b"\x02" if binary else b"\x01") + payload


class TcpConnection(asyncio.Protocol, Connection):
    def __init__(self, hub: Hub, admission: Admission) -> None:
        Connection.__init__(self, hub)
        self._admission = admission
        self._ticket: Ticket | None = None
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._skip = 0  # bytes of an oversized frame still to discard
        self._eof_sent = False  # we closed our side: read and drop until the client closes its side
        self._timer: asyncio.TimerHandle | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport subclass
        ticket = self._ticket = self._admission.admit(transport.get_extra_info("peername"))
        if ticket.verdict is Verdict.SHED:  # bye, and close at once
            self.session.close(ErrorCode.UNAVAILABLE, ticket.reason, reconnect=True)
            self.write(self.session.data_to_send(), False)
            self.closed = True
            transport.close()
            return
        if ticket.verdict is Verdict.REFUSE:  # bye unavailable (reconnect later), then the usual close
            self.run(self.session.close(ErrorCode.UNAVAILABLE, ticket.reason, reconnect=True))
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.hub.add(self)

    def data_received(self, data: bytes) -> None:
        if self._eof_sent:
            return
        if self._skip:
            dropped = min(self._skip, len(data))
            self._skip -= dropped
            data = data[dropped:]
            if not data:
                return
        buf = self._buf
        buf += data
        limit = self.hub.limits.max_frame_bytes
        pos = 0
        end = len(buf)
        while end - pos >= 4 and not self.closed:
            length = int.from_bytes(buf[pos : pos + 4], "big")
            if length == 0 or length > 4 * limit + 1:
                self._fatal(length)
                return
            if length - 1 > limit:
                # Skip it without buffering: what is here now, and the rest as it arrives.
                available = min(end - pos - 4, length)
                self._skip = length - available
                pos += 4 + available
                self.session.oversized(length - 1)
                self.flush()
                continue
            if end - pos < 4 + length:
                break
            kind = buf[pos + 4]
            payload = bytes(buf[pos + _HEADER : pos + 4 + length])
            pos += 4 + length
            if kind in (JSON_KIND, MSGPACK_KIND):
                self.on_data(payload, kind == MSGPACK_KIND)
            else:
                self.session.refuse(ErrorCode.BAD_FRAME, f"unknown encoding byte {kind:#04x}")
                self.flush()
        del buf[:pos]

    def _fatal(self, length: int) -> None:
        reason = "empty frame" if length == 0 else f"frame of {length} bytes is far over the limit"
        self.run(self.session.close(ErrorCode.TOO_LARGE if length else ErrorCode.BAD_FRAME, reason, reconnect=False))

    def eof_received(self) -> bool | None:
        return False  # the client closed its side: close the connection (what we queued is still sent)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._ticket is not None:
            self._admission.release(self._ticket)
        self.on_closed()

    def pause_writing(self) -> None:  # the hub's buffer check handles slow consumers
        pass

    def resume_writing(self) -> None:
        pass

    # Connection

    def write(self, frames: list[bytes], binary: bool) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        if len(frames) == 1:
            t.write(frame(frames[0], binary))
        else:
            t.write(b"".join([frame(data, binary) for data in frames]))

    def close_transport(self, code: ErrorCode) -> None:
        """Half-close after what is queued (the ``bye``), then read and drop until the client closes its
        side, at most ``CLOSE_TIMEOUT`` seconds. Closing with unread client data would make the kernel
        reset the connection, and a reset can destroy the ``bye`` before the client reads it."""
        t = self.transport
        if t is None or t.is_closing() or self._eof_sent:
            return
        self._eof_sent = True
        if not t.can_write_eof():
            t.close()
            return
        t.write_eof()
        t.resume_reading()  # a stopping server paused reads: drain them now
        self._timer = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, t.abort)

    def buffered(self) -> int:
        return self.transport.get_write_buffer_size() if self.transport is not None else 0

    def pause_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()


async def serve_tcp(hub: Hub, host: str, port: int, *, admission: Admission) -> Listener:
    """Listen for chat connections with TCP framing at ``tcp://host:port``; ``admission`` caps them."""
    return Listener(bind(host, port), lambda: TcpConnection(hub, admission), name="tcp").start()
