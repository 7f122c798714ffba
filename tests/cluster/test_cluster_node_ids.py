"""Node ids across real processes (docs/operations.md, "Node ids"): claimed through etcd, never hashed
from names; a node that cannot claim one does not start; and a three-member etcd that loses the member
the nodes talk to keeps the cluster working (registrations, discovery, a new node's claim)."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
import zlib
from pathlib import Path

import aetcd
import httpx
import pytest

from im.backends.registry.etcd import EtcdRegistry
from im.cluster import LocalCluster, RoleProcess
from im.model.cluster import ServiceInstance
from im.procs import free_port
from im.transfer.pool import _score
from tests.cluster.conftest import drop_schema, make_cluster, node_id_of, stop_checked
from tests.support.client import Account, ChatClient, register
from tests.support.etcd import EtcdCluster
from tests.support.wait import eventually

TTL = 2.0  # registry.ttl in the test clusters


def old_hash(name: str) -> int:
    """The node bits that the name gave before node ids were claimed (crc32, low 10 bits)."""
    return zlib.crc32(name.encode()) & 0x3FF


def colliding_name(name: str) -> str:
    """Another transfer node name with the same old hash as ``name``."""
    return next(f"tr-x{i}" for i in range(100_000) if old_hash(f"tr-x{i}") == old_hash(name))


def another_transfer(c: LocalCluster, name: str) -> RoleProcess:
    """One more transfer node in cluster ``c``, named ``name``, on free ports (tr-1's settings)."""
    args = list(c.nodes["tr-1"].args)
    grpc, ops = free_port(), free_port()
    args[args.index("transfer.node_id=tr-1")] = f"transfer.node_id={name}"
    args[args.index(f"transfer.port={c.nodes['tr-1'].ports['grpc']}")] = f"transfer.port={grpc}"
    args[args.index(f"ops.port={c.nodes['tr-1'].ports['ops']}")] = f"ops.port={ops}"
    node = RoleProcess("transfer", name, args, c.data_dir / "logs" / f"{name}.log", {"grpc": grpc, "ops": ops})
    c.nodes[name] = node
    return node


def node_of(mid: str | int) -> int:
    return (int(mid) >> 12) & 0x3FF


async def users(c: LocalCluster, n: int) -> list[Account]:
    return list(await asyncio.gather(*(register(c.api, f"u{i}-{uuid.uuid4().hex[:6]}") for i in range(n))))


async def send_on_every_pair(c: LocalCluster, accounts: list[Account], tag: str) -> list[dict[str, object]]:
    """Each user, on gw-1, sends one message to every later user; returns the acks."""
    ws = f"ws://127.0.0.1:{c.nodes['gw-1'].ports['ws']}/ws"
    clients = [ChatClient(ws, a, "d") for a in accounts]
    try:
        for client in clients:
            assert (await client.connect())["t"] == "auth_ok"
        acks = []
        for i, client in enumerate(clients):
            for peer in accounts[i + 1 :]:
                ack = await client.send(f"{tag}-{peer.uid}", to=peer.uid)
                assert ack is not None, client.errors
                acks.append(ack)
        return acks
    finally:
        for client in clients:
            await client.close()


def role_alone(tmp_path: Path, etcd_endpoint: str) -> tuple[LocalCluster, RoleProcess]:
    """A transfer node of a cluster that was never started, on ``etcd_endpoint``."""
    c = make_cluster(tmp_path / "cluster", etcd_endpoint=etcd_endpoint, gateways=0, transfers=1)
    node = next(n for n in c._plan() if n.name == "tr-1")
    return c, node


def refused_start(node: RoleProcess) -> tuple[int, str]:
    """Start ``node``, which must exit at once; its exit status and its last log line."""
    with pytest.raises(RuntimeError, match="exited with"):
        node.start(timeout=30)
    assert node.proc is not None
    log = node.log()
    assert "Traceback" not in log, log
    return node.proc.wait(), log.strip().splitlines()[-1]


async def test_a_node_that_cannot_claim_a_node_id_does_not_start(tmp_path: Path) -> None:
    # etcd not answering
    closed = f"127.0.0.1:{free_port()}"
    c, node = role_alone(tmp_path / "a", closed)
    try:
        code, line = await asyncio.to_thread(refused_start, node)
        assert code == 1
        assert line.startswith("im transfer: cannot claim a node id") and closed in line, line
        assert "registry.etcd_endpoints" in line, line
    finally:
        await drop_schema(c.postgres_schema)


async def instances(view: EtcdRegistry, role: str) -> list[ServiceInstance]:
    """The test's own reading, retried while etcd elects a new leader ("leader changed", or "context
    deadline exceeded" while the two members left agree on one: slow on a loaded machine)."""
    deadline = time.monotonic() + 20.0
    while True:
        try:
            return await view.instances(role)
        except aetcd.ClientError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


async def test_three_member_etcd_with_the_first_member_stopped(tmp_path: Path) -> None:
    """Every node talks to the first member of a three-member etcd; SIGKILL it: the nodes move to the
    others (registrations stay, discovery and chat work), and a new transfer node starts, registers and
    claims a node id of its own, although its name collides with tr-1's under the old hash (crc32): the
    messages the two nodes commit carry distinct node ids."""
    etcd = EtcdCluster(3).start()
    try:
        c = make_cluster(tmp_path / "cluster", etcd_endpoint=etcd.endpoints[0], gateways=1, transfers=1)
        c.extra += ["--set", "registry.etcd_endpoints=" + ",".join(etcd.endpoints)]
        await asyncio.to_thread(c.start)
        try:
            accounts = await users(c, 6)  # 15 direct conversations: both transfer nodes will carry some
            await send_on_every_pair(c, accounts[:2], "before")

            offsets = {name: len(node.log()) for name, node in c.nodes.items()}
            await asyncio.to_thread(etcd.members[0].stop, signal.SIGKILL)
            view_prefix = f"/{c.redis_prefix.rstrip(':')}/services/"
            async with EtcdRegistry(etcd.endpoints[1:], prefix=view_prefix, timeout=2.0) as view:
                # For twice the TTL after the stop, every node stays registered: keepalives moved on.
                until = time.monotonic() + 2 * TTL
                while time.monotonic() < until:
                    listed = {r: [i.node for i in await instances(view, r)] for r in ("api", "gateway", "transfer")}
                    assert listed == {"api": ["api-1"], "gateway": ["gw-1"], "transfer": ["tr-1"]}, listed
                    await asyncio.sleep(0.2)
                for node in ("api-1", "gw-1", "tr-1"):  # each was on the first member, and moved
                    assert "etcd member unreachable" in c.nodes[node].log()[offsets[node] :], node
                # Discovery: the API hands out the gateway.
                async with httpx.AsyncClient() as http:
                    r = await http.get(f"{c.api}/gateway", headers=accounts[0].auth)
                    assert r.status_code == 200 and r.json()["node"] == "gw-1", r.text

                # A new node (the first member still dead) claims an id and registers (it is ready, so
                # registered, once start returns); the gateway links to it.
                twin = colliding_name("tr-1")
                await asyncio.to_thread(another_transfer(c, twin).start)
                assert sorted(i.node for i in await instances(view, "transfer")) == sorted(["tr-1", twin])
                assert "etcd member unreachable" in c.nodes[twin].log()  # it tried the first member first
                await eventually(lambda: f"linked to transfer node {twin} at" in c.nodes["gw-1"].log(), "linked")
            ids = {node: node_id_of(c, node) for node in ("tr-1", twin, "api-1")}
            assert len(set(ids.values())) == 3, ids  # the API mints ids too (group changes)

            # Chat goes through both transfer nodes, each minting under its own node id.
            acks = await send_on_every_pair(c, accounts, "after")
            assert {node_of(str(a["mid"])) for a in acks} == {ids["tr-1"], ids[twin]}, ids
            for a in acks:  # each conversation's messages come from the node the gateway sends it to
                assert node_of(str(a["mid"])) == ids[max(("tr-1", twin), key=lambda n: _score(n, str(a["conv"])))]
            assert len({a["mid"] for a in acks}) == len(acks)
        finally:
            await asyncio.to_thread(stop_checked, c)
    finally:
        etcd.destroy()
