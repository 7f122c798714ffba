"""The WebSocket gateway's RFC 6455 behaviour end to end, against an in-process ``im serve``.

In-process so the tests can look at the hub (connections leave it on close) and shorten the handshake
timeout; driven by the ``websockets`` library (through the recording :class:`ChatClient`, so the history
checker runs as on every end-to-end test) and by the SDK's picows-based :class:`WebSocketTransport`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import websockets

from im.client import Ack, AuthOk, ClientSession, Encoding, Message, Synced, WebSocketTransport
from im.config import load_config
from im.server import EmbeddedServer
from tests.support.checker import History
from tests.support.client import Account, ChatClient, register
from tests.support.server import RELAXED_RATES_CONFIG

MAX_FRAME = 64 * 1024  # the default limits.max_frame_bytes


@dataclass
class InProcess:
    """What the history checker and the clients need of a server."""

    server: EmbeddedServer
    ws: str
    tcp: tuple[str, int]
    api: str


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[InProcess]:
    """Overrides the subprocess server of conftest.py: ``im serve`` in this event loop."""
    config = load_config(
        None,
        {
            "data_dir": str(tmp_path / "data"),
            "log_level": "warning",
            "http": {"port": 0},
            "gateway": {"ws_port": 0, "tcp_port": 0, "auth_timeout": 2.0},
            "auth": {"argon2_time_cost": 1, "argon2_memory_kib": 1024, "argon2_parallelism": 1},
            "rates": RELAXED_RATES_CONFIG,
        },
    )
    srv = EmbeddedServer(config)
    ready = asyncio.Event()
    task = asyncio.create_task(srv.run(lambda _: ready.set()))
    await asyncio.wait_for(ready.wait(), 20)
    host, tcp_port = srv.tcp_url.removeprefix("tcp://").rsplit(":", 1)
    yield InProcess(srv, srv.ws_url, (host, int(tcp_port)), f"{srv.http_url}/api/v1")
    srv.request_stop()
    await asyncio.wait_for(task, 20)


async def _sdk_connect(url: str, account: Account, device: str) -> tuple[WebSocketTransport, ClientSession]:
    """The SDK's picows transport and session, MessagePack (binary messages), up to ``synced``."""
    t = WebSocketTransport(url, encoding=Encoding.MSGPACK)
    s = ClientSession(device, encoding=Encoding.MSGPACK)
    await t.connect()
    t.send(s.connect(account.access))
    while not isinstance(await _sdk_next(t, s), Synced):
        pass
    assert isinstance(s.auth_ok, AuthOk)
    return t, s


async def _sdk_next(t: WebSocketTransport, s: ClientSession) -> object:
    while True:
        data = await asyncio.wait_for(t.recv(), 10)
        assert data is not None, "closed"
        event = s.receive(data)
        t.send_many(s.data_to_send())
        if event is not None:
            return event


async def test_websocket_users_chat_with_tcp_and_sdk_users(server: InProcess, history: History) -> None:
    names = ("alice", "bob", "carol", "dave")
    alice, bob, carol, dave = await asyncio.gather(*(register(server.api, n) for n in names))
    a = history.client(alice, "ws")
    b = history.client(bob, "tcp", tcp=True)
    d = ChatClient(server.ws, dave, "second-ws", history=history)
    history.clients.append(d)
    history.accounts[dave.uid] = dave
    for c in (a, b, d):
        assert (await c.connect())["t"] == "auth_ok"
    ct, cs = await _sdk_connect(server.ws, carol, "sdk")  # picows client, binary frames
    for i in range(5):
        assert (await a.send(f"a->b {i}", to=bob.uid)) is not None
        assert (await b.send(f"b->a {i}", to=alice.uid)) is not None
        assert (await a.send(f"a->d {i}", to=dave.uid)) is not None
        assert (await d.send(f"d->a {i}", to=alice.uid)) is not None
    assert [m["body"] for m in await b.wait_messages(5)] == [f"a->b {i}" for i in range(5)]
    assert [m["body"] for m in await d.wait_messages(5)] == [f"a->d {i}" for i in range(5)]
    got = await a.wait_messages(10)
    assert sorted(m["body"] for m in got) == sorted([f"b->a {i}" for i in range(5)] + [f"d->a {i}" for i in range(5)])
    # The SDK user, both ways.
    sent = cs.send("c->a", to=alice.uid)
    ct.send_many(cs.data_to_send())
    ack = await _sdk_next(ct, cs)
    assert isinstance(ack, Ack) and ack.cmid == sent.cmid
    assert (await a.wait_messages(11))[-1]["body"] == "c->a"
    assert (await a.send("a->c", to=carol.uid)) is not None
    msg = await _sdk_next(ct, cs)
    assert isinstance(msg, Message) and msg.body == "a->c"
    await ct.close()


