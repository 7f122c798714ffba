"""Transports: the TCP framing under the SDK's names (``tcp_frame``, ``TcpFramer``; the core itself is
tested in tests/test_tcp_framing.py), then TCP and in-memory pairs over real sockets / queues.

The WebSocket and TCP transports against the real server are exercised in test_client.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import pytest

from im.client.transport import (
    MemoryTransport,
    TcpFramer,
    TcpFramingError,
    TcpTransport,
    TransportClosed,
    WebSocketTransport,
    _Inbox,
    tcp_frame,
)
from im.protocol.codec import Encoding


def test_tcp_frame_layout() -> None:
    assert tcp_frame(b"abc", Encoding.JSON) == b"\x00\x00\x00\x04\x01abc"
    assert tcp_frame(b"", Encoding.MSGPACK) == b"\x00\x00\x00\x01\x02"


def test_framer_reassembles_split_and_joined_frames() -> None:
    stream = b"".join(tcp_frame(p, Encoding.JSON) for p in (b"one", b"", b"three" * 100))
    f = TcpFramer()
    got: list[bytes] = []
    for i in range(0, len(stream), 7):  # arbitrary chunking
        got += f.feed(stream[i : i + 7])
    assert got == [b"one", b"", b"three" * 100]
    assert TcpFramer().feed(stream) == got


@pytest.mark.parametrize(
    "data", [b"\x00\x00\x00\x00\x01", b"\x00\x00\x00\x02\x03x", b"\x00\x00\x10\x01\x01"], ids=["zero", "kind", "big"]
)
def test_framer_refuses_what_cannot_be_resynchronised(data: bytes) -> None:
    with pytest.raises(TcpFramingError):
        TcpFramer(max_frame=1024).feed(data)


async def test_memory_pair_carries_frames_in_order_and_close_ends_both() -> None:
    a, b = MemoryTransport.pair()
    await a.connect()
    a.send_many([b"1", b"2"])
    b.send(b"back")
    assert [await b.recv(), await b.recv(), await a.recv()] == [b"1", b"2", b"back"]
    waiting = asyncio.create_task(b.recv())
    await asyncio.sleep(0)
    await a.close()
    assert await waiting is None
    assert await a.recv() is None
    with pytest.raises(TransportClosed):
        a.send(b"x")


def test_inbox_pauses_the_producer_past_high_water_and_resumes_at_half() -> None:
    calls: list[str] = []
    inbox = _Inbox(4, lambda: calls.append("pause"), lambda: calls.append("resume"))

    async def drain(n: int) -> None:
        for _ in range(n):
            await inbox.get()

    for i in range(5):
        inbox.put(bytes([i]))
    assert calls == ["pause"]
    asyncio.run(drain(2))
    assert calls == ["pause"]
    asyncio.run(drain(1))
    assert calls == ["pause", "resume"]


@pytest.fixture
async def echo_server() -> AsyncIterator[tuple[str, list[tuple[int, bytes]]]]:
    """A TCP server speaking the framing: echoes every frame, upper-cased, with the same encoding byte."""
    seen: list[tuple[int, bytes]] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                header = await reader.readexactly(5)
                length, kind = int.from_bytes(header[:4], "big"), header[4]
                payload = await reader.readexactly(length - 1)
                seen.append((kind, payload))
                if payload == b"bye":
                    break
                writer.write(header + payload.upper())
        except asyncio.IncompleteReadError:
            pass
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    yield f"tcp://127.0.0.1:{port}", seen
    srv.close()
    await srv.wait_closed()


async def test_tcp_transport_round_trip_and_server_close(echo_server: tuple[str, list[tuple[int, bytes]]]) -> None:
    url, seen = echo_server
    async with TcpTransport(url, encoding=Encoding.MSGPACK) as t:
        t.send(b"a")
        t.send_many([b"b" * 70000, b"c"])
        assert [await t.recv(), await t.recv(), await t.recv()] == [b"A", b"B" * 70000, b"C"]
        assert [k for k, _ in seen] == [0x02, 0x02, 0x02]
        t.send(b"bye")
        assert await t.recv() is None  # the server closed
        with pytest.raises(TransportClosed):
            t.send(b"late")


async def test_tcp_transport_abort_and_bad_addresses(echo_server: tuple[str, list[tuple[int, bytes]]]) -> None:
    url, _ = echo_server
    t = TcpTransport(url)
    await t.connect()
    t.abort()
    assert await t.recv() is None
    with pytest.raises(ValueError):
        TcpTransport("ws://127.0.0.1:1/ws")
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(OSError):
        await TcpTransport(f"tcp://127.0.0.1:{port}").connect()


async def test_transports_connect_from_the_given_source_address() -> None:
    peers: list[str] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peers.append(writer.get_extra_info("peername")[0])
        writer.close()

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        tcp = TcpTransport(f"tcp://127.0.0.1:{port}", local_addr="127.0.0.2")
        await tcp.connect()
        await tcp.close()
        ws = WebSocketTransport(f"ws://127.0.0.1:{port}/ws", local_addr="127.0.0.3", connect_timeout=2)
        with contextlib.suppress(Exception):  # the peer is no WebSocket server: only the source matters
            await ws.connect()
        for _ in range(100):
            if len(peers) == 2:
                break
            await asyncio.sleep(0.01)
        assert peers == ["127.0.0.2", "127.0.0.3"]
    finally:
        server.close()
        await server.wait_closed()
