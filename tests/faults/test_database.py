"""The database going away: a private PostgreSQL under a running cluster is restarted (``pg_ctl stop -m
fast`` then start) or crashed (SIGKILL of the postmaster, then start: WAL recovery) while clients stream.

What the system promises (docs/operations.md, "What a crash costs", PostgreSQL):

- no send is acked without its commit: every ack any client got names an entry of the log as it is
  after recovery (C4 of the history checker, and the SDK apps' own check), crash recovery included;
- while the database is away sends are refused ``unavailable`` (retryable), explicitly: every send a
  raw protocol client wrote is answered (acked or refused) within a bounded time, none is left silent;
  no other error code is seen;
- a new connection is answered ``bye unavailable`` (reconnect) and an HTTP request 503 ``unavailable``
  with ``Retry-After``, never left waiting nor answered 500;
- the nodes report not ready while it is away (``/health/ready`` 503 naming ``store``) and ready again
  once it is back;
- after recovery every client's resends (same cmid) land once: nothing lost, nothing twice, seqs dense,
  every device sees every seq once and in order (C1-C6; ``check_delivery`` for the SDK apps).

Six SDK apps (WebSocket and TCP, JSON and MessagePack, pairs and a group over both gateways) and two raw
protocol clients recorded by the history checker stream through the outage. Each SDK app's messages are
stored in the order it posted them (docs/protocol.md section 8, "Sender order": a send behind a refused
one is refused until that one is resent). The raw clients resend their refused sends first, in order, as
the protocol asks, but keep writing new ones meanwhile, so their order is not checked. The last test runs the
same fault under ``im serve`` on PostgreSQL (the committer in the gateway's process, no gRPC link).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from im.cluster import LocalCluster
from tests.cluster.conftest import client_on, make_cluster, stop_checked, without_loggers
from tests.cluster.test_cluster_faults import start_chat
from tests.support.apps import RETRYABLE, App, RawDevice, check_delivery, pump
from tests.support.checker import History
from tests.support.client import ChatClient, register
from tests.support.postgres import PrivatePostgres
from tests.support.server import ServerProcess
from tests.support.wait import eventually

DOWN = 3.0  # seconds the database stays away
AFTER = 30  # posts each SDK app makes once the database is back
#: Loggers whose records may carry tracebacks while the database is away (counted engine errors, one
#: traceback per window).
OUTAGE_LOGGERS = ("asyncpg.pool", "im.core.committer", "im.gateway.hub")


@pytest.fixture
def cluster(tmp_path: Path, pg: PrivatePostgres) -> Iterator[LocalCluster]:
    """The cluster of tests/cluster on the private PostgreSQL (overrides the shared-server one, so the
    ``history`` and ``apps`` fixtures use it); every node must stop cleanly at the end."""
    for attempt in range(3):  # another test's cluster may take a port between the check and the bind
        try:
            c = make_cluster(tmp_path / f"cluster{attempt}", postgres_dsn=pg.dsn).start()
            break
        except RuntimeError as exc:
            if "already in use" not in str(exc) or attempt == 2:
                raise
    yield c
    stop_checked(c, ignore_loggers=OUTAGE_LOGGERS, drop=False)  # the schema goes with the private server


async def readiness(cluster: LocalCluster) -> dict[str, tuple[int, Any]]:
    """``/health/ready`` of every gateway and transfer node (operations listener): status and body."""
    out: dict[str, tuple[int, Any]] = {}
    async with httpx.AsyncClient(timeout=5) as http:
        for name, node in cluster.nodes.items():
            if "ops" in node.ports:
                r = await http.get(f"http://127.0.0.1:{node.ports['ops']}/health/ready")
                out[name] = (r.status_code, r.json())
    return out


@pytest.mark.parametrize("fault", ["restart-fast", "kill-9"])
async def test_database_away_mid_stream(
    fault: str, pg: PrivatePostgres, cluster: LocalCluster, history: History, apps: list[App]
) -> None:
    """PostgreSQL stopped fast (or its postmaster SIGKILLed) mid-stream, away for DOWN seconds, started
    again (crash recovery after a kill): see the module docstring for what is asserted."""
    chat = await start_chat(cluster, apps)
    r0, r1, late = [await register(cluster.api, name) for name in ("raw0", "raw1", "late")]
    raw = [
        RawDevice(client_on(history, cluster, "gw-1", r0, "raw0"), r1.uid),
        RawDevice(client_on(history, cluster, "gw-2", r1, "raw1", tcp=True), r0.uid),
    ]
    for d in raw:
        assert (await d.c.connect())["t"] == "auth_ok"
    back = asyncio.Event()  # set once the database is back: the SDK apps make AFTER more posts then
    stop_raw = asyncio.Event()
    pumps = [asyncio.create_task(pump(a, t, back, AFTER)) for a, t in zip(chat.apps, chat.targets, strict=True)]
    raws = [asyncio.create_task(d.stream(stop_raw)) for d in raw]
    figures: dict[str, Any] = {"fault": fault}
    try:
        # Mid-stream: every app and raw client has had acks.
        await eventually(
            lambda: all(a.acked() >= 6 for a in chat.apps) and all(len(d.c.acks) >= 6 for d in raw), "acks before"
        )
        acks_before = [len(d.c.acks) for d in raw]
        down_at = time.monotonic()
        await asyncio.to_thread(pg.kill if fault == "kill-9" else pg.stop)
        gone_at = time.monotonic()
        # Away: every node reports not ready, naming the store ...
        await eventually(lambda: _all_not_ready(cluster), "every node not ready while the database is away", DOWN + 5)
        figures["not_ready_after_s"] = round(time.monotonic() - gone_at, 2)
        # ... a new connection is told `bye unavailable` (its session cannot be checked), not left waiting ...
        newcomer = ChatClient(f"ws://127.0.0.1:{cluster.nodes['gw-1'].ports['ws']}/ws", late, "late")
        first = await newcomer.connect()
        assert (first["t"], first.get("code"), first.get("reconnect")) == ("bye", "unavailable", True), first
        await newcomer.close()
        # ... and so is an HTTP request whose token must be checked: 503 `unavailable`, Retry-After.
        async with httpx.AsyncClient(timeout=10) as http:
            r = await http.get(f"{cluster.api}/gateway", headers=late.auth)
        assert (r.status_code, r.json()["code"], r.headers.get("retry-after")) == (503, "unavailable", "1"), r.text
        await asyncio.sleep(max(0.0, DOWN - (time.monotonic() - gone_at)))
        # ... and every send written while it was away was answered, refused `unavailable`: none silent.
        checked_at = time.monotonic()
        refused_while_down = 0
        for d in raw:
            silent = d.silent(checked_at - 1.5)
            assert not silent, f"{d.c.device}: {len(silent)} sends written >1.5 s ago still unanswered"
            # (a device whose connection was closed, `bye unavailable`, wrote nothing while reconnecting)
            during = {x for x, (at, _) in d.sent.items() if gone_at + 0.5 < at < checked_at - 1.5}
            assert not (during & set(d.c.acks)), f"{d.c.device}: acked while the database was away"
            assert {e["code"] for e in d.c.errors} <= RETRYABLE, Counter(e["code"] for e in d.c.errors)
            refused_while_down += len(during & {str(e.get("ref")) for e in d.c.errors})
        assert refused_while_down > 0, "no raw send refused while the database was away: " + str(
            [(d.c.device, d.open, len(d.sent), len(d.c.errors), d.connection, d.c.events[-3:]) for d in raw]
        )
        figures["raw_sends_while_down"] = sum(1 for d in raw for at, _ in d.sent.values() if gone_at < at < checked_at)
        figures["raw_refused_unavailable"] = sum(len(d.c.errors) for d in raw)
        figures["raw_bye_unavailable"] = sum(
            1 for d in raw for e in d.c.events if e["t"] == "bye" and e["code"] == "unavailable"
        ) + sum(sum(d.refused_auth.values()) for d in raw)
        await asyncio.to_thread(pg.start)
        started = time.monotonic()
        figures["down_s"] = round(started - down_at, 2)
        # Back: sends are acked again, and every node is ready again.
        await eventually(
            lambda: all(len(d.c.acks) > n + 5 for d, n in zip(raw, acks_before, strict=True)),
            lambda: (
                "acks after: "
                + str(
                    [
                        (d.c.device, d.open, len(d.c.acks), n, d.connection, d.c.errors[-2:])
                        for d, n in zip(raw, acks_before, strict=True)
                    ]
                )
            ),
            20,
        )
        figures["acks_again_after_start_s"] = round(time.monotonic() - started, 2)
        await eventually(lambda: _all_ready(cluster), "every node ready again", 20)
        figures["ready_after_start_s"] = round(time.monotonic() - started, 2)
        back.set()
        await asyncio.gather(*pumps)
        stop_raw.set()
        await asyncio.gather(*raws)
    finally:
        stop_raw.set()
        for t in [*pumps, *raws]:
            t.cancel()
        if not pg.running:  # failed while it was away: bring it back for the history check and the stop
            await asyncio.to_thread(pg.start)
    # After recovery every client's resends land once, and every ack is in the log (C4, crash included).
    figures["raw_resend_rounds"] = [await d.resend_until_acked() for d in raw]
    figures["raw_reconnects"] = [d.connection for d in raw]
    # Each app's messages are stored in the order it posted them, across the refusals of the outage
    # (docs/protocol.md section 8, "Sender order").
    logs = await check_delivery(cluster, chat.apps, chat.members, ordered=True)
    figures["sdk_messages"] = sum(len(log) for log in logs.values())
    figures["sdk_reconnects"] = sum(a.c.connections - 1 for a in chat.apps)
    figures["raw_messages"] = sum(len(d.sent) for d in raw)
    figures["checked"] = await history.check()  # also run by the fixture; here for the figures
    print(f"\nDATABASE FIGURES {figures}")


async def _all_not_ready(cluster: LocalCluster) -> bool:
    got = await readiness(cluster)
    return all(code == 503 and body["checks"]["store"]["ok"] is False for code, body in got.values())


async def _all_ready(cluster: LocalCluster) -> bool:
    got = await readiness(cluster)
    if not all(code == 200 for code, _ in got.values()):
        return False
    async with httpx.AsyncClient(timeout=5) as http:
        r = await http.get(f"{cluster.api}/health/ready")
    return r.status_code == 200


async def test_database_crashes_under_im_serve(tmp_path: Path, pg: PrivatePostgres) -> None:
    """``im serve`` on PostgreSQL (one process: the committer beside the gateway, no link): the same
    promises when the postmaster is SIGKILLed mid-stream and started again: sends refused `unavailable`
    and none silent while it is away, a new connection `bye unavailable`, HTTP 503, not ready then ready,
    every resend stored once, C1-C6."""
    server = ServerProcess(
        tmp_path / "serve", extra=["--set", "store.kind=postgres", "--set", f"store.postgres_dsn={pg.dsn}"]
    ).start()
    history = History(server)
    try:
        a, b, late = [await register(server.api, name) for name in ("ann", "ben", "late")]
        raw = [RawDevice(history.client(a, "a1"), b.uid), RawDevice(history.client(b, "b1", tcp=True), a.uid)]
        for d in raw:
            assert (await d.c.connect())["t"] == "auth_ok"
        stop_raw = asyncio.Event()
        streams = [asyncio.create_task(d.stream(stop_raw)) for d in raw]
        figures: dict[str, Any] = {"fault": "im serve, kill-9"}
        try:
            await eventually(lambda: all(len(d.c.acks) >= 6 for d in raw), "acks before")
            acks_before = [len(d.c.acks) for d in raw]
            await asyncio.to_thread(pg.kill)
            gone_at = time.monotonic()
            async with httpx.AsyncClient(timeout=10) as http:
                await eventually(
                    lambda: _status(http, f"{server.api}/health/ready", 503), "not ready while away", DOWN + 5
                )
                r = await http.get(f"{server.api}/gateway", headers=late.auth)
                assert (r.status_code, r.json()["code"]) == (503, "unavailable"), r.text
            newcomer = ChatClient(server.ws, late, "late")
            first = await newcomer.connect()
            assert (first["t"], first.get("code")) == ("bye", "unavailable"), first
            await newcomer.close()
            await asyncio.sleep(max(0.0, DOWN - (time.monotonic() - gone_at)))
            checked_at = time.monotonic()
            for d in raw:
                assert not d.silent(checked_at - 1.5), f"{d.c.device}: sends left unanswered"
                during = {x for x, (at, _) in d.sent.items() if gone_at + 0.5 < at < checked_at - 1.5}
                assert not (during & set(d.c.acks)), f"{d.c.device}: acked while the database was away"
                assert {e["code"] for e in d.c.errors} <= RETRYABLE, Counter(e["code"] for e in d.c.errors)
            figures["raw_refused_unavailable"] = sum(len(d.c.errors) for d in raw)
            await asyncio.to_thread(pg.start)
            started = time.monotonic()
            await eventually(
                lambda: all(len(d.c.acks) > n + 5 for d, n in zip(raw, acks_before, strict=True)), "acks after", 20
            )
            figures["acks_again_after_start_s"] = round(time.monotonic() - started, 2)
            async with httpx.AsyncClient(timeout=10) as http:
                await eventually(lambda: _status(http, f"{server.api}/health/ready", 200), "ready again", 20)
            figures["ready_after_start_s"] = round(time.monotonic() - started, 2)
            stop_raw.set()
            await asyncio.gather(*streams)
        finally:
            stop_raw.set()
            for t in streams:
                t.cancel()
            if not pg.running:
                await asyncio.to_thread(pg.start)
        figures["raw_resend_rounds"] = [await d.resend_until_acked() for d in raw]
        figures["raw_messages"] = sum(len(d.sent) for d in raw)
        await history.close_all()
        figures["checked"] = await history.check()
        print(f"\nDATABASE FIGURES {figures}")
    finally:
        await history.close_all()
        code = await asyncio.to_thread(server.stop)
    assert code == 0, server.log()[-4000:]
    log = without_loggers(server.log(), OUTAGE_LOGGERS)
    assert "Traceback" not in log, log[-4000:]


async def _status(http: httpx.AsyncClient, url: str, want: int) -> bool:
    return (await http.get(url)).status_code == want
