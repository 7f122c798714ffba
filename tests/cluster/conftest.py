"""Fixtures: a real local cluster per test (``im.cluster.LocalCluster``: api, two gateways, two transfer
nodes, a private etcd) on the shared PostgreSQL, Redis and RabbitMQ, and the history checker.

Each cluster gets its own PostgreSQL schema, Redis key prefix, etcd and ports, so tests never see each
other's data. Short TTLs (registry 2 s, presence 3 s) make crash recovery quick enough for a test.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from im.cluster import LocalCluster
from im.procs import free_block
from tests.support.apps import apps  # noqa: F401  (the SDK apps' fixture, for test_cluster_faults)
from tests.support.checker import History
from tests.support.client import Account, ChatClient
from tests.support.postgres import DSN
from tests.support.server import FAST_ARGON2, RELAXED_RATES
from tests.support.workers import cluster_block_range
from tests.support.zygote import ZYGOTE

#: Offsets from the base port that a two-gateway, two-transfer cluster uses (im.cluster's layout).
_OFFSETS = (
    0,
    5,
    6,
    11,
    12,
    13,
    14,
    17,
    18,
    21,
    22,
    23,
    24,
    27,
    31,
    32,
    33,
    34,
    37,
)  # im.cluster: APIs, etcd, nodes, ops


def free_base() -> int:
    """A base port whose whole layout is free now and lies below the ephemeral range, so no outgoing
    connection, nor ``free_port()`` (20000 and up), can take one of its ports between this check and
    the cluster's start (that race once failed a gateway's ops listener with "address already in use").
    It lies in this test worker's share of 10000-19999 (``cluster_block_range``), so two pytest-xdist
    workers never start clusters on the same ports."""
    low, high = cluster_block_range()
    return free_block(_OFFSETS, low=low, high=high)


@dataclass
class ClusterView:
    """What the history checker needs of a server: the API address."""

    api: str


def make_cluster(data_dir: Path, *, postgres_dsn: str = DSN, **kw: object) -> LocalCluster:
    """A (not yet started) cluster on its own schema, Redis prefix and ports; ``postgres_dsn``: another
    PostgreSQL than the shared test server (a private one a test may stop)."""
    tag = uuid.uuid4().hex[:10]
    return LocalCluster(
        data_dir,
        postgres_dsn=postgres_dsn,
        postgres_schema=f"im_cluster_{tag}",
        redis_prefix=f"im-cluster-{tag}:",
        base_port=free_base(),
        extra=[
            *FAST_ARGON2,
            *RELAXED_RATES,
            "--set",
            "registry.ttl=2",
            "--set",
            "presence.ttl=3",
            "--log-level",
            "info",
        ],
        **{"spawn": ZYGOTE.spawn_im, **kw},  # type: ignore[arg-type]
    )


async def drop_schema(schema: str) -> None:
    conn = await asyncpg.connect(DSN, timeout=5)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


async def schema_exists(schema: str) -> bool:
    conn = await asyncpg.connect(DSN, timeout=5)
    try:
        return bool(await conn.fetchval("SELECT 1 FROM pg_namespace WHERE nspname = $1", schema))
    finally:
        await conn.close()


#: The start of a record in the text log format (im.observability.logs): time, level, node, role, logger.
_RECORD = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z [A-Z]+ \S+ \S+ (\S+): ", re.MULTILINE)


def without_loggers(log: str, loggers: Collection[str]) -> str:
    """The log without the records (with their tracebacks) of the named loggers."""
    if not loggers:
        return log
    starts = [m.start() for m in _RECORD.finditer(log)]
    kept = [log[: starts[0] if starts else len(log)]]
    for start, end in zip(starts, [*starts[1:], len(log)], strict=True):
        m = _RECORD.match(log, start)
        if m is None or m.group(1) not in loggers:
            kept.append(log[start:end])
    return "".join(kept)


def stop_checked(c: LocalCluster, *, ignore_loggers: Collection[str] = (), drop: bool = True) -> None:
    """Stop the cluster; every node still running must stop cleanly on SIGTERM (exit 0, no traceback;
    ``ignore_loggers``: except in the records of these loggers, a library's own noise). ``drop``: drop its
    schema on the shared test server (False: the cluster ran on a private PostgreSQL)."""
    running = [n for n in c.nodes.values() if n.running]
    codes = c.stop()
    for node in running:
        assert codes[node.name] == 0, f"{node.name} exited with {codes[node.name]}:\n{node.log()[-4000:]}"
        log = without_loggers(node.log(), ignore_loggers)
        assert "Traceback" not in log, f"{node.name}:\n{log[-4000:]}"
    if c.etcd is not None:
        c.etcd.destroy()
    if drop:
        asyncio.run(drop_schema(c.postgres_schema))  # after the nodes stopped: nothing polls it any more


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """A started cluster; at the end every node still running must stop cleanly on SIGTERM."""
    c = make_cluster(tmp_path / "cluster").start()
    yield c
    stop_checked(c)


@pytest.fixture
async def history(cluster: LocalCluster) -> AsyncIterator[History]:
    """The checker (C1-C6) over everything the clients made with :func:`client_on` saw."""
    h = History(ClusterView(cluster.api))  # type: ignore[arg-type]
    yield h
    await h.close_all()
    await h.check()


def client_on(
    history: History, cluster: LocalCluster, gateway: str, account: Account, device: str, *, tcp: bool = False
) -> ChatClient:
    """A recording client of ``account`` on the named gateway node (WebSocket, or TCP)."""
    ports = cluster.nodes[gateway].ports
    c = ChatClient(
        f"ws://127.0.0.1:{ports['ws']}/ws",
        account,
        device,
        history=history,
        tcp=("127.0.0.1", ports["tcp"]) if tcp else None,
    )
    history.clients.append(c)
    history.accounts[account.uid] = account
    return c


_CLAIMED = re.compile(r"node id (\d+) claimed by (\S+) ")


def node_id_of(c: LocalCluster, node: str) -> int:
    """The node id (the node bits of its message ids) that ``node`` claimed last, read from its log."""
    claims = [int(n) for n, owner in _CLAIMED.findall(c.nodes[node].log()) if owner == node]
    assert claims, f"{node} claimed no node id:\n{c.nodes[node].log()[-2000:]}"
    return claims[-1]
