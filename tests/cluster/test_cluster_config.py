"""The configuration centre across a real cluster: ``im config set limits.send_rate`` is enforced by every
gateway within a second of the change, and again after etcd restarted; a bad value is refused by the CLI;
one written around the CLI (straight into etcd) is ignored by every node, with one log line each, and the
last good value stays."""

from __future__ import annotations

import asyncio
import itertools
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from im.backends.config.etcd import EtcdConfigStore
from im.backends.registry.etcd import EtcdRegistry
from im.cluster import LocalCluster
from tests.cluster.conftest import make_cluster, stop_checked
from tests.support.client import ChatClient, register
from tests.support.wait import eventually

GATEWAYS = ("gw-1", "gw-2")
_probes = itertools.count()


@pytest.fixture
def small_cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    c = make_cluster(tmp_path / "cluster", transfers=1).start()
    yield c
    stop_checked(c)


def _registry_flags(c: LocalCluster) -> list[str]:
    assert c.etcd_endpoint is not None
    return [
        "--set",
        "registry.kind=etcd",
        "--set",
        f"registry.etcd_endpoints={c.etcd_endpoint}",
        "--set",
        f"registry.prefix=/{c.redis_prefix.rstrip(':')}/services/",
    ]


def im_config(c: LocalCluster, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "im", "config", *args, *_registry_flags(c)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


@pytest.fixture
async def centre(small_cluster: LocalCluster) -> AsyncIterator[EtcdConfigStore]:
    """The cluster's configuration centre, read (and written around the CLI) from the test."""
    c = small_cluster
    assert c.etcd_endpoint is not None
    registry = EtcdRegistry(c.etcd_endpoint, prefix=f"/{c.redis_prefix.rstrip(':')}/services/", keepalive=False)
    store = EtcdConfigStore(registry, f"/{c.redis_prefix.rstrip(':')}/config/")
    yield store
    await store.close()
    await registry.close()


def _reopens(log: str) -> int:
    return sum(1 for line in log.splitlines() if "configuration watch" in line and "reopened" in line)


async def limited(client: ChatClient, to: int) -> bool:
    """Whether three sends in a row meet ``rate_limited`` (with limits.send_rate=1 the third does: a
    connection's bucket holds 2; with the default 2000, none does)."""
    # Probes refused before are resent first, in order: a later send of the conversation waits for them
    # (docs/protocol.md section 8, "Sender order").
    refused = dict.fromkeys(str(e["ref"]) for e in client.errors if str(e.get("ref")).startswith("probe-"))
    again = [m for m in refused if m not in client.acks]
    cmids = [f"probe-{next(_probes)}" for _ in range(3)]
    for cmid in again:
        await client.send("probe", to=to, cmid=cmid, wait=False)
    errors_before = len(client.errors)
    for cmid in cmids:
        await client.send("probe", to=to, cmid=cmid, wait=False)
    await client.wait_for(
        lambda: all(m in client.acks or any(e.get("ref") == m for e in client.errors[errors_before:]) for m in cmids)
    )
    return any(
        (e["code"] == "rate_limited" or "resend it first" in e["message"]) for e in client.errors[errors_before:]
    )


async def enforced_within_a_second(
    clients: dict[str, ChatClient], to: int, centre: EtcdConfigStore, *, want: bool
) -> None:
    """Every gateway's client meets (``want``) or stops meeting the limit within 1 s of the last change in
    the centre's history (the time the CLI wrote it)."""
    changed_at = (await centre.history())[-1].at
    seen_at: dict[str, float] = {}

    async def all_switched() -> bool:
        for gw, client in clients.items():
            if gw not in seen_at and await limited(client, to) == want:
                seen_at[gw] = time.time()
        return len(seen_at) == len(clients)

    await eventually(all_switched, lambda: f"switched: {seen_at}", timeout=10, interval=0.02)
    late = {gw: round(at - changed_at, 3) for gw, at in seen_at.items() if at - changed_at > 1.0}
    assert not late, f"applied later than 1 s after the change: {late}"


async def test_a_limit_set_with_im_config_is_enforced_by_every_gateway_also_after_an_etcd_restart(
    small_cluster: LocalCluster, centre: EtcdConfigStore
) -> None:
    c = small_cluster
    alice, bob = await register(c.api, "alice"), await register(c.api, "bob")
    clients: dict[str, ChatClient] = {}
    for gw in GATEWAYS:
        client = ChatClient(f"ws://127.0.0.1:{c.nodes[gw].ports['ws']}/ws", alice, f"dev-{gw}")
        assert (await client.connect())["t"] == "auth_ok"
        clients[gw] = client
    try:
        for client in clients.values():
            assert not await limited(client, bob.uid)

        # A bad value and a setting that needs a restart are refused, saying why; nothing is written.
        bad, static = await asyncio.gather(
            asyncio.to_thread(im_config, c, "set", "limits.send_rate", "fast"),
            asyncio.to_thread(im_config, c, "set", "http.port", "9000"),
        )
        assert bad.returncode == 2 and "limits.send_rate" in bad.stderr and "refused" in bad.stderr, bad
        assert static.returncode == 2 and "restart" in static.stderr, static
        assert await centre.values() == {}

        done = await asyncio.to_thread(im_config, c, "set", "limits.send_rate", "1", "--by", "ops@test")
        assert done.returncode == 0, done.stderr
        await enforced_within_a_second(clients, bob.uid, centre, want=True)

        # Around the CLI: an invalid value is ignored by every node (one line each), 1 stays in force.
        await centre.set("limits.send_rate", "fast", by="etcdctl")
        line = "limits.send_rate='fast' ignored"
        await eventually(lambda: all(line in c.nodes[n].log() for n in (*GATEWAYS, "api-1", "tr-1")), timeout=5)
        await centre.set("log_level", "info", by="etcdctl")  # another change: the bad value is not logged again
        for client in clients.values():
            assert await limited(client, bob.uid)
        for n in GATEWAYS:
            assert c.nodes[n].log().count(line) == 1, c.nodes[n].log()[-2000:]

        # Removed: back to the configured 2000 on every gateway.
        gone = await asyncio.to_thread(im_config, c, "unset", "limits.send_rate")
        assert gone.returncode == 0, gone.stderr
        await enforced_within_a_second(clients, bob.uid, centre, want=False)

        # etcd restarts: once the nodes' watches reopened, a change applies within a second again.
        assert c.etcd is not None
        await asyncio.to_thread(c.etcd.restart, signal.SIGTERM, 0.5)
        await eventually(
            lambda: all(_reopens(c.nodes[n].log()) for n in GATEWAYS),
            "the gateways' configuration watches reopening",
            timeout=15,
        )
        again = await asyncio.to_thread(im_config, c, "set", "limits.send_rate", "1")
        assert again.returncode == 0, again.stderr
        await enforced_within_a_second(clients, bob.uid, centre, want=True)

        history, got = await asyncio.gather(
            asyncio.to_thread(im_config, c, "history", "limits.send_rate"),
            asyncio.to_thread(im_config, c, "get", "limits.send_rate"),
        )
        assert "limits.send_rate = 1.0   (from etcd)" in got.stdout, got.stdout + got.stderr
        assert history.returncode == 0, history.stderr
        lines = history.stdout.splitlines()
        assert "ops@test  limits.send_rate: (not set) -> 1" in lines[0], lines
        assert "limits.send_rate: (not set) -> 1" in lines[-1], lines
    finally:
        for client in clients.values():
            await client.close()
