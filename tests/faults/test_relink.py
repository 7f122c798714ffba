"""A message committed while its recipient's gateway is not linked to the committing transfer node.

Routers are at most once: a transfer node drops what it routes to a gateway it has no stream to. The
gateway makes up for it when the link comes up (``Hub.catch_up``): every open session reads the log's
heads of its conversations and fetches what it lacks, without waiting for the conversation's next message
or a reconnect (docs/reliability.md, "Relinks").

The window is made wide and certain: one transfer node, its gRPC port behind a fault proxy; the proxy
cuts every link to it while ``gw-2`` is paused (SIGSTOP, well inside its lease), heals, ``gw-1`` relinks
and its user sends to a user on ``gw-2``: the transfer node commits and acks, and has no stream to
``gw-2``. Then ``gw-2`` is woken: it relinks, and its device gets the messages on the connection it had.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from im.cluster import LocalCluster
from im.faultproxy import FaultProxy
from tests.cluster.conftest import ClusterView, client_on, make_cluster, stop_checked
from tests.support.apps import fetch_counts
from tests.support.checker import History
from tests.support.client import register
from tests.support.wait import eventually

#: Long enough that a paused gateway keeps its registration and its devices' presence.
LONG_LEASES = ["--set", "registry.ttl=30", "--set", "presence.ttl=60"]


@pytest.fixture
def one_transfer(tmp_path: Path) -> Iterator[tuple[LocalCluster, FaultProxy]]:
    c = make_cluster(tmp_path / "cluster", transfers=1)
    proxy = FaultProxy(("127.0.0.1", c.base_port + 13)).start()  # im.cluster: transfer node 1's gRPC port
    c.node_args = {name: list(LONG_LEASES) for name in ("api-1", "gw-1", "gw-2")}
    c.node_args["tr-1"] = [*LONG_LEASES, "--set", f"transfer.public_address={proxy.address}"]
    try:
        c.start()
    except BaseException:
        proxy.close()
        raise
    try:
        yield c, proxy
    finally:
        try:
            stop_checked(c)
        finally:
            proxy.close()


def _links(c: LocalCluster, node: str) -> int:
    return c.nodes[node].log().count("linked to transfer node")


async def test_messages_committed_while_a_gateway_was_unlinked_reach_its_devices_when_it_relinks(
    one_transfer: tuple[LocalCluster, FaultProxy],
) -> None:
    cluster, proxy = one_transfer
    history = History(ClusterView(cluster.api))  # type: ignore[arg-type]
    alice, bob = await register(cluster.api, "relink-a"), await register(cluster.api, "relink-b")
    try:
        a = client_on(history, cluster, "gw-1", alice, "phone")
        b = client_on(history, cluster, "gw-2", bob, "phone")
        assert (await a.connect())["t"] == "auth_ok"
        assert (await b.connect())["t"] == "auth_ok"
        assert await a.send("before", to=bob.uid) is not None
        await b.wait_messages(1)
        ws_before = b.ws
        gw1_links = _links(cluster, "gw-1")
        gw2 = cluster.nodes["gw-2"].proc
        assert gw2 is not None
        proxy.cut()
        os.kill(gw2.pid, signal.SIGSTOP)
        try:
            proxy.heal()
            await eventually(lambda: _links(cluster, "gw-1") > gw1_links, "gw-1 relinked to tr-1", 20)
            for i in range(3):  # committed and acked; tr-1 has no stream to gw-2 to route them on
                ack = await a.send(f"while gw-2 was unlinked {i}", to=bob.uid)
                assert ack is not None, a.errors[-3:]
            assert [m["body"] for m in b.messages] == ["before"]
        finally:
            os.kill(gw2.pid, signal.SIGCONT)
        await eventually(lambda: len(b.messages) >= 4, lambda: f"gw-2's device caught up: {b.messages}", 20)
        assert b.ws is ws_before and b.live, b.closed_reason  # the same connection: caught up, not resumed
        assert [m["seq"] for m in b.messages] == [1, 2, 3, 4]
        assert [m["body"] for m in b.messages][1:] == [f"while gw-2 was unlinked {i}" for i in range(3)]
        fetches = await fetch_counts(cluster, "gw-2")
        assert fetches["catch_up"] >= 1, f"{fetches}; gw-2's log: {cluster.nodes['gw-2'].log()[-1500:]}"
    finally:  # closed whatever happened: a socket left open would fail a later test when collected
        await history.close_all()
    await history.check()
