"""Faults across real processes: a node of a running cluster dies (SIGKILL) or stops (SIGTERM) while SDK
clients stream messages through it.

SDK clients (``im.client.Client``, some over WebSocket, some over TCP) chat in direct pairs and in one
group, each posting messages in a loop without waiting for anyone. Mid-stream a gateway or a transfer
node goes away. The clients must notice, find a live gateway through ``GET /gateway`` when theirs is
gone, resend what was not acked with the same cmids, and resume from their cursors. Afterwards, for
every conversation, against the stored log read over HTTP:

- the log is dense (seqs 1..N), one entry per (sender, device, cmid), and holds exactly what was sent;
- every send was acked once (to the application), and the ack names its log entry;
- every member's application saw the conversation's seqs 1..N once each, in order (messages and its
  own non-``dup`` acks), with the content of the log.

Raw protocol clients (``tests.support.client.ChatClient``) recorded in the history checker run beside
them where they fit (C1-C6 after the test).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import httpx

from im.client import Bye, Disconnected, Encoding
from im.cluster import LocalCluster
from im.model.ids import direct_conv
from im.transfer.pool import _score
from tests.cluster.conftest import client_on, node_id_of
from tests.support.apps import (
    AFTER_FAULT,
    PACE,
    App,
    Target,
    check_delivery,
    committed_by,
    create_group,
    node_of,
    pairs_and_group,
    pump,
    raw_resend,
    read_log,
    start_app,
    unanswered,
)
from tests.support.checker import History
from tests.support.client import Account, ChatClient, register
from tests.support.wait import eventually

# --- the gateways and the nodes' logs -------------------------------------------------------------------


async def handed_out(cluster: LocalCluster, account: Account) -> str:
    async with httpx.AsyncClient(timeout=20) as http:
        r = await http.get(f"{cluster.api}/gateway", headers=account.auth)
    assert r.status_code == 200, r.text
    return str(r.json()["node"])


async def wait_only_gateway(cluster: LocalCluster, account: Account, node: str, timeout: float = 20.0) -> None:
    """Wait until ``GET /gateway`` answers ``node`` 20 times in a row: the API picks the least loaded
    listed gateway (at random between equals), so another one still listed would show up."""
    deadline = time.monotonic() + timeout
    streak, answers = 0, Counter[str]()
    while streak < 20:
        got = await handed_out(cluster, account)
        answers[got] += 1
        streak = streak + 1 if got == node else 0
        assert time.monotonic() < deadline, f"GET /gateway still hands out other nodes: {answers}"
        if streak == 0:
            await asyncio.sleep(0.1)


def log_since(cluster: LocalCluster, node: str, offset: int) -> str:
    return cluster.nodes[node].log()[offset:]


async def wait_log(cluster: LocalCluster, node: str, text: str, offset: int = 0, timeout: float = 20.0) -> None:
    await eventually(lambda: text in log_since(cluster, node, offset), f"{node} never logged {text!r}", timeout)


# --- a chat: three direct pairs and one group, spread over both gateways ------------------------------


@dataclass
class Chat:
    users: list[Account]
    group: str
    apps: list[App]
    targets: list[list[Target]]  # per app
    members: dict[str, list[App]]


async def start_chat(cluster: LocalCluster, apps: list[App]) -> Chat:
    """Six users: pairs (0,1), (2,3), (4,5) and a group of all. Even ones on WebSocket, odd ones on TCP;
    0, 3, 4 start on gw-1 and 1, 2, 5 on gw-2, so every pair spans both gateways and each gateway holds
    both transports. 4 and 5 speak MessagePack."""
    users = list(await asyncio.gather(*(register(cluster.api, f"user{i}") for i in range(6))))
    group = await create_group(cluster, users[0], users[1:])
    started = await asyncio.gather(
        *(
            start_app(
                cluster,
                u,
                f"dev{i}",
                transport="tcp" if i % 2 else "ws",
                first_on="gw-1" if i in (0, 3, 4) else "gw-2",
                encoding=Encoding.MSGPACK if i >= 4 else Encoding.JSON,
            )
            for i, u in enumerate(users)
        )
    )
    apps.extend(started)
    for i, a in enumerate(started):
        assert a.c.transport is not None
        assert node_of(cluster, a.c.transport.url) == ("gw-1" if i in (0, 3, 4) else "gw-2")  # type: ignore[attr-defined]
    targets, members = pairs_and_group(users, group, started)
    return Chat(users, group, started, targets, members)


def current_node(cluster: LocalCluster, app: App) -> str | None:
    t = app.c.transport
    return None if t is None else node_of(cluster, t.url)  # type: ignore[attr-defined]


# --- the tests ------------------------------------------------------------------------------------------


def freeze(cluster: LocalCluster, node: str) -> None:
    """SIGSTOP a node: its sockets stay open but nothing is read or answered (kill it afterwards)."""
    proc = cluster.nodes[node].proc
    assert proc is not None and proc.poll() is None
    os.kill(proc.pid, signal.SIGSTOP)


async def _gateway_fault(cluster: LocalCluster, apps: list[App], sig: signal.Signals) -> None:
    chat = await start_chat(cluster, apps)
    moving = [chat.apps[i] for i in (0, 3, 4)]  # on gw-1
    staying = [chat.apps[i] for i in (1, 2, 5)]
    gw1 = cluster.nodes["gw-1"]
    fault = asyncio.Event()
    pumps = [asyncio.create_task(pump(a, t, fault)) for a, t in zip(chat.apps, chat.targets, strict=True)]
    try:
        # Mid-stream: everyone has had acks, in the group and in its pair.
        await eventually(lambda: all(a.acked() >= 6 for a in chat.apps), "acks before the fault")
        if sig == signal.SIGKILL:
            # Freeze gw-1 first, so that its clients surely have sends out (written, never answered)
            # when it dies; some of them may already be committed, their acks lost with the node.
            freeze(cluster, "gw-1")
            try:
                await eventually(lambda: all(len(a.c.outbox) >= 3 for a in moving), "unanswered sends on gw-1", 10)
            finally:
                code = await asyncio.to_thread(gw1.stop, sig)
        else:
            code = await asyncio.to_thread(gw1.stop, sig)
        fault.set()
        # The API hands out only the live gateway (at once after a clean stop; after the lease's TTL
        # after a crash), and every client of gw-1 comes back through it.
        await wait_only_gateway(cluster, chat.users[0], "gw-2")
        await asyncio.gather(*pumps)
    finally:
        for p in pumps:
            p.cancel()
    await check_delivery(cluster, chat.apps, chat.members, ordered=True)

    for a in moving:
        assert a.c.error is None
        assert current_node(cluster, a) == "gw-2", f"{a.name} is on {current_node(cluster, a)}"
        # one connection to gw-1, then (after refused attempts while the API still listed it) gw-2
        assert a.c.connections == 2 and a.dialled[0] == "gw-1" and a.dialled[-1] == "gw-2", a.dialled
        lost = a.of(Disconnected)
        assert lost and all(e.reconnect for e in lost), lost
    for a in staying:  # the other gateway's clients never noticed
        assert a.c.connections == 1 and not a.of(Disconnected), (a.name, a.of(Disconnected))
        assert current_node(cluster, a) == "gw-2"
    if sig == signal.SIGTERM:
        assert code == 0, gw1.log()[-4000:]
        assert "Traceback" not in gw1.log(), gw1.log()[-4000:]
        # Told to move before the connection went: bye shutdown, reconnect allowed. (A client that is
        # still writing can lose the race: the stopping gateway reads nothing more, so the kernel resets
        # the connection at exit, and the SDK aborts on the failed write before reading the bye.)
        byes = {a.name: [(b.code, b.reconnect) for b in a.of(Bye)] for a in moving}
        assert all(b in ([], [("shutdown", True)]) for b in byes.values()) and any(byes.values()), byes
        for a in moving:
            if a.of(Bye):
                assert a.of(Disconnected)[0].reason == "bye shutdown", a.of(Disconnected)
    else:
        assert code == -signal.SIGKILL
        assert not any(a.of(Bye) for a in moving)


async def test_gateway_killed_mid_stream(cluster: LocalCluster, history: History, apps: list[App]) -> None:
    """SIGKILL gw-1 while its clients stream (frozen first, so that each has unanswered sends when it
    dies): they reconnect to gw-2 through GET /gateway (which stops handing out gw-1 once its lease
    expired), resend what was unacked and resume; nothing lost, nothing twice, everything in order. The
    clients of gw-2 never notice."""
    await _gateway_fault(cluster, apps, signal.SIGKILL)


async def test_gateway_stopped_mid_stream(cluster: LocalCluster, history: History, apps: list[App]) -> None:
    """SIGTERM gw-1 while its clients stream: it leaves the registry at once, answers what is on its
    links, tells its clients to move (bye shutdown) and exits 0; they continue on gw-2 with no loss."""
    await _gateway_fault(cluster, apps, signal.SIGTERM)


async def raw_pump(c: ChatClient, to: int, sent: dict[str, float], fault: asyncio.Event, after: int) -> None:
    """A raw protocol client streaming sends without waiting (refusals are resent by raw_resend).
    ``sent``: cmid -> when it was written."""
    k, posted_after = 0, 0
    while posted_after < after:
        cmid = f"{c.device}-{k}"
        sent[cmid] = time.monotonic()
        await c.send(cmid, to=to, cmid=cmid, wait=False)
        k += 1
        if fault.is_set():
            posted_after += 1
        await asyncio.sleep(PACE)


async def resend_acked(c: ChatClient, to: int) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Send every acked cmid again: returns (first ack, ack of the resend) pairs."""
    before = dict(c.acks)
    c.errors.clear()
    for cmid in before:
        await c.send(cmid, to=to, cmid=cmid, wait=False)
    await c.wait_for(lambda: all(x in c.acks for x in before) or bool(c.errors), timeout=30)
    assert not c.errors, c.errors
    return [(ack, c.acks[cmid]) for cmid, ack in before.items()]


