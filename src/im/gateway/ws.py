"""The WebSocket transport (RFC 6455, via picows): a thin pump around :class:`Connection`.

One WebSocket message carries one protocol frame: text for JSON, binary for MessagePack. Fragmented
messages are reassembled up to the frame limit. Frames over ``max_frame_bytes`` are answered with a
``too_large`` error and the connection stays open; frames over four times that are refused by the
WebSocket layer itself with close code 1009 (it will not buffer them).
"""

from __future__ import annotations

import asyncio
import logging

from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, WSUpgradeRequest, ws_create_server

from im.gateway.hub import Connection, Hub
from im.protocol.errors import ErrorCode

log = logging.getLogger(__name__)

WS_PATH = "/ws"
_CLOSE_CODES = {
    ErrorCode.SHUTDOWN: WSCloseCode.GOING_AWAY,
    ErrorCode.SLOW_CONSUMER: WSCloseCode.TRY_AGAIN_LATER,
    ErrorCode.AUTH_FAILED: WSCloseCode.POLICY_VIOLATION,
    ErrorCode.AUTH_TIMEOUT: WSCloseCode.POLICY_VIOLATION,
    ErrorCode.IDLE_TIMEOUT: WSCloseCode.GOING_AWAY,
    ErrorCode.REPLACED: WSCloseCode.POLICY_VIOLATION,
    ErrorCode.UNAVAILABLE: WSCloseCode.TRY_AGAIN_LATER,
}


def _frame_many(payloads: list[bytes], binary: bool) -> bytes:
    """Unmasked server-to-client WebSocket frames (RFC 6455 section 5.2), concatenated."""
    first = 0x82 if binary else 0x81  # FIN + opcode
    parts: list[bytes] = []
    for data in payloads:
        n = len(data)
        if n < 126:
            parts.append(bytes((first, n)))
        elif n < 65536:
            parts.append(bytes((first, 126)) + n.to_bytes(2, "big"))
        else:
            parts.append(bytes((first, 127)) + n.to_bytes(8, "big"))
        parts.append(data)
    return b"".join(parts)


class WsConnection(WSListener, Connection):  # type: ignore[misc]
    def __init__(self, hub: Hub) -> None:
        WSListener.__init__(self)
        Connection.__init__(self, hub)
        self.transport: WSTransport | None = None
        self._fragments: list[bytes] = []
        self._fragment_binary = False
        self._fragment_size = 0

    # picows callbacks

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        self.hub.add(self)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind is WSMsgType.TEXT or kind is WSMsgType.BINARY:
            if frame.fin:
                self.on_data(frame.get_payload_as_bytes(), kind is WSMsgType.BINARY)
            else:
                self._fragments = [frame.get_payload_as_bytes()]
                self._fragment_binary = kind is WSMsgType.BINARY
                self._fragment_size = len(self._fragments[0])
        elif kind is WSMsgType.CONTINUATION:
            if not self._fragments:
                return
            self._fragment_size += frame.payload_size
            if self._fragment_size <= 4 * self.hub.limits.max_frame_bytes:
                self._fragments.append(frame.get_payload_as_bytes())
            if frame.fin:
                data = b"".join(self._fragments)
                self._fragments = []
                if self._fragment_size > len(data):  # parts were dropped: refuse by its real size
                    self.session.oversized(self._fragment_size)
                    self.flush()
                else:
                    self.on_data(data, self._fragment_binary)
        elif kind is WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code(), frame.get_close_message())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.on_closed()

    # Connection

    def write(self, frames: list[bytes], binary: bool) -> None:
        t = self.transport
        if t is None or t.is_disconnected:
            return
        if len(frames) == 1:
            t.send(WSMsgType.BINARY if binary else WSMsgType.TEXT, frames[0])
        else:  # many frames, one write: one system call instead of one per frame
            t.underlying_transport.write(_frame_many(frames, binary))

    def close_transport(self, code: ErrorCode) -> None:
        t = self.transport
        if t is not None and not t.is_disconnected:
            t.send_close(_CLOSE_CODES.get(code, WSCloseCode.POLICY_VIOLATION), code.value.encode())
            t.disconnect()

    def buffered(self) -> int:
        t = self.transport
        return t.underlying_transport.get_write_buffer_size() if t is not None else 0

    def pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.underlying_transport.pause_reading()


async def serve_websocket(hub: Hub, host: str, port: int) -> asyncio.Server:
    """Listen for chat connections at ``ws://host:port/ws``."""

    def factory(request: WSUpgradeRequest) -> WsConnection | None:
        if request.path.split(b"?")[0] != WS_PATH.encode():
            return None
        return WsConnection(hub)

    return await ws_create_server(
        factory,
        host,
        port,
        max_frame_size=4 * hub.limits.max_frame_bytes,
        read_buffer_init_size=1024,
        websocket_handshake_timeout=hub.limits.auth_timeout,
        enable_auto_pong=True,
        use_aiofastnet=False,
    )
