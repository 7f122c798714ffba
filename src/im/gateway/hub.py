"""The transport-independent half of a gateway node.

:class:`Connection` runs one :class:`~im.protocol.session.ServerSession` for a transport (WebSocket
or TCP): it carries out the session's commands against the core and writes what the session
queues. :class:`Hub` indexes the node's connections by user, receives routed batches (it is the node's
:class:`DeliverySink`), coalesces cursor and read-mark writes, and runs the timers.

The hub is given what it uses, and nothing else: the read side (sync points, replays, members, who may
see whose typing), the store of cursors and read marks, presence (where devices are online), the router
it attaches to and publishes ephemeral events on, the account service (tokens, revoked sessions), and
``submit``, where sends go: the committer in this process, or the transfer nodes (``TransferPool``).
"""

from __future__ import annotations

import abc
import asyncio
import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from im.backends.chat import CursorStore
from im.backends.presence import Presence
from im.backends.rate_limit import Hit, RateLimiter, Rule
from im.backends.routing import DeliverySink, Router
from im.core.accounts import AccountService
from im.core.committer import SendRequest, SubmitSend
from im.core.reads import ChatReads
from im.gateway.replacement import DeviceClaims
from im.model.chat import StoredMessage
from im.model.cluster import DeviceLocation
from im.model.errors import ErrorCode, ImError
from im.model.ids import direct_conv
from im.observability import tracing
from im.observability.metrics import LATENCY_SAMPLE, METRICS
from im.protocol import commands as cmd
from im.protocol.codec import Encoding
from im.protocol.frames import Receipt, TypingEvent
from im.protocol.messages import EncodedCache
from im.protocol.session import Limits, ServerSession, State
from im.throttled_log import ThrottledLog

log = logging.getLogger(__name__)
#: Every connecting client meets a store that is down: one counted line per window, not a traceback each.
_sync_failures = ThrottledLog(log, "connections: sync points unavailable", level=logging.ERROR)
_auth_failures = ThrottledLog(log, "authentications: account store unavailable", level=logging.ERROR)
_replay_failures = ThrottledLog(log, "replays: storage unavailable", level=logging.ERROR)
_frame_failures = ThrottledLog(log, "frames that failed with an unexpected error", level=logging.ERROR)
#: Presence down: every connection and disconnection would write a line; one counted line per window.
_presence_failures = ThrottledLog(log, "presence updates: presence unavailable")
#: The store down: the cursor flush runs every few hundred ms and would write a line each time.
_cursor_failures = ThrottledLog(log, "cursor flushes: storage unavailable (kept for the next flush)")
#: The commands that pass the hub's shared rate limits before they are carried out.
_GATED = (cmd.Submit, cmd.SaveCursor, cmd.MarkRead, cmd.SendTyping)


@dataclass(frozen=True, slots=True)
class HubRates:
    """The shared rate limits the gateway applies (config ``rates``): per user over all their devices and
    gateways, and per conversation over all its members. Each connection's own token buckets
    (``limits.send_rate``, ``limits.typing_rate``) come first, in the session."""

    sends_per_user: Rule
    sends_per_conversation: Rule
    typing_per_user: Rule
    receipts_per_user: Rule


class SendLease:
    """Units of one shared send budget (a user's, or a conversation's) that a connection took ahead.

    Taking a few units per limiter call instead of one per send keeps the limiter off the per-message
    path of ``im serve``; units are counted against the budget when taken, so a lease can only make the
    budget stricter, except that the units a connection still holds may be spent after the budget's
    window moved on (at most the lease size per connection)."""

    __slots__ = ("credit", "hit")

    def __init__(self, hit: Hit) -> None:
        self.hit = hit
        self.credit = 0


