"""The SDK over TLS (``https://``, ``wss://``, ``tls://``) against a real ``im serve`` speaking TLS itself
(tests/support/tls_server.py ``running_tls_server``): chat, reconnect and resume; a certificate from
another CA or for another host is refused with a clear error and nothing reaches the server in clear; a
server that hands out a plaintext gateway address is refused; ``insecure_skip_verify`` works and warns
every time."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from im.certs import create_ca
from im.client import (
    ApiClient,
    ApiError,
    Client,
    ClientClosed,
    Disconnected,
    PlaintextRefused,
    TcpTransport,
    TlsVerificationError,
    WebSocketTransport,
)
from im.client.tls import client_context, is_secure
from tests.client.conftest import PASSWORD, Recorder
from tests.support.server import running_server
from tests.support.tls_server import TlsServer, running_tls_server

PING = b'{"t":"ping","id":1}'


@pytest.fixture
def tls(tmp_path: Path) -> Iterator[TlsServer]:
    with running_tls_server(tmp_path) as srv:
        yield srv


@pytest.fixture
def other_ca(tmp_path: Path) -> Path:
    """A CA that signed nothing the server uses."""
    return create_ca(tmp_path / "other").cert


async def _register(srv: TlsServer, *names: str) -> None:
    async with ApiClient(srv.http, ca_file=srv.ca.cert) as api:
        for name in names:
            with contextlib.suppress(ApiError):
                await api.register(name, PASSWORD)


@pytest.fixture
async def login(tls: TlsServer) -> AsyncIterator[Any]:
    clients: list[Client] = []

    async def make(name: str, **options: Any) -> tuple[Client, Recorder]:
        await _register(tls, name)
        options.setdefault("ca_file", tls.ca.cert)
        client = await Client.login(tls.http, name, PASSWORD, device="dev", backoff_max=0.5, **options)
        clients.append(client)
        return client, Recorder(client)

    yield make
    for c in clients:
        await c.close()


# --- the context --------------------------------------------------------------------------------------


def test_client_context_defaults_and_refusals(tmp_path: Path, other_ca: Path) -> None:
    ctx = client_context()
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    pinned = client_context(ca_file=other_ca)  # only that CA, not the system store
    assert len(pinned.get_ca_certs()) == 1
    off = client_context(insecure_skip_verify=True)
    assert off.verify_mode == ssl.CERT_NONE and not off.check_hostname
    with pytest.raises(ValueError, match="contradict"):
        client_context(ca_file=other_ca, insecure_skip_verify=True)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        client_context(ca_file=tmp_path / "missing.crt")
    garbage = tmp_path / "garbage.crt"
    garbage.write_text("not a certificate")
    with pytest.raises(ValueError, match="no usable PEM"):
        client_context(ca_file=garbage)
    assert [is_secure(u) for u in ("https://h", "wss://h/ws", "tls://h:1", "http://h", "ws://h", "tcp://h:1")] == [
        True,
        True,
        True,
        False,
        False,
        False,
    ]
    with pytest.raises(ValueError, match="not a ws:// or wss://"):
        WebSocketTransport("https://127.0.0.1:1/ws")
    with pytest.raises(ValueError, match="tls://host:port"):
        TcpTransport("ssl://127.0.0.1:1")


# --- working over TLS -----------------------------------------------------------------------------------


async def test_gateway_hands_out_tls_addresses(tls: TlsServer) -> None:
    await _register(tls, "gateway_user")
    async with ApiClient(tls.http, ca_file=tls.ca.cert) as api:
        await api.login("gateway_user", PASSWORD)
        gw = await api.gateway()
        assert (gw.ws, gw.tcp) == (tls.ws, tls.tcp)
        # Raw transports with the same CA: a ping answered over wss:// and tls://.
        for t in (WebSocketTransport(gw.ws, ca_file=tls.ca.cert), TcpTransport(tls.tcp, ca_file=tls.ca.cert)):
            async with t:
                t.send(PING)
                assert b'"pong"' in (await asyncio.wait_for(t.recv(), 10) or b"")


@pytest.mark.parametrize("transport", ["ws", "tcp"])
async def test_chat_reconnect_and_resume_over_tls(tls: TlsServer, login: Any, transport: str) -> None:
    n = 120
    alice, a = await login("alice", transport=transport, backoff_base=0.05)
    bob, b = await login("bob", transport=transport, backoff_base=0.05)
    first = await alice.send({"text": "over TLS"}, to=bob.uid)
    conv = first.conv
    await b.wait(lambda: len(b.messages) == 1)
    assert b.messages[0].body == {"text": "over TLS"}
    assert alice.transport is not None and alice.transport.secure
    cmids = []
    for i in range(n):
        cmids.append(alice.post(i, conv=conv))
        if i == n // 3:
            await b.wait(lambda: len(b.messages) >= 10)
            assert bob.transport is not None
            bob.transport.abort()  # the receiver's TLS connection dies mid-stream
        if i == n // 2:
            assert alice.transport is not None
            alice.transport.abort()  # the sender's, with sends in flight
        await asyncio.sleep(0.001)
    await b.wait(lambda: len(b.messages) == n + 1)
    await a.wait(lambda: len(a.acks) == n + 1)
    assert alice.connections >= 2 and bob.connections >= 2
    assert [m.seq for m in b.messages] == list(range(1, n + 2))  # no gap, no duplicate
    assert [m.body for m in b.messages[1:]] == list(range(n))
    assert sorted(x.cmid for x in a.acks[1:]) == sorted(cmids)
    assert any(type(e) is Disconnected and e.reconnect for e in b.events)


# --- refusals -------------------------------------------------------------------------------------------


async def test_a_certificate_from_another_ca_is_refused(tls: TlsServer, other_ca: Path) -> None:
    await _register(tls, "carol")
    with pytest.raises(TlsVerificationError, match=r"certificate verify failed|unable to get local issuer") as info:
        await Client.login(tls.http, "carol", PASSWORD, ca_file=other_ca)
    assert f"only the CA file {other_ca}" in str(info.value)
    # Without ca_file the system store is used, which does not know the test CA either.
    with pytest.raises(TlsVerificationError, match="the system CA store"):
        async with ApiClient(tls.http) as api:
            await api.login("carol", PASSWORD)
    for t in (WebSocketTransport(tls.ws, ca_file=other_ca), TcpTransport(tls.tcp, ca_file=other_ca)):
        with pytest.raises(TlsVerificationError, match=re.escape(t.url)):
            await t.connect()


async def test_a_client_stops_when_the_gateway_certificate_is_refused(tls: TlsServer, other_ca: Path) -> None:
    """API trusted, gateway not: the client stops with the TLS error instead of retrying forever."""
    await _register(tls, "dave")
    api = ApiClient(tls.http, ca_file=tls.ca.cert)
    await api.login("dave", PASSWORD)

    def transport(gw: Any) -> WebSocketTransport:
        return WebSocketTransport(gw.ws, ca_file=other_ca)

    client = Client(api, device="d", transport_factory=transport, close_api=True)
    client.start()
    with pytest.raises(ClientClosed):
        await client.wait_connected(20)
    assert isinstance(client.error, TlsVerificationError)
    assert client.connections == 0
    await client.close()


async def test_a_wrong_host_name_is_refused(tmp_path: Path) -> None:
    """The server's certificate is from the trusted CA, but for another host (not 127.0.0.1): refused on every
    listener, and each connection ends in the server's TLS handshake (nothing reaches the application)."""
    with running_tls_server(tmp_path, ["--log-level", "debug"], hosts=("elsewhere.example",)) as srv:
        with pytest.raises(TlsVerificationError, match=r"Hostname mismatch|IP address mismatch"):
            async with ApiClient(srv.http, ca_file=srv.ca.cert) as api:
                await api.register("erin", PASSWORD)
        for t in (WebSocketTransport(srv.ws, ca_file=srv.ca.cert), TcpTransport(srv.tcp, ca_file=srv.ca.cert)):
            with pytest.raises(TlsVerificationError, match="mismatch"):
                await t.connect()
        log = srv.server.log()
        for listener in ("http", "websocket", "tcp"):
            assert f"{listener}: TLS handshake failed" in log, f"no refused handshake on {listener}:\n{log[-4000:]}"
        # The refused registration never reached the API: the name is still free (the chain alone trusted).
        unverified = ssl.create_default_context(cafile=srv.ca.cert)
        unverified.check_hostname = False
        async with ApiClient(srv.http, ssl_context=unverified) as api:
            await api.register("erin", PASSWORD)


