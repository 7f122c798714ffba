"""The write path: every write to a conversation log goes through :class:`Committer`'s one task.

It takes all queued sends (and membership changes) at once, checks them against the cached conversation
state (:class:`~im.core.states.ConversationStates`) and consent, assigns dense seqs, drops duplicates by
client message id, writes them in one store transaction, and only then acks them and routes them to the
gateway nodes holding their recipients. While a commit is on disk the next batch gathers, so the number
of transactions per second stays small however many messages arrive (group commit). Who may change a
group's membership is decided by :mod:`im.core.membership`; :class:`~im.core.groups.Groups` is the API
for group writes in front of this committer.

The store is the judge when several committers share it (distributed mode): a batch whose heads moved
is refused whole with :class:`SeqConflict`; the committer reloads the state it cached and retries, so a
seq is never assigned twice nor skipped.

Fault isolation: whatever one send carries, it can fail only that send. An unexpected exception while
preparing one item refuses that item alone (``invalid``). A batch the store refuses (any exception but
SeqConflict) is split in halves, recursively, each part prepared again from reloaded state (seqs stay
dense, parts commit left to right so each conversation keeps its order), until the items the store will
not take are alone and refused ``invalid``: one poisoned item costs about log2(batch) extra store calls.
When an item is alone and still refused, one read asks the store whether it is up: if not, the store
itself is down and everything left is refused ``unavailable`` at once (log2(batch)+2 store calls, one
log line); if it is, the item is tried once more (a restart of the database may end between the
refusal and the read) and refused ``invalid`` only when it fails again while the store answers, and not
with an error that says the engine went away (``engine_unreachable``: a connection closed in the middle of
the call, as a pool's connection whose link broke earlier does, while the read went through another): a
refusal caused by the store being away is never final (the client resends the same cmid). Both are
logged as counted, rate-limited lines (im.throttled_log), never a traceback per send.

Message ids come from :attr:`Committer.ids` (im.core.ids), whose node id a claim assigns (distributed
mode) or which holds a fixed one (``im serve``). While no node id is held (a claim lost, not yet made
again) every pass refuses its items ``unavailable`` (retryable, same cmid) and stores nothing.

Fencing: each claim carries a token (``Snowflake.fence``: the etcd create revision of the claim key,
larger for every later claim). Before the first pass under a new claim the committer records its token
in the store (``ChatStore.raise_fence``), and every batch carries (node id, token); the store refuses a
batch whose token is below the one recorded for its node id (``FenceRefused``), in the batch's own
transaction. So a node paused past its lease, whose node id another node claimed and recorded meanwhile,
cannot commit when it wakes up, whatever it believes: its batch is refused ``unavailable`` (retryable),
minting stops and the claim is made again (``Snowflake.refused`` → the claim's ``on_refused``).

Sender order (im.model.send_order): a send refused ``unavailable`` here (store outage, contention, no node
id, fenced) bars the later sends of its (uid, device, conversation) until it is resent, is found stored
(resent to another node, which took it) or ``order_hold`` seconds pass, so a device's sends are stored in
the order it sent them. The check costs nothing while no barrier is held.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import msgspec
from opentelemetry.trace import Span

from im.backends.accounts import UserDirectory
from im.backends.chat import ChatStore
from im.backends.presence import Presence
from im.backends.routing import Router
from im.core.consent import Consent
from im.core.ids import Snowflake
from im.core.live_routes import LiveRoutes
from im.core.membership import MemberRequest, plan_member_change
from im.core.states import ConversationStates, unknown_conv
from im.model.chat import CommitBatch, ConversationState, Group, MemberChange, StoredMessage
from im.model.errors import ErrorCode, FenceRefused, ImError, SeqConflict
from im.model.ids import direct_conv, group_conv, parse_conv
from im.model.send_order import DEFAULT_HOLD, SendOrder, behind_refused
from im.observability import tracing
from im.observability.metrics import METRICS, engine_unreachable
from im.throttled_log import ThrottledLog

log = logging.getLogger(__name__)

#: ``done(request, message, dup, None)`` once durable, or ``done(request, None, False, error)``. The
#: request is handed back so a transport can pass one bound method for all its sends (no closure each).
SendCallback = Callable[["SendRequest", StoredMessage | None, bool, ImError | None], None]
#: Where a gateway hands its sends: :meth:`Committer.submit` in this process, or a transfer node's
#: (``TransferPool.submit``), with the same contract.
SubmitSend = Callable[["SendRequest", SendCallback], None]
#: Message types whose body refers to an uploaded file: ``{"file_id": "...", ...}``.
FILE_TYPES = frozenset({"image", "file"})


class FileRef(msgspec.Struct):
    file_id: str


_decode_file_ref = msgspec.json.Decoder(FileRef).decode


class FileAccess(Protocol):
    """What the send path asks of the file service (im.files)."""

    async def attachable(self, pairs: Sequence[tuple[int, str]]) -> set[tuple[int, str]]:
        """The (uid, file_id) pairs whose file exists and that user may read (so may send)."""
        ...


_encode_json = msgspec.json.Encoder().encode


def _no_node_id() -> ImError:
    """The refusal while this process holds no node id (its claim was lost and is being made again)."""
    return ImError(ErrorCode.UNAVAILABLE, "this node holds no message id range right now; retry")


def _fenced() -> ImError:
    """The refusal of a batch the store fenced off: this node's node id was claimed by another since."""
    return ImError(ErrorCode.UNAVAILABLE, "this node lost its message id range to another node; retry")


