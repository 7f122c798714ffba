"""The WebSocket gateway pump (im.gateway.ws_connection) on a real loopback socket and event loop.

The RFC 6455 details are tested on the sans-I/O protocol (tests/test_ws_protocol.py); here, what the pump
adds: the handshake timer, messages to ``Connection.on_data`` and frames back, ``too_large`` answers,
close codes for the session's reasons, admission refusals and the closing half-close.
"""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import msgspec

from im.gateway.ws_connection import WsConnection
from im.gateway.ws_protocol import WsSettings
from im.model.errors import ErrorCode
from im.net import Admission
from tests.support.pump import LIMIT, PumpHub, admission, connect_pump
from tests.support.wait import eventually
from tests.test_ws_protocol import frame, request

SETTINGS = WsSettings(max_message=LIMIT)


class RecordingWs(WsConnection):
    """A WsConnection that records what it hands the session."""

    def __init__(
        self, hub: PumpHub, adm: Admission, *, handshake_timeout: float = 5.0, close_timeout: float = 5.0
    ) -> None:
        super().__init__(
            hub,  # type: ignore[arg-type]
            SETTINGS,
            handshake_timeout=handshake_timeout,
            close_timeout=close_timeout,
            admission=adm,
        )
        self.data: list[tuple[bytes, bool]] = []

    def on_data(self, data: bytes, binary: bool) -> None:
        self.data.append((data, binary))
        super().on_data(data, binary)


async def handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    """Send the upgrade request; the response head."""
    writer.write(request())
    return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """(opcode, payload) of the next (unmasked, unfragmented) server frame."""
    b0, b1 = await asyncio.wait_for(reader.readexactly(2), 5)
    n = b1 & 0x7F
    if n == 126:
        n = int.from_bytes(await reader.readexactly(2), "big")
    elif n == 127:
        n = int.from_bytes(await reader.readexactly(8), "big")
    assert b0 & 0x80 and not b1 & 0x80
    return b0 & 0x0F, await reader.readexactly(n)


async def read_json(reader: asyncio.StreamReader) -> Any:
    op, payload = await read_frame(reader)
    assert op == 0x1
    return json.loads(payload)


async def read_close(reader: asyncio.StreamReader) -> tuple[int, str]:
    op, payload = await read_frame(reader)
    assert op == 0x8
    return int.from_bytes(payload[:2], "big"), payload[2:].decode()


async def at_eof(reader: asyncio.StreamReader) -> bool:
    return await asyncio.wait_for(reader.read(), 5) == b""


async def test_messages_reach_on_data_and_answers_come_back_as_frames() -> None:
    hub, adm = PumpHub(), admission()
    conn, reader, writer = await connect_pump(lambda: RecordingWs(hub, adm))
    assert hub.added == []  # not before the upgrade
    assert (await handshake(reader, writer)).startswith(b"HTTP/1.1 101 ")
    assert hub.added == [conn]
    sock = conn.transport.get_extra_info("socket") if conn.transport else None
    assert sock is not None and sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    data = frame(0x1, b'{"t":"ping","id":1}')
    for i in range(len(data)):  # one byte per write
        writer.write(data[i : i + 1])
        await writer.drain()
    assert await read_json(reader) == {"t": "pong", "id": 1}
    writer.write(frame(0x1, b'{"t":"ping",', fin=False) + frame(0x0, b'"id":2}'))  # fragmented
    assert await read_json(reader) == {"t": "pong", "id": 2}
    assert conn.data == [(b'{"t":"ping","id":1}', False), (b'{"t":"ping","id":2}', False)]
    writer.write(frame(0x9, b"hb"))  # a WebSocket ping: answered by the protocol, not the session
    assert await read_frame(reader) == (0xA, b"hb")
    writer.close()
    await eventually(lambda: conn.closed, timeout=5)
    assert hub.unregistered == [conn] and adm.open == 0


async def test_binary_messages_are_answered_in_messagepack_binary_frames() -> None:
    hub, adm = PumpHub(), admission()
    conn, reader, writer = await connect_pump(lambda: RecordingWs(hub, adm))
    await handshake(reader, writer)
    writer.write(frame(0x2, msgspec.msgpack.encode({"t": "ping", "id": 9})))
    op, payload = await read_frame(reader)
    assert (op, msgspec.msgpack.decode(payload)) == (0x2, {"t": "pong", "id": 9})
    assert conn.data[0][1] is True
    writer.close()


