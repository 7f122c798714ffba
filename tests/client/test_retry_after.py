"""The SDK honours the server's ``retry_after`` (error frames, HTTP 429/503 from the API, and a gateway
over its connection cap: HTTP 503 to the upgrade, or a close 1013 after it)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator

import httpx
import pytest
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_create_server

from im.client import ApiClient, ApiError, Client, Gateway, TcpTransport, Transport, WebSocketTransport
from im.client.transport import TRY_AGAIN_AFTER
from im.net import RETRY_AFTER, refusal_503
from im.protocol.frames import Error
from im.protocol.tcp_framing import encode_frame
from tests.client.conftest import PASSWORD
from tests.client.test_session import opened, out, srv
from tests.support.server import ServerProcess


def test_session_keeps_the_longest_retry_after_until_retry() -> None:
    s = opened()
    a, b = s.send("a", to=2), s.send("b", to=2)
    s.data_to_send()
    s.receive(srv(Error(code="rate_limited", message="user send limit reached", ref=a.cmid, retry_after=2.5)))
    s.receive(srv(Error(code="rate_limited", message="user send limit reached", ref=b.cmid, retry_after=0.5)))
    assert s.wants_retry and s.retry_after == 2.5  # the pump waits at least this long before retry()
    s.retry()
    assert s.retry_after == 0.0
    assert out(s) == [a, b]


def test_refusal_without_retry_after_leaves_the_pumps_own_delay() -> None:
    s = opened()
    a = s.send("a", to=2)
    s.data_to_send()
    s.receive(srv(Error(code="unavailable", message="storage", ref=a.cmid)))
    assert s.wants_retry and s.retry_after == 0.0


async def test_api_error_carries_retry_after() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        body = {"code": "rate_limited", "message": "too many login attempts; retry in 42 s", "retry_after": 42}
        return httpx.Response(429, json=body, headers={"Retry-After": "42"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://im") as http:
        api = ApiClient("http://im", http=http)
        with pytest.raises(ApiError) as refused:
            await api.login("alice", "password123")
    assert refused.value.status == 429 and refused.value.code == "rate_limited"
    assert refused.value.retry_after == 42


# --- a gateway over its connection cap (docs/protocol.md section 3, "Connection caps") ---------------


class _TryAgainLater(WSListener):
    """The gateway's refusal after the handshake: close 1013 with the reason the server gives."""

    def on_ws_connected(self, transport: WSTransport) -> None:
        transport.send_close(WSCloseCode.TRY_AGAIN_LATER, b"the server is at its connection limit, retry later")
        transport.disconnect()


class _LoginRefused(WSListener):
    """A gateway admitting no more logins (docs/protocol.md section 3, "Login admission"): the ``auth``
    is answered ``error unavailable`` with ``retry_after`` 0.3 and ``bye unavailable``, then close 1013."""

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type is not WSMsgType.TEXT:
            return
        reason = "too many logins at once; retry later"
        for f in (
            {"t": "error", "code": "unavailable", "message": reason, "ref": None, "retry_after": 0.3},
            {"t": "bye", "code": "unavailable", "message": reason, "reconnect": True},
        ):
            transport.send(WSMsgType.TEXT, json.dumps(f).encode())
        transport.send_close(WSCloseCode.TRY_AGAIN_LATER, b"try again later")
        transport.disconnect()


@contextlib.asynccontextmanager
async def refusing_gateway(kind: str) -> AsyncIterator[str]:
    """A gateway URL whose server refuses every connection as a gateway over a cap does: the WebSocket
    upgrade answered with the gateway's own HTTP 503 (``Retry-After: 5``), or the handshake completed and
    the connection closed 1013; on TCP, ``error unavailable`` with ``retry_after`` 5, then ``bye``."""
    if kind == "503":

        async def shed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(refusal_503("the server is at its connection limit, retry later"))
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(shed, "127.0.0.1", 0)
    elif kind == "tcp":

        async def refuse(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            reason = "the server is at its connection limit, retry later"
            frames = [
                {"t": "error", "code": "unavailable", "message": reason, "ref": None, "retry_after": RETRY_AFTER},
                {"t": "bye", "code": "unavailable", "message": reason, "reconnect": True},
            ]
            writer.write(b"".join(encode_frame(json.dumps(f).encode(), False) for f in frames))
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(refuse, "127.0.0.1", 0)
    elif kind == "login":
        server = await ws_create_server(lambda _request: _LoginRefused(), "127.0.0.1", 0)
    else:
        server = await ws_create_server(lambda _request: _TryAgainLater(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"tcp://127.0.0.1:{port}" if kind == "tcp" else f"ws://127.0.0.1:{port}/ws"
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("kind", ["503", "1013", "tcp"])
async def test_a_gateway_over_its_cap_is_tried_again_no_sooner_than_it_asked(server: ServerProcess, kind: str) -> None:
    """The first connection is refused; with a backoff of a few milliseconds of its own, the client
    still waits the 5 s the gateway asked for (``Retry-After``, the protocol's 5 s after a 1013, the TCP
    refusal's ``retry_after``) before it connects to a gateway that takes it."""
    async with ApiClient(server.http) as api:
        await api.register("alice", PASSWORD)
        bob = await api.register("bob", PASSWORD)
    tried: list[tuple[float, str]] = []
    async with refusing_gateway(kind) as refusing:

        def transport(gateway: Gateway) -> Transport:
            url = refusing if not tried else gateway.ws
            tried.append((time.monotonic(), url))
            return TcpTransport(url) if url.startswith("tcp://") else WebSocketTransport(url)

        client = await Client.login(
            server.http,
            "alice",
            PASSWORD,
            device="phone",
            transport_factory=transport,
            backoff_base=0.005,
            backoff_max=0.02,
            connect_timeout=30,
        )
    try:
        assert [url for _, url in tried][:1] == [refusing] and len(tried) == 2, tried
        waited = tried[1][0] - tried[0][0]
        assert waited >= RETRY_AFTER, f"tried again after {waited:.2f}s"
        assert client.told_to_wait == 1
        assert await client.send({"text": "in"}, to=bob.uid) is not None  # the second one serves
    finally:
        await client.close()


async def test_a_refused_login_on_websocket_is_tried_again_when_its_retry_after_says(server: ServerProcess) -> None:
    """A login refusal on WebSocket ends with close 1013 too, but its error said when to come back (the
    gateway tells the refusals of a storm successive times, so that they come back spread out): the
    client waits that long, not the 5 s a close 1013 alone asks for (every refused WebSocket client of
    a storm came back together 5-6 s later)."""
    async with ApiClient(server.http) as api:
        await api.register("alice", PASSWORD)
    tried: list[float] = []
    async with refusing_gateway("login") as refusing:

        def transport(gateway: Gateway) -> Transport:
            tried.append(time.monotonic())
            return WebSocketTransport(refusing if len(tried) == 1 else gateway.ws)

        client = await Client.login(
            server.http, "alice", PASSWORD, device="phone", transport_factory=transport, backoff_base=0.005
        )
        try:
            await client.wait_synced(10)
        finally:
            await client.close()
    waited = tried[1] - tried[0]
    assert 0.3 <= waited < TRY_AGAIN_AFTER / 2, f"tried again after {waited:.2f}s"
    assert client.told_to_wait == 1
