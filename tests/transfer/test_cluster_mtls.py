"""Mutual TLS on the link across real processes: ``im transfer``, ``im gateway`` and ``im api``, each
with its own certificate (``cluster_tls``), chat end to end; the transfer port refuses plaintext; a node
whose certificate names another node does not start. (Certificates: :mod:`im.certs`; the cluster:
``im.cluster.LocalCluster`` on the shared PostgreSQL and Redis and a private etcd.)"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from im import certs
from im.cluster import LocalCluster, RoleProcess
from im.transfer.gen import transfer_pb2 as pb
from im.transfer.wire import LINK_METHOD
from tests.cluster.conftest import make_cluster, stop_checked
from tests.support.client import ChatClient, register


@dataclass
class MtlsCluster(LocalCluster):
    """A LocalCluster whose every node gets ``cluster_tls`` with its own certificate from ``pki``."""

    pki: Path = Path()

    def _plan(self) -> list[RoleProcess]:
        plan = super()._plan()
        for node in plan:
            node.args += [
                "--set",
                f"cluster_tls.ca_file={self.pki / 'ca.crt'}",
                "--set",
                f"cluster_tls.cert_file={self.pki / (node.name + '.crt')}",
                "--set",
                f"cluster_tls.key_file={self.pki / (node.name + '.key')}",
            ]
        return plan


def make_pki(directory: Path, names: list[str]) -> Path:
    ca = certs.create_ca(directory)
    for name in names:
        certs.issue(directory, ca, name)
    return directory


@pytest.fixture
def mtls_cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    pki = make_pki(tmp_path / "pki", ["tr-1", "gw-1", "api-1"])
    base = make_cluster(tmp_path / "cluster", gateways=1, transfers=1)
    fields = {f: getattr(base, f) for f in ("data_dir", "postgres_dsn", "postgres_schema", "redis_prefix")}
    c = MtlsCluster(**fields, base_port=base.base_port, gateways=1, transfers=1, extra=base.extra, pki=pki)
    c.start()
    yield c
    stop_checked(c)


async def test_a_cluster_with_mutual_tls_on_the_link_chats(mtls_cluster: LocalCluster) -> None:
    c = mtls_cluster
    alice, bob = await asyncio.gather(register(c.api, "alice"), register(c.api, "bob"))
    ws = f"ws://127.0.0.1:{c.nodes['gw-1'].ports['ws']}/ws"
    a, b = ChatClient(ws, alice, "phone"), ChatClient(ws, bob, "laptop")
    try:
        assert (await a.connect())["t"] == "auth_ok" and (await b.connect())["t"] == "auth_ok"
        for i in range(10):
            assert await a.send(f"m{i}", to=bob.uid) is not None
        got = await b.wait_messages(10)
        assert [m["body"] for m in got] == [f"m{i}" for i in range(10)]
    finally:
        await a.close()
        await b.close()
    assert "gateway gw-1 linked" in c.nodes["tr-1"].log()

    # the transfer port speaks TLS only: a plaintext peer gets no stream
    async with grpc.aio.insecure_channel(f"127.0.0.1:{c.nodes['tr-1'].ports['grpc']}") as channel:

        async def hello() -> AsyncIterator[pb.GatewayFrame]:
            yield pb.GatewayFrame(hello=pb.Hello(node="gw-1"))

        call = channel.stream_stream(
            LINK_METHOD,
            request_serializer=pb.GatewayFrame.SerializeToString,
            response_deserializer=pb.TransferFrame.FromString,
        )(hello())
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await asyncio.wait_for(call.read(), 10)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_node_whose_certificate_names_another_node_does_not_start(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki", ["gw-2"])
    cmd = [
        sys.executable,
        "-m",
        "im",
        "gateway",
        "--data-dir",
        str(tmp_path / "data"),
        *[
            f"--set={k}={v}"
            for k, v in {
                "store.kind": "postgres",
                "store.postgres_dsn": "postgresql://postgres@127.0.0.1:1/x",
                "presence.kind": "redis",
                "registry.kind": "etcd",
                "gateway.node_id": "gw-1",
                "cluster_tls.ca_file": pki / "ca.crt",
                "cluster_tls.cert_file": pki / "gw-2.crt",
                "cluster_tls.key_file": pki / "gw-2.key",
            }.items()
        ],
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "names node 'gw-2', but this node is 'gw-1'" in out.stdout + out.stderr
