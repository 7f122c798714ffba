"""The operations listener (im.observability.ops_http) over real sockets: what it answers, and that bad or
oversized requests get an error without ending the listener."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from im import certs
from im.observability import metrics
from im.observability.health import Readiness
from im.observability.ops_http import MAX_HEAD, OpsServer
from im.tls import ReloadingContext


async def raw(server: OpsServer, data: bytes) -> tuple[int, bytes]:
    """Send ``data`` as is; the status code and body of the answer (the server closes after it)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(data)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


@pytest.fixture
async def ops() -> AsyncIterator[tuple[OpsServer, Readiness]]:
    metrics.install(True)
    readiness = Readiness(cache_for=0)

    async def engine() -> None:
        pass

    readiness.add("store", engine)
    server = OpsServer("127.0.0.1", 0, metrics=True, ready=readiness.check)
    await server.start()
    try:
        yield server, readiness
    finally:
        await server.stop()


async def test_metrics_text_and_health(ops: tuple[OpsServer, Readiness]) -> None:
    server, readiness = ops
    assert server.port > 0 and server.url == f"http://127.0.0.1:{server.port}"
    before = metrics.METRICS.sends
    metrics.METRICS.sends += 7
    async with httpx.AsyncClient(base_url=server.url) as http:
        r = await http.get("/metrics")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/plain")
        assert f"im_sends_received_total {float(before + 7)}" in r.text
        assert "# HELP im_delivery_latency_seconds" in r.text
        assert "process_open_fds " in r.text and "process_max_fds " in r.text  # the process collector
        assert (await http.get("/health/live")).status_code == 200
        r = await http.get("/health/ready")
        assert r.status_code == 503 and r.json()["ready"] is False  # not registered yet
        readiness.registered = True
        r = await http.get("/health/ready")
        assert r.status_code == 200 and r.json()["ready"] is True and r.json()["checks"]["store"]["ok"] is True
        readiness.start_draining()
        r = await http.get("/health/ready")
        assert r.status_code == 503 and r.json()["draining"] is True
        assert (await http.get("/nothing")).status_code == 404
        assert (await http.post("/metrics")).status_code == 405


async def test_ready_that_raises_or_hangs_is_503() -> None:
    async def broken() -> tuple[bool, dict[str, object]]:
        raise RuntimeError("database gone")

    server = OpsServer("127.0.0.1", 0, metrics=True, ready=broken)
    await server.start()
    try:
        status, body = await raw(server, b"GET /health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 503
        assert json.loads(body) == {"ready": False, "error": "RuntimeError: database gone"}
    finally:
        await server.stop()


async def test_bad_requests_get_400_and_the_listener_lives(ops: tuple[OpsServer, Readiness]) -> None:
    server, _ = ops
    for bad in (
        b"GARBAGE\r\n\r\n",
        b"GET /metrics\r\n\r\n",  # no version
        b"GET metrics HTTP/1.1\r\n\r\n",  # not a path
        b"GET /metrics SPDY/3\r\n\r\n",
        b"\xff\xfe /metrics HTTP/1.1\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\n",  # the head never ends: the client closes its side
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(bad)
        writer.write_eof()
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 400 "), (bad, answer)
    status, body = await raw(server, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200 and b"im_acks_total" in body


async def test_oversized_head_is_refused(ops: tuple[OpsServer, Readiness]) -> None:
    server, _ = ops
    big = b"GET /metrics HTTP/1.1\r\nX-Filler: " + b"a" * (2 * MAX_HEAD) + b"\r\n\r\n"
    status, _ = await raw(server, big)
    assert status == 431
    no_end = b"GET /metrics HTTP/1.1\r\nX-Filler: " + b"a" * (MAX_HEAD + 10)  # never terminated
    status, _ = await raw(server, no_end)
    assert status == 431
    status, _ = await raw(server, b"GET /health/live HTTP/1.1\r\n\r\n")
    assert status == 200


async def test_metrics_off_is_404() -> None:
    server = OpsServer("127.0.0.1", 0, metrics=False, ready=Readiness().check)
    await server.start()
    try:
        status, body = await raw(server, b"GET /metrics HTTP/1.1\r\n\r\n")
        assert status == 404 and b"metrics are off" in body
        status, _ = await raw(server, b"GET /health/live HTTP/1.1\r\n\r\n")
        assert status == 200
    finally:
        await server.stop()


def _peer_cert(port: int, ca: Path) -> bytes:
    """The DER certificate the listener on ``port`` presents to a client that trusts ``ca``."""
    context = ssl.create_default_context(cafile=ca)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as sock,
        context.wrap_socket(sock, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


async def test_with_a_certificate_it_speaks_https_only_and_serves_a_replaced_certificate(tmp_path: Path) -> None:
    metrics.install(True)
    ca = certs.create_ca(tmp_path / "ca")
    first = certs.issue(tmp_path / "first", ca, "node")
    live = tmp_path / "live"
    live.mkdir()
    shutil.copy(first.cert, live / "node.crt")
    shutil.copy(first.key, live / "node.key")
    files = ReloadingContext(live / "node.crt", live / "node.key")
    readiness = Readiness(cache_for=0)
    server = OpsServer("127.0.0.1", 0, metrics=True, ready=readiness.check, tls=lambda: files.context)
    await server.start()
    try:
        assert server.url == f"https://127.0.0.1:{server.port}"
        async with httpx.AsyncClient(base_url=server.url, verify=ssl.create_default_context(cafile=ca.cert)) as http:
            r = await http.get("/metrics")
            assert r.status_code == 200 and "im_sends_received_total" in r.text
        with pytest.raises(httpx.HTTPError):  # plaintext gets no answer: the bytes are not a TLS hello
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=5) as plain:
                await plain.get("/metrics")
        before = await asyncio.to_thread(_peer_cert, server.port, ca.cert)
        second = certs.issue(tmp_path / "second", ca, "node")
        shutil.copy(second.cert, live / "node.crt")
        shutil.copy(second.key, live / "node.key")
        assert files.reload()
        after = await asyncio.to_thread(_peer_cert, server.port, ca.cert)
        assert before != after and after == ssl.PEM_cert_to_DER_cert(second.cert.read_text())
    finally:
        await server.stop()
