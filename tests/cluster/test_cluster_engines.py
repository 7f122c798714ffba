"""The cluster across engine outages: Redis presence flushed, RabbitMQ unreachable for a while, etcd
restarted. Each test runs a real :class:`~im.cluster.LocalCluster` and checks that the cluster recovers
by itself (no node restarted), that nothing is lost (the history checker) and that every node still
stops cleanly afterwards (the cluster fixtures)."""

from __future__ import annotations

import asyncio
import re
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis

from im.cluster import LocalCluster
from im.transfer.pool import _score as rendezvous_score
from tests.cluster.conftest import ClusterView, client_on, drop_schema, make_cluster, stop_checked
from tests.events.conftest import AMQP_URL, Names, WebhookReceiver
from tests.events.conftest import names as names  # a fixture, used by name
from tests.events.conftest import webhook as webhook  # a fixture, used by name
from tests.support.checker import History
from tests.support.client import ChatClient, register
from tests.support.postgres import DSN
from tests.support.proxy import TcpProxy
from tests.support.wait import eventually


def direct(a: int, b: int) -> str:
    return f"d:{min(a, b)}:{max(a, b)}"


def bodies_from(c: ChatClient, conv: str, sender: int) -> list[Any]:
    return [m["body"] for m in c.messages if m["conv"] == conv and m["from"] == sender]


# --- Redis ---------------------------------------------------------------------------------------------


async def presence_members(r: aioredis.Redis, c: LocalCluster, uid: int) -> set[str]:
    """The ``device|node`` entries of ``uid`` (the RedisPresence layout: one sorted set per user)."""
    members = cast(list[bytes], await r.zrange(f"{c.redis_prefix}p:{uid}", 0, -1))
    return {m.decode() for m in members}


async def delete_prefix(r: aioredis.Redis, prefix: str) -> int:
    """Delete every key under ``prefix`` (never anything else of the shared Redis)."""
    keys = [k async for k in r.scan_iter(match=f"{prefix}*", count=1000)]
    return int(await r.delete(*keys)) if keys else 0


async def test_presence_rebuilt_after_redis_flush(cluster: LocalCluster, history: History) -> None:
    alice, bob = await asyncio.gather(register(cluster.api, "alice"), register(cluster.api, "bob"))
    a = client_on(history, cluster, "gw-1", alice, "phone")
    b = client_on(history, cluster, "gw-2", bob, "laptop", tcp=True)
    assert (await a.connect())["t"] == "auth_ok"
    assert (await b.connect())["t"] == "auth_ok"
    conv = direct(alice.uid, bob.uid)
    r = aioredis.from_url(cluster.redis_url)
    try:
        await eventually(lambda: presence_members(r, cluster, alice.uid), what="alice announced")
        assert await presence_members(r, cluster, alice.uid) == {"phone|gw-1"}
        assert await presence_members(r, cluster, bob.uid) == {"laptop|gw-2"}
        # Only one side sends at a time and the other waits for it: a device's own send makes its session
        # fetch any gap before the ack's seq, so a reply would hide a message that was not routed live.
        for i in range(3):
            assert await a.send(f"before {i}", to=bob.uid) is not None
        await b.wait_for(lambda: len(bodies_from(b, conv, alice.uid)) == 3)
        assert await b.send("before reply", to=alice.uid) is not None
        await a.wait_for(lambda: bodies_from(a, conv, bob.uid) == ["before reply"])

        # The flush: every key of the cluster's prefix goes, and goes again every 10 ms for 1.5 s (longer
        # than one presence refresh period, 1 s at presence.ttl=3) while alice sends. Sends need no
        # presence: all are acked; and the transfer node routes by the table gw-2 keeps there of its
        # users, not by presence: every message reaches bob live all the same.
        flushing = True

        async def flush() -> int:
            rounds = 0
            while flushing:
                await delete_prefix(r, cluster.redis_prefix)
                rounds += 1
                await asyncio.sleep(0.01)
            return rounds

        flusher = asyncio.create_task(flush())
        not_live = []
        gone = 0
        for i in range(5):
            assert await a.send(f"during {i}", to=bob.uid) is not None
            await asyncio.sleep(0.3)
            if f"during {i}" not in bodies_from(b, conv, alice.uid):
                not_live.append(i)
            gone += not await presence_members(r, cluster, bob.uid)
        flushing = False
        assert await flusher > 10
        assert gone >= 3, "the test's premise: bob's presence entry was gone while alice sent"
        assert not not_live, f"messages {not_live} of the flush window did not reach bob live"

        # Rebuilt by the gateways' refresh loops (every second), without any reconnect.
        await eventually(lambda: presence_members(r, cluster, alice.uid), timeout=10, what="alice re-announced")
        await eventually(lambda: presence_members(r, cluster, bob.uid), timeout=10, what="bob re-announced")
        assert await presence_members(r, cluster, alice.uid) == {"phone|gw-1"}
        assert await presence_members(r, cluster, bob.uid) == {"laptop|gw-2"}
        assert 0 < await r.pttl(f"{cluster.redis_prefix}p:{bob.uid}") <= 3000
        during = [f"before {i}" for i in range(3)] + [f"during {i}" for i in range(5)]
        await b.wait_for(lambda: bodies_from(b, conv, alice.uid) == during, timeout=10)
    finally:
        await r.aclose()

    # Live delivery across the gateways works again, both ways: a message sent now arrives on the open
    # connection; then the same the other way.
    assert await a.send("after", to=bob.uid) is not None
    await b.wait_for(lambda: "after" in bodies_from(b, conv, alice.uid))
    assert bodies_from(b, conv, alice.uid) == [f"before {i}" for i in range(3)] + [f"during {i}" for i in range(5)] + [
        "after"
    ]
    assert await b.send("after reply", to=alice.uid) is not None
    await a.wait_for(lambda: "after reply" in bodies_from(a, conv, bob.uid))
    assert bodies_from(a, conv, bob.uid) == ["before reply", "after reply"]
    assert a.cursors[conv] == b.cursors[conv] == 11
    assert not a.errors and not b.errors
    assert a.closed_reason is None and b.closed_reason is None


