"""The fault proxy (im.faultproxy) on real loopback sockets: an echo server behind it, asyncio clients in
front. Latency and bandwidth are measured, slices are seen by the receiver, resets arrive as
ConnectionResetError, a blackhole stalls without losing bytes, a cut refuses, and heal restores."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from im.faultproxy import FaultProxy
from tests.support.proxy import TcpProxy
from tests.support.wait import eventually


class Echo:
    """An echo server on a free port: every byte back, a half close answered by a close."""

    def __init__(self) -> None:
        self.accepted = 0
        self.errors: list[BaseException] = []
        self.server: asyncio.Server | None = None

    @property
    def target(self) -> tuple[str, int]:
        assert self.server is not None
        return ("127.0.0.1", self.server.sockets[0].getsockname()[1])

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError as exc:
            self.errors.append(exc)
        finally:
            writer.close()


@pytest.fixture
async def echo() -> AsyncIterator[Echo]:
    e = Echo()
    e.server = await asyncio.start_server(e.serve, "127.0.0.1", 0)
    yield e
    e.server.close()
    await e.server.wait_closed()


@pytest.fixture
def proxy(echo: Echo) -> Iterator[FaultProxy]:
    with FaultProxy(echo.target, seed=14) as p:
        yield p


async def connect(proxy: FaultProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(proxy.host, proxy.port)


async def round_trip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> float:
    """Seconds until ``data`` came back whole."""
    start = time.monotonic()
    writer.write(data)
    assert await asyncio.wait_for(reader.readexactly(len(data)), 20) == data
    return time.monotonic() - start


async def test_forwards_both_ways_and_counts(proxy: FaultProxy, echo: Echo) -> None:
    reader, writer = await connect(proxy)
    data = bytes(range(256)) * 40
    await round_trip(reader, writer, data)
    assert (proxy.accepted, echo.accepted) == (1, 1)
    assert (proxy.bytes_up, proxy.bytes_down) == (len(data), len(data))
    writer.write_eof()  # a half close goes through: the echo server closes, the client sees the end
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()
    await eventually(lambda: proxy.open == 0, "the connection is dropped once both ends closed")


async def test_latency_each_way_and_changed_on_an_open_connection(proxy: FaultProxy) -> None:
    reader, writer = await connect(proxy)
    assert await round_trip(reader, writer, b"x") < 0.15
    proxy.set(latency=0.2, direction="up")
    assert 0.2 <= await round_trip(reader, writer, b"y") < 1.5
    proxy.set(latency=0.15, direction="down")
    assert 0.35 <= await round_trip(reader, writer, b"z") < 2.0
    assert proxy.faults("down").latency == 0.15
    proxy.heal()
    assert await round_trip(reader, writer, b"w") < 0.15
    writer.close()


async def test_jitter_spreads_delays_but_keeps_order(proxy: FaultProxy) -> None:
    reader, writer = await connect(proxy)
    proxy.set(latency=0.1, jitter=0.1, direction="up")
    sent = b""
    arrivals: list[float] = []
    start = time.monotonic()
    for i in range(30):
        chunk = f"<{i:03d}>".encode()
        sent += chunk
        writer.write(chunk)
        await writer.drain()
        await asyncio.sleep(0.01)
    got = b""
    while len(got) < len(sent):
        got += await asyncio.wait_for(reader.read(65536), 10)
        arrivals.append(time.monotonic() - start)
    assert got == sent  # jitter never reorders bytes within a connection
    assert 0.3 <= arrivals[-1] < 5.0, arrivals  # the last chunk left at 0.3 s, up to 0.2 s late
    writer.close()


async def test_bandwidth_limits_the_rate(proxy: FaultProxy) -> None:
    reader, writer = await connect(proxy)
    proxy.set(bandwidth=40_000, direction="down")
    elapsed = await round_trip(reader, writer, b"b" * 20_000)
    assert 0.4 <= elapsed < 5.0, elapsed  # 20 kB at 40 kB/s: half a second
    proxy.set(bandwidth=0)
    assert await round_trip(reader, writer, b"c" * 20_000) < 0.4
    writer.close()


async def test_slices_reach_the_receiver_one_byte_at_a_time(proxy: FaultProxy) -> None:
    reader, writer = await connect(proxy)
    proxy.set(slice=1, bandwidth=200, direction="down")  # one byte every 5 ms
    writer.write(b"s" * 40)
    chunks: list[int] = []
    while sum(chunks) < 40:
        chunks.append(len(await asyncio.wait_for(reader.read(100), 10)))
    assert len(chunks) >= 10, chunks  # many reads, not one 40-byte read
    assert chunks.count(1) >= 5, chunks
    writer.close()


async def test_reset_after_resets_each_connection(proxy: FaultProxy, echo: Echo) -> None:
    proxy.reset_after(100, direction="up")
    for _ in range(2):  # a new connection is reset again: periodic resets
        reader, writer = await connect(proxy)
        writer.write(b"r" * 1000)
        got = b""
        with pytest.raises(ConnectionResetError):
            while chunk := await asyncio.wait_for(reader.read(65536), 10):
                got += chunk
        assert got == b"r" * len(got) and len(got) <= 100
        writer.close()
    assert proxy.resets == 2
    await eventually(lambda: len(echo.errors) == 2, lambda: f"the server sees resets too: {echo.errors}")
    assert all(isinstance(e, ConnectionResetError) for e in echo.errors)
    proxy.reset_after(None)
    reader, writer = await connect(proxy)
    await round_trip(reader, writer, b"r" * 1000)
    writer.close()


async def test_reset_all_resets_open_connections_and_keeps_listening(proxy: FaultProxy) -> None:
    conns = [await connect(proxy) for _ in range(3)]
    for reader, writer in conns:
        await round_trip(reader, writer, b"hello")
    assert proxy.reset_all() == 3
    for reader, writer in conns:
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(10), 10)
        writer.close()
    reader, writer = await connect(proxy)
    await round_trip(reader, writer, b"again")
    writer.close()


async def test_blackhole_stalls_and_heal_delivers_in_order(proxy: FaultProxy, echo: Echo) -> None:
    reader, writer = await connect(proxy)
    await round_trip(reader, writer, b"before")
    proxy.blackhole()
    writer.write(b"held")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.read(10), 0.5)
    # A new connection is accepted and kept silent; the target is not even dialled.
    reader2, writer2 = await connect(proxy)
    writer2.write(b"quiet")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader2.read(10), 0.5)
    await eventually(lambda: proxy.accepted == 2, "the second connection is accepted")
    assert echo.accepted == 1
    # A connection reset meanwhile wakes the held ones, which must go back to waiting, not spin (the
    # proxy's loop must still answer the heal below).
    _, writer3 = await connect(proxy)
    await eventually(lambda: proxy.open == 3, "the third connection is accepted")
    sock = writer3.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer3.transport.abort()  # a RST
    await eventually(lambda: proxy.open == 2, "the third connection is gone")
    proxy.heal()
    assert await asyncio.wait_for(reader.readexactly(4), 10) == b"held"
    assert await asyncio.wait_for(reader2.readexactly(5), 10) == b"quiet"
    assert echo.accepted == 2
    for w in (writer, writer2):
        w.close()


async def test_blackhole_one_direction(proxy: FaultProxy) -> None:
    reader, writer = await connect(proxy)
    proxy.blackhole(direction="down")
    writer.write(b"ping")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.read(10), 0.5)
    await eventually(lambda: proxy.bytes_up == 4, "the up direction still flows")
    assert proxy.bytes_down == 0
    proxy.heal()
    assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"
    writer.close()


async def test_cut_refuses_and_resets_then_heal_restores(proxy: FaultProxy) -> None:
    reader, writer = await connect(proxy)
    await round_trip(reader, writer, b"up")
    port = proxy.port
    proxy.cut()
    assert not proxy.running
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(10), 10)
    writer.close()
    with pytest.raises(ConnectionRefusedError):
        await connect(proxy)
    proxy.heal()
    assert proxy.running and proxy.port == port
    reader, writer = await connect(proxy)
    await round_trip(reader, writer, b"back")
    writer.close()


async def test_a_missing_target_resets_the_client() -> None:
    """The proxy accepts, cannot reach its target and resets the client: seen at the first read, or by the
    connect already when the reset comes before the client's loop checked that its connect completed."""
    with FaultProxy(("127.0.0.1", 1)) as p, pytest.raises(ConnectionResetError):  # nothing listens on port 1
        reader, writer = await connect(p)
        try:
            await asyncio.wait_for(reader.read(10), 10)
        finally:
            writer.close()


def test_bad_settings_are_refused(echo: Echo) -> None:
    with FaultProxy(echo.target) as p:
        with pytest.raises(ValueError, match="latency must be >= 0"):
            p.set(latency=-1)
        with pytest.raises(ValueError, match="direction must be"):
            p.set(latency=1, direction="sideways")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="nbytes"):
            p.reset_after(-5)


async def test_tcp_proxy_stop_is_a_cut(echo: Echo) -> None:
    with TcpProxy(echo.target) as p:
        reader, writer = await connect(p)
        await round_trip(reader, writer, b"x")
        p.stop()
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(10), 10)
        writer.close()
        with pytest.raises(ConnectionRefusedError):
            await connect(p)
        p.start()
        reader, writer = await connect(p)
        await round_trip(reader, writer, b"y")
        writer.close()