@dataclass(slots=True, init=False)
class SendRequest:
    """One client send as the committer takes it: ``conv`` names the conversation, or ``to`` the peer of
    a direct one; ``(uid, device, cmid)`` is its dedupe key. Not a msgspec struct (it is never encoded):
    in the compiled build (im.compiled) a native class, whose fields compiled code reads directly;
    ``__init__`` is written out because the dataclass one would run as Python code there."""

    uid: int
    device: str
    cmid: str
    conv: str | None
    to: int | None
    type: str
    body: bytes  # JSON text
    #: A sampled message's span in this process (tracing on; im.observability.tracing): the gateway's
    #: send span, or on a transfer node the context the gateway carried.
    trace: Span | None

    def __init__(
        self,
        uid: int,
        device: str,
        cmid: str,
        conv: str | None,
        to: int | None,
        type: str,
        body: bytes,
        trace: Span | None = None,
    ) -> None:
        self.uid = uid
        self.device = device
        self.cmid = cmid
        self.conv = conv
        self.to = to
        self.type = type
        self.body = body
        self.trace = trace


@dataclass(slots=True, init=False)
class _Send:
    req: SendRequest
    done: SendCallback

    def __init__(self, req: SendRequest, done: SendCallback) -> None:
        self.req = req
        self.done = done


@dataclass(slots=True)
class _MemberOp:
    """A membership change, committed in the log as a ``system`` message."""

    req: MemberRequest
    done: asyncio.Future[None]


class _ItemBroke(Exception):
    """One item of a pass met an unexpected exception; ``touched``: the conversations the pass changed."""

    def __init__(self, item: _Send | _MemberOp, cause: Exception, touched: set[str]) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.item, self.cause, self.touched = item, cause, touched


@dataclass(slots=True)
class _Pass:
    """One batch in the making."""

    batch: CommitBatch = field(default_factory=CommitBatch)
    acks: list[tuple[_Send, StoredMessage | None, bool, ImError | None]] = field(default_factory=list)
    op_futures: list[asyncio.Future[None]] = field(default_factory=list)
    recipients: list[list[int]] = field(default_factory=list)  # per routed message
    routed: list[StoredMessage] = field(default_factory=list)
    read_marks: dict[tuple[int, str], int] = field(default_factory=dict)  # coalesced per (uid, conv)
    answered: bool = False  # its sends' done callbacks were called (Committer._finish)