async def test_fragmented_message_and_ping(server: InProcess, history: History) -> None:
    alice, bob = await asyncio.gather(register(server.api, "alice"), register(server.api, "bob"))
    a, b = history.client(alice, "a"), history.client(bob, "b")
    await a.connect()
    await b.connect()
    frame = json.dumps({"t": "send", "cmid": "frag-1", "to": bob.uid, "type": "text", "body": "x" * 5000})
    history.sending(a, "frag-1")
    await a.ws.send([frame[i : i + 1000] for i in range(0, len(frame), 1000)])  # six fragments
    await a.wait_for(lambda: "frag-1" in a.acks)
    assert (await b.wait_messages(1))[0]["body"] == "x" * 5000
    latency = await asyncio.wait_for(await a.ws.ping(b"are you there"), 5)
    assert latency >= 0


async def test_oversized_message_then_hard_limit(server: InProcess, history: History) -> None:
    alice, bob = await asyncio.gather(register(server.api, "alice"), register(server.api, "bob"))
    a = history.client(alice, "a")
    await a.connect()
    await a.send_frame("x" * (MAX_FRAME + 10))  # over max_frame_bytes: too_large, and the connection lives on
    await a.wait_for(lambda: len(a.errors) == 1)
    assert a.errors[0]["code"] == "too_large"
    await a.ws.send(b"\x00" * (2 * MAX_FRAME))  # binary this time, still under the hard limit
    await a.wait_for(lambda: len(a.errors) == 2)
    assert a.errors[1]["code"] == "too_large"
    assert (await a.send("still here", to=bob.uid)) is not None, a.errors
    with contextlib.suppress(websockets.ConnectionClosed):
        await a.ws.send("y" * (4 * MAX_FRAME + 1))  # over the hard limit: 1009, never buffered
    await asyncio.wait_for(a.ws.wait_closed(), 5)
    assert a.ws.close_code == 1009


async def test_closing_handshakes(server: InProcess, history: History) -> None:
    alice = await register(server.api, "alice")
    # The client closes: the server echoes 1000 and drops the connection from the hub.
    a = history.client(alice, "a")
    await a.connect()
    assert server.server.hub.connections == 1
    await a.ws.close()
    assert a.ws.close_code == 1000
    for _ in range(100):
        if server.server.hub.connections == 0:
            break
        await asyncio.sleep(0.02)
    assert server.server.hub.connections == 0
    # The server closes: bye, then a close frame with the mapped code (auth_failed -> 1008).
    async with websockets.connect(server.ws) as ws:
        await ws.send(json.dumps({"t": "auth", "token": "not a token", "device": "x"}))
        frames = []
        with contextlib.suppress(websockets.ConnectionClosedError):  # raised for a close code other than 1000
            while True:
                frames.append(json.loads(await asyncio.wait_for(ws.recv(), 5)))
        assert [f["t"] for f in frames] == ["error", "bye"]
        assert ws.close_code == 1008 and ws.close_reason == "auth_failed"


async def test_http_refusals_and_handshake_timeout(server: InProcess) -> None:
    host, port = server.ws.removeprefix("ws://").split("/")[0].split(":")
    with pytest.raises(websockets.InvalidStatus) as info:
        await websockets.connect(server.ws.replace("/ws", "/nope"))
    assert info.value.response.status_code == 404
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n")  # a plain GET: 426
    response = await asyncio.wait_for(reader.read(), 5)  # the server answers, then closes
    assert response.startswith(b"HTTP/1.1 426 ")
    writer.close()
    # A client that never finishes its request is dropped after auth_timeout (2 s here).
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /ws HTTP/1.1\r\n")
    loop = asyncio.get_running_loop()
    start = loop.time()
    assert await asyncio.wait_for(reader.read(), 5) == b""
    assert 1.5 < loop.time() - start < 4
    writer.close()