def lease_size(rule: Rule) -> int:
    """Units taken per limiter call for ``rule``: 1/256 of its burst, 1 to 32 (small budgets stay exact)."""
    return max(1, min(32, rule.limit // 256))


class Connection(abc.ABC):
    """A session plus the I/O a transport provides (:meth:`write` and :meth:`close_transport`)."""

    #: The metrics label of the transport ("ws", "tcp"; empty: not counted, e.g. a test's connection).
    transport_label = ""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.session = ServerSession(hub.cache, limits=hub.limits, heartbeat=hub.limits.idle_timeout)
        self._tasks: set[asyncio.Task[None]] = set()
        self._dirty = False
        self.closed = False
        self.sid = ""  # the login session that authenticated this connection
        #: Its id in presence (set when it registers), and whether presence holds its claim: None while
        #: the claim is in flight, False when it failed (the refresh loop claims again).
        self.conn_id = ""
        self.claimed: bool | None = None
        #: This user's hits of the shared limits (sends, typing, receipts) and the lease of the user's send
        #: budget, made at the first rate-limited frame; the leases of the conversations' send budgets by
        #: target (``conv`` or ``to``), made once per target. None until needed: idle connections hold
        #: nothing for the limits.
        self.user_hits: tuple[Hit, Hit, Hit] | None = None
        self.user_sends: SendLease | None = None
        self.conv_sends: dict[str | int | None, SendLease] | None = None
        #: When the sampled sends in flight were taken (cmid -> perf_counter), for the ack latency.
        self.sent_at: dict[str, float] | None = None

    # --- what a transport implements -----------------------------------------------------------------

    @abc.abstractmethod
    def write(self, frames: list[bytes], binary: bool) -> None:
        """Write encoded frames, in order."""

    @abc.abstractmethod
    def close_transport(self, code: ErrorCode) -> None:
        """Close after what was written (no more reads)."""

    @abc.abstractmethod
    def buffered(self) -> int:
        """Bytes written but not yet sent."""

    @abc.abstractmethod
    def pause_reading(self) -> None: ...

    # --- driven by the transport ---------------------------------------------------------------------

    def on_data(self, data: bytes, binary: bool) -> None:
        try:
            self.run(self.session.receive(data, binary))
        except Exception as exc:  # a bug one frame can reach: refuse that frame, keep the connection, no log storm
            _frame_failures.hit(f"uid={self.session.uid}: {type(exc).__name__}: {str(exc)[:200]}", exc)
            self.session.refuse(ErrorCode.INVALID, "the server could not process this frame")
        self.flush()

    def on_closed(self) -> None:
        self.closed = True
        self.session.state = State.CLOSED
        for task in self._tasks:
            task.cancel()
        self.hub.unregister(self)

    # --- driven by the session and the hub -------------------------------------------------------------

    def flush(self) -> None:
        self._dirty = False
        frames = self.session.data_to_send()
        if frames and not self.closed:
            self.write(frames, self.session.encoding is Encoding.MSGPACK)
            if self.buffered() > self.send_limit():
                log.info("closing slow consumer uid=%s device=%s", self.session.uid, self.session.device)
                METRICS.slow_consumers += 1
                self.session.close(ErrorCode.SLOW_CONSUMER, "too far behind; resume from cursors")
                self.write(self.session.data_to_send(), self.session.encoding is Encoding.MSGPACK)
                self.close_transport(ErrorCode.SLOW_CONSUMER)

    def send_limit(self) -> int:
        """Bytes queued for the client past which it is closed as a slow consumer. Small until it has
        authenticated: a stranger who never reads must not make the server hold megabytes of answers."""
        s = self.session.state
        if s is State.AWAIT_AUTH or s is State.AUTHENTICATING:
            return self.hub.preauth_send_buffer
        return self.hub.max_send_buffer

    def mark_dirty(self) -> None:
        """Flush at the end of this loop iteration (coalesces writes of one routed batch)."""
        if not self._dirty:
            self._dirty = True
            self.hub.schedule_flush(self)

    def run(self, commands: Iterable[cmd.Command]) -> None:
        for c in commands:
            if isinstance(c, _GATED):
                if self.hub.rate_limited:
                    self.hub.gate(self, c)  # the shared rate limits, then perform()
                else:
                    self.perform(c)
            elif isinstance(c, cmd.Fetch):
                self._spawn(self._fetch(c))
            elif isinstance(c, cmd.Authenticate):
                self._spawn(self._authenticate(c))
            elif isinstance(c, cmd.Close):
                self.flush()
                self.close_transport(c.code)

    def perform(self, c: cmd.Submit | cmd.SaveCursor | cmd.MarkRead | cmd.SendTyping) -> None:
        """Carry out a command the rate limits allowed."""
        if type(c) is cmd.Submit:
            self._submit(c)
        elif type(c) is cmd.SaveCursor:
            self.hub.save_cursor(self.session.uid, self.session.device, c.conv, c.seq)
        elif type(c) is cmd.MarkRead:
            self.hub.mark_read(self.session.uid, c.conv, c.seq)
        else:
            assert type(c) is cmd.SendTyping
            self._spawn(self.hub.typing(self.session.uid, self.session.device, c.conv))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _submit(self, c: cmd.Submit) -> None:
        s = self.session
        METRICS.sends += 1
        req = SendRequest(s.uid, s.device, c.cmid, c.conv, c.to, c.type, c.body)
        if not METRICS.sends % LATENCY_SAMPLE and METRICS.enabled:  # one send in LATENCY_SAMPLE is timed
            if self.sent_at is None:
                self.sent_at = {}
            self.sent_at[c.cmid] = time.perf_counter()
        if tracing.ON and tracing.sampled():  # one trace per sampled message, from here to every delivery
            req.trace = tracing.start_send(type(self).__name__)
        self.hub.submit(req, self._send_done)

    def _send_done(self, req: SendRequest, m: StoredMessage | None, dup: bool, err: ImError | None) -> None:
        if req.trace is not None:
            tracing.end(req.trace, err, None if m is None else m.mid, dup)
        if err is not None:
            METRICS.refused += 1
        else:
            METRICS.acks += 1
            METRICS.duplicates += dup
        if self.sent_at:
            taken = self.sent_at.pop(req.cmid, None)
            if taken is not None and err is None:
                METRICS.ack_seconds.observe(time.perf_counter() - taken)
        if self.closed:
            return
        if err is not None:
            self.session.send_failed(req.cmid, err.code, err.message, err.retry_after)
        else:
            assert m is not None
            self.run(self.session.send_done(req.cmid, m, dup))
        self.mark_dirty()

    async def _authenticate(self, c: cmd.Authenticate) -> None:
        try:
            principal = await self.hub.accounts.authenticate(c.token)
        except ImError as exc:
            self.run(self.session.auth_failed(ErrorCode.AUTH_FAILED, exc.message))
            self.flush()
            return
        except Exception as exc:  # the account store is away (the session check reads it): say so, not silence
            _auth_failures.hit(f"{type(exc).__name__}: {exc}", exc)
            METRICS.engine_error(exc)
            self.run(self.session.close(ErrorCode.UNAVAILABLE, "storage unavailable; reconnect later"))
            self.flush()
            return
        self.session.uid, self.session.device = principal.uid, c.device
        self.sid = principal.sid
        # Register before reading the sync points, so nothing committed in between is missed; what
        # arrives meanwhile waits in the session until the replay is set up.
        await self.hub.register(self)
        try:
            points = await self.hub.reads.sync_points(principal.uid, c.device)
        except Exception as exc:
            _sync_failures.hit(f"uid={principal.uid}: {type(exc).__name__}: {exc}", exc)
            METRICS.engine_error(exc)
            self.run(self.session.close(ErrorCode.UNAVAILABLE, "storage unavailable; reconnect later"))
            self.flush()
            return
        self.run(self.session.auth_succeeded(principal.uid, c.device, points, c.cursors))
        self.flush()

    async def _fetch(self, c: cmd.Fetch) -> None:
        s = self.session
        METRICS.gap_fetches += 1
        try:
            start, messages = await self.hub.reads.replay(
                s.uid, s.device, c.conv, c.after, c.upto, self.hub.replay_page
            )
        except Exception as exc:
            _replay_failures.hit(f"uid={s.uid} conv={c.conv[:80]}: {type(exc).__name__}: {exc}", exc)
            METRICS.engine_error(exc)
            self.run(s.close(ErrorCode.UNAVAILABLE, "storage unavailable; reconnect later"))
            self.flush()
            return
        self.run(s.fetched(c.conv, start, messages))
        self.flush()


class Hub(DeliverySink):
    """The node's connections by user, and the batched work they share."""

    #: Set by :meth:`unregister` when the last connection closed, once :meth:`drain_and_close` waits for it.
    _all_closed: asyncio.Event | None = None

    def __init__(
        self,
        node: str,
        *,
        reads: ChatReads,
        cursor_store: CursorStore,
        presence: Presence,
        router: Router,
        accounts: AccountService,
        submit: SubmitSend,
        limits: Limits,
        replay_page: int = 500,
        max_send_buffer: int = 4 * 1024 * 1024,
        preauth_send_buffer: int = 64 * 1024,
        presence_ttl: float = 60.0,
        cursor_flush_interval: float = 0.2,
        limiter: RateLimiter | None = None,
        rates: HubRates | None = None,
    ) -> None:
        self.node = node
        #: Sync points, replays, members and typing consent (what connections read).
        self.reads = reads
        #: Where sends go: the committer in this process, or a transfer node (``TransferPool.submit``).
        self.submit = submit
        self.accounts = accounts
        self._cursor_store = cursor_store
        self._presence = presence
        self._router = router
        self.limits = limits
        self.replay_page = replay_page
        self.max_send_buffer = max_send_buffer
        self.preauth_send_buffer = preauth_send_buffer
        self.cache = EncodedCache()
        self._presence_ttl = presence_ttl
        #: One connection per device across nodes (gateway/replacement.py).
        self.claims = DeviceClaims(node, presence, router, ttl=presence_ttl)
        self._cursor_interval = cursor_flush_interval
        self._by_user: dict[int, dict[str, Connection]] = {}
        self._all: set[Connection] = set()
        self._to_flush: list[Connection] = []
        self._cursors: dict[tuple[int, str, str], int] = {}
        self._reads: dict[tuple[int, str], int] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()
        #: Shared rate limits (None: only the per-connection ones). Commands of one event-loop turn go to
        #: the limiter in one call; one call at a time, so each connection's commands keep their order.
        self._limiter = limiter if rates is not None else None
        self._rates = rates
        self._user_lease = lease_size(rates.sends_per_user) if rates is not None else 1
        self._conv_lease = lease_size(rates.sends_per_conversation) if rates is not None else 1
        self._gated: list[tuple[Connection, cmd.Submit | cmd.SaveCursor | cmd.MarkRead | cmd.SendTyping]] = []
        self._gate_task: asyncio.Task[None] | None = None

    # --- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> None:
        self._router.attach(self.node, self)
        self.accounts.on_revoke(self.revoked)
        self._tasks = [
            asyncio.create_task(self._tick(), name="im-hub-timers"),
            asyncio.create_task(self._flush_cursors_forever(), name="im-hub-cursors"),
        ]

    def add(self, conn: Connection) -> None:
        self._all.add(conn)
        if conn.transport_label:
            METRICS.connections[conn.transport_label] += 1
            METRICS.opened[conn.transport_label] += 1

    @property
    def connections(self) -> int:
        return len(self._all)

    async def drain_and_close(self, *, close_wait: float = 1.0) -> None:
        """Graceful stop, part two (after the committer, or the transfer links, answered every send taken):
        write what is due (those answers), say bye to everyone, stop the timers, flush cursors and read
        marks. Returns once every connection has closed (clients close on ``bye``; one that does not is
        waited for at most ``close_wait`` seconds, its transport aborts it later) and its presence entry
        is removed; then detaches from the router."""
        self._flush_marked()  # the answers of the last batch go before the bye
        for conn in list(self._all):
            conn.run(conn.session.close(ErrorCode.SHUTDOWN, "server is stopping; reconnect"))
        tasks = [*self._tasks, *([self._gate_task] if self._gate_task is not None else [])]
        for task in tasks:  # commands still being decided by the rate gate go unanswered: clients resend
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        self._tasks = []
        await self.claims.stop()
        await self._flush_cursors()
        if self._all:
            self._all_closed = asyncio.Event()
            try:
                async with asyncio.timeout(close_wait):
                    await self._all_closed.wait()
            except TimeoutError:
                pass
        if self._background:  # presence removals of the connections that closed
            await asyncio.wait(list(self._background), timeout=close_wait)
        self._router.detach(self.node)

    def pause_all(self) -> None:
        """Graceful stop, part one: read nothing more, so no new send is taken."""
        for conn in self._all:
            conn.pause_reading()

    # --- registration --------------------------------------------------------------------------------

    async def register(self, conn: Connection) -> None:
        s = conn.session
        conn.conn_id = self.claims.new_id()
        devices = self._by_user.setdefault(s.uid, {})
        old = devices.get(s.device)
        devices[s.device] = conn
        if old is None:
            METRICS.authenticated += 1
        if old is not None and old is not conn:
            old.run(old.session.close(ErrorCode.REPLACED, "the same device connected again", reconnect=False))
        try:  # the device's holder now, wherever the older connection is (it is asked to close)
            await self.claims.claim([DeviceLocation(s.uid, s.device, self.node, conn.conn_id)])
            conn.claimed = True
        except Exception as exc:  # presence is a routing hint: the refresh loop announces this device again
            conn.claimed = False
            METRICS.engine_error(exc)
            _presence_failures.hit(f"{type(exc).__name__}: {exc}: uid={s.uid} device={s.device} not announced yet")

    async def _set_offline(self, uid: int, device: str, conn_id: str) -> None:
        if device in self._by_user.get(uid, {}):
            return  # the device came back meanwhile: its entry is current
        try:
            await self._presence.set_offline([DeviceLocation(uid, device, self.node, conn_id)])
        except Exception as exc:  # the entry expires on its own within the presence TTL
            METRICS.engine_error(exc)
            _presence_failures.hit(f"{type(exc).__name__}: {exc}: uid={uid} device={device} not removed")

    def close_replaced(self, connections: Sequence[DeviceLocation]) -> None:
        """Close these connections if they are still the ones held here (by id): a newer connection of
        their device took over on another node (DeliverySink; the refresh loop's left-out entries)."""
        for c in connections:
            conn = self._by_user.get(c.uid, {}).get(c.device)
            if conn is not None and conn.conn_id == c.conn:
                conn.run(conn.session.close(ErrorCode.REPLACED, "the same device connected again", reconnect=False))
                conn.flush()

    def revoked(self, sid: str) -> None:
        """A login session was revoked (logout, refresh-token reuse): close its connections."""
        for conn in [c for c in self._all if c.sid == sid]:
            conn.run(conn.session.close(ErrorCode.AUTH_FAILED, "the login session was revoked", reconnect=False))
            conn.flush()

    def unregister(self, conn: Connection) -> None:
        if conn in self._all:
            self._all.discard(conn)
            if conn.transport_label:
                METRICS.connections[conn.transport_label] -= 1
        s = conn.session
        devices = self._by_user.get(s.uid)
        if devices is not None and devices.get(s.device) is conn:
            del devices[s.device]
            METRICS.authenticated -= 1
            if not devices:
                del self._by_user[s.uid]
            task = asyncio.get_running_loop().create_task(self._set_offline(s.uid, s.device, conn.conn_id))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        if not self._all and self._all_closed is not None:
            self._all_closed.set()  # drain_and_close waits for this

    # --- DeliverySink --------------------------------------------------------------------------------

    def deliver(self, messages: Sequence[StoredMessage], recipients: Sequence[Sequence[int]]) -> None:
        if METRICS.enabled:  # one clock read per routed batch; one message in LATENCY_SAMPLE is timed
            now_ms, observe = time.time() * 1000.0, METRICS.delivery_seconds.observe
            for m in messages[(-METRICS.routed - 1) % LATENCY_SAMPLE :: LATENCY_SAMPLE]:  # the 8th, 16th, ...
                observe((now_ms - m.ts) / 1000.0)
            METRICS.routed += len(messages)
        if tracing.ROUTING:  # sampled messages among them (tracing on): a delivery span each
            spans = tracing.deliver_spans(messages, recipients)
            try:
                self._deliver(messages, recipients)
            finally:
                for span in spans:
                    span.end()
        else:
            self._deliver(messages, recipients)

    def _deliver(self, messages: Sequence[StoredMessage], recipients: Sequence[Sequence[int]]) -> None:
        by_user = self._by_user
        for m, uids in zip(messages, recipients, strict=True):
            for uid in uids:
                devices = by_user.get(uid)
                if devices:
                    for conn in devices.values():
                        session = conn.session
                        cmds = session.deliver(m)
                        if cmds:
                            conn.run(cmds)
                        if session.has_output:
                            conn.mark_dirty()

    def deliver_event(self, frame: object, uids: Iterable[int], skip: tuple[int, str] | None) -> None:
        for uid in uids:
            for device, conn in self._by_user.get(uid, {}).items():
                if skip is None or (uid, device) != skip:
                    conn.session.event(frame)
                    conn.mark_dirty()

    def schedule_flush(self, conn: Connection) -> None:
        if not self._to_flush:
            asyncio.get_running_loop().call_soon(self._flush_marked)
        self._to_flush.append(conn)

    def _flush_marked(self) -> None:
        conns, self._to_flush = self._to_flush, []
        for conn in conns:
            conn.flush()

    # --- shared rate limits ----------------------------------------------------------------------------

    @property
    def rate_limited(self) -> bool:
        """Whether sends, typing and receipts pass the shared rate limits (:meth:`gate`)."""
        return self._limiter is not None

    def _first_limited_frame(self, conn: Connection) -> None:
        hits = conn.user_hits = self.user_hits(conn.session.uid)
        assert hits is not None
        conn.user_sends = SendLease(hits[0])

    def set_rates(self, rates: HubRates) -> None:
        """New shared rate limits (a dynamic setting changed): every connection takes its hits and leases
        afresh at its next limited frame (units it held ahead are dropped, never granted twice)."""
        if self._rates is None or rates == self._rates:
            return  # built without shared limits, or unchanged: nothing to do
        self._rates = rates
        self._user_lease = lease_size(rates.sends_per_user)
        self._conv_lease = lease_size(rates.sends_per_conversation)
        for conn in self._all:
            conn.user_hits = None
            conn.user_sends = None
            conn.conv_sends = None

    def user_hits(self, uid: int) -> tuple[Hit, Hit, Hit] | None:
        """A user's hits of the per-user limits (sends, typing, receipts); None without shared limits."""
        if self._limiter is None or self._rates is None:
            return None
        r, key = self._rates, str(uid)
        return Hit(r.sends_per_user, key), Hit(r.typing_per_user, key), Hit(r.receipts_per_user, key)

    def _conv_lease_of(self, conn: Connection, c: cmd.Submit) -> SendLease:
        key = c.conv if c.conv is not None else c.to
        leases = conn.conv_sends
        if leases is None:
            leases = conn.conv_sends = {}
        lease = leases.get(key)
        if lease is None:
            assert self._rates is not None
            if len(leases) >= 1024:  # bound the per-connection cache (held units are forgone)
                leases.clear()
            conv = c.conv if c.conv is not None else direct_conv(conn.session.uid, c.to or 0)
            lease = leases[key] = SendLease(Hit(self._rates.sends_per_conversation, conv))
        return lease

    def _refill(self, lease: SendLease, size: int) -> float | None:
        """Make ``lease`` hold a unit: take ``size`` units in one call, or one when fewer are left. 0.0
        when it holds one, the wait when the budget is spent, None when the limiter needs I/O."""
        if lease.credit:
            return 0.0
        assert self._limiter is not None
        check = self._limiter.check_now
        if size > 1:
            waits = check((lease.hit._replace(cost=size),))
            if waits is None:
                return None
            if not waits[0]:
                lease.credit = size
                return 0.0
        waits = check((lease.hit,))
        if waits is None:
            return None
        if not waits[0]:
            lease.credit = 1
        return waits[0]

    def gate(self, conn: Connection, c: cmd.Submit | cmd.SaveCursor | cmd.MarkRead | cmd.SendTyping) -> None:
        """Pass a command through the shared rate limits: at once when the limiter decides without I/O
        (in memory: ``im serve``) and nothing is waiting for a decision (which keeps each connection's
        order); else queued and decided with the others of this loop turn in one call."""
        if not self._gated:  # decide at once if the limiter can without I/O (in memory: im serve)
            if conn.user_sends is None:
                self._first_limited_frame(conn)
            assert conn.user_hits is not None and conn.user_sends is not None
            if type(c) is cmd.Submit:
                user, conv = conn.user_sends, self._conv_lease_of(conn, c)
                if not (user.credit and conv.credit):
                    user_wait = self._refill(user, self._user_lease)
                    conv_wait = self._refill(conv, self._conv_lease) if user_wait == 0.0 else 0.0
                    if user_wait is not None and conv_wait is not None and (user_wait or conv_wait):
                        self._apply([(conn, c)], [user_wait, conv_wait])
                        return
                if user.credit and conv.credit:  # (else the limiter needs I/O: the batch below decides)
                    user.credit -= 1
                    conv.credit -= 1
                    conn.perform(c)
                    return
            else:
                assert self._limiter is not None
                user_hits = conn.user_hits
                waits = self._limiter.check_now((user_hits[1] if type(c) is cmd.SendTyping else user_hits[2],))
                if waits is not None:
                    if waits[0]:
                        self._apply([(conn, c)], waits)
                    else:
                        conn.perform(c)
                    return
        self._gated.append((conn, c))
        if self._gate_task is None:
            self._gate_task = asyncio.get_running_loop().create_task(self._run_gate(), name="im-hub-rates")

    async def _run_gate(self) -> None:
        try:
            while self._gated:
                batch, self._gated = self._gated, []
                await self._decide(batch)
        finally:
            self._gate_task = None

    async def _decide(self, batch: list[tuple[Connection, Any]]) -> None:
        """One limiter call for the batch: a send takes one unit of its user's and its conversation's
        budgets (refused: ``error rate_limited`` with ref and retry_after; the connection's later sends
        are decided after it, in order); a recv or read one of its user's receipts budget (refused:
        dropped, one ``error rate_limited`` per connection and batch); typing one of the typing budget
        (refused: dropped silently, as the session's own typing limit does)."""
        assert self._limiter is not None
        self._apply(batch, await self._limiter.check(self._hits(batch)))

    def _hits(self, batch: list[tuple[Connection, Any]]) -> list[Hit]:
        """The limiter hits of the commands, in order: two per send (user, conversation), one otherwise."""
        hits: list[Hit] = []
        add = hits.append
        submit, send_typing = cmd.Submit, cmd.SendTyping
        for conn, c in batch:
            if conn.user_sends is None:
                self._first_limited_frame(conn)
            user = conn.user_hits
            assert user is not None
            if type(c) is submit:
                add(user[0])
                add(self._conv_lease_of(conn, c).hit)
            elif type(c) is send_typing:
                add(user[1])
            else:
                add(user[2])
        return hits

    def _apply(self, batch: list[tuple[Connection, Any]], waits: list[float]) -> None:
        """Carry out what the limiter allowed; answer the refusals (see :meth:`_decide`)."""
        i = 0
        told: set[Connection] = set()
        for conn, c in batch:
            if type(c) is cmd.Submit:
                wait = waits[i] or waits[i + 1]
                user_wait = waits[i]
                i += 2
            else:
                wait = user_wait = waits[i]
                i += 1
            if conn.closed:
                continue
            if not wait:
                conn.perform(c)
                continue
            retry = math.ceil(wait * 1000) / 1000
            if type(c) is cmd.Submit:
                what = "user" if user_wait else "conversation"
                METRICS.rate_refused("send-user" if user_wait else "send-conv")
                conn.session.send_failed(c.cmid, ErrorCode.RATE_LIMITED, f"{what} send limit reached", retry)
                conn.mark_dirty()
            elif type(c) is cmd.SendTyping:
                METRICS.rate_refused("typing")
            else:
                METRICS.rate_refused("receipts")
                if conn in told:
                    continue
                told.add(conn)
                conn.session.refuse(ErrorCode.RATE_LIMITED, "receipt limit reached (recv/read dropped)", retry)
                conn.mark_dirty()

    # --- cursors, read marks, typing -----------------------------------------------------------------

    def save_cursor(self, uid: int, device: str, conv: str, seq: int) -> None:
        key = (uid, device, conv)
        if seq > self._cursors.get(key, -1):
            self._cursors[key] = seq

    def mark_read(self, uid: int, conv: str, seq: int) -> None:
        key = (uid, conv)
        if seq > self._reads.get(key, -1):
            self._reads[key] = seq

    async def typing(self, uid: int, device: str, conv: str) -> None:
        """Typing goes to the conversation's members, except those the typer blocks or who block the
        typer (docs/protocol.md section 11)."""
        members = await self.reads.members_of(conv)
        if uid not in members:
            return
        hidden = await self.reads.hidden_from(uid, [m for m in members if m != uid])
        await self._notify([(conv, uid, TypingEvent(conv=conv, uid=uid), (uid, device))], hidden)

    async def _notify(
        self, events: list[tuple[str, int, object, tuple[int, str] | None]], hidden: set[int] | None = None
    ) -> None:
        """Ephemeral frames (conv, from uid, frame, skip) to the members' online devices (but ``hidden``):
        one presence lookup for all of them, one publish per (frame, node)."""
        targets: list[tuple[object, list[int], tuple[int, str] | None]] = []
        members_of = await self.reads.members_by_conv(list({conv for conv, *_ in events}))  # one batch
        for conv, uid, frame, skip in events:
            members = members_of[conv]
            if uid in members:
                targets.append((frame, [m for m in members if not hidden or m not in hidden], skip))
        if not targets:
            return
        located = await self._presence.locate({u for _, members, _ in targets for u in members})
        for frame, recipients, skip in targets:
            nodes: dict[str, set[int]] = {}
            for member in recipients:
                for loc in located.get(member, ()):
                    nodes.setdefault(loc.node, set()).add(member)
            for node, uids in nodes.items():
                self._router.publish_event(node, frame, sorted(uids), skip)

    async def _flush_cursors(self) -> None:
        cursors, self._cursors = self._cursors, {}
        reads, self._reads = self._reads, {}
        receipts: list[tuple[str, int, object, tuple[int, str] | None]] = []
        try:
            if cursors:
                await self._cursor_store.save_cursors((u, d, c, s) for (u, d, c), s in cursors.items())
            if reads:
                await self._cursor_store.save_read_marks((u, c, s) for (u, c), s in reads.items())
        except BaseException:  # keep them for the next flush (saving again is harmless: marks only grow)
            for (uid, device, conv), seq in cursors.items():
                self.save_cursor(uid, device, conv, seq)
            for (uid, conv), seq in reads.items():
                self.mark_read(uid, conv, seq)
            raise
        if cursors:
            delivered: dict[tuple[int, str], int] = {}
            for (uid, _dev, conv), seq in cursors.items():
                delivered[(uid, conv)] = max(seq, delivered.get((uid, conv), 0))
            receipts += [
                (conv, uid, Receipt(conv=conv, uid=uid, kind="delivered", seq=seq), None)
                for (uid, conv), seq in delivered.items()
            ]
        if reads:
            receipts += [
                (conv, uid, Receipt(conv=conv, uid=uid, kind="read", seq=seq), None)
                for (uid, conv), seq in reads.items()
            ]
        await self._notify(receipts)

    async def _flush_cursors_forever(self) -> None:
        while True:
            await asyncio.sleep(self._cursor_interval)
            try:
                await self._flush_cursors()
            except Exception as exc:  # store or presence away: what was taken is retried by clients' resume
                METRICS.engine_error(exc)
                _cursor_failures.hit(f"{type(exc).__name__}: {exc}")

    async def _tick(self) -> None:
        refresh_every = max(1.0, self._presence_ttl / 3)
        since_refresh = 0.0
        while True:
            await asyncio.sleep(1.0)
            for conn in list(self._all):
                cmds = conn.session.check_timers()
                if cmds:
                    conn.run(cmds)
            since_refresh += 1.0
            if since_refresh >= refresh_every:
                since_refresh = 0.0
                await self._refresh_presence()

    async def _refresh_presence(self) -> None:
        """Re-announce every connection presence holds (closing those another node's connection of the
        same device displaced meanwhile), and claim again those whose claim failed; a claim in flight is
        left to finish (refreshing it first could find the older holder and close the newer one)."""
        held: list[DeviceLocation] = []
        failed: list[tuple[Connection, DeviceLocation]] = []
        for uid, devices in self._by_user.items():
            for device, conn in devices.items():
                if conn.claimed:
                    held.append(DeviceLocation(uid, device, self.node, conn.conn_id))
                elif conn.claimed is False:
                    failed.append((conn, DeviceLocation(uid, device, self.node, conn.conn_id)))
        try:
            if held:
                self.close_replaced(await self._presence.set_online(held, self._presence_ttl))
            if failed:
                await self.claims.claim([location for _, location in failed])
                for conn, _ in failed:
                    conn.claimed = True
        except Exception as exc:  # keep the timers running; the next refresh tries again
            METRICS.engine_error(exc)
            log.warning("presence refresh failed (%s: %s)", type(exc).__name__, exc)
