"""im.net.Listener with TlsAccept, in-process on asyncio's and uvloop's event loops: the context is taken
per connection, handshakes in progress are capped (per address and in all), a stalled handshake is
dropped after its timeout, and closing the listener aborts handshakes under way at once."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop

from im.net import Admission, Listener, TlsAccept, bind
from im.tls import server_context
from tests.support.server import TlsFiles, make_tls
from tests.tls.test_reloading import peer_name

Body = Callable[[TlsFiles], Coroutine[Any, Any, None]]


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[Body], None]:
    files = make_tls(tmp_path)

    def go(body: Body) -> None:
        if request.param == "uvloop":
            uvloop.run(body(files))
        else:
            asyncio.run(body(files))

    return go


def listener(files: TlsFiles, *, per_address: int = 0, total: int = 100, timeout: float = 5.0) -> Listener:
    ctx = server_context(files.cert, files.key)
    slots = Admission(max_connections=total, max_per_address=per_address, max_refusing=0)
    tls = TlsAccept(lambda: ctx, slots, handshake_timeout=timeout, shutdown_timeout=timeout)
    return Listener(bind("127.0.0.1", 0), Echo, name="test", tls=tls).start()


async def closed_within(sock: socket.socket, seconds: float) -> bool:
    """True when the peer closes ``sock`` (EOF or reset) within ``seconds``."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    try:
        return await asyncio.wait_for(loop.sock_recv(sock, 1), seconds) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


async def echo_over_tls(files: TlsFiles, port: int) -> str:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=files.client_context(), server_hostname="127.0.0.1"
    )
    writer.write(b"hello")
    assert await reader.readexactly(5) == b"hello"
    name = peer_name(writer.get_extra_info("ssl_object"))
    writer.close()
    await writer.wait_closed()
    return name


def test_tls_echo_and_per_address_handshake_cap(run: Callable[[Body], None]) -> None:
    async def body(files: TlsFiles) -> None:
        lst = listener(files, per_address=2)
        port = lst.sockets[0].getsockname()[1]
        stalled = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]  # no handshake
        await asyncio.sleep(0.2)
        extra = socket.create_connection(("127.0.0.1", port))
        assert await closed_within(extra, 2.0)  # over the cap: closed at once, no handshake
        assert lst.handshakes_shed == 1
        assert not await closed_within(stalled[0], 0.3)  # the first two still wait for their handshake
        for s in (*stalled, extra):
            s.close()
        await asyncio.sleep(0.2)  # their slots are given back when the server sees them go
        assert await echo_over_tls(files, port) == "server"
        lst.close()
        await lst.wait_closed()

    run(body)


def test_a_stalled_handshake_is_dropped_after_its_timeout(run: Callable[[Body], None]) -> None:
    async def body(files: TlsFiles) -> None:
        lst = listener(files, timeout=0.5)
        port = lst.sockets[0].getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as s:
            start = time.monotonic()
            assert await closed_within(s, 5.0)
            assert 0.4 < time.monotonic() - start < 3.0
        await asyncio.sleep(0.1)
        assert lst.handshakes_failed == 1
        assert lst.tls is not None and lst.tls.slots.open == 0
        lst.close()
        await lst.wait_closed()

    run(body)


def test_closing_aborts_handshakes_in_progress(run: Callable[[Body], None]) -> None:
    async def body(files: TlsFiles) -> None:
        lst = listener(files, timeout=30.0)
        port = lst.sockets[0].getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as s:
            await asyncio.sleep(0.2)
            start = time.monotonic()
            lst.close()
            await lst.wait_closed()
            assert time.monotonic() - start < 2.0  # not the 30 s handshake timeout
            assert await closed_within(s, 2.0)
        assert lst.tls is not None and lst.tls.slots.open == 0

    run(body)


def test_plaintext_is_refused(run: Callable[[Body], None]) -> None:
    async def body(files: TlsFiles) -> None:
        lst = listener(files)
        port = lst.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"hello\r\n" * 100)
        got = await asyncio.wait_for(reader.read(), 5)
        assert b"hello" not in got  # an alert at most, never an echo
        writer.close()
        await lst.wait_closed()
        assert await echo_over_tls(files, port) == "server"
        lst.close()

    run(body)


def test_each_connection_takes_the_current_context(run: Callable[[Body], None], tmp_path: Path) -> None:
    async def body(files: TlsFiles) -> None:
        from im import certs

        other = certs.issue(tmp_path / "other", certs.Issued(files.ca, files.ca.with_suffix(".key")), "other")
        contexts = [server_context(files.cert, files.key), server_context(other.cert, other.key)]
        slots = Admission(max_connections=10, max_per_address=0, max_refusing=0)
        lst = Listener(bind("127.0.0.1", 0), Echo, name="t", tls=TlsAccept(lambda: contexts[0], slots)).start()
        port = lst.sockets[0].getsockname()[1]
        assert await echo_over_tls(files, port) == "server"
        contexts.reverse()
        assert await echo_over_tls(files, port) == "other"
        lst.close()

    run(body)
