"""SDK clients (``im.client.Client``) that record what their application sees, the pumps that make them
post, and the checks of what they saw against the stored log: what the tests of faults over a real
cluster share (tests/cluster/test_cluster_faults.py, tests/faults/).

An :class:`App` is one logged-in SDK client with every event its application got, in order, and every post
it made (``planned``: cmid -> (conv, body), in post order). :func:`check_delivery` checks a chat of apps
against the log read over HTTP: every post acked once and stored once, dense seqs, every member saw every
conversation whole and in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import httpx
import pytest
import websockets

from im.client import (
    Ack,
    Client,
    ClientEvent,
    Encoding,
    Gateway,
    Message,
    SendFailed,
    TcpTransport,
    Transport,
    WebSocketTransport,
)
from im.cluster import LocalCluster
from im.model.ids import direct_conv
from tests.support.client import Account, ChatClient
from tests.support.wait import eventually

PASSWORD = "correct horse battery"  # tests.support.client.register's default
PACE = 0.01  # seconds between two posts of one client: a fault must land mid-stream
AFTER_FAULT = 40  # posts each client makes after the fault

Target = tuple[str, dict[str, Any]]  # (conv, the send's addressing: {"conv": ...} or {"to": uid})


class HasApi(Protocol):
    """A server or cluster: the base URL of its HTTP API (``.../api/v1``)."""

    @property
    def api(self) -> str: ...


def _ports(cluster: LocalCluster) -> dict[int, str]:
    return {port: name for name, node in cluster.nodes.items() for port in node.ports.values()}


def node_of(cluster: LocalCluster, url: str) -> str:
    """The cluster node listening at a ws:// or tcp:// URL."""
    port = int(url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
    return _ports(cluster)[port]


@dataclass
class App:
    """One SDK client and everything its application got, in order (``on_event``)."""

    name: str
    account: Account
    device: str
    events: list[ClientEvent] = field(default_factory=list)
    planned: dict[str, tuple[str, str]] = field(default_factory=dict)  # cmid -> (conv, body), in post order
    dialled: list[str] = field(default_factory=list)  # the gateway node of every connection attempt
    client: Client | None = None

    @property
    def c(self) -> Client:
        assert self.client is not None
        return self.client

    @property
    def uid(self) -> int:
        return self.account.uid

    def of(self, kind: type[Any]) -> list[Any]:
        return [e for e in self.events if type(e) is kind]

    @property
    def acks(self) -> list[Ack]:
        return self.of(Ack)

    def acked(self, convs: set[str] | None = None) -> int:
        return sum(1 for a in self.acks if convs is None or a.conv in convs)


async def start_app(
    cluster: LocalCluster,
    account: Account,
    device: str,
    *,
    transport: Literal["ws", "tcp"],
    first_on: str,
    encoding: Encoding = Encoding.JSON,
    route: Callable[[str], str] | None = None,
    connect_timeout: float = 20.0,
) -> App:
    """A logged-in SDK client. Its first connection goes to gateway ``first_on`` (so the test knows who is
    where); every later one to the gateway ``GET /api/v1/gateway`` hands out, as the SDK does by itself.
    ``route``: the URL each connection really dials, given the gateway's (e.g. a fault proxy in front of
    it); directly when None."""
    app = App(account.username, account, device)
    ports = cluster.nodes[first_on].ports
    pinned = f"tcp://127.0.0.1:{ports['tcp']}" if transport == "tcp" else f"ws://127.0.0.1:{ports['ws']}/ws"

    def factory(gw: Gateway) -> Transport:
        later = (gw.tcp or "") if transport == "tcp" else gw.ws
        url = later if app.dialled else pinned
        app.dialled.append(node_of(cluster, url))
        dial = url if route is None else route(url)
        if transport == "tcp":
            return TcpTransport(dial, encoding=encoding)
        return WebSocketTransport(dial, encoding=encoding)

    app.client = await Client.login(
        cluster.api.removesuffix("/api/v1"),
        account.username,
        PASSWORD,
        device=device,
        transport=transport,
        encoding=encoding,
        backoff_max=0.5,
        on_event=app.events.append,
        transport_factory=factory,
        connect_timeout=connect_timeout,
    )
    return app


@pytest.fixture
async def apps() -> AsyncIterator[list[App]]:
    """The SDK clients a test starts (append them); closed at the end. Request it after the cluster's
    fixture, so that they are closed before the cluster stops."""
    out: list[App] = []
    yield out
    for app in out:
        if app.client is not None:
            with contextlib.suppress(Exception):
                await app.client.close()


def pairs_and_group(
    users: list[Account], group: str, started: list[App]
) -> tuple[list[list[Target]], dict[str, list[App]]]:
    """The targets (per app) and members (conv -> apps) of a chat where user ``i`` (app ``started[i]``)
    posts in turn to ``group`` and to its direct conversation with user ``i ^ 1``."""
    targets: list[list[Target]] = []
    members: dict[str, list[App]] = {group: list(started)}
    for i, u in enumerate(users):
        peer = users[i ^ 1]
        dm = direct_conv(u.uid, peer.uid)
        targets.append([(group, {"conv": group}), (dm, {"to": peer.uid})])
        members.setdefault(dm, []).append(started[i])
    return targets, members


async def pump(
    app: App, targets: list[Target], fault: asyncio.Event, after: int = AFTER_FAULT, start: int = 0, pace: float = PACE
) -> None:
    """Post to the targets in turn, never waiting for an ack, until ``after`` posts were made once
    ``fault`` is set. Posts made while disconnected wait in the outbox."""
    k, posted_after = start, 0
    while posted_after < after:
        conv, address = targets[k % len(targets)]
        cmid, body = f"{app.name}-{k}", f"{app.name} #{k}"
        app.planned[cmid] = (conv, body)
        app.c.post(body, cmid=cmid, **address)
        k += 1
        if fault.is_set():
            posted_after += 1
        await asyncio.sleep(pace)
        assert k - start < 2000, f"{app.name}: the fault never came"


async def post_until(app: App, targets: list[Target], stop: asyncio.Event, pace: float) -> None:
    """Post to the targets in turn every ``pace`` seconds, never waiting for an ack, until ``stop``."""
    k = 0
    while not stop.is_set():
        conv, address = targets[k % len(targets)]
        cmid, body = f"{app.name}-{k}", f"{app.name} #{k}"
        app.planned[cmid] = (conv, body)
        app.c.post(body, cmid=cmid, **address)
        k += 1
        await asyncio.sleep(pace)


# --- raw protocol clients (tests.support.client.ChatClient) -------------------------------------------


def unanswered(c: ChatClient, sent: dict[str, float]) -> dict[str, float]:
    """The sends of ``sent`` (cmid -> when written) neither acked nor refused yet."""
    refused = {e.get("ref") for e in c.errors}
    return {cmid: at for cmid, at in sent.items() if cmid not in c.acks and cmid not in refused}


async def raw_resend(
    c: ChatClient, to: int, sent: dict[str, float], *, rounds: int, timeout: float, pause: float
) -> int:
    """Every send answered on the open connection (no silent drop: each round waits at most ``timeout``);
    the refused ones (``unavailable`` only) resent with their cmid, after ``pause`` (a client's back-off),
    until acked, in at most ``rounds`` rounds. Returns how many refusals there were."""
    refusals = 0
    for _ in range(rounds):
        await c.wait_for(lambda: not unanswered(c, sent), timeout=timeout)
        assert {e["code"] for e in c.errors} <= {"unavailable"}, c.errors[:5]
        refusals += len(c.errors)
        todo = [x for x in sent if x not in c.acks]
        if not todo:
            return refusals
        await asyncio.sleep(pause)
        c.errors.clear()
        for cmid in todo:
            await c.send(cmid, to=to, cmid=cmid, wait=False)
    raise AssertionError(f"{c.device}: sends still unacked after {rounds} rounds")


#: The refusals a raw client may see while an engine or a node is away: ``unavailable`` (the store, or a
#: send behind a refused one: docs/protocol.md section 8), and ``rate_limited`` once its resends of those
#: pass its own send rate. Both are explicit and retryable; anything else (``invalid``: dropped) fails.
RETRYABLE = {"unavailable", "rate_limited"}


class RawDevice:
    """A raw protocol client (recorded by the history checker) that streams sends without waiting and, like
    any client, reconnects (stating its cursors) when the server closes its connection. ``sent``: cmid ->
    (when it was written, on which connection)."""

    def __init__(self, c: ChatClient, to: int, pace: float = 0.02) -> None:
        self.c, self.to, self.pace = c, to, pace
        self.sent: dict[str, tuple[float, int]] = {}
        self.connection = 0  # how many connections were opened after the first
        self.refused_auth: Counter[str] = Counter()  # connections answered with a bye instead of auth_ok
        self.resent: Counter[str] = Counter()  # cmid -> the refusals of it stream() has resent it after

    @property
    def open(self) -> bool:
        return self.c._reader is not None and not self.c._reader.done()

    async def reconnect(self) -> None:
        while True:
            if self.c.ws is not None:
                with contextlib.suppress(Exception):
                    await self.c.ws.close()
            first = await self.c.connect()  # an answer within 10 s (ChatClient.connect): never silence
            if first["t"] == "auth_ok":
                self.connection += 1
                return
            # Refused: bye unavailable, or first an error unavailable saying when to come back (a login
            # the gateway will not start now, a TCP connection over a cap: docs/protocol.md section 3).
            assert first["t"] in ("bye", "error") and first["code"] == "unavailable", first
            self.refused_auth[first["code"]] += 1
            await asyncio.sleep(max(0.3, first.get("retry_after") or 0.0))

    async def stream(self, stop: asyncio.Event) -> None:
        k = 0
        while not stop.is_set():
            reconnected = not self.open
            if reconnected:
                await self.reconnect()
            refusals = Counter(str(e.get("ref")) for e in self.c.errors)
            # Refused sends first, in order (a later one waits for them: section 8); after a reconnect every
            # send not acked, as a resend written on the closed connection may never have arrived.
            unacked = [x for x in self.sent if x not in self.c.acks]
            for x in unacked if reconnected else [x for x in unacked if refusals[x] > self.resent[x]]:
                self.resent[x] = refusals[x]
                with contextlib.suppress(websockets.ConnectionClosed, OSError):
                    await self.c.send(x, to=self.to, cmid=x, wait=False)
            cmid = f"{self.c.device}-{k}"
            self.sent[cmid] = (time.monotonic(), self.connection)
            with contextlib.suppress(websockets.ConnectionClosed, OSError):  # closed: reconnect, resend later
                await self.c.send(cmid, to=self.to, cmid=cmid, wait=False)
            k += 1
            await asyncio.sleep(self.pace)

    def answered(self) -> set[str]:
        return set(self.c.acks) | {str(e.get("ref")) for e in self.c.errors}

    def silent(self, older_than: float) -> set[str]:
        """Sends written on the connection still open, before ``older_than``, with no answer at all."""
        if not self.open:
            return set()
        return {
            x for x, (at, conn) in self.sent.items() if conn == self.connection and at < older_than
        } - self.answered()

    async def resend_until_acked(self, timeout: float = 30.0) -> int:
        """Resend (same cmid) every send not acked until all are; returns how many rounds it took. The only
        refusals accepted are the retryable ones of :data:`RETRYABLE`."""
        deadline = time.monotonic() + timeout
        rounds = 0
        while True:
            if not self.open:
                await self.reconnect()
            todo = [x for x in self.sent if x not in self.c.acks]
            if not todo:
                return rounds
            assert time.monotonic() < deadline, f"{self.c.device}: {len(todo)} sends still unacked"
            assert {e["code"] for e in self.c.errors} <= RETRYABLE, self.c.errors
            rounds += 1
            self.c.errors.clear()
            with contextlib.suppress(websockets.ConnectionClosed, OSError):
                for cmid in todo:
                    await self.c.send(cmid, to=self.to, cmid=cmid, wait=False)
            with contextlib.suppress(TimeoutError):
                await self.c.wait_for(lambda t=set(todo): t <= self.answered() or not self.open, timeout=10)  # type: ignore[misc]
            await asyncio.sleep(0.2)


async def fetch_counts(c: LocalCluster, node: str) -> dict[str, float]:
    """A gateway's catch-up fetches (after a relink) and gap fetches (a live message ahead of the device)."""
    async with httpx.AsyncClient(timeout=10) as http:
        text = (await http.get(c.metrics_urls()[node])).text
    return {
        kind: sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(f"im_{kind}_fetches_total"))
        for kind in ("catch_up", "gap")
    }