# --- RabbitMQ ------------------------------------------------------------------------------------------


@pytest.fixture
def amqp_proxy() -> Iterator[TcpProxy]:
    """A TCP proxy in front of the test RabbitMQ: stop it and the broker is unreachable."""
    host_port = AMQP_URL.split("@", 1)[1].split("/", 1)[0]
    host, _, port = host_port.rpartition(":")
    with TcpProxy((host, int(port))) as proxy:
        yield proxy


#: aiormq logs a warning with a traceback for every connection the broker drops: library noise.
AIORMQ_LOGGERS = ("aiormq.connection",)


@pytest.fixture
async def events_cluster(
    tmp_path: Path, amqp_proxy: TcpProxy, names: Names, webhook: WebhookReceiver
) -> AsyncIterator[LocalCluster]:
    """A cluster with the event pipeline on, its broker behind ``amqp_proxy``: both transfer nodes run
    an outbox relay and a push consumer (one of each active). Stopped (then its schema dropped) before
    ``names`` deletes the exchange and queue."""
    amqp_url = AMQP_URL.replace(AMQP_URL.split("@", 1)[1].split("/", 1)[0], amqp_proxy.address, 1)
    c = make_cluster(tmp_path / "cluster", amqp_url=amqp_url)
    c.extra += [
        "--set",
        f"events.exchange={names.exchange}",
        "--set",
        f"events.queue={names.queue}",
        "--set",
        f"events.webhook_url={webhook.url}",
    ]
    try:
        c.start()
    except BaseException:
        if c.etcd is not None:
            c.etcd.destroy()
        raise
    yield c
    # Stopped on a thread: the webhook receiver runs on this loop and may still be answering a push.
    await asyncio.to_thread(stop_checked, c, ignore_loggers=AIORMQ_LOGGERS)
    await drop_schema(c.postgres_schema)


@pytest.fixture
async def events_history(events_cluster: LocalCluster) -> AsyncIterator[History]:
    """The checker over ``events_cluster`` (its schema is dropped by that fixture, after the stop)."""
    h = History(ClusterView(events_cluster.api))  # type: ignore[arg-type]
    yield h
    await h.close_all()
    await h.check()


async def outbox_rows(c: LocalCluster) -> int:
    conn = await asyncpg.connect(DSN, timeout=5)
    try:
        return int(await conn.fetchval(f'SELECT count(*) FROM "{c.postgres_schema}".outbox'))
    finally:
        await conn.close()


async def outbox_empty(c: LocalCluster) -> bool:
    return await outbox_rows(c) == 0


def log_tail(c: LocalCluster, offsets: dict[str, int], role: str = "transfer") -> str:
    """What the nodes of ``role`` logged since ``offsets`` (byte offsets by node name)."""
    return "".join(
        n.log_path.read_bytes()[offsets.get(n.name, 0) :].decode(errors="replace")
        for n in c.nodes.values()
        if n.role == role
    )


