"""TLS on every listener of a real ``im serve``: HTTPS, wss:// and TCP over TLS work with raw clients
that trust only the test CA; plaintext is refused on each port and the server carries on; HSTS; the
gateway addresses; certificates replaced on disk (by mtime and by SIGHUP); the handshake timeout."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from im import certs
from tests.support.client import Account, TcpLink
from tests.support.server import ServerProcess, TlsFiles, make_tls, running_server
from tests.tls.test_reloading import peer_name

HANDSHAKE_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    d = tmp_path_factory.mktemp("tls")
    files = make_tls(d / "pki")
    with running_server(d / "data", ["--set", f"tls.handshake_timeout={HANDSHAKE_TIMEOUT}"], tls=files) as proc:
        yield proc


def tls_files(server: ServerProcess) -> TlsFiles:
    assert server.tls is not None
    return server.tls


async def tls_register(server: ServerProcess, name: str) -> Account:
    """Register and log in over HTTPS (the shared helper speaks plain HTTP)."""
    body = {"username": name, "password": "correct horse battery"}
    async with httpx.AsyncClient(verify=server.verify) as http:
        assert (await http.post(f"{server.api}/auth/register", json=body)).status_code == 201
        r = await http.post(f"{server.api}/auth/login", json=body)
        assert r.status_code == 200, r.text
        t = r.json()
    return Account(t["uid"], name, body["password"], t["access_token"], t["refresh_token"])


async def tls_tcp(server: ServerProcess) -> TcpLink:
    ctx = tls_files(server).client_context()
    return TcpLink(*await asyncio.open_connection(*server.tcp, ssl=ctx, server_hostname="127.0.0.1"))


async def auth(link: Any, account: Account, device: str) -> dict[str, Any]:
    await link.send(json.dumps({"t": "auth", "token": account.access, "device": device}))
    return dict(json.loads(await asyncio.wait_for(link.recv(), 10)))


async def next_frame(link: Any, kind: str) -> dict[str, Any]:
    while True:
        frame: dict[str, Any] = json.loads(await asyncio.wait_for(link.recv(), 10))
        if frame["t"] == kind:
            return frame


def served_cn(port: int, ca: Path) -> str:
    """The common name of the certificate a new connection to ``port`` is shown."""
    ctx = ssl.create_default_context(cafile=ca)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        return peer_name(tls)


async def healthy(server: ServerProcess) -> None:
    async with httpx.AsyncClient(verify=server.verify) as http:
        assert (await http.get(f"{server.api}/health")).status_code == 200


# --- HTTPS ---------------------------------------------------------------------------------------------


async def test_https_serves_the_api_with_hsts(tls_server: ServerProcess) -> None:
    assert tls_server.api.startswith("https://")
    async with httpx.AsyncClient(verify=tls_server.verify) as http:
        r = await http.get(f"{tls_server.api}/health")
        page = await http.get(f"{tls_server.http}/")
    assert r.status_code == 200
    assert r.headers["strict-transport-security"] == "max-age=31536000"
    assert page.headers["strict-transport-security"] == "max-age=31536000"  # the web client too


async def test_https_client_without_the_ca_refuses_the_server(tls_server: ServerProcess) -> None:
    async with httpx.AsyncClient() as http:  # the system's CAs: the private CA is not among them
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await http.get(f"{tls_server.api}/health")


async def test_plain_http_is_refused_and_the_server_stays_up(tls_server: ServerProcess) -> None:
    plain = f"http://127.0.0.1:{tls_server.http_port}/api/v1/health"
    async with httpx.AsyncClient() as http:
        for _ in range(3):
            with pytest.raises(httpx.HTTPError):
                await http.get(plain)
    with socket.create_connection(("127.0.0.1", tls_server.http_port), timeout=5) as raw:
        raw.sendall(b"GET /api/v1/health HTTP/1.1\r\nhost: x\r\n\r\n")
        answer = raw.recv(4096)
    assert not answer.startswith(b"HTTP"), answer  # nothing is served in clear
    await healthy(tls_server)


def test_tls_versions(tls_server: ServerProcess) -> None:
    """1.3 by default, 1.2 accepted, 1.1 refused."""

    def version(highest: ssl.TLSVersion) -> str | None:
        ctx = tls_files(tls_server).client_context()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # TLSv1_1 itself is deprecated
            ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
            ctx.maximum_version = highest
        with (
            socket.create_connection(("127.0.0.1", tls_server.http_port), timeout=5) as raw,
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            return tls.version()

    assert version(ssl.TLSVersion.MAXIMUM_SUPPORTED) == "TLSv1.3"
    assert version(ssl.TLSVersion.TLSv1_2) == "TLSv1.2"
    with pytest.raises(ssl.SSLError):
        version(ssl.TLSVersion.TLSv1_1)


# --- the gateway addresses -----------------------------------------------------------------------------


async def test_gateway_hands_out_tls_addresses(tls_server: ServerProcess) -> None:
    alice = await tls_register(tls_server, "gw-alice")
    async with httpx.AsyncClient(verify=tls_server.verify) as http:
        body = (await http.get(f"{tls_server.api}/gateway", headers=alice.auth)).json()
    assert body["ws"] == f"wss://127.0.0.1:{tls_server.ws_port}/ws"
    assert body["tcp"] == f"tls://127.0.0.1:{tls_server.tcp_port}"


# --- wss:// and TCP over TLS ----------------------------------------------------------------------------


async def test_wss_and_tls_tcp_users_chat(tls_server: ServerProcess) -> None:
    alice, bob = await asyncio.gather(tls_register(tls_server, "alice"), tls_register(tls_server, "bob"))
    ctx = tls_files(tls_server).client_context()
    async with websockets.connect(tls_server.ws, ssl=ctx) as ws:
        assert (await auth(ws, alice, "browser"))["t"] == "auth_ok"
        tcp = await tls_tcp(tls_server)
        try:
            assert (await auth(tcp, bob, "phone"))["t"] == "auth_ok"
            for i in range(20):
                await ws.send(json.dumps({"t": "send", "cmid": f"w{i}", "to": bob.uid, "body": f"over wss {i}"}))
                await tcp.send(json.dumps({"t": "send", "cmid": f"t{i}", "to": alice.uid, "body": f"over tls {i}"}))
            got_bob = [(await next_frame(tcp, "msg"))["body"] for _ in range(20)]
            got_alice: list[str] = []
            while len(got_alice) < 20:
                frame = await next_frame(ws, "msg")
                if frame["from"] == bob.uid:
                    got_alice.append(frame["body"])
            assert got_bob == [f"over wss {i}" for i in range(20)]
            assert got_alice == [f"over tls {i}" for i in range(20)]
            await tcp.send(json.dumps({"t": "ping", "id": 7}))
            assert (await next_frame(tcp, "pong"))["id"] == 7
        finally:
            await tcp.close()


async def test_plain_websocket_is_refused(tls_server: ServerProcess) -> None:
    for _ in range(3):
        with pytest.raises((websockets.InvalidMessage, websockets.ConnectionClosed, OSError, EOFError)):
            async with websockets.connect(f"ws://127.0.0.1:{tls_server.ws_port}/ws", open_timeout=5):
                pass
    ctx = tls_files(tls_server).client_context()
    async with websockets.connect(tls_server.ws, ssl=ctx) as ws:  # still serving
        await ws.send(json.dumps({"t": "ping", "id": 1}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 5))["t"] == "pong"


async def test_plain_tcp_is_refused(tls_server: ServerProcess) -> None:
    alice = await tls_register(tls_server, "plain-tcp")
    for _ in range(3):
        link = await TcpLink.open(tls_server.tcp)
        try:
            await link.send(json.dumps({"t": "auth", "token": alice.access, "device": "d"}))
            with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
                await asyncio.wait_for(link.recv(), 10)  # a TLS alert or nothing, then the close: never a frame
        finally:
            await link.close()
    tcp = await tls_tcp(tls_server)
    try:
        assert (await auth(tcp, alice, "d"))["t"] == "auth_ok"
    finally:
        await tcp.close()


# --- the handshake timeout ------------------------------------------------------------------------------


@pytest.mark.parametrize("port", ["http_port", "ws_port", "tcp_port"])
def test_a_socket_that_never_handshakes_is_closed(tls_server: ServerProcess, port: str) -> None:
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", getattr(tls_server, port)), timeout=HANDSHAKE_TIMEOUT + 10) as raw:
        assert raw.recv(1) == b""  # the server closed it (a reset would raise instead)
    took = time.monotonic() - start
    assert HANDSHAKE_TIMEOUT * 0.8 <= took < HANDSHAKE_TIMEOUT + 5, took


# --- certificates replaced on disk ----------------------------------------------------------------------


def replace_files(files: TlsFiles, new: certs.Issued) -> None:
    """Install ``new`` as the server's certificate and key, each file by a rename, key first."""
    for src, dst in ((new.key, files.key), (new.cert, files.cert)):
        tmp = dst.with_name(f".{dst.name}.new")
        shutil.copy(src, tmp)
        os.replace(tmp, dst)


