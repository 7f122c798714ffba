"""The TCP gateway pump (im.gateway.tcp_connection) on a real loopback socket and event loop.

Bytes in become ``Connection.on_data`` calls, answers come out framed; oversized frames, unknown
encodings, broken streams, admission refusals and the closing half-close behave as docs/protocol.md
("TCP framing") says, with no server around the connection.
"""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import msgspec

from im.gateway.tcp_connection import TcpConnection
from im.model.errors import ErrorCode
from im.net import Admission
from im.protocol.tcp_framing import encode_frame
from tests.support.pump import LIMIT, PumpHub, admission, connect_pump
from tests.support.wait import eventually


class RecordingTcp(TcpConnection):
    """A TcpConnection that records what it hands the session."""

    def __init__(self, hub: PumpHub, adm: Admission, **kw: Any) -> None:
        super().__init__(hub, adm, **kw)  # type: ignore[arg-type]
        self.data: list[tuple[bytes, bool]] = []

    def on_data(self, data: bytes, binary: bool) -> None:
        self.data.append((data, binary))
        super().on_data(data, binary)


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, Any]:
    """(encoding byte, decoded frame) of the next server frame."""
    header = await asyncio.wait_for(reader.readexactly(5), 5)
    payload = await reader.readexactly(int.from_bytes(header[:4], "big") - 1)
    return header[4], json.loads(payload) if header[4] == 1 else msgspec.msgpack.decode(payload)


async def at_eof(reader: asyncio.StreamReader) -> bool:
    return await asyncio.wait_for(reader.read(), 5) == b""


def ping(i: int) -> bytes:
    return encode_frame(json.dumps({"t": "ping", "id": i}).encode(), binary=False)


async def test_frames_in_any_chunking_reach_on_data_and_answers_come_back_framed() -> None:
    hub, adm = PumpHub(), admission()
    conn, reader, writer = await connect_pump(lambda: RecordingTcp(hub, adm))
    assert hub.added == [conn] and adm.open == 1
    stream = ping(1) + ping(2)
    for i in range(len(stream)):  # one byte per write: the pump reassembles
        writer.write(stream[i : i + 1])
        await writer.drain()
    assert await read_frame(reader) == (1, {"t": "pong", "id": 1})
    assert await read_frame(reader) == (1, {"t": "pong", "id": 2})
    assert conn.data == [(b'{"t": "ping", "id": 1}', False), (b'{"t": "ping", "id": 2}', False)]
    sock = conn.transport.get_extra_info("socket") if conn.transport else None
    assert sock is not None and sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    writer.close()
    await eventually(lambda: conn.closed, timeout=5)
    assert hub.unregistered == [conn] and adm.open == 0


async def test_messagepack_frames_are_answered_in_messagepack() -> None:
    hub, adm = PumpHub(), admission()
    conn, reader, writer = await connect_pump(lambda: RecordingTcp(hub, adm))
    writer.write(encode_frame(msgspec.msgpack.encode({"t": "ping", "id": 7}), binary=True))
    assert await read_frame(reader) == (2, {"t": "pong", "id": 7})
    assert conn.data[0][1] is True
    writer.close()


async def test_oversized_and_unknown_encoding_are_refused_and_the_connection_stays() -> None:
    hub, adm = PumpHub(), admission()
    conn, reader, writer = await connect_pump(lambda: RecordingTcp(hub, adm))
    writer.write(encode_frame(b"x" * (LIMIT + 1), binary=False))
    writer.write((3).to_bytes(4, "big") + b"\x07{}")
    writer.write(ping(3))
    _, too_large = await read_frame(reader)
    assert (too_large["t"], too_large["code"]) == ("error", "too_large")
    assert too_large["message"] == f"frame of {LIMIT + 1} bytes > {LIMIT}"
    _, bad = await read_frame(reader)
    assert (bad["t"], bad["code"], bad["message"]) == ("error", "bad_frame", "unknown encoding byte 0x07")
    assert await read_frame(reader) == (1, {"t": "pong", "id": 3})
    assert len(conn.data) == 1  # only the ping reached the session
    writer.close()


async def test_a_frame_far_over_the_limit_gets_bye_and_a_half_close() -> None:
    hub, adm = PumpHub(), admission()
    conn, reader, writer = await connect_pump(lambda: RecordingTcp(hub, adm))
    writer.write((4 * LIMIT + 2).to_bytes(4, "big"))
    _, bye = await read_frame(reader)
    assert (bye["t"], bye["code"], bye["reconnect"]) == ("bye", "too_large", False)
    assert await at_eof(reader)  # our FIN, after the bye
    assert not conn.closed  # still reading (and dropping) until the client closes its side
    writer.write(ping(1))  # dropped
    writer.close()
    await eventually(lambda: conn.closed, timeout=5)
    assert conn.data == []