def transfer_for(conv: str) -> str:
    """The transfer node the gateways send ``conv`` to while both are up (their rendezvous hash)."""
    return max(("tr-1", "tr-2"), key=lambda n: _score(n, conv))


async def test_transfer_node_killed_mid_stream(cluster: LocalCluster, history: History, apps: list[App]) -> None:
    """SIGKILL the transfer node that carries most conversations while clients stream (frozen first, so
    that sends are pending on the links when it dies): the gateways hand those sends to the other node at
    once, in their order, so clients see no error at all, and drop the link when the node's lease
    expired; a resend of a send the dead node had committed is answered with the original (dedupe across
    nodes through the store). No acked message is lost, none is stored twice, seqs stay dense, every device
    sees every seq once, in order, each sender's messages are stored in the order sent; no client is
    disconnected. Restarted, the node is linked by both gateways again and takes its conversations back."""
    chat = await start_chat(cluster, apps)
    victim = max(("tr-1", "tr-2"), key=lambda n: (sum(transfer_for(c) == n for c in chat.members), n == "tr-1"))
    survivor = "tr-2" if victim == "tr-1" else "tr-1"
    on_victim = {conv for conv in chat.members if transfer_for(conv) == victim}
    assert on_victim
    # Raw protocol clients too, in a conversation on the victim (recorded in the history checker: C1-C6
    # after the test); they see the `unavailable` refusals the SDK hides.
    r0 = await register(cluster.api, "raw0")
    for i in range(1, 40):
        r1 = await register(cluster.api, f"raw{i}")
        if transfer_for(direct_conv(r0.uid, r1.uid)) == victim:
            break
    raw_conv = direct_conv(r0.uid, r1.uid)
    assert transfer_for(raw_conv) == victim
    raw = [client_on(history, cluster, "gw-1", r0, "raw0"), client_on(history, cluster, "gw-2", r1, "raw1", tcp=True)]
    for c in raw:
        assert (await c.connect())["t"] == "auth_ok"
    convs = [*chat.members, raw_conv]

    fault = asyncio.Event()
    raw_sent: list[dict[str, float]] = [{}, {}]
    pumps = [asyncio.create_task(pump(a, t, fault)) for a, t in zip(chat.apps, chat.targets, strict=True)]
    pumps += [
        asyncio.create_task(raw_pump(c, peer.uid, sent, fault, AFTER_FAULT))
        for c, peer, sent in zip(raw, (r1, r0), raw_sent, strict=True)
    ]
    offsets = {name: len(node.log()) for name, node in cluster.nodes.items()}

    def acked(conv: str) -> int:
        sdk = sum(ack.conv == conv for a in chat.apps for ack in a.acks)
        return sdk + sum(bool(ack["conv"] == conv) for c in raw for ack in c.acks.values())

    def out_on_victim(a: App) -> int:
        return sum(a.planned[cmid][0] in on_victim for cmid in a.c.outbox)

    def ready_to_kill() -> bool:
        # every raw client has sends out that the gateway surely took (written 0.3 s ago), every app in
        # a conversation of the victim has sends out there
        now = time.monotonic()
        waiting = [unanswered(c, sent) for c, sent in zip(raw, raw_sent, strict=True)]
        return all(w and now - min(w.values()) > 0.3 for w in waiting) and all(
            out_on_victim(a) >= 2 for a in chat.apps if any(a in chat.members[c] for c in on_victim)
        )

    try:
        # Mid-stream: both nodes have committed sends of each of their conversations.
        await eventually(lambda: all(acked(conv) >= 6 for conv in convs), lambda: str({c: acked(c) for c in convs}))
        # Freeze the victim first, so that sends are surely pending on the links when it dies.
        freeze(cluster, victim)
        try:
            await eventually(ready_to_kill, "sends pending on the frozen transfer node", 15)
            pending = [dict(unanswered(c, sent)) for c, sent in zip(raw, raw_sent, strict=True)]
            killed_at = time.monotonic()
        finally:
            code = await asyncio.to_thread(cluster.nodes[victim].stop, signal.SIGKILL)
        assert code == -signal.SIGKILL
        fault.set()
        # Sends pending on the broken links are answered by the other node, with no error ...
        for c, waiting in zip(raw, pending, strict=True):
            await c.wait_for(lambda: not unanswered(c, waiting), timeout=10)  # noqa: B023
            taken = [x for x, at in waiting.items() if killed_at - at > 0.3]
            assert taken and all(x in c.acks for x in taken), (taken, c.errors)
            assert c.errors == [], c.errors
        # ... and the gateways (and the API) unlink the node once its lease expired.
        for node in ("gw-1", "gw-2", "api-1"):
            await wait_log(cluster, node, f"transfer node {victim} left the registry", offsets[node])
        await asyncio.gather(*pumps)
    finally:
        for p in pumps:
            p.cancel()
    for c, peer, sent in zip(raw, (r1, r0), raw_sent, strict=True):
        await raw_resend(c, peer.uid, sent, rounds=20, timeout=30.0, pause=0.2)
    # Every acked send resent: answered with its original (the survivor finds the victim's commits in
    # the store: cross-node dedupe), never stored again.
    for c, peer in zip(raw, (r1, r0), strict=True):
        pairs = await resend_acked(c, peer.uid)
        assert any(committed_by(first) == node_id_of(cluster, victim) for first, _ in pairs)
        for first, again in pairs:
            assert (again["seq"], again["mid"], again["dup"]) == (first["seq"], first["mid"], True), (first, again)
    logs = await check_delivery(cluster, chat.apps, chat.members, ordered=True)
    logs[raw_conv] = await read_log(cluster, r0, raw_conv)
    seqs = [e["seq"] for e in logs[raw_conv]]
    assert seqs == list(range(1, len(seqs) + 1)), seqs
    keys = [(e["from"], e["dev"], e["cmid"]) for e in logs[raw_conv]]
    raw_keys = [(r0.uid, "raw0", x) for x in raw_sent[0]] + [(r1.uid, "raw1", x) for x in raw_sent[1]]
    assert sorted(keys) == sorted(raw_keys), "the raw clients' sends are not stored once each"

    # The victim committed some of its conversations' messages before the crash, the survivor the rest.
    for conv in on_victim | {raw_conv}:
        by = Counter(committed_by(e) for e in logs[conv] if e["type"] != "system")
        assert by[node_id_of(cluster, victim)] > 0 and by[node_id_of(cluster, survivor)] > 0, (conv, by)
    acks_before = sum(a.acked() for a in chat.apps)

    # Restarted, the node registers again and both gateways link to it...
    offsets = {name: len(node.log()) for name, node in cluster.nodes.items()}
    await asyncio.to_thread(cluster.nodes[victim].start)
    for gw in ("gw-1", "gw-2"):
        await wait_log(cluster, gw, f"linked to transfer node {victim} at", offsets[gw])
        await wait_log(cluster, victim, f"gateway {gw} linked", offsets[victim])
    # ... and its conversations go through it again.
    go = asyncio.Event()
    go.set()
    await asyncio.gather(*(pump(a, t, go, 10, 10_000) for a, t in zip(chat.apps, chat.targets, strict=True)))
    logs = await check_delivery(cluster, chat.apps, chat.members, ordered=False)
    assert sum(a.acked() for a in chat.apps) == acks_before + 10 * len(chat.apps)
    for conv, log in logs.items():
        late = [e for e in log if e["type"] != "system" and int(e["cmid"].rsplit("-", 1)[1]) >= 10_000]
        assert late, conv
        want = node_id_of(cluster, transfer_for(conv))
        assert all(committed_by(e) == want for e in late), (conv, Counter(committed_by(e) for e in late))
        for a in chat.members[conv]:  # with no fault, each sender's messages are stored in the order sent
            mine = [e["cmid"] for e in late if e["from"] == a.uid]
            posted = [x for x, (c, _) in a.planned.items() if c == conv and int(x.rsplit("-", 1)[1]) >= 10_000]
            assert mine == posted, (a.name, conv, mine, posted)
    # The gateways stayed up: no client was disconnected.
    assert all(a.c.connections == 1 and not a.of(Disconnected) for a in chat.apps)