def reissue(files: TlsFiles, name: str) -> certs.Issued:
    ca = certs.Issued(files.ca, files.ca.with_suffix(".key"))
    return certs.issue(files.ca.parent / "next", ca, name)


async def wait_served(server: ServerProcess, port: int, name: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while (seen := served_cn(port, tls_files(server).ca)) != name:
        assert time.monotonic() < deadline, f"still served {seen!r}, not {name!r}"
        await asyncio.sleep(0.1)


async def test_a_replaced_certificate_is_served_without_a_restart(tmp_path: Path) -> None:
    files = make_tls(tmp_path / "pki")
    with running_server(tmp_path / "data", ["--set", "tls.reload_interval=0.2"], tls=files) as server:
        alice = await tls_register(server, "alice")
        ctx = files.client_context()
        async with websockets.connect(server.ws, ssl=ctx) as ws:
            assert (await auth(ws, alice, "open-before"))["t"] == "auth_ok"
            tcp = await tls_tcp(server)
            assert (await auth(tcp, alice, "tcp-before"))["t"] == "auth_ok"
            assert served_cn(server.http_port, files.ca) == "server"
            replace_files(files, reissue(files, "renewed"))
            for port in (server.http_port, server.ws_port, server.tcp_port):
                await wait_served(server, port, "renewed")
            for link in (ws, tcp):  # the connections opened before keep working, on their old certificate
                await link.send(json.dumps({"t": "ping", "id": 3}))
                assert (await next_frame(link, "pong"))["id"] == 3
            await tcp.close()
        assert "reloaded, new connections get certificate CN=renewed" in server.log()


async def test_sighup_reloads_and_a_broken_replacement_keeps_the_old_certificate(tmp_path: Path) -> None:
    files = make_tls(tmp_path / "pki")
    with running_server(tmp_path / "data", ["--set", "tls.reload_interval=0"], tls=files) as server:
        assert server.proc is not None
        replace_files(files, reissue(files, "by-sighup"))
        assert served_cn(server.ws_port, files.ca) == "server"  # no polling: nothing happens by itself
        server.proc.send_signal(signal.SIGHUP)
        for port in (server.http_port, server.ws_port, server.tcp_port):
            await wait_served(server, port, "by-sighup")
        # A broken replacement: logged, and the certificate in use stays.
        files.cert.write_text("-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")
        server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "does not load" not in server.log():
            assert time.monotonic() < deadline, server.log()[-2000:]
            await asyncio.sleep(0.05)
        for port in (server.http_port, server.ws_port, server.tcp_port):
            assert served_cn(port, files.ca) == "by-sighup"
        await healthy(server)
        assert server.proc.poll() is None


# --- TLS consequences for the pumps: closing, slow consumers --------------------------------------------


async def test_a_bye_is_read_whole_even_when_the_client_keeps_sending(tls_server: ServerProcess) -> None:
    """TLS has no half-close: the TLS close drains what the client still sends, so the last frames
    arrive instead of being lost to a reset."""
    tcp = await tls_tcp(tls_server)
    try:
        junk = json.dumps({"t": "ping", "id": 1}).encode()
        frame = (len(junk) + 1).to_bytes(4, "big") + b"\x01" + junk
        auth_frame = json.dumps({"t": "auth", "token": "not a token", "device": "d"}).encode()
        tcp.writer.write((len(auth_frame) + 1).to_bytes(4, "big") + b"\x01" + auth_frame + frame * 20_000)
        got = []
        with contextlib.suppress(asyncio.IncompleteReadError):
            while True:
                got.append(json.loads(await asyncio.wait_for(tcp.recv(), 10)))
        assert [f["t"] for f in got][-2:] == ["error", "bye"], got
        assert got[-1]["code"] == "auth_failed"
    finally:
        await tcp.close()


def test_a_slow_consumer_over_tls_is_disconnected(tls_server: ServerProcess) -> None:
    """The hub's send-buffer limits hold on TLS transports (they count what is not yet encrypted or not
    yet handed to the socket): a client that sends pings and never reads the pongs is closed once
    limits.preauth_send_buffer (64 KiB) is queued, as over plain TCP."""
    ctx = tls_files(tls_server).client_context()
    ping = b'{"t":"ping","id":1}'
    block = ((len(ping) + 1).to_bytes(4, "big") + b"\x01" + ping) * 3000
    with (
        socket.create_connection(tls_server.tcp, timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        deadline = time.monotonic() + 60
        with pytest.raises(OSError):  # reset, broken pipe or a TLS error once the server gives up
            while time.monotonic() < deadline:
                tls.sendall(block)
    assert "closing slow consumer" in tls_server.log()
    with socket.create_connection(("127.0.0.1", tls_server.http_port), timeout=5):
        pass  # still accepting
