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
import time
from collections.abc import Collection, Iterable, Sequence
from typing import Any, ClassVar, Protocol

from im.backends.chat import CursorStore
from im.backends.presence import Presence
from im.backends.rate_limit import RateLimiter
from im.backends.routing import DeliverySink, Router
from im.cancel import raise_if_cancelling, retry_pause
from im.core.accounts import AccountService
from im.core.committer import SendRequest, SubmitSend
from im.core.reads import ChatReads
from im.gateway.rates import HubRates, Lease, SharedRateGate
from im.gateway.replacement import DeviceClaims
from im.model.chat import StoredMessage
from im.model.cluster import DeviceLocation
from im.model.errors import ErrorCode, ImError
from im.mypyc_options import mypyc_attr
from im.observability import tracing
from im.observability.metrics import LATENCY_SAMPLE, METRICS
from im.protocol import commands as cmd
from im.protocol.codec import Encoding
from im.protocol.frames import Receipt, TypingEvent
from im.protocol.logins import Busy, LoginGate
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
#: The store down when a relink asks every session to check the log's heads: retried, one line per window.
_heads_failures = ThrottledLog(log, "catch-ups after a relink: storage unavailable (retrying)")
#: The commands that pass the hub's shared rate limits before they are carried out.
_GATED = (cmd.Submit, cmd.SaveCursor, cmd.MarkRead, cmd.SendTyping)
#: Seconds a login waits at most for the transfer nodes to route its user here (``Router.announce``);
#: a link that answers later has every session check the log once it does.
ANNOUNCE_WAIT = 5.0


class ConnectionHub(Protocol):
    """What a connection (and its transport) uses of its hub: :class:`Hub` is the one the servers make.
    A protocol rather than the class so that the compiled build (``scripts/compile.py``) lets a connection
    run against any hub that has these, such as the tests' pre-authentication stand-in."""

    cache: EncodedCache
    limits: Limits
    preauth_send_buffer: int
    max_send_buffer: int
    rates: SharedRateGate
    logins: LoginGate
    accounts: AccountService
    reads: ChatReads
    submit: SubmitSend
    replay_page: int
    live_wait: float
    catch_ups: int

    def add(self, conn: Connection) -> None: ...
    def unregister(self, conn: Connection) -> None: ...
    async def register(self, conn: Connection) -> None: ...
    def schedule_flush(self, conn: Connection) -> None: ...
    def save_cursor(self, uid: int, device: str, conv: str, seq: int) -> None: ...
    def mark_read(self, uid: int, conv: str, seq: int) -> None: ...
    async def typing(self, uid: int, device: str, conv: str) -> None: ...
    async def check_heads(self, conns: Sequence[Connection]) -> None: ...