async def test_an_oversized_message_is_refused_and_the_connection_stays() -> None:
    hub, adm = PumpHub(), admission()
    conn, reader, writer = await connect_pump(lambda: RecordingWs(hub, adm))
    await handshake(reader, writer)
    writer.write(frame(0x1, b"x" * (LIMIT + 1)) + frame(0x1, b'{"t":"ping","id":3}'))
    error = await read_json(reader)
    assert (error["t"], error["code"]) == ("error", "too_large")
    assert await read_json(reader) == {"t": "pong", "id": 3}
    assert len(conn.data) == 1
    writer.close()


async def test_a_message_far_over_the_limit_closes_1009_then_half_closes() -> None:
    hub, adm = PumpHub(), admission()
    conn, reader, writer = await connect_pump(lambda: RecordingWs(hub, adm))
    await handshake(reader, writer)
    writer.write(frame(0x2, b"y" * (4 * LIMIT + 1)))
    assert (await read_close(reader))[0] == 1009
    assert await at_eof(reader)
    assert not conn.closed  # reading (and dropping) until the client closes its side
    writer.close()
    await eventually(lambda: conn.closed, timeout=5)


async def test_the_sessions_close_becomes_bye_and_its_close_code() -> None:
    hub, adm = PumpHub(), admission()
    conn, reader, writer = await connect_pump(lambda: RecordingWs(hub, adm))
    await handshake(reader, writer)
    conn.run(conn.session.close(ErrorCode.SHUTDOWN, "server is stopping; reconnect"))
    bye = await read_json(reader)
    assert (bye["t"], bye["code"]) == ("bye", "shutdown")
    assert await read_close(reader) == (1001, "shutdown")  # GOING_AWAY
    assert await at_eof(reader)
    conn.write([b'{"t":"pong"}'], False)  # after the close frame: nothing more is written
    writer.write(frame(0x8, (1001).to_bytes(2, "big")))  # the client's close frame, then its FIN
    writer.close()
    await eventually(lambda: conn.closed, timeout=5)


async def test_a_silent_client_is_dropped_after_the_handshake_timeout() -> None:
    hub, adm = PumpHub(), admission()
    conn, reader, writer = await connect_pump(lambda: RecordingWs(hub, adm, handshake_timeout=0.1))
    await eventually(lambda: conn.closed, timeout=5)
    assert await asyncio.wait_for(reader.read(), 5) == b""
    assert hub.added == [] and adm.open == 0
    writer.close()


async def test_a_client_that_never_closes_is_aborted_after_close_timeout() -> None:
    hub, adm = PumpHub(), admission()
    conn, reader, writer = await connect_pump(lambda: RecordingWs(hub, adm, close_timeout=0.2))
    await handshake(reader, writer)
    conn.close_transport(ErrorCode.IDLE_TIMEOUT)
    assert await read_close(reader) == (1001, "idle_timeout")
    assert await at_eof(reader)
    await eventually(lambda: conn.closed, timeout=5)  # the client still holds its side open
    writer.close()


async def test_refused_connections_get_their_handshake_then_1013_and_shed_ones_a_503() -> None:
    hub, adm = PumpHub(), admission(max_connections=1, max_refusing=1)
    first, r1, w1 = await connect_pump(lambda: RecordingWs(hub, adm))
    await handshake(r1, w1)
    refused, r2, w2 = await connect_pump(lambda: RecordingWs(hub, adm))
    assert (await handshake(r2, w2)).startswith(b"HTTP/1.1 101 ")
    code, reason = await read_close(r2)
    assert code == 1013 and "connection limit" in reason
    assert await at_eof(r2)
    shed, r3, w3 = await connect_pump(lambda: RecordingWs(hub, adm))
    response = await asyncio.wait_for(r3.read(), 5)  # the 503, then the close (no handshake)
    assert response.startswith(b"HTTP/1.1 503 ") and b'"code": "unavailable"' in response
    await eventually(lambda: shed in hub.unregistered, timeout=2)
    assert hub.added == [first] and adm.shed_total == 1
    for w in (w1, w2, w3):
        w.close()
    await eventually(lambda: first.closed and refused.closed, timeout=5)
    assert adm.open == 0 and adm.refusing == 0
