"""Bad links to the engines (issue 14): nodes' links to PostgreSQL, Redis, RabbitMQ or etcd at 300 ms ±
200 ms latency, 8 KB/s, 1-byte writes and resets every 1-2.5 s, while clients keep chatting; then healed.

The cluster of test_partitions.py (:func:`tests.faults.conftest.net`): transfer node tr-1 reaches each
engine through its own fault proxy, and so does gateway gw-1 for the engines a gateway uses (PostgreSQL
for logins' sync points, replays and cursors; Redis for presence and the shared rate limits; etcd for its
registration and the configuration centre). RabbitMQ is the transfer nodes' alone, and its outbox relay
runs on either of them (one at a time), so tr-2's link to it goes through a proxy too. One engine at a
time, every proxy to it gets :data:`~tests.faults.conftest.BAD_LINK` both ways and, from 1.5 s on, every
1-2.5 s one of them (in turn) resets all its connections, for ``WINDOW`` seconds (``WINDOW_LONG`` with
``IM_FAULTS_LONG=1``); then the links are healed.

SDK clients (a pair on tr-1, a pair on tr-2, a group of all four, both gateways, both transports) and two
raw protocol clients (a pair on tr-1, recorded by the history checker; they reconnect when told to and
resend what was refused, or not acked, with the same cmid) post throughout. Checked:

- the history checker (C1-C9) and the SDK checks (tests/support/apps.py): every post acked once and
  stored once, dense seqs, each sender's messages stored in the order posted, every member saw every
  conversation whole and in order;
- no silent drop: every send is acked or refused with a retryable code (``unavailable``, ``rate_limited``)
  and resent until acked, all within ``SETTLE`` seconds of the heal; no SDK send refused for good; no raw
  send on an open connection waits longer than ``MAX_WAIT`` for its answer while the links are bad;
- the cluster keeps working through the bad links (sends acked meanwhile; with RabbitMQ, events
  published meanwhile), the nodes stay up, their memory and descriptors stay bounded, and after the heal
  every victim is ready again, its descriptors settle, and (RabbitMQ) the outbox drains;
- the faults happened: every proxy carried its node's traffic both ways while bad, reset connections,
  and accepted new ones (the engine's client reconnected through the bad link).

8 KB/s is no limit for PostgreSQL here: the commits of this workload (~30 messages/s, half of them on
tr-1) move under 1 KB/s each way; round trips (0.1-1 s each) are what slows a commit, and resets what
refuses one (``unavailable``, resent).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
import pytest

from im.cluster import LocalCluster
from im.faultproxy import FaultProxy
from tests.cluster.test_cluster_engines import outbox_empty
from tests.faults.conftest import (
    BAD_LINK,
    FD_BOUND,
    FD_SETTLED,
    GATEWAY_VICTIM,
    PEER,
    RSS_BOUND_KIB,
    VICTIM,
    Net,
    Proxies,
    Samples,
    acked,
    fds,
    ready,
    reset_now_and_then,
    rss_kib,
    start_workload,
    watch,
)
from tests.support.apps import App, RawDevice, check_delivery, post_until, read_log
from tests.support.checker import History
from tests.support.wait import eventually

#: The long variant outlasts the suite's timeout per test (pyproject.toml: 120 s).
pytestmark = [pytest.mark.timeout(600)] if os.environ.get("IM_FAULTS_LONG", "") not in ("", "0") else []

Engine = Literal["postgres", "redis", "rabbitmq", "etcd"]
ENGINES: list[Engine] = ["postgres", "redis", "rabbitmq", "etcd"]
#: Seconds the links are bad in the suite, and with IM_FAULTS_LONG=1.
WINDOW, WINDOW_LONG = 8.0, 90.0
#: Seconds the links are slow before the first reset (which then comes 1-2.5 s later).
SLOW_FIRST = 1.5
#: Seconds between two posts of one client: six clients, about 30 messages/s in all.
PACE = 0.2
#: The longest a raw send on an open connection may wait for its answer (ack or refusal) while the links
#: are bad: the commit in progress and its own, a few round trips of up to 1 s each, or a reconnect of
#: the engine's client after a reset (PostgreSQL measured up to 7 s on a loaded box, Redis 4 s). A
#: client waiting out a timeout instead (asyncpg's 60 s command timeout, a link never found dead) fails.
MAX_WAIT = 15.0
#: Seconds after the heal by which every raw send must be acked (resent as often as refused). Below
#: ``limits.send_order_hold`` (30 s): a barrier that outlives the refused send it waits for shows here.
SETTLE = 15.0


@dataclass
class Victim:
    """One node whose link to the engine is bad: its proxy, and what it looked like meanwhile."""

    name: str
    proxy: FaultProxy
    pid: int = 0
    fd0: int = 0
    rss0: int = 0
    samples: Samples = field(default_factory=Samples)


def victims(net: Net, engine: Engine) -> list[Victim]:
    """tr-1; gw-1 where a gateway talks to ``engine`` too; tr-2 for RabbitMQ (the outbox relay runs on
    either transfer node, one at a time)."""
    out = [Victim(VICTIM, net.proxies[engine])]
    if engine in net.gateway_proxies:
        out.append(Victim(GATEWAY_VICTIM, net.gateway_proxies[engine]))
    if engine in net.peer_proxies:
        out.append(Victim(PEER, net.peer_proxies[engine]))
    return out


async def published(c: LocalCluster) -> int:
    """Outbox events the transfer nodes' relays published to RabbitMQ so far (im_outbox_published)."""
    total = 0.0
    async with httpx.AsyncClient(timeout=10) as http:
        for node in (VICTIM, PEER):
            text = (await http.get(c.metrics_urls()[node])).text
            total += sum(float(x.split()[-1]) for x in text.splitlines() if x.startswith("im_outbox_published"))
    return int(total)


