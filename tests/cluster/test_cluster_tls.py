"""``im cluster`` with TLS end to end (its default): HTTPS on the API, ``wss://`` and ``tls://`` on the
gateways, mutual TLS on every gRPC link, certificates from a private CA made in the cluster's data
directory. A user on WebSocket and one on TCP, on different gateways, chat through a transfer node;
nothing answers in plaintext."""

from __future__ import annotations

import asyncio
import os
import queue
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from im import certs
from im.client import ApiClient, Client, Message
from im.cluster import LocalCluster
from tests.client.conftest import Recorder
from tests.cluster.conftest import drop_schema, free_base, make_cluster, schema_exists, stop_checked
from tests.support.postgres import DSN

PASSWORD = "correct horse battery"


@pytest.fixture
def tls_cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    c = make_cluster(tmp_path / "cluster", gateways=2, transfers=1, tls=True).start()
    yield c
    stop_checked(c)


def _root(cluster: LocalCluster) -> str:
    return cluster.api.removesuffix("/api/v1")


async def test_users_on_two_gateways_chat_over_tls(tls_cluster: LocalCluster) -> None:
    root, ca = _root(tls_cluster), tls_cluster.ca_file
    assert root.startswith("https://") and ca is not None and ca.exists()
    async with ApiClient(root, ca_file=ca) as api:
        await api.register("alice", PASSWORD)
        bob_uid = (await api.register("bob", PASSWORD)).uid
        await api.login("alice", PASSWORD)
        gateway = await api.gateway()
        assert gateway.ws.startswith("wss://") and gateway.tcp is not None and gateway.tcp.startswith("tls://")
    alice = await Client.login(root, "alice", PASSWORD, device="phone", transport="ws", ca_file=ca)
    bob = await Client.login(root, "bob", PASSWORD, device="laptop", transport="tcp", ca_file=ca)
    try:
        seen = Recorder(bob)
        for i in range(20):
            await alice.send({"text": f"over tls {i}"}, to=bob_uid)
        await seen.wait(lambda: len(seen.messages) == 20)
        assert [m.body["text"] for m in seen.messages] == [f"over tls {i}" for i in range(20)]
        assert all(type(m) is Message for m in seen.messages)
    finally:
        await alice.close()
        await bob.close()


def _grpc_first_byte(port: int, ctx: ssl.SSLContext) -> bytes:
    """Open TLS to a gRPC port (ALPN h2, as gRPC requires), send the HTTP/2 preface, return the first byte
    the server answers."""
    ctx.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        return tls.recv(1)


def test_nothing_answers_in_plaintext_or_without_a_cluster_certificate(tls_cluster: LocalCluster) -> None:
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{tls_cluster.base_port}/api/v1/health", timeout=5)
    trusted = ssl.create_default_context(cafile=tls_cluster.ca_file)
    ops = {name: url for name, url in tls_cluster.metrics_urls().items() if name[:2] in ("gw", "tr")}
    assert sorted(ops) == ["gw-1", "gw-2", "tr-1"]
    for url in ops.values():  # the operations listeners: HTTPS with the node's certificate, nothing in clear
        assert url.startswith("https://")
        assert "process_open_fds " in httpx.get(url, verify=trusted, timeout=5).text
        with pytest.raises(httpx.HTTPError):
            httpx.get("http://" + url.removeprefix("https://"), timeout=5)
    port = next(n for n in tls_cluster.nodes.values() if n.role == "transfer").ports["grpc"]
    ca = certs.Issued(tls_cluster.certs_dir / "ca.crt", tls_cluster.certs_dir / "ca.key")
    probe = certs.issue(tls_cluster.certs_dir, ca, "probe", server=False)
    with_cert = ssl.create_default_context(cafile=ca.cert)
    with_cert.load_cert_chain(probe.cert, probe.key)
    assert _grpc_first_byte(port, with_cert)  # the server's HTTP/2 SETTINGS: TLS with a cluster certificate
    without = ssl.create_default_context(cafile=ca.cert)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        if not _grpc_first_byte(port, without):  # TLS 1.3: the refusal may come after the handshake
            raise ConnectionError("closed without an answer")


def test_im_cluster_is_tls_end_to_end_unless_told_otherwise(tmp_path: Path) -> None:
    """The command itself, not LocalCluster (whose own default is plaintext): ``im cluster`` with no TLS
    flag makes its CA, serves HTTPS only and says which CA to trust; SIGINT stops every node."""
    tag = uuid.uuid4().hex[:10]
    data = tmp_path / "cluster"
    base = free_base()
    argv = [sys.executable, "-m", "im", "cluster", "--data-dir", str(data), "--base-port", str(base)]
    # The tests' database, where drop_schema drops it (im cluster's own default is the database postgres).
    argv += ["--gateways", "1", "--transfers", "1", "--postgres", DSN, "--schema", f"im_cluster_{tag}"]
    for setting in ("auth.argon2_time_cost=1", "auth.argon2_memory_kib=1024", f"presence.redis_prefix=im-c-{tag}:"):
        argv += ["--set", setting]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    assert proc.stdout is not None
    out: queue.Queue[str] = queue.Queue()  # its lines, read by a thread: a wait for one has a deadline
    stdout = proc.stdout

    def read() -> None:
        for line in stdout:
            out.put(line)

    threading.Thread(target=read, daemon=True).start()
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 90
        while not (lines and "Ctrl-C stops every node" in lines[-1]):
            try:
                lines.append(out.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        said = "".join(lines)
        assert "Ctrl-C stops every node" in said, said[-4000:]
        ca = data / "certs" / "ca.crt"
        assert f"TLS end to end; clients trust {ca}" in said, said
        assert f"HTTP API  https://127.0.0.1:{base}/api/v1" in said, said
        assert httpx.get(
            f"https://127.0.0.1:{base}/api/v1/health", verify=ssl.create_default_context(cafile=ca)
        ).is_success
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{base}/api/v1/health", timeout=5)
        assert asyncio.run(schema_exists(f"im_cluster_{tag}"))  # where the finally drops it
        os.killpg(proc.pid, signal.SIGINT)  # a clean stop of every node
        assert proc.wait(60) == 0, "".join(lines)[-4000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()
        asyncio.run(drop_schema(f"im_cluster_{tag}"))
