"""The IM rules: who may write where, the next seq, dedupe by client message id, group commit, routing.

Every write to a conversation log goes through :class:`ChatService`'s one committer task, which takes
all queued sends (and membership changes) at once, checks them against cached conversation state,
assigns dense seqs, writes them in one store transaction, and only then acks and routes them. While a
commit is on disk the next batch gathers, so the number of transactions per second stays small however
many messages arrive (group commit).

The store is the judge when several committers share it (distributed mode): a batch whose heads moved
is refused whole with :class:`SeqConflict`; the committer reloads the state it cached and retries, so a
seq is never assigned twice nor skipped.

Fault isolation: whatever one send carries, it can fail only that send. An unexpected exception while
preparing one item refuses that item alone (``invalid``). A batch the store refuses (any exception but
SeqConflict) is split in halves, recursively, each part prepared again from reloaded state (seqs stay
dense, parts commit left to right so each conversation keeps its order), until the items the store will
not take are alone and refused ``invalid``: one poisoned item costs about log2(batch) extra store calls.
When an item is alone and still refused before any part committed, one read asks the store whether
it is up: if not, the store itself is down and everything left is refused ``unavailable`` at once
(log2(batch)+2 store calls, one log line). Both are logged as counted, rate-limited lines
(im.throttled_log), never a traceback per send.
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

from im.backends.accounts import AccountStore
from im.backends.chat import ChatStore
from im.backends.presence import Presence
from im.backends.routing import Router
from im.core.consent import Consent
from im.core.ids import Snowflake
from im.model.chat import CommitBatch, ConversationState, ConversationSummary, Group, MemberChange, StoredMessage
from im.model.errors import ErrorCode, ImError, SeqConflict
from im.model.ids import conv_out_of_range, direct_conv, group_conv, parse_conv
from im.throttled_log import ThrottledLog

log = logging.getLogger(__name__)

#: ``done(request, message, dup, None)`` once durable, or ``done(request, None, False, error)``. The
#: request is handed back so a transport can pass one bound method for all its sends (no closure each).
SendCallback = Callable[["SendRequest", StoredMessage | None, bool, ImError | None], None]
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


ROLES = ("owner", "admin", "member")
_encode_json = msgspec.json.Encoder().encode


def _unknown_conv(conv: str) -> ImError:
    """The refusal of a conversation id :func:`parse_conv` refused: ``invalid`` when only an id in it is
    out of range (docs/protocol.md section 6), else ``not_found``."""
    if conv_out_of_range(conv):
        return ImError(ErrorCode.INVALID, "ids in a conversation id are 1..2^63-1")
    return ImError(ErrorCode.NOT_FOUND, f"no conversation {conv[:80]!r}")


class SendRequest(msgspec.Struct, gc=False):
    uid: int
    device: str
    cmid: str
    conv: str | None
    to: int | None
    type: str
    body: bytes  # JSON text


@dataclass(slots=True)
class _Send:
    req: SendRequest
    done: SendCallback


@dataclass(slots=True)
class _MemberOp:
    """A membership change, committed in the log as a ``system`` message."""

    actor: int
    gid: int
    op: str  # "add" | "remove" | "leave" | "role"
    uids: list[int]
    role: str | None
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


class ChatService:
    """Conversations, groups and the send path. Thread-unsafe; lives on one event loop."""

    def __init__(
        self,
        store: ChatStore,
        accounts: AccountStore,
        router: Router,
        presence: Presence,
        *,
        files: FileAccess | None = None,
        node: str = "core-1",
        max_batch: int = 2048,
        max_group_members: int = 2000,
        history_page_max: int = 200,
        recent_sends: int = 50_000,
        state_ttl: float | None = None,
        privacy_ttl: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.accounts = accounts
        self.router = router
        self.presence = presence
        self.files = files
        self._ids = Snowflake(node)
        self._max_batch = max_batch
        self._max_group_members = max_group_members
        self._history_page_max = history_page_max
        self._clock = clock
        self._states: dict[str, ConversationState] = {}
        # None: this core is the only writer and its cache is the truth (im serve). A number: other
        # processes write too (distributed mode), so states older than this are read again.
        self._state_ttl = state_ttl
        self._loaded_at: dict[str, float] = {}
        self._refreshed: dict[str, float] = {}  # conv -> when a refusal last re-read its state
        self._recent: OrderedDict[tuple[int, str, str], StoredMessage] = OrderedDict()
        self._recent_max = recent_sends
        self._reroute: set[tuple[int, str, str]] = set()  # dups found in the store, to route once
        self._queue: list[_Send | _MemberOp] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        # privacy_ttl None: blocks and settings are cached until forget_privacy (im serve, whose
        # AccountService announces every change); a number: read again when older (distributed mode).
        self.consent = Consent(accounts, store, ttl=privacy_ttl, clock=clock)
        self.commits = 0  # transactions written (for the benchmark's report)
        self.committed = 0  # messages written
        self.store_calls = 0  # store.commit calls, successful or not (fault-isolation tests count them)
        self._poison_log = ThrottledLog(log, "sends the store or the checks could not take")
        self._outage_log = ThrottledLog(log, "batches: storage unavailable", level=logging.ERROR)
        self._callback_log = ThrottledLog(log, "answers a send callback failed on", level=logging.ERROR)

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
        self._queue.append(_Send(req, done))
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
                await self._wake.wait()
                continue
            items, self._queue = self._queue[: self._max_batch], self._queue[self._max_batch :]
            await self._commit_isolated(items)

    async def _commit_isolated(self, items: list[_Send | _MemberOp]) -> None:
        """Commit ``items``; if the store refuses the batch, split it so only what it will not take fails
        (module docstring, "Fault isolation"). Parts are tried depth first, left before right."""
        parts: list[list[_Send | _MemberOp]] = [items]
        store_alive = False  # proven by a part that committed, or by a probe
        while parts:
            part = parts.pop()
            try:
                await self._commit(part)
            except Exception as exc:
                if len(part) > 1:
                    half = len(part) // 2
                    parts.append(part[half:])
                    parts.append(part[:half])
                    continue
                if not store_alive:
                    store_alive = await self._store_answers()
                if not store_alive:
                    rest = [i for p in (part, *reversed(parts)) for i in p]
                    self._outage_log.hit(f"{len(rest)} items: {type(exc).__name__}: {exc}", exc)
                    self._fail(rest, ImError(ErrorCode.UNAVAILABLE, f"storage error: {type(exc).__name__}"))
                    return
                self._poison_log.hit(f"{type(exc).__name__}: {str(exc)[:200]}")
                self._fail(part, ImError(ErrorCode.INVALID, "the server cannot store this message"))
                continue
            store_alive = True

    async def _store_answers(self) -> bool:
        """Whether the store is up (one read): tells a poisoned item from an outage once a part is alone."""
        try:
            await self.store.load_conversations(["g:1"])
        except Exception:
            return False
        return True

    async def _commit(self, items: list[_Send | _MemberOp]) -> None:
        for attempt in range(4):
            p = await self._prepare(items)
            if not p.batch.messages and not p.batch.member_changes:
                self._finish(p)
                await self._route_quietly(p)  # duplicates first stored by another writer, if any
                return
            try:
                self.store_calls += 1
                await self.store.commit(p.batch)
            except SeqConflict:
                # Another writer moved a head or a retry met its original: reload, look up, try again.
                for conv in p.batch.heads:
                    self._states.pop(conv, None)
                keys = [(i.req.uid, i.req.device, i.req.cmid) for i in items if isinstance(i, _Send)]
                for key, m in (await self.store.find_sent(keys)).items():
                    self._remember(key, m)
                    # Stored by another writer (or an earlier life of this one), which may have died before
                    # routing it: route it again when answered (sessions drop seqs they already have).
                    self._reroute.add(key)
                if len(self._reroute) > 10_000:  # answered right below; bound it whatever happens
                    self._reroute.clear()
                log.info("seq conflict, retry %d", attempt + 1)
                continue
            except BaseException:
                for conv in p.batch.heads:
                    self._states.pop(conv, None)
                raise
            self.commits += 1
            self.committed += len(p.batch.messages)
            for m in p.batch.messages:
                if m.type != "system":
                    self._remember((m.sender, m.device, m.cmid), m)
            self._finish(p)
            await self._route_quietly(p)
            return
        self._fail(items, ImError(ErrorCode.UNAVAILABLE, "conversation too contended; retry"))

    async def _route_quietly(self, p: _Pass) -> None:
        try:
            await self._route(p.routed, p.recipients)
        except Exception as exc:  # acked and stored: sessions recover it from the log (gap fetch)
            log.warning("routing %d committed messages failed (%s: %s)", len(p.routed), type(exc).__name__, exc)

    def _finish(self, p: _Pass) -> None:
        for item, m, dup, err in p.acks:
            try:
                item.done(item.req, m, dup, err)
            except Exception as exc:  # a transport's bug: the batch is stored, answer the others
                self._callback_log.hit(f"{type(exc).__name__}: {str(exc)[:200]}", exc)
        for fut in p.op_futures:
            if not fut.done():
                fut.set_result(None)

    @staticmethod
    def _fail(items: Sequence[_Send | _MemberOp], err: ImError) -> None:
        for item in items:
            if isinstance(item, _Send):
                item.done(item.req, None, False, err)
            elif not item.done.done():
                item.done.set_exception(err)

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
        await self._load([c for _, c in targets if isinstance(c, str)])
        await self._load_consent(targets)
        # Both users of a first-time direct conversation must exist (however it was addressed).
        new_peers = {
            uid
            for item, c in targets
            if isinstance(c, str) and c not in self._states and isinstance(item, _Send) and c.startswith("d:")
            for uid in (parse_conv(c) or ("", ()))[1]
        }
        known = await self.accounts.get_users(sorted(new_peers)) if new_peers else {}
        attachable = await self._check_files([i for i, _ in targets if isinstance(i, _Send)])
        now_ms = int(self._clock() * 1000)
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
            allowed = await self.files.attachable(list(set(wanted.values()))) if self.files else set()
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
            return group_conv(item.gid)
        req = item.req
        if req.to is not None:
            if req.to == req.uid:
                return ImError(ErrorCode.INVALID, "cannot send a direct message to yourself")
            if req.to <= 0:
                return ImError(ErrorCode.NOT_FOUND, f"no user {req.to}")
            return direct_conv(req.uid, req.to)
        assert req.conv is not None
        if parse_conv(req.conv) is None:
            return _unknown_conv(req.conv)
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
        key = (req.uid, req.device, req.cmid)
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
            peer = b if a == req.uid else a
            if req.uid not in (a, b):
                raise ImError(ErrorCode.NOT_MEMBER, f"not a member of {conv}")
            if peer not in known:
                raise ImError(ErrorCode.NOT_FOUND, f"no user {peer}")
            self.consent.check_send(req.uid, peer, new=True)
            checked = True
            state = ConversationState(conv, "direct", 0, {a: "member", b: "member"})
            self._states[conv] = state
            p.batch.new_conversations.append(ConversationState(conv, "direct", 0, dict(state.members)))
        if req.uid not in state.members:
            raise ImError(ErrorCode.NOT_MEMBER, f"not a member of {conv}")
        if not checked and self.consent.restricted and state.kind == "direct":  # someone blocks someone
            for peer in state.members:
                if peer != req.uid:
                    self.consent.check_send(req.uid, peer, new=False)
        file_id = attachable.get(id(item))
        if isinstance(file_id, ImError):
            raise file_id
        if file_id is not None:
            p.batch.file_refs.append((file_id, conv))
        heads_before.setdefault(conv, state.last_seq)
        state.last_seq += 1
        m = StoredMessage(
            conv=conv,
            seq=state.last_seq,
            mid=self._ids.next(now_ms),
            sender=req.uid,
            device=req.device,
            cmid=req.cmid,
            ts=now_ms,
            type=req.type,
            body=req.body,
        )
        in_batch[key] = m
        p.batch.messages.append(m)
        p.read_marks[(req.uid, conv)] = m.seq  # a sender has read up to its own message
        p.acks.append((item, m, False, None))
        p.routed.append(m)
        p.recipients.append(list(state.members))

    # --- consent (blocks, contacts-only): docs/protocol.md section 18 -----------------------------------

    def forget_privacy(self, uid: int) -> None:
        """``uid``'s blocks or settings changed (in this process): the next check reads them again."""
        self.consent.forget(uid)

    async def _load_consent(self, targets: list[tuple[_Send | _MemberOp, str | ImError]]) -> None:
        """Before a pass: the privacy of both users of every direct send and of every user being added
        to a group, and whether a contacts-only peer has the sender as a contact (new conversations).
        A direct conversation whose users are both cached costs one lookup (``Consent.fresh_convs``)."""
        wanted: set[int] = set()
        new_direct: list[tuple[int, int]] = []
        directs: list[str] = []
        fresh = self.consent.fresh_convs()
        for item, conv in targets:
            if conv in fresh:
                continue
            if isinstance(item, _MemberOp):
                if item.op == "add":
                    wanted.update(item.uids)
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
        await self.consent.prepare(wanted, new_direct, directs)

    async def hidden_from(self, uid: int, viewers: Sequence[int]) -> set[int]:
        """Those of ``viewers`` that must not see ``uid``'s typing: see :meth:`Consent.hidden_from`."""
        return await self.consent.hidden_from(uid, viewers)

    async def devices(self, uid: int) -> list[tuple[str, int, bool]]:
        """The user's devices (those that ever synced, and those online now): (name, last activity in
        seconds since the epoch, online now), by name."""
        known = dict(await self.store.devices(uid))
        located = await self.presence.locate([uid])
        online = {loc.device for loc in located.get(uid, ())}
        return sorted((d, known.get(d, 0), d in online) for d in {*known, *online})

    async def leave_all_groups(self, uid: int) -> None:
        """Take ``uid`` out of every group it is in, as if it left each (ownership passes on)."""
        for point in await self.store.sync_points(uid, ""):
            parsed = parse_conv(point.conv)
            if parsed is not None and parsed[0] == "group":
                try:
                    await self.leave_group(uid, parsed[1][0])
                except ImError as exc:  # already gone meanwhile: nothing to leave
                    log.info("leaving %s on account deletion: %s", point.conv, exc.message)

    def _prepare_member_op(self, p: _Pass, op: _MemberOp, conv: str, now_ms: int, heads: dict[str, int]) -> None:
        state = self._states.get(conv)
        if state is None or state.kind != "group":
            raise ImError(ErrorCode.NOT_FOUND, f"no group {op.gid}")
        actor_role = state.members.get(op.actor)
        if actor_role is None:
            raise ImError(ErrorCode.NOT_MEMBER, f"not a member of group {op.gid}")
        before = dict(state.members)
        changes: list[tuple[int, str | None]] = []
        if op.op == "add":
            if actor_role not in ("owner", "admin"):
                raise ImError(ErrorCode.FORBIDDEN, "only the owner and admins add members")
            fresh = [u for u in dict.fromkeys(op.uids) if u not in state.members]
            for u in fresh:
                self.consent.check_add(op.actor, u)
            if len(state.members) + len(fresh) > self._max_group_members:
                raise ImError(ErrorCode.INVALID, f"a group has at most {self._max_group_members} members")
            changes = [(u, "member") for u in fresh]
            event: dict[str, object] = {"event": "members_added", "uids": fresh, "by": op.actor}
        elif op.op == "remove":
            target = op.uids[0]
            role = state.members.get(target)
            if role is None:
                raise ImError(ErrorCode.NOT_FOUND, f"user {target} is not a member")
            if actor_role == "member" or role == "owner" or (actor_role == "admin" and role == "admin"):
                raise ImError(
                    ErrorCode.FORBIDDEN,
                    f"a{'n' if actor_role != 'member' else ''} {actor_role} "
                    f"cannot remove a{'n' if role != 'member' else ''} {role}",
                )
            changes = [(target, None)]
            event = {"event": "member_removed", "uid": target, "by": op.actor}
        elif op.op == "leave":
            changes = [(op.actor, None)]
            event = {"event": "member_left", "uid": op.actor}
            if actor_role == "owner":
                heirs = sorted(
                    (u for u in state.members if u != op.actor),
                    key=lambda u: (state.members[u] != "admin", u),
                )
                if heirs:
                    changes.append((heirs[0], "owner"))
                    event["new_owner"] = heirs[0]
        else:  # role
            target = op.uids[0]
            if actor_role != "owner":
                raise ImError(ErrorCode.FORBIDDEN, "only the owner changes roles")
            if op.role not in ("admin", "member"):
                raise ImError(ErrorCode.INVALID, "role must be 'admin' or 'member'")
            if state.members.get(target) in (None, "owner"):
                raise ImError(
                    ErrorCode.INVALID if target in state.members else ErrorCode.NOT_FOUND,
                    f"cannot change the role of user {target}",
                )
            changes = [(target, op.role)]
            event = {"event": "role_changed", "uid": target, "role": op.role, "by": op.actor}
        if not changes:
            p.op_futures.append(op.done)
            return
        heads.setdefault(conv, state.last_seq)
        state.last_seq += 1
        mid = self._ids.next(now_ms)
        m = StoredMessage(
            conv=conv,
            seq=state.last_seq,
            mid=mid,
            sender=op.actor,
            device="",
            cmid=f"sys-{mid}",
            ts=now_ms,
            type="system",
            body=_encode_json(event),
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

    async def _load(self, convs: Sequence[str]) -> None:
        ttl = self._state_ttl
        if ttl is not None:
            now = self._clock()
            loaded_at = self._loaded_at
            for c in convs:
                if now - loaded_at.get(c, -1e18) > ttl:
                    self._states.pop(c, None)
        missing = sorted({c for c in convs if c not in self._states})
        if missing:
            self._states.update(await self.store.load_conversations(missing))
            if ttl is not None:
                if len(self._loaded_at) > 100_000:
                    self._loaded_at.clear()
                self._loaded_at.update(dict.fromkeys(missing, now))

    async def _route(self, messages: list[StoredMessage], recipients: list[list[int]]) -> None:
        """Hand committed messages to the gateway nodes holding any recipient, one batch per node."""
        if not messages:
            return
        uids = {u for rs in recipients for u in rs}
        located = await self.presence.locate(uids)
        nodes_of = {uid: {loc.node for loc in locs} for uid, locs in located.items()}
        per_node: dict[str, tuple[list[StoredMessage], list[list[int]]]] = {}
        for m, rs in zip(messages, recipients, strict=True):
            targets: dict[str, list[int]] = {}
            for uid in rs:
                for node in nodes_of.get(uid, ()):
                    targets.setdefault(node, []).append(uid)
            for node, node_uids in targets.items():
                msgs, recs = per_node.setdefault(node, ([], []))
                msgs.append(m)
                recs.append(node_uids)
        for node, (msgs, recs) in per_node.items():
            self.router.publish(node, msgs, recs)

    # --- groups --------------------------------------------------------------------------------------

    async def create_group(self, owner: int, name: str, members: list[int]) -> Group:
        name = name.strip()
        if not 1 <= len(name) <= 100:
            raise ImError(ErrorCode.INVALID, "a group name has 1..100 characters")
        others = [u for u in dict.fromkeys(members) if u != owner]
        if len(others) + 1 > self._max_group_members:
            raise ImError(ErrorCode.INVALID, f"a group has at most {self._max_group_members} members")
        found = await self.accounts.get_users(others)
        unknown = [u for u in others if u not in found]
        if unknown:
            raise ImError(ErrorCode.NOT_FOUND, f"no user {unknown[0]}")
        await self.consent.load(set(others))
        for u in others:
            self.consent.check_add(owner, u)
        now_ms = int(self._clock() * 1000)
        mid = self._ids.next(now_ms)
        roles = {owner: "owner", **{u: "member" for u in others}}
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
        gid = await self.store.create_group(Group(0, name, owner, now_ms), first, roles)
        first.conv = group_conv(gid)
        await self._route([first], [list(roles)])
        return Group(gid, name, owner, now_ms)

    async def _member_op(self, actor: int, gid: int, op: str, uids: list[int], role: str | None = None) -> None:
        if self._closing:
            raise ImError(ErrorCode.UNAVAILABLE, "server is stopping")
        if op == "add":
            found = await self.accounts.get_users(uids)
            unknown = [u for u in uids if u not in found]
            if unknown:
                raise ImError(ErrorCode.NOT_FOUND, f"no user {unknown[0]}")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(_MemberOp(actor, gid, op, uids, role, fut))
        self._wake.set()
        await fut

    async def add_members(self, actor: int, gid: int, uids: list[int]) -> None:
        await self._member_op(actor, gid, "add", uids)

    async def remove_member(self, actor: int, gid: int, uid: int) -> None:
        if uid == actor:
            await self._member_op(actor, gid, "leave", [])
        else:
            await self._member_op(actor, gid, "remove", [uid])

    async def leave_group(self, uid: int, gid: int) -> None:
        await self._member_op(uid, gid, "leave", [])

    async def set_role(self, actor: int, gid: int, uid: int, role: str) -> None:
        await self._member_op(actor, gid, "role", [uid], role)

    async def group(self, actor: int, gid: int) -> Group:
        await self._require_member(actor, group_conv(gid))
        group = await self.store.get_group(gid)
        if group is None:
            raise ImError(ErrorCode.NOT_FOUND, f"no group {gid}")
        return group

    async def group_members(self, actor: int, gid: int) -> dict[int, str]:
        state = await self._require_member(actor, group_conv(gid))
        return dict(state.members)

    # --- reads ---------------------------------------------------------------------------------------

    async def _require_member(self, uid: int, conv: str) -> ConversationState:
        if parse_conv(conv) is None:
            raise _unknown_conv(conv)
        await self._load([conv])
        state = self._states.get(conv)
        if state is None:
            raise ImError(ErrorCode.NOT_FOUND, f"no conversation {conv}")
        if uid not in state.members:
            raise ImError(ErrorCode.NOT_MEMBER, f"not a member of {conv}")
        return state

    async def members_of(self, conv: str) -> dict[int, str]:
        return (await self.members_by_conv([conv]))[conv]

    async def members_by_conv(self, convs: Sequence[str]) -> dict[str, dict[int, str]]:
        """Members of each conversation (empty for an unknown one); what is not cached is read in one batch."""
        await self._load(convs)
        return {conv: dict(state.members) if (state := self._states.get(conv)) else {} for conv in convs}

    async def history(
        self, uid: int, conv: str, *, after: int | None, before: int | None, limit: int
    ) -> tuple[list[StoredMessage], bool]:
        """A page of the log, oldest first, and whether more lies beyond it in the paging direction."""
        await self._require_member(uid, conv)
        limit = max(1, min(limit, self._history_page_max))
        if after is not None:
            page = await self.store.read_range(conv, after, before, limit + 1)
            return page[:limit], len(page) > limit
        page = await self.store.read_range(conv, 0, before, limit + 1, newest_first=True)
        return list(reversed(page[:limit])), len(page) > limit

    async def conversations(self, uid: int) -> list[ConversationSummary]:
        return await self.store.list_conversations(uid)

    async def receipts(self, uid: int, conv: str) -> dict[int, tuple[int, int]]:
        """Per member of ``conv``: (read seq, delivered seq), the stored marks (docs/protocol.md section
        10). Delivered is the best delivery cursor of any of the member's devices, and at least their read
        mark (what was read was held). Members only."""
        await self._require_member(uid, conv)
        reads = await self.store.read_marks(conv)
        delivered = await self.store.delivered_marks(conv)
        return {m: (reads.get(m, 0), max(reads.get(m, 0), delivered.get(m, 0))) for m in sorted(reads)}

    async def online(self, viewer: int, uids: Sequence[int]) -> dict[int, bool]:
        """For each of ``uids``: whether it has a device online, under the presence rule (docs/protocol.md
        section 18): user X reads as online to V only when V is X, or when neither blocks the other and
        X has V as a contact, X and V are members of one group, or X has written in their direct
        conversation. Anyone else reads as offline, so one unsolicited message tells its sender nothing."""
        wanted = set(uids)
        visible = {viewer} & wanted
        others = wanted - visible
        if others:
            candidates = await self._presence_candidates(viewer, others)
            if candidates:
                visible |= candidates - await self.hidden_from(viewer, sorted(candidates))
        located = await self.presence.locate(sorted(visible)) if visible else {}
        return {u: u in located for u in uids}

    async def _presence_candidates(self, viewer: int, others: set[int]) -> set[int]:
        """Those of ``others`` that consented to ``viewer`` seeing them (blocks not yet applied)."""
        # The device name "" is never a real device: this lists the viewer's conversations, nothing else.
        groups: list[str] = []
        directs: dict[int, str] = {}
        for point in await self.store.sync_points(viewer, ""):
            parsed = parse_conv(point.conv)
            if parsed is None:
                continue
            kind, ids = parsed
            if kind == "group":
                groups.append(point.conv)
            else:
                directs.update((u, point.conv) for u in ids if u in others)
        found: set[int] = set()
        if groups:
            await self._load(groups)
            for conv in groups:
                state = self._states.get(conv)
                if state is not None and viewer in state.members:
                    found.update(u for u in state.members if u in others)
        rest = others - found
        if rest:
            found.update(x for x, _ in await self.accounts.contact_pairs([(x, viewer) for x in sorted(rest)]))
        pairs = [(x, directs[x]) for x in sorted(others - found) if x in directs]
        found.update(x for x, _ in await self.consent.wrote_in(pairs))
        return found

    async def replay(
        self, uid: int, device: str, conv: str, after: int | None, upto: int, limit: int
    ) -> tuple[int, list[StoredMessage]]:
        """Stored messages a device is missing: (start point, messages with start < seq <= upto)."""
        if after is None:
            after = await self.store.start_cursor(uid, device, conv)
        if upto <= after:
            return after, []
        return after, await self.store.read_range(conv, after, upto + 1, limit)
