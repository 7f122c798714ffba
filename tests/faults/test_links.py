"""Bad links (issue 14): chat over links with 300 ms ± 200 ms latency, 8 KB/s, 1-byte slices and resets.

A real cluster (api, two gateways, two transfer nodes, each its own process) with a fault proxy
(:mod:`im.faultproxy`) on one kind of path at a time:

- **clients <-> gateways**: every client connection (WebSocket and TCP, to both gateways, the first one
  and every reconnect) goes through a proxy in front of the gateway's port;
- **gateways <-> transfer nodes**: each transfer node advertises a proxy in front of its gRPC port
  (``transfer.public_address``), so every gateway's (and the API's) link to it crosses the proxy.

SDK clients (``im.client.Client``, WebSocket and TCP, JSON and MessagePack) post in a direct pair and a
group of all without waiting for acks; raw protocol clients (``tests.support.client.ChatClient``,
recorded in the history checker) post in their own direct conversation and reconnect and resend with
the same cmids themselves. While they do, the links are bad and one proxy at a time resets every
connection on it every 1-2.5 s (between gateways and transfer nodes: the two nodes' links in turn, each
time once the gateways are linked to the other node again, the case docs/transfer.md §6 promises order
for). Then the resets stop (the links stay slow) and every send must be
acked: the SDK apps' checks (tests.support.apps.check_delivery: every post acked once and
stored once, each sender's posts stored in the order posted, every member saw every conversation 1..N
once, in order) and the history checker (C1-C6) find nothing lost, duplicated or out of order.

``IM_FAULTS_LONG=1`` runs the chat phase for three minutes instead of about ten seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import websockets

from im.client import Disconnected, Encoding
from im.cluster import LocalCluster
from im.model.ids import direct_conv
from tests.cluster.conftest import ClusterView, make_cluster, stop_checked
from tests.faults.conftest import BAD_LINK, Proxies, pause, reset_now_and_then
from tests.support.apps import App, Target, check_delivery, create_group, pairs_and_group, post_until, start_app
from tests.support.checker import History
from tests.support.client import Account, ChatClient, register
from tests.support.wait import eventually

#: The long variant outlasts the suite's timeout per test (pyproject.toml: 120 s).
pytestmark = [pytest.mark.timeout(900)] if os.environ.get("IM_FAULTS_LONG", "") not in ("", "0") else []

#: Seconds between two posts of one client: a little under 8 KB/s of deliveries per client.
PACE = 0.2
#: Seconds of chat while the links are reset (short run; long run with IM_FAULTS_LONG=1).
SHORT, LONG = 10.0, 180.0
#: Seconds every client has to get its last send acked once the resets stopped.
DRAIN = 60.0


# --- proxies ---------------------------------------------------------------------------------------------


def _link_events(cluster: LocalCluster, node: str, address: str) -> tuple[int, bool]:
    """From ``node``'s log, about its link to the transfer node at ``address``: how many times it was
    lost (or an attempt failed), and whether the last word is "linked" (im.transfer.client's log lines)."""
    a = re.escape(address)
    lost = list(re.finditer(rf"transfer link to {a}: |transfer node {a} ended the link", cluster.nodes[node].log()))
    linked = list(re.finditer(rf"linked to transfer node \S+ at {a}$", cluster.nodes[node].log(), re.MULTILINE))
    return len(lost), bool(linked) and (not lost or linked[-1].start() > lost[-1].start())


async def reset_links_in_turn(
    cluster: LocalCluster, proxies: Proxies, stop: asyncio.Event, rng: random.Random
) -> dict[str, Any]:
    """Until ``stop``: every RESET_EVERY seconds, reset every link to one transfer node, the two in turn,
    but only once both gateways are linked to the other one again, so that the sends pending on the
    broken links always have a node to go to (transfer.md §6). Returns the rounds and how long the
    gateways took to relink (from the reset until both logged "linked" again)."""
    order = list(proxies.by_port.values())
    gateways = ("gw-1", "gw-2")
    relinks: list[float] = []
    watchers: list[asyncio.Task[None]] = []

    def relinked(address: str, before: dict[str, int]) -> bool:
        events = {gw: _link_events(cluster, gw, address) for gw in gateways}
        return all(lost > before[gw] and up for gw, (lost, up) in events.items())

    async def watch(address: str, before: dict[str, int], at: float) -> None:
        await eventually(lambda: relinked(address, before), f"the gateways relink to {address}", 60, interval=0.05)
        relinks.append(time.monotonic() - at)

    rounds = 0
    try:
        while await pause(stop, rng):
            victim, other = order[rounds % 2], order[(rounds + 1) % 2]
            await eventually(
                lambda: all(_link_events(cluster, gw, other.address)[1] for gw in gateways),  # noqa: B023
                f"both gateways linked to {other.address}",
                60,
                interval=0.05,
            )
            if rounds >= 1:
                await watchers[-1]  # the previous victim (the other node) relinked
            before = {gw: _link_events(cluster, gw, victim.address)[0] for gw in gateways}
            at = time.monotonic()
            await asyncio.to_thread(victim.reset_all)
            watchers.append(asyncio.create_task(watch(victim.address, before, at)))
            rounds += 1
        if watchers:
            await watchers[-1]
    finally:
        for w in watchers:
            w.cancel()
    return {
        "reset_rounds": rounds,
        "relink_s_median": round(sorted(relinks)[len(relinks) // 2], 2) if relinks else None,
        "relink_s_max": round(max(relinks), 2) if relinks else None,
    }


# --- raw recorded clients -------------------------------------------------------------------------------

#: What a broken or refused connection raises in the raw client.
LINK_ERRORS = (OSError, EOFError, asyncio.IncompleteReadError, TimeoutError, websockets.WebSocketException)


@dataclass
class Raw:
    """A raw protocol client that keeps chatting with ``peer`` across resets: it reconnects (stating its
    cursors), resends every unacked send with its cmid after each ``auth_ok``, and resends a send refused
    with ``unavailable`` (the only refusal acceptable here)."""

    c: ChatClient
    peer: int
    sent: list[str] = field(default_factory=list)  # cmids, in send order
    connects: int = 0
    refused: list[dict[str, Any]] = field(default_factory=list)

    @property
    def up(self) -> bool:
        return self.c._reader is not None and not self.c._reader.done()

    def unacked(self) -> list[str]:
        return [x for x in self.sent if x not in self.c.acks]

    async def ensure_connected(self) -> bool:
        if self.up:
            return True
        try:
            first = await asyncio.wait_for(self.c.connect(), 30)
        except LINK_ERRORS:
            self._abandon()
            return False
        # Turned away (a login the gateway will not start now, a connection over a cap: an error with
        # retry_after, then a bye; or a bye alone): come back later.
        if (first["t"] == "bye" and first.get("reconnect")) or (first["t"] == "error" and first["ref"] is None):
            self._abandon()
            await asyncio.sleep(float(first.get("retry_after") or 0.5))
            return False
        assert first["t"] == "auth_ok", first
        self.connects += 1
        for cmid in self.unacked():
            if not await self._write(cmid):
                return False
        return True

    def _abandon(self) -> None:
        """Drop a connection attempt that went wrong (its socket may still be open)."""
        transport = getattr(self.c.ws, "transport", None)
        if transport is not None:
            transport.abort()

    async def _write(self, cmid: str) -> bool:
        try:
            await self.c.send(cmid, to=self.peer, cmid=cmid, wait=False)
        except LINK_ERRORS:
            return False
        return True

    async def _resend_refused(self) -> None:
        if not self.c.errors:
            return
        errors, self.c.errors[:] = list(self.c.errors), []
        self.refused += errors
        assert {e.get("code") for e in errors} <= {"unavailable"}, errors
        await asyncio.sleep(0.2)  # back off, as the SDK does (retry_delay)
        for ref in [e.get("ref") for e in errors]:
            if ref in self.sent and ref not in self.c.acks:
                await self._write(ref)

    async def run(self, stop: asyncio.Event) -> None:
        """Post every PACE seconds until ``stop``, then until every send is acked."""
        k = 0
        while not stop.is_set():
            if await self.ensure_connected():
                cmid = f"{self.c.device}-{k}"
                k += 1
                self.sent.append(cmid)
                await self._write(cmid)
                await self._resend_refused()
            await asyncio.sleep(PACE)
        while self.unacked():
            if await self.ensure_connected():
                await self._resend_refused()
            with contextlib.suppress(TimeoutError):
                await self.c.wait_for(lambda: not self.up or bool(self.c.errors) or not self.unacked(), 1.0)


def raw_client(history: History, account: Account, device: str, url: str, tcp: tuple[str, int] | None) -> ChatClient:
    c = ChatClient(url, account, device, history=history, tcp=tcp)
    history.clients.append(c)
    history.accounts[account.uid] = account
    return c


# --- the chat -----------------------------------------------------------------------------------------------


@dataclass
class LinkChat:
    apps: list[App]
    members: dict[str, list[App]]
    targets: list[list[Target]]
    raws: list[Raw]


async def start_link_chat(
    cluster: LocalCluster, history: History, apps: list[App], route: Callable[[str], str]
) -> LinkChat:
    """Four SDK users (0 and 2 on WebSocket, 1 and 3 on TCP; 2 and 3 speak MessagePack; 0 and 3 start on
    gw-1, 1 and 2 on gw-2) in pairs (0,1) and (2,3) and a group of all; two raw users in their own pair,
    one on each gateway (WebSocket on gw-1, TCP on gw-2). Every connection goes through ``route``."""
    users = list(await asyncio.gather(*(register(cluster.api, f"link{i}") for i in range(4))))
    group = await create_group(cluster, users[0], users[1:])
    started = await asyncio.gather(
        *(
            start_app(
                cluster,
                u,
                f"dev{i}",
                transport="tcp" if i % 2 else "ws",
                first_on="gw-1" if i in (0, 3) else "gw-2",
                encoding=Encoding.MSGPACK if i >= 2 else Encoding.JSON,
                route=route,
                connect_timeout=30.0,
            )
            for i, u in enumerate(users)
        )
    )
    apps.extend(started)
    targets, members = pairs_and_group(users, group, started)

    r0, r1 = await asyncio.gather(register(cluster.api, "rawlink0"), register(cluster.api, "rawlink1"))
    gw1, gw2 = cluster.nodes["gw-1"].ports, cluster.nodes["gw-2"].ports
    ws_url = route(f"ws://127.0.0.1:{gw1['ws']}/ws")
    tcp_host, tcp_port = route(f"tcp://127.0.0.1:{gw2['tcp']}").removeprefix("tcp://").rsplit(":", 1)
    raws = [
        Raw(raw_client(history, r0, "raw0", ws_url, None), r1.uid),
        Raw(raw_client(history, r1, "raw1", "", (tcp_host, int(tcp_port))), r0.uid),
    ]
    return LinkChat(list(started), members, targets, raws)


Nemesis = Callable[[asyncio.Event], Coroutine[Any, Any, dict[str, Any]]]


async def chat_through_resets(chat: LinkChat, proxies: Proxies, seconds: float, nemesis: Nemesis) -> dict[str, Any]:
    """Chat for ``seconds`` while ``nemesis`` resets links until its event is set; then stop it (the
    links stay bad) and wait until every SDK send and every raw send is acked. Returns figures."""
    stop_posting, stop_resets = asyncio.Event(), asyncio.Event()
    resetter = asyncio.create_task(nemesis(stop_resets))
    tasks = [
        asyncio.create_task(post_until(a, t, stop_posting, PACE)) for a, t in zip(chat.apps, chat.targets, strict=True)
    ]
    raw_tasks = [asyncio.create_task(r.run(stop_posting)) for r in chat.raws]
    started = time.monotonic()
    try:
        await asyncio.sleep(seconds)
        stop_posting.set()
        stop_resets.set()
        resets = await resetter
        await asyncio.gather(*tasks)
        drained = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*raw_tasks), DRAIN)
        await eventually(
            lambda: all(not a.c.outbox for a in chat.apps),
            lambda: "unacked sends: " + ", ".join(f"{a.name}={len(a.c.outbox)}" for a in chat.apps if a.c.outbox),
            DRAIN,
        )
        drain_s = time.monotonic() - drained
    finally:
        stop_posting.set()
        stop_resets.set()
        for t in [resetter, *tasks, *raw_tasks]:
            t.cancel()
    return {
        "seconds": round(time.monotonic() - started, 1),
        **resets,
        "drain_s": round(drain_s, 1),
        "sdk_posts": sum(len(a.planned) for a in chat.apps),
        "raw_posts": sum(len(r.sent) for r in chat.raws),
        "sdk_connections": sum(a.c.connections for a in chat.apps),
        "raw_connections": sum(r.connects for r in chat.raws),
        "unavailable_refusals_raw": sum(len(r.refused) for r in chat.raws),
        **proxies.figures(),
    }


async def check_chat(cluster: LocalCluster, history: History, chat: LinkChat) -> dict[str, int]:
    """The SDK apps' checks and the history checker (C1-C6, also run again at teardown)."""
    logs = await check_delivery(cluster, chat.apps, chat.members, ordered=True)
    for r in chat.raws:
        assert not r.unacked(), f"{r.c.device}: unacked {r.unacked()[:10]}"
        acked = [r.c.acks[x] for x in r.sent]
        assert len({(a["conv"], a["seq"]) for a in acked}) == len(acked), f"{r.c.device}: two sends, one seq"
    raw_conv = direct_conv(chat.raws[0].c.account.uid, chat.raws[1].c.account.uid)
    # Each raw sender's sends are stored in the order sent (it resends in order, and refusals were rare).
    for r in chat.raws:
        seqs = [r.c.acks[x]["seq"] for x in r.sent]
        if not r.refused:
            assert seqs == sorted(seqs), f"{r.c.device}: stored out of the order sent"
        assert all(r.c.acks[x]["conv"] == raw_conv for x in r.sent)
    counts = await history.check()
    return {"sdk_conversations": len(logs), "sdk_stored": sum(len(log) for log in logs.values()), **counts}


def report(name: str, figures: dict[str, Any]) -> None:
    print(f"\n{name}: " + json.dumps(figures, sort_keys=True))


# --- clients <-> gateways ------------------------------------------------------------------------------


@pytest.fixture
def gateway_proxies(cluster: LocalCluster) -> Iterator[Proxies]:
    """A fault proxy in front of every client port of every gateway (WebSocket and TCP)."""
    proxies = Proxies()
    for i, name in enumerate(("gw-1", "gw-2")):
        ports = cluster.nodes[name].ports
        proxies.add(ports["ws"], seed=10 * i + 1)
        proxies.add(ports["tcp"], seed=10 * i + 2)
    yield proxies
    proxies.close()


async def test_clients_chat_over_bad_links_to_the_gateways(
    cluster: LocalCluster, history: History, apps: list[App], gateway_proxies: Proxies, long_run: bool
) -> None:
    """Every client connection crosses a proxy with 300 ms ± 200 ms latency, 8 KB/s and 1-byte writes
    each way, and one proxy at a time resets all its connections every 1-2.5 s. The clients reconnect
    (through the proxies again), resume from their cursors and resend with the same cmids: every send is
    acked once, stored once, in the order sent, and every member sees every conversation whole."""
    gateway_proxies.set(**BAD_LINK)
    chat = await start_link_chat(cluster, history, apps, gateway_proxies.route)
    for r in chat.raws:
        assert await r.ensure_connected()
    rng = random.Random(14)
    figures = await chat_through_resets(
        chat, gateway_proxies, LONG if long_run else SHORT, lambda stop: reset_now_and_then(gateway_proxies, stop, rng)
    )
    counts = await check_chat(cluster, history, chat)
    report("clients<->gateways", figures | counts)
    assert figures["resets"] >= 2, figures  # the faults did happen ...
    assert figures["sdk_connections"] + figures["raw_connections"] > len(chat.apps) + len(chat.raws), figures
    for a in chat.apps:  # ... and the clients never stopped on their own
        assert a.c.error is None and all(e.reconnect for e in a.of(Disconnected)), a.name


# --- gateways <-> transfer nodes ----------------------------------------------------------------------


@pytest.fixture
def proxied_transfers(tmp_path: Path) -> Iterator[tuple[LocalCluster, Proxies]]:
    """A cluster whose transfer nodes advertise a fault proxy in front of their gRPC port: every link of
    the gateways and the API to them crosses it."""
    c = make_cluster(tmp_path / "cluster")
    proxies = Proxies()
    for i in (1, 2):
        p = proxies.add(c.base_port + 10 * i + 3, seed=100 + i)  # im.cluster: transfer node i's gRPC port
        c.node_args[f"tr-{i}"] = ["--set", f"transfer.public_address={p.address}"]
    try:
        c.start()
    except BaseException:
        proxies.close()
        raise
    try:
        yield c, proxies
    finally:
        try:
            stop_checked(c)
        finally:
            proxies.close()


@pytest.fixture
async def transfer_history(proxied_transfers: tuple[LocalCluster, Proxies]) -> AsyncIterator[History]:
    h = History(ClusterView(proxied_transfers[0].api))  # type: ignore[arg-type]
    yield h
    await h.close_all()
    await h.check()


async def test_chat_over_bad_links_between_gateways_and_transfer_nodes(
    proxied_transfers: tuple[LocalCluster, Proxies], transfer_history: History, apps: list[App], long_run: bool
) -> None:
    """Every gRPC link from a gateway (or the API) to a transfer node crosses a proxy with 300 ms ± 200 ms
    latency, 8 KB/s and 1-byte writes each way; every 1-2.5 s every link to one transfer node is reset,
    the two nodes in turn, each time once both gateways are linked to the other node again. The gateways
    hand the sends pending on a broken link to the other node at once, in order (docs/transfer.md §6),
    relink, and their sessions fetch any delivery lost with the link from the log: no client sees an
    error or loses its connection, every send is acked once and stored once, each sender's sends are
    stored in the order sent, and every member sees every conversation whole and in order."""
    cluster, proxies = proxied_transfers
    await eventually(lambda: all(p.open >= 3 for p in proxies.by_port.values()), "gw-1, gw-2 and api-1 linked")
    proxies.set(**BAD_LINK)
    chat = await start_link_chat(cluster, transfer_history, apps, lambda url: url)
    for r in chat.raws:
        assert await r.ensure_connected()
    rng = random.Random(41)
    figures = await chat_through_resets(
        chat, proxies, LONG if long_run else SHORT, lambda stop: reset_links_in_turn(cluster, proxies, stop, rng)
    )
    counts = await check_chat(cluster, transfer_history, chat)
    report("gateways<->transfer nodes", figures | counts)
    assert figures["resets"] >= 3, figures  # links were reset ...
    assert figures["connections"] >= 6 + 2, figures  # ... and made again
    for a in chat.apps:  # the clients' own connections were never touched
        assert a.c.error is None and a.c.connections == 1 and not a.of(Disconnected), (a.name, a.of(Disconnected))
    assert all(r.connects == 1 for r in chat.raws), [r.connects for r in chat.raws]
    assert figures["unavailable_refusals_raw"] == 0, [r.refused for r in chat.raws]  # handed over, not refused
    for node in ("gw-1", "gw-2"):
        log = cluster.nodes[node].log()
        assert "Traceback" not in log, log[-4000:]