@mypyc_attr(allow_interpreted_subclasses=True)  # every transport (and a test's connection) subclasses it
class Connection(abc.ABC):
    """A session plus the I/O a transport provides (:meth:`write` and :meth:`close_transport`)."""

    #: The metrics label of the transport ("ws", "tcp"; empty: not counted, e.g. a test's connection).
    transport_label: ClassVar[str] = ""

    def __init__(self, hub: ConnectionHub) -> None:
        self.hub = hub
        self.session = ServerSession(hub.cache, limits=hub.limits, heartbeat=hub.limits.idle_timeout)
        #: Its running tasks (auth, fetches, ...); None while there are none: an idle connection holds no set.
        self._tasks: set[asyncio.Task[None]] | None = None
        self._dirty = False
        self.closed = False
        self.sid = ""  # the login session that authenticated this connection
        #: Its id in presence (set when it registers), and whether presence holds its claim: None while
        #: the claim is in flight, False when it failed (the refresh loop claims again).
        self.conn_id = ""
        self.claimed: bool | None = None
        #: Its leases of its user's shared budgets (sends, typing, receipts), made at the first
        #: rate-limited frame; of the conversations' send budgets by target (``conv`` or ``to``), made
        #: once per target. None until needed: idle connections hold nothing for the limits.
        self.user_leases: tuple[Lease, Lease, Lease] | None = None
        self.conv_sends: dict[str | int | None, Lease] | None = None
        #: Its commands waiting in the shared limits' queue: while any do, its later ones queue behind.
        self.gated = 0
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
        for task in self._tasks or ():
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
        ranges: list[tuple[str, int, int]] | None = None  # fetches from a known start: read together
        for c in commands:
            if isinstance(c, _GATED):
                if self.hub.rates.enabled:
                    self.hub.rates.gate(self, c)  # the shared rate limits, then perform()
                else:
                    self.perform(c)
            elif isinstance(c, cmd.Fetch):
                if c.after is None:  # a conversation first seen live: its start is read first
                    self._spawn(self._fetch(c))
                elif ranges is None:
                    ranges = [(c.conv, c.after, c.upto)]
                else:
                    ranges.append((c.conv, c.after, c.upto))
            elif isinstance(c, cmd.AwaitLive):
                asyncio.get_running_loop().call_later(self.hub.live_wait, self._live_wait_over, c.conv, c.seq)
            elif isinstance(c, cmd.Authenticate):
                self._spawn(self._authenticate(c))
            elif isinstance(c, cmd.Close):
                self.flush()
                self.close_transport(c.code)
        if ranges is not None:  # a gap, or the replay at login, a catch-up: one read for all of them
            self._spawn(self._fetch_ranges(ranges))

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
        if self._tasks is None:
            self._tasks = set()
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if self._tasks is not None:
            self._tasks.discard(task)
            if not self._tasks:
                self._tasks = None

    def _submit(self, c: cmd.Submit) -> None:
        s = self.session
        if not s.may_submit(c):  # an earlier send of its conversation was refused while it waited
            self.mark_dirty()
            return
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
            self.session.send_failed(req.cmid, err.code, err.message, err.retry_after, gateway=err.gateway)
        else:
            assert m is not None
            self.run(self.session.send_done(req.cmid, m, dup))
        self.mark_dirty()

    async def _authenticate(self, c: cmd.Authenticate) -> None:
        turn = self.hub.logins.admit()  # a bounded rate of logins (im.protocol.logins)
        if isinstance(turn, Busy):
            self.run(self.session.auth_busy(turn.retry_after))
            self.flush()
            return
        if turn:
            try:
                await asyncio.sleep(turn)
            except asyncio.CancelledError:
                self.hub.logins.give_back()
                raise
            if self.closed:  # gone while it waited: its turn goes to the next login, and no work is done
                self.hub.logins.give_back()
                return
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
        catch_ups = self.hub.catch_ups  # points read before a relink may miss what its link dropped
        try:
            points = await self.hub.reads.sync_points(principal.uid, c.device)
        except Exception as exc:
            self._sync_failed(exc)
            return
        self.run(self.session.auth_succeeded(principal.uid, c.device, points, c.cursors))
        self.flush()
        if self.hub.catch_ups != catch_ups:  # the hub's catch-up passed this session by while it authenticated
            try:
                await self.hub.check_heads([self])
            except Exception as exc:
                self._sync_failed(exc)

    def _sync_failed(self, exc: Exception) -> None:
        """The store did not say where the device stands: ``bye unavailable``; it resumes from its cursors."""
        _sync_failures.hit(f"uid={self.session.uid}: {type(exc).__name__}: {exc}", exc)
        METRICS.engine_error(exc)
        self.run(self.session.close(ErrorCode.UNAVAILABLE, "storage unavailable; reconnect later"))
        self.flush()

    def _live_wait_over(self, conv: str, seq: int) -> None:
        if not self.closed:
            self.run(self.session.live_wait_over(conv, seq))

    async def _fetch_ranges(self, ranges: list[tuple[str, int, int]]) -> None:
        """Fetches from a known start (conv, after, upto): one store read for all, page after page."""
        s = self.session
        METRICS.gap_fetches += len(ranges)
        try:
            found = await self.hub.reads.replay_ranges(ranges, self.hub.replay_page)
        except Exception as exc:
            self._replay_failed(f"convs={len(ranges)}", exc)
            return
        more: list[cmd.Command] = []  # the next pages, if any: again one read for all
        for conv, after, _ in ranges:
            more.extend(s.fetched(conv, after, found.get(conv, [])))
        self.run(more)
        self.flush()

    async def _fetch(self, c: cmd.Fetch) -> None:
        """A conversation first seen live (``after`` None): where the device starts is read first."""
        s = self.session
        METRICS.gap_fetches += 1
        try:
            start, messages = await self.hub.reads.replay(
                s.uid, s.device, c.conv, c.after, c.upto, self.hub.replay_page
            )
        except Exception as exc:
            self._replay_failed(f"conv={c.conv[:80]}", exc)
            return
        self.run(s.fetched(c.conv, start, messages))
        self.flush()

    def _replay_failed(self, what: str, exc: Exception) -> None:
        """The store did not give what the device lacks: ``bye unavailable``; it resumes from its cursors."""
        _replay_failures.hit(f"uid={self.session.uid} {what}: {type(exc).__name__}: {exc}", exc)
        METRICS.engine_error(exc)
        self.run(self.session.close(ErrorCode.UNAVAILABLE, "storage unavailable; reconnect later"))
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
        live_wait: float = 0.05,
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
        #: Seconds a device's own result, come ahead of the live messages before it (a commit is answered
        #: before it is routed), waits for them before they are read from the store instead.
        self.live_wait = live_wait
        self.max_send_buffer = max_send_buffer
        self.preauth_send_buffer = preauth_send_buffer
        self.cache = EncodedCache()
        #: The rate at which logins start (``limits.auth_rate``, read from ``limits`` on each login).
        self.logins = LoginGate(limits)
        self._presence_ttl = presence_ttl
        #: One connection per device across nodes (gateway/replacement.py).
        self.claims = DeviceClaims(node, presence, router, ttl=presence_ttl)
        self._cursor_interval = cursor_flush_interval
        self._by_user: dict[int, dict[str, Connection]] = {}
        #: Users whose first connection here was announced to the transfer nodes and not yet routed by
        #: all of them (``Router.announce``): a second device's login waits for the same answers.
        self._announcing: dict[int, list[asyncio.Future[None]]] = {}
        self._all: set[Connection] = set()
        self._to_flush: list[Connection] = []
        self._cursors: dict[tuple[int, str, str], int] = {}
        self._reads: dict[tuple[int, str], int] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()
        #: The shared rate limits (gateway/rates.py; without ``rates`` only the per-connection ones).
        self.rates = SharedRateGate(limiter, rates, self._all)
        #: Calls of :meth:`catch_up` (links that came up, drops reported), and the catch-up they started.
        self.catch_ups = 0
        self._catch_up: asyncio.Task[None] | None = None
        self._catch_up_everyone = False  # every open session is to check the log's heads
        self._catch_up_some: set[Connection] = set()  # these connections are (presence had lost them)
        self.heads_batch = 1000  # users whose heads one read fetches

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
        tasks = [*self._tasks, *([self.rates.task] if self.rates.task is not None else [])]
        if self._catch_up is not None:
            tasks.append(self._catch_up)
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

    def relocate_all(self) -> None:
        """This node's registration was found lost (its lease ran out while it was paused or cut off):
        routes went elsewhere meanwhile and other nodes may hold its devices. Every client is told to
        reconnect (``bye unavailable``) and resumes from its cursors elsewhere, rather than served on."""
        log.warning("registration lost: asking %d connections to reconnect", len(self._all))
        self._flush_marked()
        for conn in list(self._all):
            conn.run(conn.session.close(ErrorCode.UNAVAILABLE, "this gateway lost its registration; reconnect"))
            conn.flush()

    def pause_all(self) -> None:
        """Graceful stop, part one: read nothing more, so no new send is taken."""
        for conn in self._all:
            conn.pause_reading()

    # --- registration --------------------------------------------------------------------------------

    def held_users(self) -> Collection[int]:
        """DeliverySink: the users with a connection here, the table committers route by (a live
        view: read it where it is used)."""
        return self._by_user.keys()

    async def register(self, conn: Connection) -> None:
        """Hold the connection's device here: claimed in presence (an older connection of the device
        elsewhere is asked to close), and routed here by the transfer nodes before this returns (at most
        :data:`ANNOUNCE_WAIT`), so that where the device stands, read after this, misses nothing."""
        s = conn.session
        conn.conn_id = self.claims.new_id()
        devices = self._by_user.get(s.uid)
        if devices is None:  # its user's first connection here: announced once it is in held_users
            devices = self._by_user[s.uid] = {}
            announced = self._router.announce(s.uid, True)
            if announced:
                self._announcing[s.uid] = announced
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
        await self._routed_here(s.uid)

    async def _routed_here(self, uid: int) -> None:
        """Wait until every transfer node that routes by its gateways' tables has this node's entry for
        ``uid`` (at most :data:`ANNOUNCE_WAIT`; a link that answers later makes every session catch up)."""
        announced = self._announcing.get(uid)
        if not announced:
            return
        if all(done.done() for done in announced):
            del self._announcing[uid]
            return
        try:
            _, late = await asyncio.wait(announced, timeout=ANNOUNCE_WAIT)
            for done in late:
                done.cancel()
        finally:
            if self._announcing.get(uid) is announced and all(done.done() for done in announced):
                del self._announcing[uid]

    async def _set_offline(self, uid: int, device: str, conn_id: str) -> None:
        if device in self._by_user.get(uid, {}):
            return  # the device came back meanwhile: its entry is current
        try:
            await self._presence.set_offline([DeviceLocation(uid, device, self.node, conn_id)])
        except Exception as exc:  # the entry expires on its own within the presence TTL
            METRICS.engine_error(exc)
            _presence_failures.hit(f"{type(exc).__name__}: {exc}: uid={uid} device={device} not removed")

    def _held_by(self, location: DeviceLocation) -> Connection | None:
        """The connection of this node that ``location`` names, if it is still open here."""
        conn = self._by_user.get(location.uid, {}).get(location.device)
        return conn if conn is not None and conn.conn_id == location.conn else None

    def close_replaced(self, connections: Sequence[DeviceLocation]) -> None:
        """Close these connections if they are still the ones held here (by id): a newer connection of
        their device took over on another node (DeliverySink; the refresh loop's left-out entries)."""
        for c in connections:
            conn = self._held_by(c)
            if conn is not None:
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
                self._announcing.pop(s.uid, None)
                self._router.announce(s.uid, False)
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

    def catch_up(self, conns: Iterable[Connection] | None = None) -> None:
        """A transfer link came up, or its node dropped deliveries for this node (a full queue): what was
        committed for this node's devices meanwhile did not arrive (routers are at most once). Every open
        session (or only ``conns``: devices presence had lost, announced again) checks the log's heads in
        the background (:meth:`check_heads`), retried while the store does not answer, so no device waits
        for its conversation's next message to find the gap; more calls meanwhile make one more pass."""
        if conns is None:
            self.catch_ups += 1
            self._catch_up_everyone = True
        else:
            self._catch_up_some.update(conns)
        if self._catch_up is None or self._catch_up.done():
            self._catch_up = asyncio.get_running_loop().create_task(self._catch_up_pending(), name="im-hub-catch-up")

    async def caught_up(self) -> None:
        """Return once the catch-up the last call started has finished (at once when none runs)."""
        if self._catch_up is not None:
            await asyncio.shield(self._catch_up)

    async def _catch_up_pending(self) -> None:
        delay = 0.2
        while self._catch_up_everyone or self._catch_up_some:
            everyone, some = self._catch_up_everyone, self._catch_up_some
            self._catch_up_everyone, self._catch_up_some = False, set()
            failed: Exception | None = None
            try:
                await self.check_heads(list(self._all) if everyone else [c for c in some if not c.closed])
            except Exception as exc:  # the store is away: try again until it answers
                METRICS.engine_error(exc)
                _heads_failures.hit(f"{type(exc).__name__}: {exc}")
                self._catch_up_everyone |= everyone
                self._catch_up_some |= {c for c in some if not c.closed}  # a long outage keeps no closed ones
                failed = exc
            if failed is not None:  # paused outside the handler (im.compiled: no await inside ``except``)
                await retry_pause(delay, failed)
                delay = min(delay * 2, 5.0)

    async def check_heads(self, conns: Sequence[Connection]) -> None:
        """Have each open session of ``conns`` fetch what the log holds beyond what it delivered: one
        read of heads per ``heads_batch`` users."""
        by_uid: dict[int, list[Connection]] = {}
        for conn in conns:
            if conn.session.state is State.OPEN:
                by_uid.setdefault(conn.session.uid, []).append(conn)
        uids = list(by_uid)
        for i in range(0, len(uids), self.heads_batch):
            chunk = uids[i : i + self.heads_batch]
            heads = await self.reads.heads(chunk)
            for uid in chunk:
                for conn in by_uid[uid]:
                    if not conn.closed:
                        cmds = conn.session.check_heads(heads.get(uid, {}))
                        if cmds:
                            METRICS.catch_up_fetches += len(cmds)
                            conn.run(cmds)

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
                raise_if_cancelling(exc)
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
                await self.refresh_presence()

    async def refresh_presence(self) -> None:
        """Re-announce every connection presence holds (closing those another node's connection of the
        same device displaced meanwhile), and claim again those whose claim failed; a claim in flight is
        left to finish (refreshing it first could find the older holder and close the newer one).
        Devices presence had lost (its data emptied, an entry expired) were routed to nowhere meanwhile:
        they check the log for what they missed (:meth:`catch_up`)."""
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
                refreshed = await self._presence.refresh(held, self._presence_ttl)
                self.close_replaced(refreshed.left_out)
                if refreshed.absent:
                    self.catch_up(c for c in map(self._held_by, refreshed.absent) if c is not None)
            if failed:
                await self.claims.claim([location for _, location in failed])
                for conn, _ in failed:
                    conn.claimed = True
                self.catch_up(conn for conn, _ in failed)  # announced only now: routed nowhere until now
        except Exception as exc:  # keep the timers running; the next refresh tries again
            raise_if_cancelling(exc)
            METRICS.engine_error(exc)
            log.warning("presence refresh failed (%s: %s)", type(exc).__name__, exc)
