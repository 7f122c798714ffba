"""TLS in distributed mode: ``im api`` and ``im gateway`` take the same ``tls`` section as ``im serve``
(HTTPS on the API, wss:// and tls:// on the gateway, handed out by ``GET /gateway``)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import websockets

from im.cluster import LocalCluster
from tests.cluster.conftest import make_cluster, stop_checked
from tests.support.client import Account, TcpLink
from tests.support.server import TlsFiles, make_tls
from tests.tls.test_listeners import auth, next_frame


@pytest.fixture
def tls_cluster(tmp_path: Path) -> Iterator[tuple[LocalCluster, TlsFiles]]:
    files = make_tls(tmp_path / "pki")
    c = make_cluster(tmp_path / "cluster", gateways=1, transfers=1)
    c.extra += ["--set", f"tls.cert_file={files.cert}", "--set", f"tls.key_file={files.key}"]
    c.start()
    yield c, files
    stop_checked(c)


async def test_api_and_gateway_serve_tls(tls_cluster: tuple[LocalCluster, TlsFiles]) -> None:
    c, files = tls_cluster
    api = f"https://127.0.0.1:{c.base_port}/api/v1"
    ctx = files.client_context()
    accounts = []
    async with httpx.AsyncClient(verify=ctx) as http:
        for name in ("alice", "bob"):
            body = {"username": name, "password": "correct horse battery"}
            assert (await http.post(f"{api}/auth/register", json=body)).status_code == 201
            t = (await http.post(f"{api}/auth/login", json=body)).json()
            accounts.append(Account(t["uid"], name, body["password"], t["access_token"], t["refresh_token"]))
        alice, bob = accounts
        gw = (await http.get(f"{api}/gateway", headers=alice.auth)).json()
    ports = c.nodes["gw-1"].ports
    assert gw["ws"] == f"wss://127.0.0.1:{ports['ws']}/ws"
    assert gw["tcp"] == f"tls://127.0.0.1:{ports['tcp']}"
    with pytest.raises(httpx.HTTPError):
        async with httpx.AsyncClient() as plain:
            await plain.get(f"http://127.0.0.1:{c.base_port}/api/v1/health")
    async with websockets.connect(gw["ws"], ssl=ctx) as ws:
        assert (await auth(ws, alice, "web"))["t"] == "auth_ok"
        host, port = gw["tcp"].removeprefix("tls://").rsplit(":", 1)
        tcp = TcpLink(*await asyncio.open_connection(host, int(port), ssl=ctx, server_hostname=host))
        try:
            assert (await auth(tcp, bob, "tcp"))["t"] == "auth_ok"
            await ws.send(json.dumps({"t": "send", "cmid": "1", "to": bob.uid, "body": "through the cluster"}))
            assert (await next_frame(tcp, "msg"))["body"] == "through the cluster"
        finally:
            await tcp.close()
