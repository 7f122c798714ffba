"""Issue 9, items 2 and 3: bounded resources per connection and per address, on all three listeners.

Each test runs a real ``im serve`` and attacks it from loopback addresses (127.0.0.x: a client socket
bound to another source address is "another address" to the server), then checks that the attack fails
with the documented answer and that bystanders (other addresses, connections already open) still work.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from tests.support.client import Account, ChatClient, TcpLink, http_from, register
from tests.support.server import ServerProcess, running_server
from tests.support.wait import eventually

MiB = 1024 * 1024
BYSTANDER = "127.0.0.2"


# --- helpers ---------------------------------------------------------------------------------------------


_opened: list[socket.socket] = []


@pytest.fixture(autouse=True)
def _close_raw_sockets() -> Iterator[None]:
    yield
    while _opened:
        _opened.pop().close()


def raw_socket(port: int, source: str = "127.0.0.1", timeout: float = 10.0) -> socket.socket:
    """A plain client socket from ``source`` (closed after the test)."""
    s = socket.socket()
    _opened.append(s)
    s.bind((source, 0))
    s.settimeout(timeout)
    s.connect(("127.0.0.1", port))
    return s


def read_until_closed(s: socket.socket, timeout: float = 15.0) -> bytes:
    """Everything the server sends until it closes (or resets) the connection."""
    s.settimeout(timeout)
    out = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := s.recv(65536):
            out += chunk
    return out


def peak_rss_kib(server: ServerProcess) -> int:
    assert server.proc is not None
    for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


async def login_from(server: ServerProcess, account: Account, source: str) -> int:
    async with http_from(source) as http:
        r = await http.post(
            f"{server.api}/auth/login", json={"username": account.username, "password": account.password}
        )
        return r.status_code


async def chat_client(server: ServerProcess, account: Account, device: str, *, tcp: bool, source: str) -> ChatClient:
    """A connected client whose socket has the given source address."""
    client = ChatClient(server.ws, account, device, tcp=server.tcp if tcp else None, source=source)
    try:
        first = await client.connect()
        assert first["t"] == "auth_ok", first
    except BaseException:
        if client.ws is not None:
            with contextlib.suppress(Exception):
                await client.ws.close()
        raise
    return client


async def exchange(a: ChatClient, b: ChatClient, text: str) -> None:
    """a sends to b, b gets it; and back."""
    assert await a.send(f"{text} a->b", to=b.account.uid) is not None
    assert await b.send(f"{text} b->a", to=a.account.uid) is not None
    assert any(m["body"] == f"{text} a->b" for m in await b.wait_messages(len(b.messages) or 1))
    await a.wait_for(lambda: any(m["body"] == f"{text} b->a" for m in a.messages))


# --- item 2: bodies counted as they arrive -------------------------------------------------------------


def _pump_until_answered(
    server: ServerProcess, head: bytes, chunk: bytes, total: int
) -> tuple[bytes, dict[str, Any], int]:
    """Send ``head`` then ``chunk`` after chunk (up to ``total`` bytes) while reading; return the
    response head, its JSON body and how many bytes had been sent when the answer came. (Plain
    sockets: an asyncio stream drops data it had read once its write side sees the reset.)"""
    s = raw_socket(server.http_port, timeout=60)
    s.sendall(head)
    sent = 0
    stop = threading.Event()

    def pump() -> None:
        nonlocal sent
        with contextlib.suppress(OSError):
            while sent < total and not stop.is_set():
                s.sendall(chunk)
                sent += len(chunk)

    pumping = threading.Thread(target=pump, daemon=True)
    pumping.start()
    try:
        got = b""
        while b"\r\n\r\n" not in got:
            data = s.recv(65536)
            assert data, f"closed without an answer after {sent} bytes"
            got += data
        at_answer = sent
        response_head, _, body = got.partition(b"\r\n\r\n")
        length = int(
            next(
                line.split(b":")[1]
                for line in response_head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            )
        )
        with contextlib.suppress(ConnectionResetError):
            while len(body) < length and (data := s.recv(65536)):
                body += data
    finally:
        stop.set()
        s.close()
        pumping.join()
    return response_head, json.loads(body[:length]), at_answer


async def test_chunked_oversized_bodies_are_refused_before_the_client_is_done(tmp_path: Path) -> None:
    with running_server(tmp_path / "data", ["--set", "files.max_upload_bytes=1048576"]) as server:
        alice = await register(server.api, "alice")
        peak_before = peak_rss_kib(server)
        # A chunked 256 MiB login body (the attack: 131 -> 1,216 MiB).
        head = (
            b"POST /api/v1/auth/login HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        chunk = b"10000\r\n" + b"a" * 0x10000 + b"\r\n"
        response, body, at_answer = await asyncio.to_thread(_pump_until_answered, server, head, chunk, 256 * MiB)
        assert response.startswith(b"HTTP/1.1 413"), response
        assert body["code"] == "too_large" and "1048576" in body["message"]
        assert at_answer < 32 * MiB, at_answer  # answered long before the client finished sending
        # The upload route keeps its own streaming limit (files.max_upload_bytes), chunked too.
        boundary = b"xyzzy"
        head = (
            b"POST /api/v1/files HTTP/1.1\r\nhost: x\r\nauthorization: Bearer "
            + alice.access.encode()
            + b"\r\ncontent-type: multipart/form-data; boundary="
            + boundary
            + b"\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        part = (
            b"--" + boundary + b'\r\ncontent-disposition: form-data; name="file"; filename="big.bin"\r\n'
            b"content-type: application/octet-stream\r\n\r\n"
        )
        first = hex(len(part))[2:].encode() + b"\r\n" + part + b"\r\n"
        response, body, at_answer = await asyncio.to_thread(
            _pump_until_answered, server, head + first, chunk, 256 * MiB
        )
        assert response.startswith(b"HTTP/1.1 413"), response
        assert body["code"] == "too_large"
        assert at_answer < 32 * MiB, at_answer
        peak_after = peak_rss_kib(server)
        assert peak_after - peak_before < 64 * 1024, (peak_before, peak_after)  # KiB: no 256 MiB buffer
        # The server is still responsive: a bystander logs in.
        assert await login_from(server, alice, BYSTANDER) == 200


# --- item 3: HTTP timeouts -------------------------------------------------------------------------------


def _time_to_close(s: socket.socket, started: float, limit: float) -> float:
    read_until_closed(s, timeout=limit)
    return time.monotonic() - started


def test_slow_heads_bodies_and_idle_keepalive_are_closed_in_time(tmp_path: Path) -> None:
    extra = [
        "--set",
        "http.head_timeout=2",
        "--set",
        "http.body_timeout=2",
        "--set",
        "http.keepalive_timeout=1",
        "--set",
        "http.max_headers=50",
    ]
    with running_server(tmp_path / "data", extra) as server:
        port = server.http_port
        started = time.monotonic()
        silent = raw_socket(port)  # connects and says nothing
        slow_head = raw_socket(port)  # slowloris: a byte of head every 0.3 s, never the end
        slow_head.sendall(b"GET /api/v1/health HTTP/1.1\r\nhost: x\r\n")
        stalled_body = raw_socket(port)  # head complete, body stops half-way
        stalled_body.sendall(
            b"POST /api/v1/auth/login HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b'content-length: 1000\r\n\r\n{"username": '
        )
        keepalive = raw_socket(port)  # one request, then idle on a keep-alive connection
        keepalive.sendall(b"GET /api/v1/health HTTP/1.1\r\nhost: x\r\n\r\n")
        stop = threading.Event()

        def trickle() -> None:
            with contextlib.suppress(OSError):
                while not stop.wait(0.3):
                    slow_head.sendall(b"x")

        trickler = threading.Thread(target=trickle, daemon=True)
        trickler.start()
        try:
            # While they hang on, a bystander is served.
            assert httpx.get(f"{server.api}/health", timeout=5).status_code == 200
            assert _time_to_close(silent, started, 10) < 2 + 1.5
            assert _time_to_close(slow_head, started, 10) < 2 + 1.5
            assert _time_to_close(stalled_body, started, 10) < 2 + 1.5
            got = read_until_closed(keepalive, timeout=10)
            assert got.startswith(b"HTTP/1.1 200"), got
            assert time.monotonic() - started < 1 + 1.5
        finally:
            stop.set()
            trickler.join()
        # Each was closed after its timeout, not before: a slow but complete request still works.
        s = raw_socket(port)
        s.sendall(b"GET /api/v1/health HTTP/1.1\r\n")
        time.sleep(1.0)  # under head_timeout: the timeout is what is tested here, not the wait
        s.sendall(b"host: x\r\nconnection: close\r\n\r\n")
        assert read_until_closed(s).startswith(b"HTTP/1.1 200")
        # Too many header fields, or a head over http.max_head_bytes (16 KiB): 431 too_large (400 when
        # the head came in pieces and h11 stopped buffering it).
        s = raw_socket(port)
        fields = b"".join(b"x-h%d: 1\r\n" % i for i in range(60))
        s.sendall(b"GET /api/v1/health HTTP/1.1\r\nhost: x\r\n" + fields + b"\r\n")
        got = read_until_closed(s)
        assert got.startswith(b"HTTP/1.1 431") and b'"too_large"' in got, got
        s = raw_socket(port)
        s.sendall(b"GET /api/v1/health HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 20_000 + b"\r\n\r\n")
        got = read_until_closed(s)
        assert got.startswith((b"HTTP/1.1 431", b"HTTP/1.1 400")), got
        s = raw_socket(port)
        s.sendall(b"GET /api/v1/health HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 20_000)
        assert read_until_closed(s).startswith(b"HTTP/1.1 400")  # incomplete: not buffered past the limit
        assert httpx.get(f"{server.api}/health", timeout=5).status_code == 200


# --- item 3: per-address caps on each listener ----------------------------------------------------------

CAP = 4


async def test_per_address_cap_refuses_the_next_connection_on_each_listener(tmp_path: Path) -> None:
    extra = ["--set", f"limits.max_connections_per_address={CAP}"]
    with running_server(tmp_path / "data", extra) as server:
        alice, bob = await asyncio.gather(register(server.api, "alice"), register(server.api, "bob"))

        # HTTP, from 127.0.0.1: CAP idle connections, then 503 unavailable with Retry-After.
        held = [raw_socket(server.http_port) for _ in range(CAP)]
        refused = raw_socket(server.http_port)
        answer = read_until_closed(refused)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503"), answer
        assert b"retry-after: 5" in head.lower()
        assert json.loads(body)["code"] == "unavailable"
        assert await login_from(server, alice, BYSTANDER) == 200  # another address is served
        held[0].sendall(b"GET /api/v1/health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        assert read_until_closed(held[0]).startswith(b"HTTP/1.1 200")  # and so are those already in
        for s in held:
            s.close()

        # WebSocket, from 127.0.0.4: CAP open, then the next is closed 1013 after its handshake.
        source = "127.0.0.4"
        conns = [await websockets.connect(server.ws, local_addr=(source, 0)) for _ in range(CAP)]
        extra_ws = await websockets.connect(server.ws, local_addr=(source, 0))
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(extra_ws.recv(), 10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
        assert "too many connections" in closed.value.rcvd.reason
        a = await chat_client(server, alice, "phone", tcp=False, source=BYSTANDER)
        b = await chat_client(server, bob, "laptop", tcp=True, source=BYSTANDER)
        await exchange(a, b, "ws cap")
        for c in conns:
            await c.close()

        # TCP, from 127.0.0.5: CAP open, then the next gets error unavailable with retry_after 5 (a TCP
        # client has no HTTP status to read it from), bye unavailable (reconnect) and a close.
        source = "127.0.0.5"
        links = [await TcpLink.open(server.tcp, source) for _ in range(CAP)]
        extra_tcp = await TcpLink.open(server.tcp, source)
        error = json.loads(await asyncio.wait_for(extra_tcp.recv(), 10))
        assert error["t"] == "error" and error["code"] == "unavailable" and error["ref"] is None, error
        assert error["retry_after"] == 5 and "too many connections" in error["message"], error
        bye = json.loads(await asyncio.wait_for(extra_tcp.recv(), 10))
        assert bye["t"] == "bye" and bye["code"] == "unavailable" and bye["reconnect"] is True, bye
        assert await asyncio.wait_for(extra_tcp.reader.read(), 10) == b""  # then closed
        await exchange(a, b, "tcp cap")
        for link in [*links, extra_tcp]:
            await link.close()
        await a.close()
        await b.close()


# --- item 3: the descriptor test -------------------------------------------------------------------------


async def test_600_idle_sockets_under_ulimit_512_take_nothing_down(tmp_path: Path) -> None:
    """The issue's attack: under ``ulimit -n 512``, 600 idle HTTP sockets took every listener down.
    Now the process cap (512 - fd_reserve 128 = 384) refuses the overflow cleanly, the database and the
    open connections keep working, and new users are served again as soon as the idle ones time out."""
    extra = ["--set", "http.head_timeout=3"]
    with running_server(tmp_path / "data", extra, nofile=512) as server:
        alice, bob = await asyncio.gather(register(server.api, "alice"), register(server.api, "bob"))
        a = await chat_client(server, alice, "phone", tcp=False, source=BYSTANDER)
        b = await chat_client(server, bob, "laptop", tcp=True, source=BYSTANDER)
        # An HTTP client already connected (one keep-alive connection) keeps using it through the flood.
        statuses: list[int | str] = []
        kept = httpx.AsyncClient(
            transport=httpx.AsyncHTTPTransport(local_address=BYSTANDER, limits=httpx.Limits(max_connections=1)),
            timeout=10,
        )

        async def keep_asking() -> None:
            while True:
                try:
                    statuses.append((await kept.get(f"{server.api}/users/me", headers=alice.auth)).status_code)
                except httpx.HTTPError as exc:
                    statuses.append(f"{time.monotonic():.2f} {exc!r}")
                await asyncio.sleep(0.3)

        asking = asyncio.create_task(keep_asking())
        await eventually(lambda: statuses, "the HTTP client got no answer")

        def flood() -> list[socket.socket]:
            out = []
            for i in range(600):  # 60 from each of ten addresses: under the per-address cap (128)
                with contextlib.suppress(OSError):
                    out.append(raw_socket(server.http_port, source=f"127.0.0.{10 + i % 10}"))
            return out

        idle = await asyncio.to_thread(flood)
        try:
            assert len(idle) == 600
            last = await asyncio.to_thread(read_until_closed, idle[-1], 10)  # one past the process cap
            assert last.startswith(b"HTTP/1.1 503") and b"connection limit" in last, last
            # Over the process cap: the documented refusal, not a hang or a dead listener.
            async with http_from("127.0.0.3") as http:
                r = await http.get(f"{server.api}/health")
            assert r.status_code in (200, 503), r.text
            if r.status_code == 503:
                assert r.json()["code"] == "unavailable" and r.headers["retry-after"] == "5"
            # Users already connected are unaffected, on WebSocket, TCP and their HTTP connection.
            await exchange(a, b, "during the flood")
            seen = len(statuses)
            await eventually(lambda: len(statuses) >= seen + 3, lambda: f"the open HTTP connection hangs: {statuses}")
            asking.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asking
            await kept.aclose()
            assert set(statuses) == {200}, (statuses, server.log()[-3000:])

            # A new user: register, log in, connect over WebSocket and TCP, once the idle sockets have
            # been closed by the head timeout (the attacker gets no more than that).
            attempts = itertools.count()

            async def new_user_works() -> bool:
                try:
                    carol = await register(server.api, f"carol{next(attempts)}")
                    c1 = await chat_client(server, carol, "ws", tcp=False, source=BYSTANDER)
                    c2 = await chat_client(server, carol, "tcp", tcp=True, source=BYSTANDER)
                except (TimeoutError, AssertionError, OSError, httpx.HTTPError, ConnectionClosed):
                    return False
                await exchange(c1, a, "new user ws")
                await exchange(c2, b, "new user tcp")
                await c1.close()
                await c2.close()
                return True

            await eventually(new_user_works, "a new user could not use the server", timeout=30, interval=0.5)
            assert await login_from(server, alice, BYSTANDER) == 200
            await exchange(a, b, "after the flood")
        finally:
            for s in idle:
                s.close()
        await a.close()
        await b.close()
        # The descriptors kept back (limits.fd_reserve) were never needed by the listeners: no accept
        # failed for lack of one (tests/test_net.py covers what happens when one does).
        assert "cannot accept" not in server.log(), server.log()[-3000:]