def counters(p: FaultProxy) -> dict[str, int]:
    return {"accepted": p.accepted, "bytes_up": p.bytes_up, "bytes_down": p.bytes_down, "resets": p.resets}


def longest_wait(raw: list[RawDevice]) -> float:
    """The longest a send written on a raw client's open connection has waited for its answer so far."""
    now = time.monotonic()
    waits = [now - d.sent[x][0] for d in raw for x in d.silent(now)]
    return max(waits, default=0.0)


async def slow_then_reset(links: Proxies, stop: asyncio.Event, rng: random.Random) -> dict[str, Any]:
    """``SLOW_FIRST`` seconds of the slow links alone (what was in flight crosses them), then resets in turn
    until ``stop``."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), SLOW_FIRST)
    return await reset_now_and_then(links, stop, rng)


async def bad_engine_links(
    net: Net, history: History, apps: list[App], engine: Engine, seconds: float, profile: dict[str, Any]
) -> dict[str, Any]:
    """The scenario of the module docstring for ``engine`` with the link ``profile``; returns figures."""
    c = net.cluster
    vs = victims(net, engine)
    links = Proxies({v.proxy.port: v.proxy for v in vs})
    w = await start_workload(net, history, apps, f"e{engine[:2]}{uuid.uuid4().hex[:4]}")
    raw = [RawDevice(rc, to, PACE) for rc, to in zip(w.raw, w.raw_peer, strict=True)]
    stop, stop_resets = asyncio.Event(), asyncio.Event()
    pumps = [asyncio.create_task(post_until(a, t, stop, PACE)) for a, t in zip(w.apps, w.targets, strict=True)]
    pumps += [asyncio.create_task(d.stream(stop)) for d in raw]
    resetter: asyncio.Task[dict[str, Any]] | None = None
    waited = 0.0
    try:
        convs = [*w.members, w.raw_conv]
        await eventually(lambda: all(acked(w, conv) >= 3 for conv in convs), "acks before the bad links")
        for v in vs:
            await eventually(lambda: ready(c, v.name), f"{v.name} ready before the bad links")  # noqa: B023
            v.pid = c.nodes[v.name].proc.pid  # type: ignore[union-attr]
            v.fd0, v.rss0 = fds(v.pid), rss_kib(v.pid)
        before = {v.name: counters(v.proxy) for v in vs}
        acked0 = sum(acked(w, conv) for conv in convs)
        published0 = await published(c)

        links.set(**profile)
        resetter = asyncio.create_task(slow_then_reset(links, stop_resets, random.Random(engine)))
        until = time.monotonic() + seconds
        watchers = [asyncio.create_task(watch(c, v.name, until, v.samples, None)) for v in vs]
        while time.monotonic() < until:
            waited = max(waited, longest_wait(raw))
            await asyncio.sleep(0.1)
        await asyncio.gather(*watchers)
        stop_resets.set()
        rounds = await resetter
        during = {v.name: {k: n - before[v.name][k] for k, n in counters(v.proxy).items()} for v in vs}
        acked_during = sum(acked(w, conv) for conv in convs) - acked0
        published_during = await published(c) - published0
        for v in vs:
            v.proxy.heal()
        healed = time.monotonic()
        for v in vs:
            await eventually(lambda: ready(c, v.name), f"{v.name} ready after the heal", 30)  # noqa: B023
        ready_after = time.monotonic() - healed
        until = time.monotonic() + 2  # traffic through the healed links
        while time.monotonic() < until:
            waited = max(waited, longest_wait(raw))
            await asyncio.sleep(0.1)
    finally:
        stop.set()
        stop_resets.set()
        await asyncio.gather(*pumps, *([resetter] if resetter else []), return_exceptions=True)
        for v in vs:
            v.proxy.heal()  # already, unless the test failed while the links were bad
    for v in vs:
        assert c.nodes[v.name].running, c.nodes[v.name].log()[-4000:]

    refused = Counter(str(e.get("code")) for d in raw for e in d.c.errors)
    resend_rounds = [await d.resend_until_acked(timeout=SETTLE) for d in raw]
    await check_delivery(c, w.apps, w.members, ordered=True)
    log = await read_log(c, w.raw[0].account, w.raw_conv)
    assert [e["seq"] for e in log] == list(range(1, len(log) + 1))
    if engine == "rabbitmq":
        # The events of every message committed meanwhile went out once the relay got through.
        await eventually(lambda: outbox_empty(c), "the outbox drained after the heal", 30, interval=0.2)

    # The links really were bad and really carried the victims' engine traffic: bytes both ways while
    # bad, connections reset, and the engine clients connected again through the bad link. A client may
    # have dropped its connection itself before its turn to be reset came (RabbitMQ's, whose reconnects
    # seldom finish over this link): then it reconnected more than once instead.
    for v in vs:
        d = during[v.name]
        assert d["bytes_up"] > 0 and d["bytes_down"] > 0, (v.name, d)
        assert d["accepted"] >= 1 and (d["resets"] >= 1 or d["accepted"] >= 2), (v.name, d)
    assert sum(during[v.name]["resets"] for v in vs) >= 1, during
    assert acked_during > 0, "nothing acked while the links were bad"  # the cluster kept working
    if engine == "rabbitmq":  # and the outbox relay published through its slow link
        assert published_during > 0, "no event published while the links were bad"
    assert waited <= MAX_WAIT, f"a send waited {waited:.1f}s for its answer"
    for v in vs:
        s = v.samples
        assert s.rss and s.fds
        assert max(s.fds) - v.fd0 <= FD_BOUND, (v.name, v.fd0, s.fds)
        assert max(s.rss) - v.rss0 <= RSS_BOUND_KIB, (v.name, v.rss0, s.rss)
        await eventually(
            lambda: fds(v.pid) - v.fd0 <= FD_SETTLED,  # noqa: B023
            lambda: f"{v.name} descriptors {v.fd0} -> {fds(v.pid)}",  # noqa: B023
            20,
        )
    return {
        "engine": engine,
        "seconds": seconds,
        **rounds,
        "sdk_posts": sum(len(a.planned) for a in w.apps),
        "raw_posts": sum(len(d.sent) for d in raw),
        "sdk_reconnects": sum(a.c.connections - 1 for a in w.apps),
        "raw_reconnects": sum(d.connection for d in raw),
        "raw_refused": dict(refused),
        "raw_resend_rounds": resend_rounds,
        "acked_during": acked_during,
        "published_during": published_during,
        "longest_wait_s": round(waited, 1),
        "ready_after_s": round(ready_after, 1),
        "during": during,
        "not_ready_probes": {v.name: f"{v.samples.not_ready}/{v.samples.ready_probes}" for v in vs},
        "fds": {v.name: [v.fd0, max(v.samples.fds)] for v in vs},
        "rss_kib": {v.name: [v.rss0, max(v.samples.rss)] for v in vs},
    }


def report(name: str, figures: dict[str, Any]) -> None:
    print(f"\n{name}: " + json.dumps(figures, sort_keys=True))


@pytest.mark.parametrize("engine", ENGINES)
async def test_bad_link_to_engine(
    net: Net, net_history: History, apps: list[App], long_run: bool, engine: Engine
) -> None:
    """Clients chat while the victims' links to ``engine`` are bad and reset; nothing acked is lost,
    duplicated or reordered, nothing is dropped silently, and the victims recover after the heal."""
    figures = await bad_engine_links(net, net_history, apps, engine, WINDOW_LONG if long_run else WINDOW, BAD_LINK)
    counts = await net_history.check()
    report(f"bad link to {engine}", figures | counts)
