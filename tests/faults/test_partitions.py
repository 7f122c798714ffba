"""Partitions: one node of a running cluster cut off from one engine, or from the other nodes, while
clients keep chatting through the cluster; then healed.

The victim is transfer node tr-1 (it commits, routes, relays the outbox and holds a leased node id): it
reaches PostgreSQL, Redis, RabbitMQ and etcd each through its own fault proxy, and every other node
dials its gRPC endpoint through one more (tr-1 advertises the proxy's address), while the other nodes
keep the direct path. One path at a time is cut (refused, open connections reset) or blackholed (open
connections stay, nothing flows, new ones are accepted and left silent) for ``PARTITION`` seconds (30 s
with ``IM_FAULTS_LONG=1``), then healed.

SDK clients (a pair on tr-1, a pair on tr-2, a group of all four, over both gateways and both
transports) and two raw protocol clients (a pair on tr-1, recorded by the history checker) post without
pause throughout. Checked:

- the history checker (C1-C6) and the SDK checks of ``tests/support/apps.py``: every post
  acked once and stored once, dense seqs, each sender's messages stored in the order posted, every member
  saw every conversation whole and in order;
- no silent drop: every send of the raw clients (which stay connected) got an answer on its connection,
  an ack or an explicit ``unavailable``, and the refused ones were resent until acked;
- the victim's resident memory (VmRSS) and open descriptors stay under a stated bound during the
  partition, and its descriptors come back near where they were;
- the victim recovers: ready again (``/health/ready``) and committing its conversations again; after a
  RabbitMQ partition the outbox drains;
- with its links blackholed, no send waits longer than the link's keepalive allows (``LINK_STALL``): the
  gateways find the silent link dead and hand its sends to tr-2 (without keepalive they waited out the
  whole partition).

Every path is cut in the suite; PostgreSQL, Redis and the links are blackholed too (RabbitMQ and etcd
as well with ``IM_FAULTS_LONG=1``). Gateway gw-1 is the victim of ``test_gateway_cut_off``: it reaches
Redis and etcd through proxies of its own (see :func:`gateway_partition` for what that promises). One
cluster serves the whole module; each test makes its own users and conversations and its own history.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from typing import Literal

import pytest

from im.cluster import LocalCluster
from im.faultproxy import FaultProxy
from tests.cluster.conftest import client_on, node_id_of
from tests.cluster.test_cluster_engines import outbox_empty
from tests.faults.conftest import (
    FD_BOUND,
    FD_SETTLED,
    GATEWAY_VICTIM,
    KEEPALIVE,
    RSS_BOUND_KIB,
    VICTIM,
    Net,
    Samples,
    Workload,
    acked,
    fds,
    note_stall,
    ready,
    rss_kib,
    start_workload,
    watch,
)
from tests.support.apps import (
    App,
    RawDevice,
    check_delivery,
    committed_by,
    fetch_counts,
    post_until,
    raw_resend,
    read_log,
)
from tests.support.checker import History
from tests.support.client import ChatClient
from tests.support.wait import eventually

PARTITION = 6.0  # seconds cut off in the suite (registry TTL 2 s, presence TTL 3 s: every lease runs out)
PARTITION_LONG = 30.0
PACE = 0.05  # seconds between two posts of one client
#: With the links blackholed, the longest a send may wait for its answer: the pings find the link dead
#: (interval + timeout), then the gateway hands the send to the other transfer node; the rest is margin
#: for a loaded box. Without keepalive the sends waited for the heal (the whole partition).
LINK_STALL = 2 * KEEPALIVE + 2.5

Path_ = Literal["postgres", "redis", "rabbitmq", "etcd", "links"]
Mode = Literal["cut", "blackhole"]


async def raw_pump(c: ChatClient, to: int, sent: dict[str, float], stop: asyncio.Event) -> None:
    k = 0
    while not stop.is_set():
        cmid = f"{c.device}-{k}"
        sent[cmid] = time.monotonic()
        await c.send(cmid, to=to, cmid=cmid, wait=False)
        k += 1
        await asyncio.sleep(PACE)


# --- the scenario ------------------------------------------------------------------------------------


async def cut_off(
    c: LocalCluster,
    node: str,
    proxy: FaultProxy,
    mode: Mode,
    seconds: float,
    samples: Samples,
    w: Workload,
    *,
    stalls: bool,
) -> tuple[int, int, float, float]:
    """Once every conversation of the workload ``w`` is flowing and ``node`` is ready: ``proxy`` cut or
    blackholed for ``seconds`` while ``node`` is watched (``samples``; with ``stalls`` the raw clients'
    waits too), then healed, and ``node`` ready again. Returns its descriptors and RSS before the fault,
    when it was healed and how long ``node`` took to be ready after."""
    convs = [*w.members, w.raw_conv]
    await eventually(lambda: all(acked(w, conv) >= 5 for conv in convs), "acks before the partition")
    pid = c.nodes[node].proc.pid  # type: ignore[union-attr]
    await eventually(lambda: ready(c, node), f"{node} ready before the partition")
    fd0, rss0 = fds(pid), rss_kib(pid)
    if mode == "cut":
        proxy.cut()
    else:
        proxy.blackhole()
    await watch(c, node, time.monotonic() + seconds, samples, w if stalls else None)
    proxy.heal()
    healed = time.monotonic()
    await eventually(lambda: ready(c, node), f"{node} ready after the heal", 30)
    return fd0, rss0, healed, time.monotonic() - healed


async def partition(net: Net, history: History, apps: list[App], path: Path_, mode: Mode, seconds: float) -> None:
    c, proxy = net.cluster, net.proxies[path]
    w = await start_workload(net, history, apps, f"{path[:2]}{mode[:2]}{uuid.uuid4().hex[:4]}")
    stop = asyncio.Event()
    pumps = [asyncio.create_task(post_until(a, t, stop, PACE)) for a, t in zip(w.apps, w.targets, strict=True)]
    pumps += [
        asyncio.create_task(raw_pump(rc, to, sent, stop))
        for rc, to, sent in zip(w.raw, w.raw_peer, w.raw_sent, strict=True)
    ]
    pid = c.nodes[VICTIM].proc.pid  # type: ignore[union-attr]
    samples = Samples()
    try:
        # Recovery: ready again, and committing its own conversations again (probes from the raw pair).
        fd0, rss0, healed, ready_after = await cut_off(c, VICTIM, proxy, mode, seconds, samples, w, stalls=True)
        until = time.monotonic() + 2  # traffic through the healed node
        while time.monotonic() < until:
            note_stall(samples, w)
            await asyncio.sleep(0.1)
    finally:
        stop.set()
        await asyncio.gather(*pumps, return_exceptions=True)
    assert c.nodes[VICTIM].running, c.nodes[VICTIM].log()[-4000:]

    refusals = 0
    for rc, to, sent in zip(w.raw, w.raw_peer, w.raw_sent, strict=True):
        refusals += await raw_resend(rc, to, sent, rounds=30, timeout=45.0, pause=0.3)
    # Live delivery is at most once: a message the victim committed while a gateway was not linked to it
    # (yet) was dropped on the way. The gateway's sessions fetch it when the link comes up (Hub.catch_up):
    # no closing post is needed to show the gap (docs/reliability.md, "Relinks").
    await eventually(lambda: all(not a.c.outbox for a in w.apps), "every post answered", 45)
    # Each sender's messages are stored in the order posted, on every path, across the victim's refusals
    # (`unavailable`: its store away, or its node id claim lost with etcd): a send behind a refused one is
    # refused until that one is resent (docs/protocol.md section 8, "Sender order").
    await check_delivery(c, w.apps, w.members, ordered=True)

    # Serves again: a new send in each of its conversations is committed by the victim itself.
    mine = node_id_of(c, VICTIM)
    probe = w.raw[0]

    probes: list[object] = []

    async def committed_by_victim() -> bool:
        n = len(probe.errors)
        ack = await probe.send("probe", to=w.raw_peer[0], cmid=f"probe-{uuid.uuid4().hex}")
        probes.append(committed_by(ack) if ack is not None else probe.errors[n:])
        assert ack is None or not ack["dup"], ack  # a new cmid each time: a fresh commit
        return ack is not None and committed_by(ack) == mine

    await eventually(
        committed_by_victim,
        lambda: f"{VICTIM} (node id {mine}) committing {w.raw_conv}: {probes[-5:]}",
        30,
        interval=0.3,
    )
    serves_after = time.monotonic() - healed
    log = await read_log(c, w.raw[0].account, w.raw_conv)
    assert [e["seq"] for e in log] == list(range(1, len(log) + 1))

    if path == "rabbitmq":
        # The events of every message committed meanwhile waited in the outbox and went out after the heal.
        await eventually(lambda: outbox_empty(c), "the outbox drained after the heal", 30, interval=0.2)
    if path == "links":
        # A silent link is noticed (keepalive) and its sends answered by the other node meanwhile.
        assert samples.stall <= LINK_STALL, f"a send waited {samples.stall:.1f}s for its answer"
    # Bounded while cut off, and settled afterwards.
    assert samples.rss and samples.fds
    assert max(samples.fds) - fd0 <= FD_BOUND, (fd0, samples.fds)
    assert max(samples.rss) - rss0 <= RSS_BOUND_KIB, (rss0, samples.rss)
    await eventually(lambda: fds(pid) - fd0 <= FD_SETTLED, lambda: f"descriptors {fd0} -> {fds(pid)}", 20)
    messages = sum(len(a.planned) for a in w.apps) + sum(len(s) for s in w.raw_sent)
    print(
        f"\nPARTITION {path} {mode} {seconds:.0f}s: messages={messages} raw_refusals={refusals} "
        f"not_ready_probes={samples.not_ready}/{samples.ready_probes} "
        f"fds {fd0}->max {max(samples.fds)} rss_kib {rss0}->max {max(samples.rss)} ready_after={ready_after:.1f}s "
        f"commits_again_after={serves_after:.1f}s "
        f"longest_wait_for_answer={samples.stall:.1f}s"
    )


@pytest.mark.parametrize("path", ["postgres", "redis", "rabbitmq", "etcd", "links"])
async def test_cut(net: Net, net_history: History, apps: list[App], long_run: bool, path: Path_) -> None:
    await partition(net, net_history, apps, path, "cut", PARTITION_LONG if long_run else PARTITION)


#: Blackholed in the suite: where silence differs most from a reset (a commit, a presence lookup or a
#: link that waits instead of failing). RabbitMQ and etcd too with IM_FAULTS_LONG=1 (their clients time
#: out like Redis's; the suite's time budget keeps them out of the short run).
BLACKHOLED = ["postgres", "redis", "links"] + (
    ["rabbitmq", "etcd"] if os.environ.get("IM_FAULTS_LONG", "") not in ("", "0") else []
)


@pytest.mark.parametrize("path", BLACKHOLED)
async def test_blackhole(net: Net, net_history: History, apps: list[App], long_run: bool, path: Path_) -> None:
    await partition(net, net_history, apps, path, "blackhole", PARTITION_LONG if long_run else PARTITION)


# --- a gateway cut off ---------------------------------------------------------------------------------


async def gateway_partition(net: Net, history: History, apps: list[App], path: str, mode: Mode, seconds: float) -> None:
    """gw-1 cut off from Redis or etcd while the same workload runs (SDK apps and a raw client on each
    gateway). What is promised (docs/reliability.md, "Partitions"):

    - Redis away: gw-1 goes on serving its connections (the shared rate limits fail open); its presence
      entries run out, so messages for its devices committed meanwhile are not routed to it live. When
      Redis is back its presence refresh finds them gone, registers them again and catches those devices
      up from the store (``Hub.catch_up``): nothing is missed, with no later message needed.
    - etcd away: its registration's lease runs out. When etcd is back it registers again and asks every
      client to reconnect (``bye unavailable``): other nodes may have taken its place meanwhile. Clients
      resume from their cursors, elsewhere or here.

    Either way: every send answered (acked or refused retryably, resent until acked), nothing lost, twice
    or out of order; gw-1's memory and descriptors bounded while cut off; ready and delivering again
    after the heal."""
    c, proxy = net.cluster, net.gateway_proxies[path]
    w = await start_workload(net, history, apps, f"g{path[:2]}{mode[:2]}{uuid.uuid4().hex[:4]}")
    # Raw clients that reconnect when told to (bye unavailable) and resend what was not acked.
    raw = [RawDevice(rc, to, PACE) for rc, to in zip(w.raw, w.raw_peer, strict=True)]
    stop = asyncio.Event()
    pumps = [asyncio.create_task(post_until(a, t, stop, PACE)) for a, t in zip(w.apps, w.targets, strict=True)]
    pumps += [asyncio.create_task(d.stream(stop)) for d in raw]
    samples = Samples()
    try:
        fetches0 = await fetch_counts(c, GATEWAY_VICTIM)
        fd0, rss0, healed, ready_after = await cut_off(
            c, GATEWAY_VICTIM, proxy, mode, seconds, samples, w, stalls=False
        )
        await asyncio.sleep(2)  # traffic through the healed node
    finally:
        stop.set()
        await asyncio.gather(*pumps, return_exceptions=True)
    assert c.nodes[GATEWAY_VICTIM].running, c.nodes[GATEWAY_VICTIM].log()[-4000:]

    rounds = [await d.resend_until_acked(timeout=45.0) for d in raw]
    await check_delivery(c, w.apps, w.members, ordered=True)
    log = await read_log(c, w.raw[0].account, w.raw_conv)
    assert [e["seq"] for e in log] == list(range(1, len(log) + 1))

    # Delivers again: a new device on gw-1 gets a message sent on gw-2 live (presence in Redis again,
    # gw-1 linked and registered).
    fresh = client_on(history, c, GATEWAY_VICTIM, w.raw[0].account, f"fresh{uuid.uuid4().hex[:4]}")
    sender = w.raw[1]
    try:
        assert (await fresh.connect())["t"] == "auth_ok"
        probes: list[str] = []

        async def delivered_live() -> bool:
            cmid = f"live-{uuid.uuid4().hex}"
            probes.append(cmid)
            if not sender.live:
                return False
            await sender.send("to gw-1", to=w.raw_peer[1], cmid=cmid)
            with contextlib.suppress(TimeoutError):
                await fresh.wait_for(lambda: any(m.get("cmid") == cmid for m in fresh.messages), timeout=3)
            return any(m.get("cmid") == cmid for m in fresh.messages)

        await eventually(delivered_live, lambda: f"{GATEWAY_VICTIM} delivering: {len(probes)} probes", 30)
        delivers_after = time.monotonic() - healed
    finally:
        await fresh.close()

    assert samples.rss and samples.fds
    assert max(samples.fds) - fd0 <= FD_BOUND, (fd0, samples.fds)
    assert max(samples.rss) - rss0 <= RSS_BOUND_KIB, (rss0, samples.rss)
    made_up = {k: v - fetches0[k] for k, v in (await fetch_counts(c, GATEWAY_VICTIM)).items()}
    messages = sum(len(a.planned) for a in w.apps) + sum(len(d.sent) for d in raw)
    reconnects = sum(a.c.connections - 1 for a in w.apps) + sum(d.connection for d in raw)
    print(
        f"\nGATEWAY PARTITION {path} {mode} {seconds:.0f}s: messages={messages} reconnects={reconnects} "
        f"raw_resend_rounds={rounds} fetches={made_up} not_ready_probes={samples.not_ready}/{samples.ready_probes} "
        f"fds {fd0}->max {max(samples.fds)} rss_kib {rss0}->max {max(samples.rss)} "
        f"ready_after={ready_after:.1f}s delivers_again_after={delivers_after:.1f}s"
    )


@pytest.mark.parametrize(("path", "mode"), [("redis", "cut"), ("redis", "blackhole"), ("etcd", "cut")])
async def test_gateway_cut_off(
    net: Net, net_history: History, apps: list[App], long_run: bool, path: str, mode: Mode
) -> None:
    await gateway_partition(net, net_history, apps, path, mode, PARTITION_LONG if long_run else PARTITION)