class Committer:
    """The write path: group commit of sends and membership changes, seq assignment, dedupe by client
    message id, fault isolation, routing of what was committed. Thread-unsafe; lives on one event loop.

    ``states`` and ``consent`` are shared with the read side of the same process (its cache is kept
    true by this committer's passes); ``files`` checks attachments (None: no file messages pass)."""

    def __init__(
        self,
        store: ChatStore,
        accounts: UserDirectory,
        router: Router,
        presence: Presence,
        states: ConversationStates,
        consent: Consent,
        *,
        files: FileAccess | None = None,
        ids: Snowflake | None = None,
        max_batch: int = 2048,
        max_group_members: int = 2000,
        recent_sends: int = 50_000,
        order_hold: float = DEFAULT_HOLD,
        order_entries: int = 100_000,
        answer_wait: float = 0.0,
        answer_wait_max_batch: int = 64,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        #: Seconds a committed batch's answers wait for its routing (0: answered first, then routed), for
        #: batches of at most ``answer_wait_max_batch`` messages (larger ones are answered first).
        self.answer_wait = answer_wait
        self.answer_wait_max_batch = answer_wait_max_batch
        self._accounts = accounts
        self._files = files
        self._cache = states
        self._states = states.by_conv  # the hot path reads and edits the cached states in place
        self._consent = consent
        #: The message ids; a node id claim (im.backends.node_ids) assigns and revokes its node id.
        self.ids = Snowflake(0) if ids is None else ids
        self._max_batch = max_batch
        self._max_group_members = max_group_members
        self._clock = clock
        self._refreshed: dict[str, float] = {}  # conv -> when a refusal last re-read its state
        self._recent: OrderedDict[tuple[int, str, str], StoredMessage] = OrderedDict()
        self._recent_max = recent_sends
        self._reroute: set[tuple[int, str, str]] = set()  # dups found in the store, to route once
        self._routes = LiveRoutes(presence, router)  # routing, and what waits to be routed again
        self._queue: list[_Send | _MemberOp] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.store_calls = 0  # store.commit calls, successful or not (fault-isolation tests count them)
        self._poison_log = ThrottledLog(log, "sends the store or the checks could not take")
        self._outage_log = ThrottledLog(log, "batches: storage unavailable", level=logging.ERROR)
        self._callback_log = ThrottledLog(log, "answers a send callback failed on", level=logging.ERROR)
        self._fence_log = ThrottledLog(log, "batches refused by the store's fence", level=logging.WARNING)
        self._fenced: tuple[int, int] | None = None  # the (node id, token) last recorded in the store
        self.fence_refusals = 0  # batches the store refused for a lower fencing token (tests read it)
        #: Sends refused ``unavailable`` that bar their device's later sends of the same conversation.
        self.order: SendOrder[tuple[int, str, str]] = SendOrder(hold=order_hold, max_entries=order_entries, clock=clock)

    # --- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="im-committer")

    async def stop(self) -> None:
        """Refuse new writes, finish what is queued (acked or refused, never half), then stop. Returns once
        the committer task has ended: every answer of its last batch has been handed to its ``done``
        callback (and routed), so whoever stops next can rely on them being with the transports."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None

    # --- the send path -------------------------------------------------------------------------------

    def submit(self, req: SendRequest, done: SendCallback) -> None:
        """Queue a send; ``done`` is called after it is durable, or with the refusal (see SendCallback)."""
        if self._closing:
            done(req, None, False, ImError(ErrorCode.UNAVAILABLE, "server is stopping; resend elsewhere"))
            return
        queue = self._queue
        queue.append(_Send(req, done))
        if len(queue) == 1:  # the loop waits only on an empty queue: wake it on the first (Event.set is Python)
            self._wake.set()

    async def send(self, req: SendRequest) -> tuple[StoredMessage, bool]:
        """Awaitable form of :meth:`submit`."""
        fut: asyncio.Future[tuple[StoredMessage, bool]] = asyncio.get_running_loop().create_future()

        def done(_req: SendRequest, m: StoredMessage | None, dup: bool, err: ImError | None) -> None:
            if not fut.done():
                if err is not None:
                    fut.set_exception(err)
                else:
                    assert m is not None
                    fut.set_result((m, dup))

        self.submit(req, done)
        return await fut

    async def _run(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wake.clear()
                if not self._routes.held:
                    await self._wake.wait()
                    continue
                try:  # messages whose routing failed: route them with the next commit, or after a back-off
                    await asyncio.wait_for(self._wake.wait(), self._routes.held.delay())
                    continue
                except TimeoutError:
                    pass
                await self._route_quietly(None)  # outside the handler (im.compiled: no await inside ``except``)
                continue
            # One turn of the loop before taking the batch: the last batch's acks and deliveries are
            # flushed, and the frames that arrived meanwhile join this batch instead of the next one.
            await asyncio.sleep(0)
            items, self._queue = self._queue[: self._max_batch], self._queue[self._max_batch :]
            if tracing.ON and (traces := [i.req.trace for i in items if type(i) is _Send and i.req.trace is not None]):
                with tracing.commit_batch(traces, len(items)):  # a batch carrying sampled messages
                    await self._commit_isolated(items)
            else:
                await self._commit_isolated(items)

    async def _commit_isolated(self, items: list[_Send | _MemberOp]) -> None:
        """Commit ``items``; if the store refuses the batch, split it so only what it will not take fails
        (module docstring, "Fault isolation"). Parts are tried depth first, left before right."""
        if self.order.held:  # sends behind a refused one: decided once for the batch, before any split
            await self._lift_stored(items)
            items = self._behind_refused(items)
        parts: list[list[_Send | _MemberOp]] = [items]
        while parts:
            part = parts.pop()
            failure = await self._try_commit(part)
            if failure is None:
                continue
            if len(part) > 1:
                half = len(part) // 2
                parts.append(part[half:])
                parts.append(part[:half])
                continue
            # Alone and refused: a poisoned item, or the store is away. An earlier part that committed
            # proves nothing (the store may have gone since), so ask it now; when it answers, the item
            # gets one more try (the store may just have come back: a restart ends between the two),
            # and only a second refusal while the store answers makes it poison.
            if await self._store_answers():
                again = await self._try_commit(part)
                if again is None:
                    continue
                failure = again
                if not engine_unreachable(failure) and await self._store_answers():
                    self._poison_log.hit(f"{type(failure).__name__}: {str(failure)[:200]}")
                    self._fail(part, ImError(ErrorCode.INVALID, "the server cannot store this message"))
                    continue
            rest = [i for p in (part, *reversed(parts)) for i in p]
            self._outage_log.hit(f"{len(rest)} items: {type(failure).__name__}: {failure}", failure)
            self._fail(rest, ImError(ErrorCode.UNAVAILABLE, f"storage error: {type(failure).__name__}"))
            return

    async def _try_commit(self, part: list[_Send | _MemberOp]) -> Exception | None:
        """:meth:`_commit`, its failure returned: the caller's next awaits then run outside any ``except``
        block (im.compiled: a compiled coroutine suspended in one leaks the exception to other tasks)."""
        try:
            await self._commit(part)
        except Exception as exc:
            return exc
        return None

    async def _store_answers(self) -> bool:
        """Whether the store is up (one read): tells a poisoned item from an outage once a part is alone."""
        try:
            await self._store.load_conversations(["g:1"])
        except Exception:
            return False
        return True

    async def _commit(self, items: list[_Send | _MemberOp]) -> None:
        for attempt in range(4):
            p = await self._prepare(items)
            if not p.batch.messages and not p.batch.member_changes:
                await self._answer_and_route(p)  # duplicates first stored by another writer, if any
                return
            started = time.perf_counter()
            conflict = False
            try:
                self.store_calls += 1
                await self._store.commit(p.batch)
            except FenceRefused as exc:
                # Another process claimed this node id since (this one was paused past its lease, say):
                # nothing was written; stop minting, claim again, refuse the items (retryable).
                for conv in p.batch.heads:
                    self._states.pop(conv, None)
                self._refused_by_fence(exc.token, f"{exc}; {len(items)} items refused")
                self._fail(items, _fenced())
                return
            except SeqConflict:
                # Another writer moved a head or a retry met its original: reload, look up, try again.
                for conv in p.batch.heads:
                    self._states.pop(conv, None)
                conflict = True
            except BaseException as exc:
                for conv in p.batch.heads:
                    self._states.pop(conv, None)
                if isinstance(exc, Exception):
                    METRICS.engine_error(exc)
                raise
            if conflict:  # looked up outside the handler (im.compiled: no await inside ``except``)
                keys = [(i.req.uid, i.req.device, i.req.cmid) for i in items if isinstance(i, _Send)]
                for key, m in (await self._store.find_sent(keys)).items():
                    self._remember(key, m)
                    # Stored by another writer (or an earlier life of this one), which may have died before
                    # routing it: route it again when answered (sessions drop seqs they already have).
                    self._reroute.add(key)
                if len(self._reroute) > 10_000:  # answered right below; bound it whatever happens
                    self._reroute.clear()
                log.info("seq conflict, retry %d", attempt + 1)
                continue
            METRICS.committed += len(p.batch.messages)
            if METRICS.enabled:
                METRICS.commit_seconds.observe(time.perf_counter() - started)
                METRICS.commit_batch.observe(len(p.batch.messages))
            for m in p.batch.messages:
                if m.type != "system":
                    self._remember((m.sender, m.device, m.cmid), m)
            await self._answer_and_route(p)
            return
        self._fail(items, ImError(ErrorCode.UNAVAILABLE, "conversation too contended; retry"))

    async def _answer_and_route(self, p: _Pass) -> None:
        """Answer a stored pass's sends and route its messages. With ``answer_wait`` the answers wait for
        the routing, at most that long: on a transfer node the results and the deliveries of a commit
        then leave in one link frame instead of two (the presence lookup in between is a Redis round
        trip, and the link's writer sent the results meanwhile). A lookup that takes longer (Redis slow
        or away) does not hold the answers past ``answer_wait``.

        Only a small batch waits (``answer_wait_max_batch``): the gRPC message it saves is a large share
        of its cost. A large one is answered first: there the saving is a few percent, and the gateway,
        which writes its next frame once its sends are answered, would wait for the lookup too (a closed
        loop of clients waiting for their acks delivered a sixth fewer messages at more CPU each)."""
        wait = self.answer_wait
        if wait <= 0 or len(p.routed) > self.answer_wait_max_batch:
            self._finish(p)
            await self._route_quietly(p)
            return
        timer = asyncio.get_running_loop().call_later(wait, self._finish_once, p)
        try:
            await self._route_quietly(p)
        except BaseException:  # cancelled: the batch is stored, answer it all the same
            timer.cancel()
            self._finish_once(p)
            raise
        timer.cancel()
        self._finish_once(p)

    def _finish_once(self, p: _Pass) -> None:
        if not p.answered:
            self._finish(p)

    async def _route_quietly(self, p: _Pass | None) -> None:
        """Route a pass's committed messages (None: only those held since a routing failed; core/live_routes.py)."""
        spans = tracing.committed(p.acks) if tracing.ON and p is not None else None  # a traced batch's
        try:
            if p is None:
                await self._routes.route_or_hold([], [])
            else:
                await self._routes.route_or_hold(p.routed, p.recipients)
        finally:
            if spans:
                tracing.routed(spans)

    def _finish(self, p: _Pass) -> None:
        p.answered = True
        for item, m, dup, err in p.acks:
            try:
                item.done(item.req, m, dup, err)
            except Exception as exc:  # a transport's bug: the batch is stored, answer the others
                self._callback_log.hit(f"{type(exc).__name__}: {str(exc)[:200]}", exc)
        for fut in p.op_futures:
            if not fut.done():
                fut.set_result(None)

    def _fail(self, items: Sequence[_Send | _MemberOp], err: ImError) -> None:
        if err.code is ErrorCode.UNAVAILABLE:
            self._hold_back(items)
        for item in items:
            if isinstance(item, _Send):
                item.done(item.req, None, False, err)
            elif not item.done.done():
                item.done.set_exception(err)

    def _hold_back(self, items: Sequence[_Send | _MemberOp]) -> None:
        """Sends refused ``unavailable``: bar their device's later sends of the same conversation."""
        order = self.order
        for item in items:
            if type(item) is _Send and isinstance(conv := self._safe_target(item), str):
                order.refused((item.req.uid, item.req.device, conv), item.req.cmid)

    async def _lift_stored(self, items: list[_Send | _MemberOp]) -> None:
        """Lift the barriers the sends of ``items`` would wait behind whose refused send is stored already.

        A send this node refused may be resent to another node and stored there (this one lost its node
        id, the gateways moved the conversation, then moved it back): the client has its ack and never
        resends it, so its barrier here would refuse the device's later sends until it expires. One store
        read for the batch, made only when a send of it would be barred; the store away, they all stay (the
        failure is counted in ``im_engine_errors_total``, as every other failed store call)."""
        order = self.order
        waits: dict[tuple[int, str, str], tuple[int, str, str]] = {}  # (uid, device, refused cmid) -> key
        for i in items:
            if type(i) is not _Send or not isinstance(c := self._safe_target(i), str):
                continue
            key = (i.req.uid, i.req.device, c)
            if (entry := order.held.get(key)) is not None and entry[0] != i.req.cmid:
                waits[(key[0], key[1], entry[0])] = key
        if not waits:
            return
        try:
            found = await self._store.find_sent(list(waits))
        except Exception as exc:
            METRICS.engine_error(exc)
            return
        for sent, m in found.items():
            if m.conv == waits[sent][2]:
                order.lift(waits[sent], sent[2])

    def _behind_refused(self, items: list[_Send | _MemberOp]) -> list[_Send | _MemberOp]:
        """Refuse the sends that wait for an earlier refused send of their device and conversation, in queue
        order (the refused one, resent, lifts the barrier for what follows it); return the others."""
        order, barred = self.order, {}
        for i in items:
            if type(i) is not _Send or not order.held or not isinstance(c := self._safe_target(i), str):
                continue
            if (barring := order.barring((i.req.uid, i.req.device, c), i.req.cmid)) is not None:
                barred[id(i)] = barring
                self._refuse_item(None, i, behind_refused(barring))
        return [i for i in items if id(i) not in barred] if barred else items

    def _remember(self, key: tuple[int, str, str], m: StoredMessage) -> None:
        self._recent[key] = m
        if len(self._recent) > self._recent_max:
            self._recent.popitem(last=False)

    async def _prepare(self, items: list[_Send | _MemberOp]) -> _Pass:
        """Check every item against cached state and build one batch (no I/O but batched loads).

        An unexpected exception while checking one item refuses that item alone: it is taken out of
        ``items`` (in place, so the caller's retries and splits no longer hold it), the cached states the
        pass touched are dropped (the store still has them as they were) and the pass starts again."""
        while True:
            try:
                return await self._prepare_pass(items)
            except _ItemBroke as broke:
                items[:] = [i for i in items if i is not broke.item]
                for conv in broke.touched:
                    self._states.pop(conv, None)
                exc = broke.cause
                self._poison_log.hit(f"{type(exc).__name__} preparing an item: {str(exc)[:200]}", exc)
                self._refuse_item(None, broke.item, ImError(ErrorCode.INVALID, "the server cannot take this message"))

    async def _prepare_pass(self, items: list[_Send | _MemberOp]) -> _Pass:
        p = _Pass()
        targets = [(item, self._safe_target(item)) for item in items]
        self._forget_if_stale(targets)
        await self._cache.load([c for _, c in targets if isinstance(c, str)])
        await self._load_consent(targets)
        # Both users of a first-time direct conversation must exist (however it was addressed).
        new_peers = {
            uid
            for item, c in targets
            if isinstance(c, str) and c not in self._states and isinstance(item, _Send) and c.startswith("d:")
            for uid in (parse_conv(c) or ("", ()))[1]
        }
        known = await self._accounts.get_users(sorted(new_peers)) if new_peers else {}
        attachable = await self._check_files([i for i, _ in targets if isinstance(i, _Send)])
        now_ms = int(self._clock() * 1000)
        if not self.ids.can_mint(now_ms, len(items)):  # no node id held (a claim lost): no message id
            self._hold_back(items)
            for item in items:
                self._refuse_item(p, item, _no_node_id())
            return p
        p.batch.fence = self.ids.fence
        if not await self._record_fence(p.batch.fence):  # a new claim: its token recorded before minting
            self._hold_back(items)
            for item in items:
                self._refuse_item(p, item, _fenced())
            p.batch.fence = None
            return p
        heads_before: dict[str, int] = {}
        in_batch: dict[tuple[int, str, str], StoredMessage] = {}
        for item, conv in targets:
            try:
                if isinstance(conv, ImError):
                    raise conv
                if isinstance(item, _Send):
                    self._prepare_send(p, item, conv, known, attachable, now_ms, heads_before, in_batch)
                else:
                    self._prepare_member_op(p, item, conv, now_ms, heads_before)
            except ImError as err:
                self._refuse_item(p, item, err)
            except Exception as exc:  # a bug or a value nothing checked: start again without this item
                touched = {*heads_before, *([conv] if isinstance(conv, str) else [])}
                raise _ItemBroke(item, exc, touched) from exc
        p.batch.read_marks = [(uid, conv, seq) for (uid, conv), seq in p.read_marks.items()]
        for conv, before in heads_before.items():
            state = self._states[conv]
            p.batch.heads[conv] = (before, state.last_seq, now_ms)
        return p

    async def _record_fence(self, fence: tuple[int, int] | None) -> bool:
        """Before the first id minted under a new claim: record its token in the store. False when the
        store holds a later claim of that node id already (then minting stops, the claim is made again)."""
        if fence is None or fence == self._fenced:
            return True
        held = await self._store.raise_fence(*fence)
        if held > fence[1]:
            self._refused_by_fence(fence[1], f"node id {fence[0]}: token {held} recorded, this claim has {fence[1]}")
            return False
        self._fenced = fence
        return True

    def _refused_by_fence(self, token: int, why: str) -> None:
        """The store holds a later claim of this node id: stop minting under it and let the claim know."""
        self.fence_refusals += 1
        self._fenced = None
        self._fence_log.hit(why)
        self.ids.refused(token)

    @staticmethod
    def _refuse_item(p: _Pass | None, item: _Send | _MemberOp, err: ImError) -> None:
        """Refuse one item: with the pass's acks (in batch order), or at once when there is no pass."""
        if isinstance(item, _Send):
            if p is not None:
                p.acks.append((item, None, False, err))
            else:
                item.done(item.req, None, False, err)
        elif not item.done.done():
            item.done.set_exception(err)

    def _safe_target(self, item: _Send | _MemberOp) -> str | ImError:
        try:
            return self._target(item)
        except Exception as exc:  # never one item's value breaking the whole pass
            self._poison_log.hit(f"{type(exc).__name__} addressing an item: {str(exc)[:200]}", exc)
            return ImError(ErrorCode.INVALID, "the server cannot take this message")

    async def _check_files(self, sends: list[_Send]) -> dict[int, str | ImError]:
        """For sends of file messages: id(send) -> the file id they may attach, or the refusal."""
        out: dict[int, str | ImError] = {}
        wanted: dict[int, tuple[int, str]] = {}
        for item in sends:
            if item.req.type not in FILE_TYPES:
                continue
            try:
                file_id = _decode_file_ref(item.req.body).file_id
            except (msgspec.DecodeError, msgspec.ValidationError):
                out[id(item)] = ImError(ErrorCode.INVALID, f"a {item.req.type} message needs a body with 'file_id'")
                continue
            wanted[id(item)] = (item.req.uid, file_id)
        if wanted:
            allowed = await self._files.attachable(list(set(wanted.values()))) if self._files else set()
            for key, pair in wanted.items():
                out[key] = pair[1] if pair in allowed else ImError(ErrorCode.NOT_FOUND, f"no file {pair[1][:80]!r}")
        return out

    def _forget_if_stale(self, targets: list[tuple[_Send | _MemberOp, str | ImError]]) -> None:
        """Drop cached state that another writer (an API process, another transfer node) may have changed
        in a way that would refuse an item: membership operations always read fresh state; a send from
        a user the cache says is not a member re-reads it (at most once a second per conversation), so a
        member added elsewhere is not refused. A removal elsewhere is caught by the head check."""
        now = self._clock()
        for item, conv in targets:
            if not isinstance(conv, str):
                continue
            state = self._states.get(conv)
            if state is None:
                continue
            if isinstance(item, _MemberOp):
                self._states.pop(conv, None)
            elif item.req.uid not in state.members and now - self._refreshed.get(conv, 0.0) > 1.0:
                self._refreshed[conv] = now
                self._states.pop(conv, None)
        if len(self._refreshed) > 10_000:
            self._refreshed.clear()

    def _target(self, item: _Send | _MemberOp) -> str | ImError:
        if isinstance(item, _MemberOp):
            return group_conv(item.req.gid)
        req = item.req
        if req.to is not None:
            if req.to == req.uid:
                return ImError(ErrorCode.INVALID, "cannot send a direct message to yourself")
            if req.to <= 0:
                return ImError(ErrorCode.NOT_FOUND, f"no user {req.to}")
            return direct_conv(req.uid, req.to)
        assert req.conv is not None
        if parse_conv(req.conv) is None:
            return unknown_conv(req.conv)
        return req.conv

    def _prepare_send(
        self,
        p: _Pass,
        item: _Send,
        conv: str,
        known: Mapping[int, object],
        attachable: Mapping[int, str | ImError],
        now_ms: int,
        heads_before: dict[str, int],
        in_batch: dict[tuple[int, str, str], StoredMessage],
    ) -> None:
        req = item.req
        uid = req.uid
        key = (uid, req.device, req.cmid)
        original = self._recent.get(key) or in_batch.get(key)
        if original is not None:
            if original.conv != conv:
                raise ImError(ErrorCode.INVALID, "cmid was already used for another conversation")
            p.acks.append((item, original, True, None))
            if key in self._reroute:
                self._reroute.discard(key)
                known_state = self._states.get(conv)
                if known_state is not None:
                    p.routed.append(original)
                    p.recipients.append(list(known_state.members))
            return
        state = self._states.get(conv)
        checked = False
        if state is None:
            parsed = parse_conv(conv)
            if parsed is None or parsed[0] != "direct":
                raise ImError(ErrorCode.NOT_FOUND, f"no conversation {conv}")
            a, b = parsed[1]
            peer = b if a == uid else a
            if uid not in (a, b):
                raise ImError(ErrorCode.NOT_MEMBER, f"not a member of {conv}")
            if peer not in known:
                raise ImError(ErrorCode.NOT_FOUND, f"no user {peer}")
            self._consent.check_send(uid, peer, new=True)
            checked = True
            state = ConversationState(conv, "direct", 0, {a: "member", b: "member"})
            self._states[conv] = state
            p.batch.new_conversations.append(ConversationState(conv, "direct", 0, dict(state.members)))
        members = state.members
        if uid not in members:
            raise ImError(ErrorCode.NOT_MEMBER, f"not a member of {conv}")
        if not checked and self._consent.restricted and state.kind == "direct":  # someone blocks someone
            for peer in members:
                if peer != uid:
                    self._consent.check_send(uid, peer, new=False)
        batch = p.batch
        file_id = attachable.get(id(item))
        if isinstance(file_id, ImError):
            raise file_id
        if file_id is not None:
            batch.file_refs.append((file_id, conv))
        seq = state.last_seq
        heads_before.setdefault(conv, seq)
        seq += 1
        state.last_seq = seq
        m = StoredMessage(
            conv=conv,
            seq=seq,
            mid=self.ids.next(now_ms),
            sender=uid,
            device=req.device,
            cmid=req.cmid,
            ts=now_ms,
            type=req.type,
            body=req.body,
        )
        in_batch[key] = m
        batch.messages.append(m)
        if req.trace is not None:  # a sampled message (tracing on): its context rides in the outbox row
            batch.traces[m.mid] = tracing.format_traceparent(req.trace.get_span_context())
        p.read_marks[(uid, conv)] = seq  # a sender has read up to its own message
        p.acks.append((item, m, False, None))
        p.routed.append(m)
        p.recipients.append(list(members))

    # --- consent (blocks, contacts-only): docs/protocol.md section 18 -----------------------------------

    async def _load_consent(self, targets: list[tuple[_Send | _MemberOp, str | ImError]]) -> None:
        """Before a pass: the privacy of both users of every direct send and of every user being added
        to a group, and whether a contacts-only peer has the sender as a contact (new conversations).
        A direct conversation whose users are both cached costs one lookup (``Consent.fresh_convs``)."""
        wanted: set[int] = set()
        new_direct: list[tuple[int, int]] = []
        directs: list[str] = []
        fresh = self._consent.fresh_convs()
        for item, conv in targets:
            if conv in fresh:
                continue
            if isinstance(item, _MemberOp):
                if item.req.op == "add":
                    wanted.update(item.req.uids)
                continue
            if not isinstance(conv, str) or not conv.startswith("d:"):
                continue
            state = self._states.get(conv)
            if state is not None:
                wanted.update(state.members)
                directs.append(conv)
            elif (parsed := parse_conv(conv)) is not None:
                wanted.update(parsed[1])
                new_direct.extend((item.req.uid, peer) for peer in parsed[1] if peer != item.req.uid)
        await self._consent.prepare(wanted, new_direct, directs)

    # --- membership changes ----------------------------------------------------------------------------

    def _prepare_member_op(self, p: _Pass, op: _MemberOp, conv: str, now_ms: int, heads: dict[str, int]) -> None:
        """Judge a membership change (im.core.membership) and, when it changes anything, apply it to the
        cached state and add its ``system`` message and member rows to the pass."""
        state = self._states.get(conv)
        plan = plan_member_change(state, op.req, consent=self._consent, max_members=self._max_group_members)
        changes = plan.changes
        if not changes:
            p.op_futures.append(op.done)
            return
        assert state is not None  # (the plan refuses an unknown group)
        before = dict(state.members)
        heads.setdefault(conv, state.last_seq)
        state.last_seq += 1
        mid = self.ids.next(now_ms)
        m = StoredMessage(
            conv=conv,
            seq=state.last_seq,
            mid=mid,
            sender=op.req.actor,
            device="",
            cmid=f"sys-{mid}",
            ts=now_ms,
            type="system",
            body=_encode_json(plan.event),
        )
        for uid, role in changes:
            if role is None:
                state.members.pop(uid, None)
            else:
                state.members[uid] = role
            joined = m.seq - 1 if uid not in before else 0
            p.batch.member_changes.append(MemberChange(conv, uid, role, joined))
        p.batch.messages.append(m)
        p.op_futures.append(op.done)
        p.routed.append(m)
        p.recipients.append(sorted(set(before) | set(state.members)))

    # --- routing ---------------------------------------------------------------------------------------

    # --- groups: the write half of im.core.groups ------------------------------------------------------

    async def create_group(self, owner: int, name: str, roles: dict[int, str]) -> Group:
        """Store a new group with ``roles`` (checked by the caller) and its first ``system`` message
        (seq 1, ``group_created``), then route that message to the members."""
        now_ms = int(self._clock() * 1000)
        if not self.ids.can_mint(now_ms):
            raise _no_node_id()
        fence = self.ids.fence
        if not await self._record_fence(fence):
            raise _fenced()
        mid = self.ids.next(now_ms)
        first = StoredMessage(
            conv="",
            seq=1,
            mid=mid,
            sender=owner,
            device="",
            cmid=f"sys-{mid}",
            ts=now_ms,
            type="system",
            body=_encode_json({"event": "group_created", "name": name, "by": owner, "uids": list(roles)}),
        )
        try:
            gid = await self._store.create_group(Group(0, name, owner, now_ms), first, roles, fence=fence)
        except FenceRefused as exc:
            self._refused_by_fence(exc.token, f"{exc}; a group creation refused")
            raise _fenced() from None
        first.conv = group_conv(gid)
        await self._routes.route([first], [list(roles)])
        return Group(gid, name, owner, now_ms)

    async def change_members(self, req: MemberRequest) -> None:
        """Queue a membership change and wait until it is committed (or refused: ImError). The users an
        ``add`` names must exist; the rules are :func:`~im.core.membership.plan_member_change`'s."""
        if self._closing:
            raise ImError(ErrorCode.UNAVAILABLE, "server is stopping")
        if req.op == "add":
            found = await self._accounts.get_users(req.uids)
            unknown = [u for u in req.uids if u not in found]
            if unknown:
                raise ImError(ErrorCode.NOT_FOUND, f"no user {unknown[0]}")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(_MemberOp(req, fut))
        self._wake.set()
        await fut