# --- the stored log and the checks --------------------------------------------------------------------


async def read_log(server: HasApi, reader: Account, conv: str) -> list[dict[str, Any]]:
    """The whole stored log of ``conv`` through the HTTP history endpoint."""
    out: list[dict[str, Any]] = []
    async with httpx.AsyncClient(timeout=20) as http:
        while True:
            r = await http.get(
                f"{server.api}/conversations/{conv}/messages",
                params={"after": out[-1]["seq"] if out else 0, "limit": 200},
                headers=reader.auth,
            )
            assert r.status_code == 200, r.text
            page = r.json()
            out.extend(page["messages"])
            if not page["has_more"] or not page["messages"]:
                return out


def committed_by(entry: dict[str, Any]) -> int:
    """The node field of a stored message's id: which node committed it."""
    return (int(entry["mid"]) >> 12) & 0x3FF


async def check_delivery(
    cluster: LocalCluster,
    apps: list[App],
    members: dict[str, list[App]],
    *,
    ordered: bool,
    timeout: float = 45.0,
) -> dict[str, list[dict[str, Any]]]:
    """Every post of every app acked once and stored once; every member app saw every conversation whole.

    ``members``: conv -> the apps in it. ``ordered``: also check that each sender's messages are stored
    in the order it posted them. Returns the logs."""
    await eventually(
        lambda: all(not a.c.outbox for a in apps),
        lambda: "unacked sends: " + ", ".join(f"{a.name}={len(a.c.outbox)}" for a in apps if a.c.outbox),
        timeout,
    )
    for a in apps:
        assert a.c.error is None, f"{a.name} stopped: {a.c.error!r}"
        assert not a.of(SendFailed), f"{a.name}: sends refused for good: {a.of(SendFailed)[:5]}"
        counts = Counter(ack.cmid for ack in a.acks)
        assert set(counts) == set(a.planned), f"{a.name}: acked {len(counts)} of {len(a.planned)} posts"
        twice = [cmid for cmid, n in counts.items() if n > 1]
        assert not twice, f"{a.name}: acked more than once to the application: {twice[:10]}"

    logs: dict[str, list[dict[str, Any]]] = {}
    for conv, conv_apps in members.items():
        log = logs[conv] = await read_log(cluster, conv_apps[0].account, conv)
        seqs = [e["seq"] for e in log]
        assert seqs == list(range(1, len(log) + 1)), f"{conv}: seqs are not dense: {seqs}"
        keys = [(e["from"], e["dev"], e["cmid"]) for e in log]
        assert len(keys) == len(set(keys)), f"{conv}: a (sender, device, cmid) is stored twice: " + str(
            [k for k, n in Counter(keys).items() if n > 1][:10]
        )
        stored = {k for k, e in zip(keys, log, strict=True) if e["type"] != "system"}
        sent = {(a.uid, a.device, cmid) for a in apps for cmid, (c, _) in a.planned.items() if c == conv}
        assert stored == sent, f"{conv}: lost {sorted(sent - stored)[:10]}, unexpected {sorted(stored - sent)[:10]}"
        for a in apps:
            mine = [e for e in log if e["from"] == a.uid and e["dev"] == a.device]
            assert all(e["body"] == a.planned[e["cmid"]][1] for e in mine), f"{conv}: {a.name}'s bodies differ"
            if ordered:
                posted = [cmid for cmid, (c, _) in a.planned.items() if c == conv]
                assert [e["cmid"] for e in mine] == posted, f"{conv}: {a.name}'s messages stored out of order"

    for a in apps:  # every ack names its stored entry
        for ack in a.acks:
            e = logs[ack.conv][ack.seq - 1]
            assert (e["cmid"], e["from"], e["dev"], e["mid"]) == (ack.cmid, a.uid, a.device, ack.mid), (a.name, ack, e)

    for conv, conv_apps in members.items():  # every member's application saw the whole log, in order
        n = len(logs[conv])
        for a in conv_apps:
            await eventually(
                lambda: a.c.cursors.get(conv, 0) >= n,  # noqa: B023 (awaited here, in the loop)
                lambda: f"{a.name} holds {conv} up to {a.c.cursors.get(conv, 0)} of {n}",  # noqa: B023
                timeout,
            )
            stream: list[int] = []
            for ev in a.events:
                if type(ev) is Message and ev.conv == conv:
                    e = logs[conv][ev.seq - 1]
                    assert (ev.mid, ev.sender, ev.dev, ev.cmid, ev.body) == (
                        e["mid"],
                        e["from"],
                        e["dev"],
                        e["cmid"],
                        e["body"],
                    ), f"{a.name}: {conv} seq {ev.seq} seen as {ev}, stored as {e}"
                    stream.append(ev.seq)
                elif type(ev) is Ack and ev.conv == conv:
                    if ev.dup:  # already in this device's stream
                        assert stream and ev.seq <= stream[-1], f"{a.name}: dup ack {ev} ahead of {stream[-3:]}"
                    else:
                        stream.append(ev.seq)
            assert stream == list(range(1, n + 1)), f"{a.name} saw {conv} as {_runs(stream)}, the log has 1..{n}"
    return logs


def _runs(seqs: list[int]) -> str:
    """1,2,3,5,5,6 -> '1-3 5 5-6': a readable stream in failure messages."""
    parts: list[str] = []
    i = 0
    while i < len(seqs):
        j = i
        while j + 1 < len(seqs) and seqs[j + 1] == seqs[j] + 1:
            j += 1
        parts.append(str(seqs[i]) if i == j else f"{seqs[i]}-{seqs[j]}")
        i = j + 1
    return " ".join(parts)


async def create_group(cluster: HasApi, owner: Account, others: list[Account]) -> str:
    async with httpx.AsyncClient(timeout=20) as http:
        r = await http.post(
            f"{cluster.api}/groups", json={"name": "faults", "members": [u.uid for u in others]}, headers=owner.auth
        )
    assert r.status_code == 201, r.text
    return str(r.json()["conv"])