async def test_a_write_after_the_bye_half_close_is_dropped() -> None:
    """Frames the hub flushes after the bye's half-close (a delivery racing the close) are dropped, not
    written after the FIN (uvloop raises ``Cannot call write() after write_eof()`` in the hub's callback)."""
    hub, adm = PumpHub(), admission()
    conn, reader, writer = await connect_pump(lambda: RecordingTcp(hub, adm))
    writer.write((4 * LIMIT + 2).to_bytes(4, "big"))
    _, bye = await read_frame(reader)
    assert bye["t"] == "bye"
    assert await at_eof(reader)
    conn.write([b'{"t":"pong","id":1}'], False)  # must not raise
    assert not conn.closed
    writer.close()
    await eventually(lambda: conn.closed, timeout=5)


async def test_an_empty_frame_gets_bye_bad_frame() -> None:
    hub, adm = PumpHub(), admission()
    _, reader, writer = await connect_pump(lambda: RecordingTcp(hub, adm))
    writer.write(ping(1) + b"\x00\x00\x00\x00")
    assert await read_frame(reader) == (1, {"t": "pong", "id": 1})
    _, bye = await read_frame(reader)
    assert (bye["t"], bye["code"], bye["message"]) == ("bye", "bad_frame", "empty frame")
    assert await at_eof(reader)
    writer.close()


async def test_a_client_that_never_closes_its_side_is_aborted_after_close_timeout() -> None:
    hub, adm = PumpHub(), admission()
    conn, reader, writer = await connect_pump(lambda: RecordingTcp(hub, adm, close_timeout=0.2))
    writer.write(b"\x00\x00\x00\x00")
    await read_frame(reader)
    assert await at_eof(reader)
    await eventually(lambda: conn.closed, timeout=5)  # the client still holds its side open
    assert adm.open == 0
    writer.close()


async def test_closing_resumes_paused_reads_so_the_clients_fin_is_seen() -> None:
    """A stopping server pauses reads, then says bye: the half-close must read again, or the connection
    would wait for the close timer."""
    hub, adm = PumpHub(), admission()
    conn, reader, writer = await connect_pump(lambda: RecordingTcp(hub, adm))  # close_timeout: 5 s
    conn.pause_reading()
    writer.write(ping(1))
    await asyncio.sleep(0.05)
    assert conn.data == []  # paused
    conn.run(conn.session.close(ErrorCode.SHUTDOWN, "server is stopping; reconnect"))
    _, bye = await read_frame(reader)
    assert (bye["t"], bye["code"]) == ("bye", "shutdown")
    assert await at_eof(reader)
    writer.close()
    await eventually(lambda: conn.closed, timeout=2)


async def test_refused_and_shed_connections_get_bye_unavailable() -> None:
    """Each is told when to come back (``error unavailable`` with ``retry_after``: a TCP client has no
    HTTP status to read it from), then ``bye unavailable``."""
    hub, adm = PumpHub(), admission(max_connections=1, max_refusing=1)
    first, _, w1 = await connect_pump(lambda: RecordingTcp(hub, adm))
    refused, r2, w2 = await connect_pump(lambda: RecordingTcp(hub, adm))  # refused: bye, then half-close
    _, error = await read_frame(r2)
    assert (error["t"], error["code"], error["retry_after"], error["ref"]) == ("error", "unavailable", 5, None)
    _, bye = await read_frame(r2)
    assert (bye["t"], bye["code"], bye["reconnect"]) == ("bye", "unavailable", True)
    assert await at_eof(r2)
    assert adm.refusing == 1 and hub.added == [first]
    shed, r3, w3 = await connect_pump(lambda: RecordingTcp(hub, adm))  # shed: bye, closed at once
    _, error = await read_frame(r3)
    assert (error["t"], error["code"], error["retry_after"]) == ("error", "unavailable", 5)
    _, bye = await read_frame(r3)
    assert (bye["t"], bye["code"]) == ("bye", "unavailable")
    assert await at_eof(r3)
    await eventually(lambda: shed in hub.unregistered, timeout=2)  # lost without waiting for the client
    assert hub.added == [first] and adm.shed_total == 1
    for w in (w1, w2, w3):
        w.close()
    await eventually(lambda: first.closed and refused.closed, timeout=5)
    assert adm.open == 0 and adm.refusing == 0