async def test_push_survives_rabbitmq_outage(
    events_cluster: LocalCluster, events_history: History, webhook: WebhookReceiver, amqp_proxy: TcpProxy
) -> None:
    c, history = events_cluster, events_history
    alice, bob, carol, dave = await asyncio.gather(*(register(c.api, n) for n in ("alice", "bob", "carol", "dave")))
    a = client_on(history, c, "gw-1", alice, "phone")
    assert (await a.connect())["t"] == "auth_ok"
    # The pipeline works through the proxy: dave (never online) is pushed. Dave's events serve as
    # fences only: the one handled when the broker went away may be pushed again after (at least once).
    assert await a.send("warm-up", to=dave.uid) is not None
    await eventually(lambda: len(webhook.requests) == 1, timeout=20, what="the warm-up push")
    assert webhook.bodies[0]["recipients"] == [dave.uid]
    await eventually(lambda: outbox_empty(c), what="the outbox drained")

    # RabbitMQ goes away: every open AMQP connection is reset and new ones are refused.
    offsets = {n.name: n.log_path.stat().st_size for n in c.nodes.values()}
    amqp_proxy.stop()
    recipient = {direct(alice.uid, bob.uid): bob.uid, direct(alice.uid, carol.uid): carol.uid}
    acked: dict[str, list[dict[str, Any]]] = {conv: [] for conv in recipient}
    for i in range(12):
        to = bob if i % 2 == 0 else carol
        ack = await a.send(f"while away {i}", to=to.uid)
        assert ack is not None, a.errors  # sends never wait for the broker
        acked[direct(alice.uid, to.uid)].append(ack)
    assert not a.errors
    # The relay tried to publish them and failed; the consumers lost their connections. Stay away until
    # both have failed to reconnect a few times (their backoff grows: 0.2, 0.4, 0.8, 1.6 s: about 3 s).
    await eventually(
        lambda: len(re.findall(r"outbox relay: (cannot connect|publishing failed)", log_tail(c, offsets))) >= 5,
        timeout=20,
        what="the relay failing to publish and to reconnect",
    )
    await eventually(
        lambda: len(re.findall(r"push consumer: .*; reconnect in", log_tail(c, offsets))) >= 4,
        timeout=20,
        what="the push consumers failing to reconnect",
    )
    # The events wait in the outbox (committed in the same transaction as the messages); nothing was pushed.
    assert await outbox_rows(c) == 12
    assert len(webhook.requests) == 1

    # Back: every event is published and pushed, once, in each conversation's order.
    amqp_proxy.start()
    assert await a.send("marker", to=dave.uid) is not None  # after all of them in the outbox's order
    await eventually(
        lambda: any(p["recipients"] == [dave.uid] and p["seq"] == 2 for p in webhook.bodies),
        timeout=30,
        what="the marker push after the broker came back",
    )
    await eventually(lambda: outbox_empty(c), what="the outbox drained")
    pushes = [p for p in webhook.bodies if p["recipients"] != [dave.uid]]
    mids = [p["mid"] for p in pushes]
    assert len(mids) == len(set(mids)), f"pushed twice: {pushes}"
    for conv, acks in acked.items():
        got = [p for p in pushes if p["conv"] == conv]
        assert [(p["mid"], p["seq"]) for p in got] == [(ack["mid"], ack["seq"]) for ack in acks]
        assert [p["seq"] for p in got] == list(range(1, 7))
    assert {p["conv"] for p in pushes} == set(acked)
    assert all(p["recipients"] == [recipient[p["conv"]]] for p in pushes)
    assert all(h["idempotency-key"] == p["mid"] for h, p in webhook.requests)
    assert all(set(p) == {"mid", "conv", "seq", "recipients"} for p in webhook.bodies)  # content-free


# --- etcd ----------------------------------------------------------------------------------------------


async def picked_nodes(api: str, auth: dict[str, str], n: int) -> list[str]:
    async with httpx.AsyncClient(timeout=10) as http:
        out = []
        for _ in range(n):
            r = await http.get(f"{api}/gateway", headers=auth)
            assert r.status_code == 200, r.text
            out.append(r.json()["node"])
        return out


