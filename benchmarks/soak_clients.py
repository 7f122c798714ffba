"""One client process of the soak (benchmarks/soak.py): light devices that hold connections for the whole
run, churn, send at a steady rate, and check every frame they receive.

Each device is one user's only device, in a direct conversation with the other device of its pair (both
devices of a pair live in the same process). A device is a :class:`~im.client.ClientSession` (cursors,
outbox, in-flight window) over a :class:`~im.client.Transport`, driven by one task that connects, reads
until the connection ends, and connects again:

- after a churn (the process aborts the connection itself): at once, to the gateway the API hands out;
- after anything else (a gateway killed, a refused connect): with jittered exponential back-off (a random
  50-100 % of ``min(10 s, 0.25 s * 2**n)``), asking the API for a live gateway each time.

Every connection authenticates with the session's cursors, so the server resumes each conversation after
the last seq the device holds, and the outbox is written again with its original cmids.

Checking, on the raw frames before the session filters anything (:class:`im.bench.anomalies.AnomalyCounter`,
the bench's checker): the seqs of each device's ``msg`` frames and non-``dup`` acks must run 1, 2, 3, ...
per conversation across every reconnect (a repeat is a duplicate, a skip a gap, a late fill out of
order); one cmid must always get the same seq; and at the end every acked send must have reached the
peer. After the drain the process reads each conversation's stored log through the API and checks it
against what its devices saw (:func:`check_logs`): seqs 1..N, one entry per cmid, every ack naming its
entry, every delivered seq the stored message, and both devices holding all N.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import traceback
from dataclasses import dataclass
from typing import Any

import httpx
import msgspec

from im.bench.anomalies import AnomalyCounter
from im.bench.server import raise_nofile, rss_bytes
from im.client import ClientSession, Encoding, SendFailed, TcpTransport, Transport, WebSocketTransport
from im.protocol.frames import Ack, AuthOk, Bye, Error, Msg, ServerFrame, Synced

BACKOFF_BASE = 0.25
BACKOFF_MAX = 10.0
#: Seconds a connection may take from connect to ``synced`` before it is dropped and tried again.
SYNC_TIMEOUT = 30.0


@dataclass(frozen=True)
class SoakUser:
    uid: int
    name: str
    token: str


@dataclass(frozen=True)
class ClientConfig:
    index: int
    api: str  # http root of the API
    password: str
    pairs: list[tuple[SoakUser, SoakUser]]
    rate: float  # messages/s this process sends
    churn_every: float
    churn_fraction: float
    transport: str  # ws | tcp | mixed
    body_size: int
    drain: float


class _Dev:
    __slots__ = (
        "attempt",
        "churned",
        "conv",
        "down_since",
        "key",
        "kind",
        "peer",
        "session",
        "synced",
        "transport",
        "user",
    )

    def __init__(self, key: int, user: SoakUser, peer: int, conv: str, kind: str) -> None:
        self.key = key
        self.user = user
        self.peer = peer
        self.conv = conv
        self.kind = kind
        self.session = ClientSession(f"soak-{key}", encoding=Encoding.JSON, cmid_prefix=f"k{key}")
        self.transport: Transport | None = None
        self.synced = False
        self.churned = False
        self.attempt = 0
        self.down_since = 0.0  # when a connection the device did not close itself ended (0: up or churned)


class SoakClients:
    def __init__(self, cfg: ClientConfig, out: Any) -> None:
        from im.model.ids import direct_conv

        self.cfg = cfg
        self.out = out
        self.decode = msgspec.json.Decoder(ServerFrame).decode
        self.tracker = AnomalyCounter()
        self.devs: list[_Dev] = []
        for i, (a, b) in enumerate(cfg.pairs):
            conv = direct_conv(a.uid, b.uid)
            for j, (user, peer) in enumerate(((a, b), (b, a))):
                kind = cfg.transport if cfg.transport != "mixed" else ("ws", "tcp")[(i + j) % 2]
                dev = _Dev(len(self.devs), user, peer.uid, conv, kind)
                self.devs.append(dev)
                self.tracker.member(conv, dev.key)
        self.body = "x" * cfg.body_size
        self.sending = False  # from when every device is connected until the parent ends the load
        self.stopping = False
        #: Seconds from a connection lost to a fault (not a churn) to the next one synced, per outage.
        self.outages: list[float] = []
        self.stopping_churn = False
        self.cmid_seq: dict[str, int] = {}  # cmid -> the seq it was first seen with (ack or msg)
        self.seen: dict[tuple[str, int], str] = {}  # (conv, seq) -> cmid delivered or acked
        self.acked_cmids: set[str] = set()
        self.problems: list[str] = []
        self.n = dict.fromkeys(
            (
                "sent",
                "acked",
                "delivered",
                "churned",
                "reconnects",
                "connect_failures",
                "retried",
                "refused",
                "errors",
                "byes",
                "mismatched",
            ),
            0,
        )
        self.http: httpx.AsyncClient | None = None

    def problem(self, text: str) -> None:
        if len(self.problems) < 30:
            self.problems.append(text)

    # --- connections --------------------------------------------------------------------------------

    async def _gateway(self, dev: _Dev) -> tuple[str, str | None]:
        assert self.http is not None
        r = await self.http.get(f"{self.cfg.api}/api/v1/gateway", headers={"Authorization": f"Bearer {dev.user.token}"})
        if r.status_code == 401:
            await self._relogin(dev)
            raise ConnectionError("token refused by the API: logged in again")
        if r.status_code != 200:
            raise ConnectionError(f"GET /gateway: {r.status_code} {r.text[:200]}")
        body = r.json()
        return body["ws"], body.get("tcp")

    async def _relogin(self, dev: _Dev) -> None:
        """The access token expired (a run longer than ``auth.access_ttl``): log in again."""
        assert self.http is not None
        r = await self.http.post(
            f"{self.cfg.api}/api/v1/auth/login", json={"username": dev.user.name, "password": self.cfg.password}
        )
        if r.status_code == 200:
            token = r.json()["access_token"]
            for d in self.devs:
                if d.user.uid == dev.user.uid:
                    d.user = SoakUser(dev.user.uid, dev.user.name, token)

    async def _device(self, dev: _Dev, sem: asyncio.Semaphore) -> None:
        """Connect, read until the connection ends, connect again; until the run stops."""
        while not self.stopping:
            if dev.attempt:
                delay = min(BACKOFF_MAX, BACKOFF_BASE * 2 ** min(dev.attempt - 1, 10))
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            try:
                async with sem:
                    ws, tcp = await self._gateway(dev)
                    if dev.kind == "tcp" and tcp:
                        t: Transport = TcpTransport(tcp, encoding=Encoding.JSON, connect_timeout=20)
                    else:
                        t = WebSocketTransport(ws, encoding=Encoding.JSON, connect_timeout=20)
                    await t.connect()
            except (OSError, TimeoutError, ConnectionError, httpx.HTTPError) as exc:
                self.n["connect_failures"] += 1
                dev.attempt += 1
                if dev.attempt == 8:
                    self.problem(f"device {dev.key}: 8 connects in a row failed, last: {type(exc).__name__}: {exc}")
                continue
            dev.transport = t
            dev.churned = False
            t.send(dev.session.connect(dev.user.token))
            deadline = asyncio.get_running_loop().call_later(SYNC_TIMEOUT, self._sync_timeout, dev, t)
            try:
                await self._read(dev, t)
            finally:
                deadline.cancel()
                dev.transport = None
                dev.synced = False
                dev.session.connection_lost()
                t.abort()
            if self.stopping:
                return
            if dev.churned:
                dev.attempt = 0
            else:
                self.n["reconnects"] += 1
                dev.attempt += 1
                if self.sending and not dev.down_since:
                    dev.down_since = time.monotonic()

    def _sync_timeout(self, dev: _Dev, t: Transport) -> None:
        if dev.transport is t and not dev.synced:
            self.problem(f"device {dev.key}: not synced {SYNC_TIMEOUT:.0f} s after connecting: dropped")
            t.abort()

    async def _read(self, dev: _Dev, t: Transport) -> None:
        session, decode, tracker = dev.session, self.decode, self.tracker
        while (data := await t.recv()) is not None:
            try:
                frame = decode(data)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
            kind = type(frame)
            if kind is Msg:
                assert isinstance(frame, Msg)
                if tracker.seq(dev.key, frame.conv, frame.seq):
                    self._seen(frame.conv, frame.seq, frame.cmid)
                    session.receive_frame(frame)
                    session.handled(frame.conv, frame.seq)
                    self.n["delivered"] += 1
            elif kind is Ack:
                assert isinstance(frame, Ack)
                if not frame.dup:
                    tracker.seq(dev.key, frame.conv, frame.seq)
                self._seen(frame.conv, frame.seq, frame.cmid)
                session.receive_frame(frame)
                if frame.cmid not in self.acked_cmids:
                    self.acked_cmids.add(frame.cmid)
                    tracker.acked(frame.conv, frame.seq, dev.key)
                    self.n["acked"] += 1
            else:
                event = session.receive_frame(frame)
                if kind is Synced:
                    dev.synced = True
                    dev.attempt = 0
                    if dev.down_since:
                        self.outages.append(time.monotonic() - dev.down_since)
                        dev.down_since = 0.0
                elif kind is AuthOk:
                    pass
                elif kind is Error:
                    assert isinstance(frame, Error)
                    if isinstance(event, SendFailed):
                        self.n["refused"] += 1
                        self.problem(f"device {dev.key}: send refused for good: {event.code}: {event.message}")
                    elif event is None:
                        self.n["retried"] += 1
                    else:
                        self.n["errors"] += 1
                        if frame.code == "unauthenticated":
                            await self._relogin(dev)
                        self.problem(f"device {dev.key}: error {frame.code}: {frame.message}")
                elif kind is Bye:
                    assert isinstance(frame, Bye)
                    self.n["byes"] += 1
            if session.has_data_to_send:
                with contextlib.suppress(ConnectionError):
                    t.send_many(session.data_to_send())

    def _seen(self, conv: str, seq: int, cmid: str) -> None:
        first = self.cmid_seq.setdefault(cmid, seq)
        other = self.seen.setdefault((conv, seq), cmid)
        if first != seq or other != cmid:
            self.n["mismatched"] += 1
            self.problem(f"{conv}: cmid {cmid} seen as seq {seq} and {first}; seq {seq} held {other}")

    # --- load, churn, keepalive ---------------------------------------------------------------------

    async def _sender(self) -> None:
        credit, last, tick = 0.0, time.monotonic(), 0
        while not self.stopping:
            await asyncio.sleep(0.05)
            now = time.monotonic()
            tick += 1
            if self.sending:
                credit += (now - last) * self.cfg.rate
                for _ in range(int(credit)):
                    dev = random.choice(self.devs)
                    dev.session.send(self.body, to=dev.peer)
                    self.n["sent"] += 1
                    self._flush(dev)
                credit -= int(credit)
            last = now
            if tick % 20 == 0:  # every second: delivery reports, retries after a refusal
                for dev in self.devs:
                    if dev.session.wants_retry:
                        dev.session.retry()
                    dev.session.flush_recv()
                    self._flush(dev)

    def _flush(self, dev: _Dev) -> None:
        if dev.transport is not None and dev.session.has_data_to_send:
            with contextlib.suppress(ConnectionError):
                dev.transport.send_many(dev.session.data_to_send())

    async def _keepalive(self) -> None:
        while not self.stopping:
            await asyncio.sleep(15)
            for dev in self.devs:
                if dev.synced:
                    dev.session.ping()
                    self._flush(dev)

    async def _churn(self) -> None:
        while not self.stopping:
            await asyncio.sleep(self.cfg.churn_every)
            if not self.sending or self.stopping_churn:
                continue
            held = [d for d in self.devs if d.synced and d.transport is not None]
            for dev in random.sample(held, int(len(held) * self.cfg.churn_fraction)):
                dev.churned = True
                self.n["churned"] += 1
                assert dev.transport is not None
                dev.transport.abort()

    # --- the run ------------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return {
            **self.n,
            "held": sum(1 for d in self.devs if d.synced),
            "outbox": sum(len(d.session.outbox) for d in self.devs),
            "duplicated": self.tracker.duplicated,
            "out_of_order": self.tracker.out_of_order,
            "rss": rss_bytes_self(),
        }

    def _caught_up(self) -> bool:
        """Nothing left in any outbox, and both devices of every pair hold the same last seq."""
        if any(d.session.outbox for d in self.devs):
            return False
        last: dict[str, set[int]] = {}
        for d in self.devs:
            last.setdefault(d.conv, set()).add(d.session.cursors.get(d.conv, 0))
        return all(len(v) == 1 for v in last.values())

    async def run(self, control: Any) -> None:
        raise_nofile()
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(timeout=20, limits=limits) as http:
            self.http = http
            sem = asyncio.Semaphore(64)
            tasks = [asyncio.create_task(self._device(d, sem)) for d in self.devs]
            background = [asyncio.create_task(c) for c in (self._sender(), self._keepalive(), self._churn())]
            t0 = time.monotonic()
            while sum(1 for d in self.devs if d.synced) < len(self.devs) and time.monotonic() - t0 < 300:
                await asyncio.sleep(0.2)
            self.out.put(("ready", self.cfg.index, {"held": sum(1 for d in self.devs if d.synced)}))
            self.sending = True
            while not control.is_set():  # the parent sets it when the load is over
                await asyncio.sleep(1.0)
                self.out.put(("stats", self.cfg.index, self.stats()))
            self.sending = False
            self.stopping_churn = True
            deadline = time.monotonic() + self.cfg.drain
            while time.monotonic() < deadline and not self._caught_up():
                await asyncio.sleep(0.5)
                self.out.put(("stats", self.cfg.index, self.stats()))
            drained = self._caught_up()
            self.stopping = True
            for d in self.devs:
                if d.transport is not None:
                    d.transport.abort()
            for t in (*tasks, *background):
                t.cancel()
            await asyncio.gather(*tasks, *background, return_exceptions=True)
            anomalies = self.tracker.finish()
            log_problems, stored = await check_logs(self, http)
        result = {
            **self.stats(),
            "drained": drained,
            "unacked": sum(len(d.session.outbox) for d in self.devs),
            "lost": anomalies.lost,
            "duplicated": anomalies.duplicated,
            "out_of_order": anomalies.out_of_order,
            "examples": anomalies.examples,
            "log_problems": log_problems,
            "stored": stored,
            "problems": self.problems,
            "outages": self.outages,
        }
        self.out.put(("result", self.cfg.index, result))


def rss_bytes_self() -> int:
    import os

    return rss_bytes(os.getpid())


async def check_logs(c: SoakClients, http: httpx.AsyncClient) -> tuple[list[str], int]:
    """Read every conversation's stored log through the API and check it against what the devices saw.
    Returns (problems, messages stored)."""
    problems: list[str] = []
    stored = 0
    by_conv: dict[str, list[_Dev]] = {}
    for d in c.devs:
        by_conv.setdefault(d.conv, []).append(d)
    sem = asyncio.Semaphore(16)

    async def one(conv: str, devs: list[_Dev]) -> None:
        nonlocal stored
        entries: list[dict[str, Any]] = []
        after = 0
        async with sem:
            while True:
                r = await http.get(
                    f"{c.cfg.api}/api/v1/conversations/{conv}/messages",
                    params={"after": after, "limit": 200},
                    headers={"Authorization": f"Bearer {devs[0].user.token}"},
                )
                if r.status_code != 200:
                    problems.append(f"{conv}: log unreadable: {r.status_code} {r.text[:200]}")
                    return
                page = r.json()
                entries.extend(page["messages"])
                if not page["has_more"] or not page["messages"]:
                    break
                after = page["messages"][-1]["seq"]
        stored += len(entries)
        seqs = [e["seq"] for e in entries]
        if seqs != list(range(1, len(seqs) + 1)):
            problems.append(f"C1/C3: {conv} seqs are not 1..{len(seqs)}")
        keys = [(e["from"], e["dev"], e["cmid"]) for e in entries]
        if len(keys) != len(set(keys)):
            problems.append(f"C2: {conv} stores a (sender, device, cmid) twice")
        for e in entries:
            cmid = c.seen.get((conv, e["seq"]))
            if cmid is not None and cmid != e["cmid"]:
                problems.append(f"C4/C6: {conv} seq {e['seq']} seen with cmid {cmid}, stored with {e['cmid']}")
            if e["cmid"] in c.cmid_seq and c.cmid_seq[e["cmid"]] != e["seq"]:
                problems.append(f"C4: {conv} cmid {e['cmid']} acked as {c.cmid_seq[e['cmid']]}, stored as {e['seq']}")
        n = len(entries)
        for d in devs:
            if (n and not c.tracker.received(d.key, conv, n)) or c.tracker.received(d.key, conv, n + 1):
                problems.append(f"C5: device {d.key} does not hold exactly {conv} 1..{n} (the stored log)")

    await asyncio.gather(*(one(conv, devs) for conv, devs in by_conv.items()))
    return problems[:50], stored


def clients_main(cfg: ClientConfig, control: Any, out: Any) -> None:
    """Entry point of a client process (multiprocessing, spawn)."""
    import uvloop

    try:
        uvloop.run(SoakClients(cfg, out).run(control))
    except BaseException:
        out.put(("error", cfg.index, traceback.format_exc()))
        raise SystemExit(1) from None
