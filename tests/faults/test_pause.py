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
from typing import Any

import asyncpg
import websockets

from im.backends.chat.postgres import PostgresChatStore
from im.backends.node_ids.etcd import EtcdNodeIds
from im.backends.registry.etcd import EtcdRegistry
from im.backends.sql.postgres_db import PostgresDatabase
from im.cluster import LocalCluster
from im.core.ids import Snowflake
from im.model.ids import direct_conv
from im.transfer.pool import _score
from tests.cluster.conftest import client_on, node_id_of
from tests.support.checker import History
from tests.support.client import ChatClient, register
from tests.support.postgres import DSN
from tests.support.wait import eventually

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
