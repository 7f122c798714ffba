"""One client process of ``im bench``: its share of the conversations, on the SDK's lower layers.

Each user is one device: a :class:`~im.client.ClientSession` (protocol state: outbox, cursors, in-flight
window, retries) over a :class:`~im.client.Transport` (WebSocket or TCP). The process reads every frame
itself (decoded once with msgspec, then handed to the session with ``receive_frame``) so that the
:class:`~im.bench.anomalies.AnomalyCounter` sees the raw seqs before the session filters anything.

Every conversation's members live in the same process, so a message's send time is known where it is
received: latency is receive time minus the time ``send`` was called, on the same monotonic clock.

Load:

- closed loop: every sender keeps ``window`` messages in flight; a message leaves the window when every
  other member has received it (and the sender sends the next one at once);
- fixed rate: the process sends ``rate`` messages/s round-robin over its senders, whatever the answers.

The parent sets ``times`` = (go, t0, t1) and then ``go``: sending starts at go, measurement (throughput,
latency) covers [t0, t1), sending stops at t1, and the process then waits for what is in flight to arrive
(at most ``drain`` seconds) before counting anomalies over the whole run.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import itertools
import logging
import ssl
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.sharedctypes import SynchronizedArray
from typing import Any

import msgspec

from im.bench.accounts import BenchTls, BenchUser
from im.bench.anomalies import AnomalyCounter
from im.bench.server import raise_nofile
from im.client import ClientSession, Encoding, SendFailed, TcpTransport, Transport, WebSocketTransport
from im.protocol.frames import Ack, Bye, Error, Msg, ServerFrame, Synced

__all__ = ["COUNTERS", "ConvPlan", "WorkerConfig", "worker_main"]

#: Shared counters per worker, in order: delivered, acked, sent.
COUNTERS = 3
#: Latency samples kept per worker (beyond it every other sample is dropped, evenly).
MAX_SAMPLES = 4_000_000


@dataclass(frozen=True)
class ConvPlan:
    """One conversation: its members (each with the transport it connects over) and who sends."""

    conv: str
    members: list[BenchUser]
    transports: list[str]  # "ws" | "tcp", one per member
    senders: list[int]  # indexes into members


#: Connections a client process opens at once (plaintext; over TLS the run divides the server's
#: per-address handshake cap between its processes instead).
CONNECT_CONCURRENCY = 64
#: Attempts at each connection before the run gives up (0.1 s, then twice as long, between them).
CONNECT_ATTEMPTS = 5


@dataclass(frozen=True)
class WorkerConfig:
    index: int
    ws_url: str
    tcp_url: str | None
    encoding: str  # "json" | "msgpack"
    window: int  # closed loop: messages in flight per sender (0: fixed rate)
    rate: float  # fixed rate: messages/s this process offers (0: closed loop)
    body_size: int
    drain: float
    connect_concurrency: int = CONNECT_CONCURRENCY
    tls: BenchTls = field(default_factory=BenchTls)


class _Dev:
    __slots__ = (
        "conv",
        "gateway",
        "key",
        "kind",
        "n_recipients",
        "session",
        "synced",
        "to",
        "token",
        "transport",
        "uid",
    )

    def __init__(self, key: int, user: BenchUser, kind: str, conv: str, n_recipients: int, encoding: Encoding):
        self.key = key
        self.uid = user.uid
        self.token = user.token
        self.gateway = (user.ws, user.tcp)  # handed out for this user; ("", None): the run's default
        self.kind = kind
        self.conv = conv
        #: Direct messages go by the peer's uid: the server refuses ``conv: "d:.."`` for a direct
        #: conversation that has no message yet (``not_found: no user N``), though the protocol says it
        #: creates it.
        self.to: int | None = None
        self.n_recipients = n_recipients
        self.session = ClientSession("bench", encoding=encoding, cmid_prefix="")
        self.transport: Transport | None = None
        self.synced: asyncio.Future[None] | None = None


class _Rec:
    """One message in flight: send time, recipients still to receive it, its seq once known, acked?"""

    __slots__ = ("acked", "dev", "remaining", "seq", "t")

    def __init__(self, t: float, remaining: int, dev: _Dev) -> None:
        self.t = t
        self.remaining = remaining
        self.dev = dev
        self.seq = 0
        self.acked = False


class Worker:
    def __init__(
        self,
        cfg: WorkerConfig,
        plans: list[ConvPlan],
        counters: SynchronizedArray[int] | Any,
        times: SynchronizedArray[float] | Any,
    ) -> None:
        self.cfg = cfg
        self.plans = plans
        self.counters = counters
        self.times = times
        self.encoding = Encoding.JSON if cfg.encoding == "json" else Encoding.MSGPACK
        if self.encoding is Encoding.JSON:
            self._decode: Any = msgspec.json.Decoder(ServerFrame).decode
        else:
            self._decode = msgspec.msgpack.Decoder(ServerFrame).decode
        self.body = "x" * cfg.body_size
        self._ssl: ssl.SSLContext | None = None  # built at the first wss:// or tls:// connection
        self.tracker = AnomalyCounter()
        self.devs: list[_Dev] = []
        self.senders: list[_Dev] = []
        self.recs: dict[str, _Rec] = {}
        self.counter = itertools.count(1)
        self.prefix = f"w{cfg.index}-"
        self.latencies = array.array("d")
        self.lat_stride = 1
        self.lat_skip = 0
        self.t0 = float("inf")
        self.t1 = float("inf")
        self.sending = False
        self.closing = False
        self.dirty: set[_Dev] = set()
        self.write_handle: asyncio.Handle | None = None
        self.tick_handle: asyncio.TimerHandle | None = None
        self.credit = 0.0
        self.rr = 0
        self.last_tick = 0.0
        self.ticks = 0
        # counts
        self.sent = self.delivered = self.acked = 0
        self.sent_measured = self.delivered_measured = self.acked_measured = 0
        self.failed = self.retried = self.errors = self.disconnects = 0
        self.unexpected = self.mismatched = self.dup_acks = 0
        #: retryable refusals by error code (``rate_limited``: the server's limits held the load back)
        self.retried_codes: dict[str, int] = {}
        self.problems: list[str] = []

    # --- set-up -------------------------------------------------------------------------------------

    def _build(self) -> None:
        key = 0
        for plan in self.plans:
            n = len(plan.members)
            for i, (user, kind) in enumerate(zip(plan.members, plan.transports, strict=True)):
                dev = _Dev(key, user, kind, plan.conv, n - 1, self.encoding)
                key += 1
                self.devs.append(dev)
                self.tracker.member(plan.conv, dev.key)
                if i in plan.senders:
                    self.senders.append(dev)
                    if plan.conv.startswith("d:"):
                        dev.to = next(m.uid for m in plan.members if m.uid != user.uid)

    def _transport(self, dev: _Dev) -> Transport:
        """To the gateway the server handed this user (a cluster spreads users over its gateways)."""
        ws, tcp = dev.gateway
        if dev.kind == "tcp":
            url = tcp if ws else self.cfg.tcp_url
            if url is None:
                raise RuntimeError("the server has no TCP listener")
            return TcpTransport(url, encoding=self.encoding, connect_timeout=60, ssl_context=self._context())
        return WebSocketTransport(
            ws or self.cfg.ws_url, encoding=self.encoding, connect_timeout=60, ssl_context=self._context()
        )

    def _context(self) -> ssl.SSLContext:
        """One TLS context for every connection of this process (only used for wss:// and tls://)."""
        if self._ssl is None:
            self._ssl = self.cfg.tls.context()
        return self._ssl

    async def _connect(self, dev: _Dev, sem: asyncio.Semaphore) -> None:
        async with sem:
            for attempt in range(CONNECT_ATTEMPTS):  # reset or refused: a server shedding connections
                transport = self._transport(dev)
                try:
                    await transport.connect()
                    break
                except ssl.SSLCertVerificationError:
                    raise  # not a load the server sheds: no retry
                except OSError:
                    if attempt == CONNECT_ATTEMPTS - 1:
                        raise
                    await asyncio.sleep(0.1 * 2**attempt)
            dev.transport = transport
            dev.synced = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().create_task(self._reader(dev))
            transport.send(dev.session.connect(dev.token))
            await asyncio.wait_for(asyncio.shield(dev.synced), 60)

    # --- the hot path -------------------------------------------------------------------------------

    async def _reader(self, dev: _Dev) -> None:
        assert dev.transport is not None
        recv, decode, session = dev.transport.recv, self._decode, dev.session
        on_msg, on_ack = self._on_msg, self._on_ack
        while True:
            data = await recv()
            if data is None:
                break
            try:
                frame = decode(data)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue  # a frame kind this SDK does not know: ignore (section 4)
            kind = type(frame)
            if kind is Msg:
                on_msg(dev, frame)
            elif kind is Ack:
                on_ack(dev, frame)
            else:
                self._on_other(dev, frame)
            if session.has_data_to_send:
                self._want_write(dev)
        if not self.closing:
            self.disconnects += 1
            self._problem(f"device {dev.uid} ({dev.kind}): connection closed during the run")
        if dev.synced is not None and not dev.synced.done():
            dev.synced.set_exception(ConnectionError(f"device {dev.uid}: connection closed before synced"))

    def _on_msg(self, dev: _Dev, m: Msg) -> None:
        if not self.tracker.seq(dev.key, m.conv, m.seq):
            return  # a duplicate: counted, not handed on
        session = dev.session
        session.receive_frame(m)
        session.handled(m.conv, m.seq)
        if m.type == "system":
            return
        rec = self.recs.get(m.cmid)
        if rec is None:
            self.unexpected += 1
            self._problem(f"device {dev.uid} got {m.conv} seq {m.seq} cmid {m.cmid} that is not in flight")
            return
        if rec.seq == 0:
            rec.seq = m.seq
        elif rec.seq != m.seq:
            self.mismatched += 1
            self._problem(f"{m.conv}: cmid {m.cmid} seen as seq {rec.seq} and as seq {m.seq}")
        now = time.monotonic()
        self.delivered += 1
        if self.t0 <= now < self.t1:
            self.delivered_measured += 1
            self.lat_skip += 1
            if self.lat_skip >= self.lat_stride:
                self.lat_skip = 0
                self.latencies.append(now - rec.t)
                if len(self.latencies) >= MAX_SAMPLES:
                    self.latencies = self.latencies[::2]
                    self.lat_stride *= 2
        rec.remaining -= 1
        if rec.remaining == 0:
            sender = rec.dev
            if rec.acked:
                del self.recs[m.cmid]
            if self.sending and self.cfg.window:
                self._send(sender)

    def _on_ack(self, dev: _Dev, a: Ack) -> None:
        if a.dup:
            self.dup_acks += 1
        else:
            self.tracker.seq(dev.key, a.conv, a.seq)
        dev.session.receive_frame(a)
        rec = self.recs.get(a.cmid)
        if rec is None or rec.acked:
            return  # an ack answered twice (a resend): the session drops it too
        rec.acked = True
        self.tracker.acked(a.conv, a.seq, dev.key)
        self.acked += 1
        if self.t0 <= time.monotonic() < self.t1:
            self.acked_measured += 1
        if rec.seq == 0:
            rec.seq = a.seq
        elif rec.seq != a.seq:
            self.mismatched += 1
            self._problem(f"{a.conv}: cmid {a.cmid} acked as seq {a.seq}, delivered as seq {rec.seq}")
        if rec.remaining == 0:
            del self.recs[a.cmid]

    def _on_other(self, dev: _Dev, frame: ServerFrame) -> None:
        event = dev.session.receive_frame(frame)
        kind = type(frame)
        if kind is Synced:
            if dev.synced is not None and not dev.synced.done():
                dev.synced.set_result(None)
        elif kind is Error:
            assert isinstance(frame, Error)
            if isinstance(event, SendFailed):
                self.failed += 1
                self._problem(f"send refused: {event.code}: {event.message}")
                self.recs.pop(event.send.cmid, None)  # not replaced: a refused send would be refused again
            elif event is None:
                self.retried += 1  # a retryable refusal: the session resends it after retry()
                self.retried_codes[frame.code] = self.retried_codes.get(frame.code, 0) + 1
            else:
                self.errors += 1
                self._problem(f"device {dev.uid}: error {frame.code}: {frame.message}")
        elif kind is Bye:
            assert isinstance(frame, Bye)
            self._problem(f"device {dev.uid}: bye {frame.code}: {frame.message}")

    def _send(self, dev: _Dev) -> None:
        cmid = f"{self.prefix}{next(self.counter)}"
        now = time.monotonic()
        self.recs[cmid] = _Rec(now, dev.n_recipients, dev)
        if dev.to is not None:
            dev.session.send(self.body, to=dev.to, cmid=cmid)
        else:
            dev.session.send(self.body, conv=dev.conv, cmid=cmid)
        self.sent += 1
        if self.t0 <= now < self.t1:
            self.sent_measured += 1
        self._want_write(dev)

    def _want_write(self, dev: _Dev) -> None:
        self.dirty.add(dev)
        if self.write_handle is None:
            self.write_handle = asyncio.get_running_loop().call_soon(self._write)

    def _write(self) -> None:
        """Write what every session queued since the last loop iteration: one call per connection."""
        self.write_handle = None
        dirty, self.dirty = self.dirty, set()
        for dev in dirty:
            session, transport = dev.session, dev.transport
            if transport is not None and session.has_data_to_send:
                with contextlib.suppress(ConnectionError):  # the reader sees the end and counts it
                    transport.send_many(session.data_to_send())

    def _tick(self, interval: float) -> None:
        now = time.monotonic()
        base = self.cfg.index * COUNTERS
        self.counters[base] = self.delivered
        self.counters[base + 1] = self.acked
        self.counters[base + 2] = self.sent
        if self.sending and now >= self.t1:
            self.sending = False
        if self.sending and self.cfg.rate and self.senders:
            self.credit += (now - self.last_tick) * self.cfg.rate
            k = int(self.credit)
            self.credit -= k
            senders, n = self.senders, len(self.senders)
            for _ in range(k):
                self._send(senders[self.rr])
                self.rr = (self.rr + 1) % n
        self.last_tick = now
        self.ticks += 1
        if self.ticks % 10 == 0:  # delivery reports and retries, every ~10 ticks
            for dev in self.devs:
                session = dev.session
                session.flush_recv()
                if session.wants_retry:
                    session.retry()
                if session.has_data_to_send:
                    self._want_write(dev)
        self.tick_handle = asyncio.get_running_loop().call_later(interval, self._tick, interval)

    def _problem(self, text: str) -> None:
        if len(self.problems) < 20:
            self.problems.append(text)

    # --- the run ------------------------------------------------------------------------------------

    async def run(self, go: Any, out: Any) -> None:
        raise_nofile()
        self._build()
        sem = asyncio.Semaphore(self.cfg.connect_concurrency)
        await asyncio.gather(*(self._connect(d, sem) for d in self.devs))
        out.put(("ready", self.cfg.index, None))
        while not go.is_set():
            await asyncio.sleep(0.002)
        t_go, self.t0, self.t1 = self.times[0], self.times[1], self.times[2]
        while time.monotonic() < t_go:
            await asyncio.sleep(0.001)
        self.sending = True
        self.last_tick = time.monotonic()
        self._tick(0.005 if self.cfg.rate else 0.02)
        if self.cfg.window:
            for dev in self.senders:
                for _ in range(self.cfg.window):
                    self._send(dev)
        while time.monotonic() < self.t1:
            await asyncio.sleep(min(0.05, max(0.0, self.t1 - time.monotonic())))
        self.sending = False
        deadline = time.monotonic() + self.cfg.drain
        while self.recs and time.monotonic() < deadline and self.disconnects == 0:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # anything that was on its way
        self.closing = True
        if self.tick_handle is not None:
            self.tick_handle.cancel()
        self._tick_counters_final()
        anomalies = self.tracker.finish()
        unfinished = len(self.recs)
        unacked = sum(1 for r in self.recs.values() if not r.acked)
        if unfinished:
            self._problem(f"{unfinished} messages still in flight after the drain ({unacked} not acked)")
        result = {
            "sent": self.sent,
            "delivered": self.delivered,
            "acked": self.acked,
            "sent_measured": self.sent_measured,
            "delivered_measured": self.delivered_measured,
            "acked_measured": self.acked_measured,
            "latency_stride": self.lat_stride,
            "latencies": self.latencies.tobytes(),
            "anomalies": anomalies.as_dict(),
            "examples": anomalies.examples,
            "failed": self.failed,
            "retried": self.retried,
            "retried_codes": self.retried_codes,
            "errors": self.errors,
            "disconnects": self.disconnects,
            "unexpected": self.unexpected,
            "mismatched": self.mismatched,
            "dup_acks": self.dup_acks,
            "unfinished": unfinished,
            "unacked": unacked,
            "connections": len(self.devs),
            "problems": self.problems,
        }
        out.put(("result", self.cfg.index, result))
        for dev in self.devs:
            if dev.transport is not None:
                dev.transport.abort()

    def _tick_counters_final(self) -> None:
        base = self.cfg.index * COUNTERS
        self.counters[base] = self.delivered
        self.counters[base + 1] = self.acked
        self.counters[base + 2] = self.sent


def quiet_insecure_warnings(tls: BenchTls) -> None:
    """With ``--insecure-skip-verify`` the command line warned once for the run: a client process does not
    repeat it for each of its thousands of connections."""
    if tls.insecure_skip_verify:
        logging.getLogger("im.client.tls").setLevel(logging.ERROR)


def worker_main(
    cfg: WorkerConfig,
    plans: list[ConvPlan],
    counters: Any,
    times: Any,
    go: Any,
    out: Any,
) -> None:
    """Entry point of a client process (multiprocessing, spawn)."""
    import uvloop

    quiet_insecure_warnings(cfg.tls)
    try:
        uvloop.run(Worker(cfg, plans, counters, times).run(go, out))
    except BaseException:
        out.put(("error", cfg.index, traceback.format_exc()))
        raise SystemExit(1) from None