async def test_a_plaintext_gateway_behind_an_https_api_is_refused(tmp_path: Path) -> None:
    """The server announces ws:// while the API is https: the client stops, it never sends the token in clear."""
    with running_tls_server(tmp_path, public_ws=False) as srv:
        await _register(srv, "frank")
        with pytest.raises(ClientClosed) as info:
            await Client.login(srv.http, "frank", PASSWORD, ca_file=srv.ca.cert, connect_timeout=20)
        error = info.value.__cause__
        assert isinstance(error, PlaintextRefused), error
        assert error.url.startswith("ws://") and "in clear" in str(error)


async def test_a_tls_url_never_falls_back_to_plaintext(tmp_path: Path) -> None:
    """tls:// and wss:// to a plaintext ``im serve``: the handshake fails; no frame is written in clear."""
    ca = create_ca(tmp_path / "certs").cert  # a CA the client trusts: the failure is the plaintext, not trust
    with running_server(tmp_path / "plain") as plain:
        for t in (
            TcpTransport(f"tls://127.0.0.1:{plain.tcp_port}", ca_file=ca, connect_timeout=3),
            WebSocketTransport(f"wss://127.0.0.1:{plain.ws_port}/ws", ca_file=ca, connect_timeout=3),
        ):
            with pytest.raises((ssl.SSLError, ConnectionError, TimeoutError)):
                await t.connect()
            with pytest.raises(ConnectionError):
                t.send(PING)


# --- the loud skip flag ---------------------------------------------------------------------------------


async def test_insecure_skip_verify_connects_and_warns_each_time(
    tls: TlsServer, login: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "im.client.tls")
    client, rec = await login("gina", ca_file=None, insecure_skip_verify=True, transport="tcp", backoff_base=0.05)
    warnings = [r for r in caplog.records if "verification is OFF" in r.getMessage()]
    assert {w.getMessage().split(" for ")[1].split(" ")[0] for w in warnings} == {tls.http + "/api/v1", tls.tcp}
    before = len(warnings)
    assert client.transport is not None
    client.transport.abort()
    await rec.wait(lambda: client.connections >= 2 and client.transport is not None)
    await client.wait_connected(20)
    again = [r for r in caplog.records if "verification is OFF" in r.getMessage()]
    assert len(again) == before + 1, "every connection without verification logs its warning"
    with pytest.raises(ValueError, match="contradict"):
        ApiClient(tls.http, ca_file=tls.ca.cert, insecure_skip_verify=True)