async def test_registry_recovers_after_etcd_restart(cluster: LocalCluster, history: History) -> None:
    assert cluster.etcd is not None
    alice, bob = await asyncio.gather(register(cluster.api, "alice"), register(cluster.api, "bob"))
    # A partner of alice whose direct conversation a third transfer node would take (rendezvous hashing:
    # the pool's own ranking), so that a send after tr-3 joined goes through it.
    partner = None
    for i in range(20):
        candidate = await register(cluster.api, f"partner{i}")
        key = direct(alice.uid, candidate.uid)
        if max(("tr-1", "tr-2", "tr-3"), key=lambda node: rendezvous_score(node, key)) == "tr-3":
            partner = candidate
            break
    assert partner is not None
    # Two connections on each gateway: equal loads, so the API hands out either while both are listed.
    a = client_on(history, cluster, "gw-1", alice, "phone")
    a2 = client_on(history, cluster, "gw-1", alice, "tablet", tcp=True)
    b = client_on(history, cluster, "gw-2", bob, "laptop")
    p = client_on(history, cluster, "gw-2", partner, "phone", tcp=True)
    for client in (a, a2, b, p):
        assert (await client.connect())["t"] == "auth_ok"
    conv, conv_p = direct(alice.uid, bob.uid), direct(alice.uid, partner.uid)
    assert await a.send("before", to=bob.uid) is not None
    await b.wait_for(lambda: bodies_from(b, conv, alice.uid) == ["before"])
    await eventually(lambda: picks_both(cluster, alice.auth), timeout=15, what="the API handing out both")

    # Down for 2 s (as long as the registry TTL), then back on the same ports and data.
    await asyncio.to_thread(cluster.etcd.restart, signal.SIGTERM, 2.0)

    # Sends still cross the gateways (the links never depended on etcd), the API still answers.
    for i in range(3):
        assert await a.send(f"after {i}", to=bob.uid) is not None
        assert await b.send(f"reply {i}", to=alice.uid) is not None
    await b.wait_for(lambda: len(bodies_from(b, conv, alice.uid)) == 4)
    await a.wait_for(lambda: len(bodies_from(a, conv, bob.uid)) == 3)
    assert set(await picked_nodes(cluster.api, alice.auth, 5)) <= {"gw-1", "gw-2"}

    # Changes after the restart are seen through the reopened watches.
    # 1. A transfer node that joins now (a new address: only a watch can tell of it) is linked by both
    #    gateways and the API, and takes its share of the conversations: alice -> partner goes through it.
    cluster.transfers = 3
    tr3 = next(n for n in cluster._plan() if n.name == "tr-3")  # base + 33: a port the fixture checked
    cluster.nodes["tr-3"] = await asyncio.to_thread(tr3.start)  # the fixture stops (and checks) it
    await eventually(
        lambda: all(f"gateway {n} linked" in tr3.log() for n in ("gw-1", "gw-2", "api-1")),
        timeout=15,
        what="gw-1, gw-2 and api-1 linking to the new tr-3",
    )
    for i in range(3):
        assert await a.send(f"three nodes {i}", to=bob.uid) is not None
        assert await a.send(f"via tr-3 {i}", to=partner.uid) is not None
        assert await p.send(f"via tr-3 back {i}", to=alice.uid) is not None
    await b.wait_for(lambda: len(bodies_from(b, conv, alice.uid)) == 7)
    await p.wait_for(lambda: bodies_from(p, conv_p, alice.uid) == [f"via tr-3 {i}" for i in range(3)])
    for client in (a, a2):

        def has_three(c: ChatClient = client) -> bool:
            return len(bodies_from(c, conv_p, partner.uid)) == 3

        await client.wait_for(has_three)
    await eventually(lambda: picks_both(cluster, alice.auth), timeout=15, what="the API handing out both")

    # 2. A gateway that stops leaves the registry: the API stops handing it out.
    gw2 = cluster.nodes["gw-2"]
    assert await asyncio.to_thread(gw2.stop) == 0
    assert "Traceback" not in gw2.log(), gw2.log()[-4000:]
    await b.wait_for(lambda: b.closed_reason is not None, timeout=15)
    await eventually(lambda: only_gw1(cluster, alice.auth), timeout=15, what="the API dropping gw-2")
    assert set(await picked_nodes(cluster.api, alice.auth, 20)) == {"gw-1"}


async def only_gw1(cluster: LocalCluster, auth: dict[str, str]) -> bool:
    return set(await picked_nodes(cluster.api, auth, 10)) == {"gw-1"}


async def picks_both(cluster: LocalCluster, auth: dict[str, str]) -> bool:
    """Both gateways are listed: with equal loads the API picks either at random."""
    return set(await picked_nodes(cluster.api, auth, 10)) == {"gw-1", "gw-2"}
