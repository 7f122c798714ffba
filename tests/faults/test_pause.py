"""A paused node (SIGSTOP past its lease, then SIGCONT) over a real cluster: fencing.

Transfer node: clients stream direct messages through both transfer nodes; ``tr-1`` is stopped (SIGSTOP)
until its node id claim has expired in etcd, then a new holder claims that node id (the test, as a new
transfer node would: an etcd claim under the same owner name, which takes the freed id, then the token
recorded in the store before any minting) and ``tr-1`` is woken (SIGCONT). Whatever ``tr-1`` still had
in hand when it woke, nothing more is committed under that node id (counted in the store by the node
bits of the message ids); ``tr-1`` notices (its lease gone, or the store refusing its token), claims
another node id and carries on; every send is acked exactly once and the history checker (C1-C6) finds
the logs dense, with no duplicate mid or seq, and every client's stream gap-free and duplicate-free.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
import websockets

from im.backends.chat.postgres import PostgresChatStore
from im.backends.node_ids.etcd import EtcdNodeIds
from im.backends.registry.etcd import EtcdRegistry
from im.backends.sql.postgres_db import PostgresDatabase
from im.cluster import LocalCluster
from im.core.ids import Snowflake
from im.model.ids import direct_conv
from im.transfer.pool import _score
from tests.cluster.conftest import client_on, drop_schema, make_cluster, node_id_of, stop_checked
from tests.support.checker import History
from tests.support.client import ChatClient, register
from tests.support.postgres import DSN
from tests.support.wait import eventually


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """The shared cluster fixture's cluster, started again on other ports when one was taken meanwhile
    (other test runs on this machine hold thousands of sockets, whose local ports can land in a range
    picked as free a moment earlier)."""
    for attempt in range(4):
        c = make_cluster(tmp_path / f"cluster-{attempt}")
        try:
            c.start()
        except RuntimeError as exc:
            asyncio.run(drop_schema(c.postgres_schema))
            if "already in use" in str(exc) and attempt < 3:
                continue
            raise
        break
    yield c
    stop_checked(c)


PAIRS = 3  # direct conversations streaming at once (spread over both transfer nodes)
BEFORE, AFTER = 15, 25  # sends per sender before the pause, and after the wake-up


def transfer_for(conv: str) -> str:
    """The transfer node the gateways send ``conv`` to while both are up (their rendezvous hash)."""
    return max(("tr-1", "tr-2"), key=lambda n: _score(n, conv))


def _prefix(cluster: LocalCluster) -> str:
    return f"/{cluster.redis_prefix.rstrip(':')}/services/"


async def _node_ids_held(registry: EtcdRegistry, prefix: str) -> set[int]:
    kvs = await registry.client.get_prefix(f"{prefix}node-ids/".encode())
    return {int(bytes(kv.key).rsplit(b"/", 1)[1]) for kv in kvs}


async def _minted_under(cluster: LocalCluster, node_id: int) -> int:
    """How many stored messages carry ``node_id`` in their message id."""
    conn = await asyncpg.connect(DSN, timeout=5)
    try:
        return int(
            await conn.fetchval(
                f'SELECT count(*) FROM "{cluster.postgres_schema}".messages WHERE ((mid >> 12) & 1023) = $1', node_id
            )
        )
    finally:
        await conn.close()


async def _send_acked(c: ChatClient, to: int, cmid: str, text: str) -> dict[str, Any]:
    """Send until acked, always with the same cmid (refusals such as ``unavailable`` and lost links are
    retried, as an SDK does); a bounded number of tries."""
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        try:
            if c.ws is None or c.closed_reason is not None or (c._reader is not None and c._reader.done()):
                with contextlib.suppress(Exception):
                    await c.close()
                await c.connect()
            ack = await c.send({"text": text}, to=to, cmid=cmid)
            if ack is not None:
                return ack
        except (TimeoutError, websockets.ConnectionClosed, OSError):
            pass
        await asyncio.sleep(0.1)
    raise AssertionError(f"{c.device}: {cmid} not acked within 40 s; errors {c.errors[-3:]}")


async def _stream(c: ChatClient, to: int, start: int, count: int) -> list[dict[str, Any]]:
    return [await _send_acked(c, to, f"{c.device}-{i}", f"m{i}") for i in range(start, start + count)]


async def test_a_paused_transfer_node_commits_nothing_under_its_taken_node_id(
    cluster: LocalCluster, history: History
) -> None:
    started = time.monotonic()
    senders: list[tuple[ChatClient, int]] = []
    receivers: list[ChatClient] = []
    on_tr1 = 0
    for i in range(PAIRS * 8):  # conversations tr-1 carries (the gateways' rendezvous hash), one on tr-2
        if len(senders) == PAIRS:
            break
        a = await register(cluster.api, f"pa{i}")
        b = await register(cluster.api, f"pb{i}")
        mine = transfer_for(direct_conv(a.uid, b.uid)) == "tr-1"
        if not mine and len(senders) - on_tr1 >= 1:
            continue
        on_tr1 += mine
        senders.append((client_on(history, cluster, "gw-1", a, f"pa{i}"), b.uid))
        receivers.append(client_on(history, cluster, "gw-2", b, f"pb{i}"))
    assert on_tr1 >= 1
    for c in [s for s, _ in senders] + receivers:
        await c.connect()
    await asyncio.gather(*(_stream(c, to, 0, BEFORE) for c, to in senders))
    n = node_id_of(cluster, "tr-1")
    tr1 = cluster.nodes["tr-1"]
    assert tr1.proc is not None
    # Traffic keeps flowing while tr-1 is stopped (sends that reach it wait, or are moved, and retried).
    during = [asyncio.create_task(_stream(c, to, BEFORE, 5)) for c, to in senders]
    os.kill(tr1.proc.pid, signal.SIGSTOP)
    paused = time.monotonic()
    try:
        async with EtcdRegistry(cluster.etcd.endpoint if cluster.etcd else "", prefix=_prefix(cluster)) as registry:
            prefix = _prefix(cluster)
            await eventually(
                lambda: _free(registry, prefix, n), f"tr-1's claim on node id {n} did not expire", timeout=15
            )
            # The new holder of node id n: claims it in etcd (same owner name: it takes the freed id) and
            # records its token in the store before it would mint, as a committer does.
            minter = Snowflake(None)
            claims = EtcdNodeIds(registry, "tr-1", minter, ttl=2)
            store = PostgresChatStore(PostgresDatabase(DSN, schema=cluster.postgres_schema, min_size=1, max_size=1))
            await claims.start()
            await store.start()
            try:
                assert claims.node_id == n, (claims.node_id, n)
                assert minter.fence is not None
                token = minter.fence[1]
                assert await store.raise_fence(n, token) == token
                under_n = await _minted_under(cluster, n)
                # etcd held still while tr-1 wakes: tr-1 cannot learn from etcd that its claim is gone, so
                # only the store's fence stands between its pending sends and the log (as for a node cut
                # off from etcd, which mints within its reservation for up to registry.node_id_reserve).
                assert cluster.etcd is not None and cluster.etcd.proc is not None
                os.kill(cluster.etcd.proc.pid, signal.SIGSTOP)
                try:
                    os.kill(tr1.proc.pid, signal.SIGCONT)
                    stopped_for = time.monotonic() - paused
                    await eventually(
                        lambda: "refused batches refused by the store's fence" in tr1.log(),
                        lambda: f"tr-1 committed or refused nothing:\n{tr1.log()[-3000:]}",
                        timeout=10,
                    )
                finally:
                    os.kill(cluster.etcd.proc.pid, signal.SIGCONT)
                # tr-1 finds out (its lease expired, or the store refused its token) and claims another id.
                claimed = re.compile(r"node id (\d+) claimed by tr-1 ")
                await eventually(
                    lambda: [int(x) for x in claimed.findall(tr1.log())][-1] != n,
                    lambda: f"tr-1 did not claim another node id:\n{tr1.log()[-3000:]}",
                    timeout=20,
                )
                await asyncio.gather(*during)
                await asyncio.gather(*(_stream(c, to, BEFORE + 5, AFTER) for c, to in senders))
                # Nothing was committed under node id n after its new holder recorded its token.
                assert await _minted_under(cluster, n) == under_n
                log = tr1.log()
                fenced = "refused batches refused by the store's fence" in log
                lost = f"node id {n} of tr-1 lost" in log
                assert fenced and lost, log[-3000:]
            finally:
                await claims.close()
                await store.close()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(tr1.proc.pid, signal.SIGCONT)
    total = BEFORE + 5 + AFTER
    for c, _ in senders:
        assert len(c.acks) == total
    for r in receivers:
        await r.wait_for(functools.partial(_got, r, total), timeout=20)
        seqs = [m["seq"] for m in r.messages]
        assert len(seqs) == len(set(seqs)), "a receiver got a message twice"
    print(
        f"\npaused transfer node: tr-1 stopped {stopped_for:.1f} s, node id {n} taken over, "
        f"{PAIRS * total} messages acked, fence refusal in tr-1's log: {fenced}, lease loss found: {lost}; "
        f"{time.monotonic() - started:.1f} s"
    )


async def _free(registry: EtcdRegistry, prefix: str, n: int) -> bool:
    return n not in await _node_ids_held(registry, prefix)


def _got(c: ChatClient, count: int) -> bool:
    return len({m["seq"] for m in c.messages}) >= count


# --- a paused gateway -----------------------------------------------------------------------------------

QUIET = 2.0  # how long the new owner's presence entries are watched after the wake-up (a bound, not a barrier)


async def _redis_now_ms(r: aioredis.Redis) -> int:
    sec, usec = await r.time()
    return int(sec) * 1000 + int(usec) // 1000


async def _live_members(r: aioredis.Redis, prefix: str, uid: int) -> set[str]:
    now = await _redis_now_ms(r)
    return {_text(m) for m in await r.zrangebyscore(f"{prefix}p:{uid}", f"({now}", "+inf")}


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def test_a_paused_gateway_moves_its_clients_and_clobbers_no_presence(
    cluster: LocalCluster, history: History
) -> None:
    """``gw-1`` is stopped (SIGSTOP) past its registration lease and its presence entries' TTL. One of its
    clients moves meanwhile (its old socket gone, as an SDK closes it; it connects to ``gw-2`` and resumes
    from its cursors), the other stays. Woken (SIGCONT), ``gw-1`` finds its lease gone, registers again
    and tells the client still there to reconnect (``bye unavailable``) instead of serving on; its
    presence writes never take the moved device from ``gw-2``; nobody gets a message twice or misses one
    (checker C1-C6)."""
    started = time.monotonic()
    prefix = cluster.redis_prefix
    sender_acc = await register(cluster.api, "gsend")
    mover_acc = await register(cluster.api, "gmove")
    stayer_acc = await register(cluster.api, "gstay")
    sender = client_on(history, cluster, "gw-2", sender_acc, "s1")
    mover = client_on(history, cluster, "gw-1", mover_acc, "m1")
    stayer = client_on(history, cluster, "gw-1", stayer_acc, "t1")
    for c in (sender, mover, stayer):
        await c.connect()
    sent = 0

    async def burst(count: int) -> None:
        nonlocal sent
        for i in range(sent, sent + count):
            await _send_acked(sender, mover_acc.uid, f"s1-m-{i}", f"to mover {i}")
            await _send_acked(sender, stayer_acc.uid, f"s1-t-{i}", f"to stayer {i}")
        sent += count

    await burst(10)
    await mover.wait_for(functools.partial(_got, mover, 10), timeout=20)
    await stayer.wait_for(functools.partial(_got, stayer, 10), timeout=20)
    gw1 = cluster.nodes["gw-1"]
    assert gw1.proc is not None
    os.kill(gw1.proc.pid, signal.SIGSTOP)
    paused = time.monotonic()
    r = aioredis.Redis.from_url(cluster.redis_url)
    try:
        # The mover notices and moves: its old socket is gone, a new connection on gw-2 resumes.
        await mover.drop()
        moved = client_on(history, cluster, "gw-2", mover_acc, "m1")
        moved.cursors = dict(mover.cursors)
        await moved.connect()
        await burst(10)  # while gw-1 is stopped: the mover gets them on gw-2, the stayer's wait in the log
        async with EtcdRegistry(cluster.etcd.endpoint if cluster.etcd else "", prefix=_prefix(cluster)) as registry:

            async def gw1_listed() -> bool:
                return any(i.node == "gw-1" for i in await registry.instances("gateway"))

            await eventually(lambda: _not(gw1_listed()), "gw-1's registration did not expire", timeout=15)
            await eventually(
                lambda: _lacks(_live_members(r, prefix, stayer_acc.uid), "t1|gw-1"),
                "gw-1's presence entries did not expire",
                timeout=15,
            )
            assert await _live_members(r, prefix, mover_acc.uid) == {"m1|gw-2"}
            os.kill(gw1.proc.pid, signal.SIGCONT)
            stopped_for = time.monotonic() - paused
            # gw-1 learns from etcd that its lease is gone, registers again, and moves its clients.
            await eventually(lambda: "etcd lease of gw-1 was lost" in gw1.log(), lambda: gw1.log()[-3000:], timeout=15)
            await eventually(lambda: stayer.closed_reason is not None, "the stayer was not asked to move", timeout=15)
            assert stayer.closed_reason is not None
            assert (stayer.closed_reason["code"], stayer.closed_reason["reconnect"]) == ("unavailable", True)
            await eventually(gw1_listed, "gw-1 did not register again", timeout=15)
            # Its presence writes never took the moved device from gw-2 (a refresh is compare-and-set).
            deadline = time.monotonic() + QUIET
            while time.monotonic() < deadline:
                assert await _live_members(r, prefix, mover_acc.uid) == {"m1|gw-2"}
                holder = await r.hget(f"{prefix}h:{mover_acc.uid}", "m1")
                assert holder is not None and _text(holder).startswith("gw-2|"), holder
                await asyncio.sleep(0.1)
        # The stayer reconnects (to gw-1, listed again) and resumes from its cursors; streaming goes on.
        await stayer.connect()
        await burst(10)
        await moved.wait_for(functools.partial(_got_after, moved, mover.cursors, 30), timeout=20)
        await stayer.wait_for(functools.partial(_got, stayer, 30), timeout=20)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(gw1.proc.pid, signal.SIGCONT)
        await r.aclose()
    for c in (stayer, moved):
        seqs = [m["seq"] for m in c.messages]
        assert len(seqs) == len(set(seqs)), f"{c.device} got a message twice"
    print(
        f"\npaused gateway: gw-1 stopped {stopped_for:.1f} s past its lease; {2 * sent} messages; "
        f"mover moved to gw-2, stayer told to reconnect; {time.monotonic() - started:.1f} s"
    )


async def _not(check: Any) -> bool:
    return not await check


async def _lacks(members: Any, member: str) -> bool:
    return member not in await members


def _got_after(c: ChatClient, before: dict[str, int], total: int) -> bool:
    """``c`` (a new connection resumed from ``before``) holds every seq up to ``total`` of its conversation."""
    return sum(before.values()) + len({m["seq"] for m in c.messages}) >= total
