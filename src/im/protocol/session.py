"""The server side of one chat connection, as a state machine with no I/O.

The transport feeds it bytes (:meth:`ServerSession.receive`) and the results of the work it asked for
(:meth:`auth_succeeded`, :meth:`fetched`, :meth:`send_done`, ...); it answers with frames to write
(:meth:`data_to_send`) and :mod:`commands <im.protocol.commands>` for the transport to carry out. It never
awaits, so the same object runs under asyncio, in tests with no event loop, or under any other pump.

Two rules it keeps for every conversation (docs/protocol.md, "Ordering"):

1. A device receives a conversation's seqs strictly in order, with no gap and no repeat: a message is
   written only when it is ``delivered + 1``; a later one waits while the gap is fetched from the store.
2. Replay before live: after ``auth`` the stored messages after the device's cursors are written before
   any live message of the same conversation (live ones wait in ``pending`` meanwhile).

The sending device gets its own message as an ``ack`` at its place in that order, so its stream of seqs
(``msg`` and ``ack`` frames together) is dense too.

And one for the device's sends (docs/protocol.md section 8, "Sender order"; im.model.send_order): once a
send is refused with a retryable code at the gateway (this session's own limits, the gateway's shared
rate limits, no transfer link; the core's ``unavailable`` is held back by the committer itself), later
sends of the same conversation on this connection are refused ``unavailable`` until the refused one is
resent (or ``limits.send_order_hold`` passes), so they cannot be stored before it. Nothing is checked
while no send is held back.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Final

import msgspec

from im.model.chat import StoredMessage, SyncPoint
from im.model.errors import ErrorCode, ImError
from im.model.ids import direct_conv
from im.model.send_order import SendOrder, behind_refused
from im.observability.metrics import METRICS
from im.protocol import commands as cmd
from im.protocol.codec import Encoding, decode_client, encode
from im.protocol.frames import Auth, AuthOk, Bye, ClientFrame, Error, Ping, Pong, Read, Recv, Send, Synced, Typing
from im.protocol.messages import EncodedCache, ack_frame


class State(Enum):
    __hash__ = object.__hash__  # members are singletons: identity hashing, in C (Enum's own is Python code)

    AWAIT_AUTH = "await_auth"
    AUTHENTICATING = "authenticating"
    OPEN = "open"
    CLOSED = "closed"


# Read per message: statics in the compiled build, where State.OPEN would look the attribute up by name.
_OPEN: Final = State.OPEN
_JSON: Final = Encoding.JSON


# The one table of what each state accepts; anything else is answered with the error named here.
ACCEPTS: dict[State, tuple[frozenset[type], ErrorCode]] = {
    State.AWAIT_AUTH: (frozenset({Auth, Ping}), ErrorCode.UNAUTHENTICATED),
    State.AUTHENTICATING: (frozenset({Ping}), ErrorCode.UNAUTHENTICATED),
    State.OPEN: (frozenset({Send, Recv, Read, Typing, Ping}), ErrorCode.ALREADY_AUTHENTICATED),
    State.CLOSED: (frozenset(), ErrorCode.UNAUTHENTICATED),
}

#: Retryable refusals that only a gateway decides: they hold the conversation's later sends back here.
_AT_GATEWAY = frozenset({ErrorCode.RATE_LIMITED, ErrorCode.TOO_MANY_IN_FLIGHT})
_RESERVED_TYPES = frozenset({"system", "undecryptable"})  # server-made: system events; bodies that did not open
_json_encoder = msgspec.json.Encoder()


@dataclass(slots=True)
class Limits:
    max_frame_bytes: int = 64 * 1024
    max_body_bytes: int = 32 * 1024
    max_cmid_length: int = 64
    max_device_length: int = 64
    max_in_flight: int = 1024
    send_rate: float = 2000.0
    typing_rate: float = 5.0
    auth_timeout: float = 10.0
    idle_timeout: float = 60.0
    #: Logins (``auth`` frames) a gateway process starts per second, bursts, and the longest wait for a
    #: turn before a login is refused with ``retry_after`` (im.protocol.logins).
    auth_rate: float = 500.0
    auth_burst: int = 200
    auth_max_wait: float = 2.0
    #: Seconds a refused send holds its conversation's later sends back at most (im.model.send_order).
    send_order_hold: float = 30.0


class TokenBucket:
    """``rate`` events per second with bursts of ``2 * rate``. The rate is given on every :meth:`take`, so
    a rate changed while the server runs (im.live_config) applies to buckets already made."""

    __slots__ = ("_last", "_tokens")

    def __init__(self, rate: float, now: float) -> None:
        self._tokens = max(1.0, 2 * rate)
        self._last = now

    def take(self, now: float, rate: float) -> bool:
        self._tokens = min(max(1.0, 2 * rate), self._tokens + (now - self._last) * rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


@dataclass(slots=True)
class ConvCursor:
    """Delivery state of one conversation on this connection."""

    delivered: int | None  # highest seq written to the client; None until the start point is known
    target: int = 0  # highest seq known to exist
    fetching: bool = False  # a fetch in flight, or (``awaiting_live``) the wait before one
    #: The device's own result came ahead of the live messages before it (a commit is answered before it
    #: is routed): they are waited for (:meth:`ServerSession.live_wait_over`) instead of read from the store.
    awaiting_live: bool = False
    pending: dict[int, StoredMessage] = field(default_factory=dict)  # live messages past a gap


class ServerSession:
    """One connection's protocol state. See the module docstring for the ordering rules."""

    def __init__(
        self,
        cache: EncodedCache,
        *,
        limits: Limits | None = None,
        heartbeat: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        #: Shared by every session of a hub and changed in place when a dynamic setting changes
        #: (im.live_config): read on each use, so the rates and sizes apply to open connections too.
        self.limits = limits or Limits()
        #: The frame size is the exception: the one announced in ``auth_ok`` holds for the connection.
        self.max_frame_bytes = self.limits.max_frame_bytes
        self.state = State.AWAIT_AUTH
        self.encoding: Encoding | None = None
        self.uid = 0
        self.device = ""
        self._cache = cache
        self._clock = clock
        self._heartbeat = heartbeat if heartbeat is not None else self.limits.idle_timeout
        now = clock()
        self._opened_at = now
        self._last_rx = now
        self._send_bucket = TokenBucket(self.limits.send_rate, now)
        self._typing_bucket = TokenBucket(self.limits.typing_rate, now)
        self._out: list[bytes] = []
        self._convs: dict[str, ConvCursor] = {}
        #: Sends handed to the core, unanswered: cmid -> (the frame, its number on this connection, the
        #: conversation it was sent to). A stored message of ours answers it only if the conversation matches
        #: too (a cmid reused for another conversation is refused, never acked by the earlier message).
        self._in_flight: dict[str, tuple[Send, int, str]] = {}
        self._sends = 0  # sends numbered so far (the order of refusals, im.model.send_order)
        self._order: SendOrder[str] | None = None  # made at the first retryable refusal of a send
        self._initial: set[str] | None = None  # conversations still replaying since auth
        #: Auth cursors of conversations not tracked yet (joined later); None when there are none (most
        #: sessions: an idle one holds no dict for them).
        self._named: dict[str, int] | None = None
        self._early: list[StoredMessage] = []  # live messages that came while authenticating

    # --- input from the client ----------------------------------------------------------------------

    def receive(self, data: bytes, binary: bool) -> list[cmd.Command]:
        """Handle one complete WebSocket message (or TCP frame) from the client."""
        if self.state is State.CLOSED:
            return []
        self._last_rx = self._clock()
        if self.encoding is None:
            self.encoding = Encoding.MSGPACK if binary else Encoding.JSON
        if len(data) > self.max_frame_bytes:
            self.oversized(len(data))
            return []
        try:
            frame = decode_client(data, Encoding.MSGPACK if binary else Encoding.JSON)
        except ImError as exc:
            self._error(exc.code, exc.message, exc.ref)
            return []
        accepted, refusal = ACCEPTS[self.state]
        if type(frame) not in accepted:
            ref = frame.cmid if isinstance(frame, Send) else None
            self._error(refusal, f"{self.state.value}: cannot take a {type(frame).__name__.lower()} frame", ref)
            return []
        return self._handle(frame)

    def refuse(self, code: ErrorCode, message: str, retry_after: float | None = None) -> None:
        """Answer a frame the transport could not even hand over (bad framing), or one the gateway
        refused (a shared rate limit), with an error."""
        self._error(code, message, retry_after=retry_after)

    def oversized(self, size: int) -> None:
        """A frame too large to take (the transport may not even have kept its bytes)."""
        self._error(ErrorCode.TOO_LARGE, f"frame of {size} bytes > {self.max_frame_bytes}")

    def _handle(self, frame: ClientFrame) -> list[cmd.Command]:
        if isinstance(frame, Send):
            return self._on_send(frame)
        if isinstance(frame, Recv):
            if self._check_cursor(frame.conv, frame.seq):
                return [cmd.SaveCursor(frame.conv, frame.seq)]
            return []
        if isinstance(frame, Read):
            if self._check_cursor(frame.conv, frame.seq):
                return [cmd.MarkRead(frame.conv, frame.seq)]
            return []
        if isinstance(frame, Typing):
            if frame.conv in self._convs:
                if self._typing_bucket.take(self._clock(), self.limits.typing_rate):
                    return [cmd.SendTyping(frame.conv)]
                METRICS.rate_limited["session-typing"] += 1
            return []
        if isinstance(frame, Ping):
            self._emit(Pong(id=frame.id))
            return []
        assert isinstance(frame, Auth)
        if not frame.device or len(frame.device) > self.limits.max_device_length:
            self._error(ErrorCode.INVALID, f"device must be 1..{self.limits.max_device_length} characters")
            return []
        if any(not isinstance(s, int) or s < 0 for s in frame.cursors.values()):
            self._error(ErrorCode.INVALID, "cursors must be non-negative integers")
            return []
        self.state = State.AUTHENTICATING
        return [cmd.Authenticate(frame.token, frame.device, dict(frame.cursors))]

    def _on_send(self, frame: Send) -> list[cmd.Command]:
        cmid, conv, to, type_ = frame.cmid, frame.conv, frame.to, frame.type  # each read once: see _OPEN
        limits = self.limits
        problem = None
        retry_after = None
        if not cmid or len(cmid) > limits.max_cmid_length:
            problem = (ErrorCode.INVALID, f"cmid must be 1..{limits.max_cmid_length} characters")
        elif (conv is None) == (to is None):
            problem = (ErrorCode.INVALID, "give exactly one of 'conv' and 'to'")
        elif not type_ or len(type_) > 32 or type_ in _RESERVED_TYPES:
            problem = (ErrorCode.INVALID, f"message type {type_[:40]!r} is not allowed")
        elif cmid in self._in_flight:
            return []  # the same send is being committed; its ack answers both
        elif (held := self._order) is not None and held.held and (barring := held.barring(self._target(frame), cmid)):
            problem = (ErrorCode.UNAVAILABLE, behind_refused(barring).message)
        elif len(self._in_flight) >= limits.max_in_flight:
            problem = (ErrorCode.TOO_MANY_IN_FLIGHT, f"more than {limits.max_in_flight} unacked sends")
        elif not self._send_bucket.take(self._clock(), limits.send_rate):
            problem = (ErrorCode.RATE_LIMITED, f"more than {limits.send_rate:g} sends per second")
            METRICS.rate_limited["session-send"] += 1
            retry_after = 1 / limits.send_rate
        if problem is None:
            try:
                body = _json_encoder.encode(frame.body)
            except (TypeError, ValueError, RecursionError):  # e.g. MessagePack extension types
                body = b""
                problem = (ErrorCode.INVALID, "the body must be plain JSON data")
        if problem is None and len(body) > limits.max_body_bytes:
            problem = (ErrorCode.TOO_LARGE, f"body of {len(body)} bytes > {limits.max_body_bytes}")
        self._sends += 1
        if problem is not None:
            if problem[0] in _AT_GATEWAY:
                self._hold_back(frame, self._sends)
            self._error(problem[0], problem[1], cmid, retry_after)
            return []
        self._in_flight[cmid] = (frame, self._sends, self._conv_of(conv, to))
        return [cmd.Submit(cmid=cmid, conv=conv, to=to, type=type_, body=body)]

    def _sent_to(self, cmid: str) -> str | None:
        """The conversation of the unanswered send ``cmid`` (None: none in flight)."""
        entry = self._in_flight.get(cmid)
        return entry[2] if entry is not None else None

    def _target(self, frame: Send | cmd.Submit) -> str:
        """The conversation a send goes to (its key in the sender-order barriers)."""
        return self._conv_of(frame.conv, frame.to)

    def _conv_of(self, conv: str | None, to: int | None) -> str:
        """``conv``, or the direct conversation with ``to``."""
        return conv if conv is not None else direct_conv(self.uid, to or 0)

    def _hold_back(self, frame: Send, number: int) -> None:
        """Send ``frame`` (this connection's ``number``-th) was refused with a retryable code: later sends of
        its conversation are refused until it is resent (im.model.send_order)."""
        order = self._order
        if order is None:
            order = self._order = SendOrder(max_entries=max(16, self.limits.max_in_flight), clock=self._clock)
        order.hold = self.limits.send_order_hold
        order.refused(self._target(frame), frame.cmid, number)

    def may_submit(self, c: cmd.Submit) -> bool:
        """Whether a send the gateway held (its shared rate limits decide a batch at a time) may still go
        to the core. False when an earlier send of the same conversation was refused meanwhile: then this
        one is refused too (``unavailable``, resend the earlier one first)."""
        order = self._order
        if order is None or not order.held:
            return True
        entry = self._in_flight.get(c.cmid)
        if entry is None:
            return True
        barring = order.barring(self._target(c), c.cmid, entry[1])
        if barring is None:
            return True
        del self._in_flight[c.cmid]
        self._error(ErrorCode.UNAVAILABLE, behind_refused(barring).message, c.cmid)
        return False

    def _check_cursor(self, conv: str, seq: int) -> bool:
        state = self._convs.get(conv)
        if state is None or state.delivered is None or seq < 0 or seq > state.delivered:
            self._error(ErrorCode.INVALID, f"cursor {conv[:80]}:{seq} is beyond what was delivered")
            return False
        return True

    # --- results of the transport's work -----------------------------------------------------------

    def auth_succeeded(
        self, uid: int, device: str, points: Iterable[SyncPoint], cursors: dict[str, int]
    ) -> list[cmd.Command]:
        """Start the replay: each conversation from the client's cursor, else the stored one."""
        if self.state is not State.AUTHENTICATING:
            return []
        self.uid, self.device = uid, device
        self.state = State.OPEN
        self._emit(AuthOk(uid=uid, device=device, heartbeat=self._heartbeat, max_frame=self.max_frame_bytes))
        out: list[cmd.Command] = []
        self._initial = set()
        for point in points:
            start = min(max(cursors.get(point.conv, point.cursor), 0), point.last_seq)
            self._convs[point.conv] = ConvCursor(delivered=start, target=point.last_seq)
            if start < point.last_seq:
                self._initial.add(point.conv)
                self._convs[point.conv].fetching = True
                out.append(cmd.Fetch(point.conv, start, point.last_seq))
        self._maybe_synced(len(self._convs))
        self._named = {conv: seq for conv, seq in cursors.items() if conv not in self._convs} or None
        early, self._early = self._early, []
        for m in early:
            out.extend(self.deliver(m))
        return out

    def over_cap(self, reason: str, retry_after: float) -> list[cmd.Command]:
        """A new connection over a connection cap (TCP: docs/protocol.md section 3, "Connection caps"),
        turned away before any ``auth``."""
        return self._turn_away(reason, retry_after)

    def auth_busy(self, retry_after: float) -> list[cmd.Command]:
        """The gateway will not start this login now (im.protocol.logins)."""
        if self.state is not State.AUTHENTICATING:
            return []
        return self._turn_away(f"too many logins at once; retry in {retry_after:g}s", retry_after)

    def _turn_away(self, message: str, retry_after: float) -> list[cmd.Command]:
        """``error unavailable`` saying when to come back (``retry_after``), then ``bye unavailable``
        (reconnect: true) and close."""
        self._error(ErrorCode.UNAVAILABLE, message, retry_after=retry_after)
        return self.close(ErrorCode.UNAVAILABLE, message)

    def auth_failed(self, code: ErrorCode, message: str) -> list[cmd.Command]:
        self._error(code, message)
        return self.close(code, message, reconnect=False)

    def deliver(self, m: StoredMessage) -> list[cmd.Command]:
        """A committed message of a conversation this user is in (live, or the sender's own result)."""
        if self.state is not _OPEN:
            if self.state is State.AUTHENTICATING:
                self._early.append(m)  # the transport registers before reading sync points
            return []
        conv, seq = m.conv, m.seq
        state = self._convs.get(conv)
        if state is None:
            # First sight of this conversation on this connection: find where the device starts. The
            # cursor its auth named, if any (the user was not a member then: it holds the conversation from
            # an earlier membership), else the store decides (its saved cursor, or the join point).
            named = self._named.pop(conv, None) if self._named else None
            state = self._convs[conv] = ConvCursor(delivered=None, target=seq, fetching=True)
            state.pending[seq] = m
            return [cmd.Fetch(conv, None if named is None else min(named, seq - 1), seq - 1)]
        delivered = state.delivered
        if delivered is not None and seq <= delivered:
            return []
        if seq > state.target:
            state.target = seq
        if not state.fetching and delivered is not None and seq == delivered + 1:
            self._write(m)
            state.delivered = seq
            return []
        state.pending[seq] = m
        if state.fetching:
            if state.awaiting_live and delivered is not None and seq == delivered + 1:
                self._drain(state)
            return []
        assert delivered is not None
        state.fetching = True
        if m.sender == self.uid and m.device == self.device and self._sent_to(m.cmid) == conv:
            # This device's own result, ahead of the live messages before it: a commit is answered before
            # it is routed, so the other senders' messages of the same commit follow at once. Wait for them.
            state.awaiting_live = True
            return [cmd.AwaitLive(conv, seq)]
        return [cmd.Fetch(conv, delivered, seq - 1)]

    def _drain(self, state: ConvCursor) -> None:
        """:meth:`_write_pending`; a wait for live messages that so closed its gap ends."""
        self._write_pending(state)
        if not state.pending:
            state.fetching = state.awaiting_live = False

    def _write_pending(self, state: ConvCursor) -> None:
        """Write the pending messages that follow what was delivered, in order."""
        delivered = state.delivered
        assert delivered is not None
        pending = state.pending
        while (m := pending.pop(delivered + 1, None)) is not None:
            self._write(m)
            delivered = m.seq
        state.delivered = delivered

    def live_wait_over(self, conv: str, seq: int) -> list[cmd.Command]:
        """The wait that :class:`~im.protocol.commands.AwaitLive` asked for is over: fetch what did not
        come live (a delivery lost on the way, or later than the wait). A wait that ended with its gap
        (its ``seq`` written) is over already: a later wait of the conversation keeps its own time."""
        state = self._convs.get(conv)
        if state is None or not state.awaiting_live or seq not in state.pending or self.state is not _OPEN:
            return []
        state.awaiting_live = False  # still fetching: the own result waits in ``pending`` (a drain ends the wait)
        assert state.delivered is not None
        return [cmd.Fetch(conv, state.delivered, min(state.pending) - 1)]

    def check_heads(self, heads: dict[str, int]) -> list[cmd.Command]:
        """The log heads of the user's conversations (conv -> last seq), read after live delivery to this
        node may have dropped messages (a transfer link was down): fetch what the device lacks. A
        conversation the device has not seen on this connection is fetched from where the store says the
        device starts, as a first live message would be."""
        if self.state is not State.OPEN:
            return []
        out: list[cmd.Command] = []
        for conv, last in heads.items():
            state = self._convs.get(conv)
            if state is None:
                if last <= 0:
                    continue
                named = self._named.pop(conv, None) if self._named else None
                self._convs[conv] = ConvCursor(delivered=None, target=last, fetching=True)
                out.append(cmd.Fetch(conv, None if named is None else min(named, last), last))
                continue
            if last > state.target:
                state.target = last
            if state.fetching or state.delivered is None or last <= state.delivered:
                continue  # a fetch in flight goes on to ``target``
            state.fetching = True
            upto = min(state.pending) - 1 if state.pending else last
            out.append(cmd.Fetch(conv, state.delivered, upto))
        return out

    def fetched(self, conv: str, start: int, messages: list[StoredMessage]) -> list[cmd.Command]:
        """Stored messages after ``start`` (the resolved start point when the Fetch had ``after=None``)."""
        state = self._convs.get(conv)
        if state is None or self.state is not State.OPEN:
            return []
        if state.delivered is None:
            state.delivered = start
        for m in messages:
            if m.seq == state.delivered + 1:
                self._write(m)
                state.delivered = m.seq
        self._write_pending(state)
        for seq in [s for s in state.pending if s <= state.delivered]:
            m = state.pending.pop(seq)
            if m.sender == self.uid and m.device == self.device and self._sent_to(m.cmid) == m.conv:
                # Our own send, at or below where the device starts (it holds it): answer it, as a dup.
                del self._in_flight[m.cmid]
                self._emit(ack_frame(m, dup=True))
        if state.delivered < state.target and messages:
            upto = min(state.pending) - 1 if state.pending else state.target
            return [cmd.Fetch(conv, state.delivered, upto)]
        # Caught up (or the store had nothing more: the next live message retries the gap).
        state.fetching = False
        if self._initial is not None and conv in self._initial:
            self._initial.discard(conv)
            self._maybe_synced(len(self._convs))
        return []

    def send_done(self, cmid: str, m: StoredMessage, dup: bool) -> list[cmd.Command]:
        """The core committed (or had committed before, ``dup``) the send ``cmid``."""
        if self._sent_to(cmid) != m.conv:
            return []  # already acked in order through deliver() (the cmid may be in flight again, elsewhere)
        state = self._convs.get(m.conv)
        if state is not None and state.delivered is not None and m.seq <= state.delivered:
            del self._in_flight[cmid]
            self._emit(ack_frame(m, dup=True))
            return []
        return self.deliver(m)

    def send_failed(
        self, cmid: str, code: ErrorCode, message: str, retry_after: float | None = None, *, gateway: bool = False
    ) -> None:
        """The send ``cmid`` was refused. A refusal decided at the gateway (``rate_limited`` and
        ``too_many_in_flight`` always; ``unavailable`` when ``gateway``: no transfer link) holds the
        conversation's later sends on this connection back; the core's own ``unavailable`` does not here:
        the committer that refused it holds them back itself, in the order it saw the sends."""
        entry = self._in_flight.pop(cmid, None)
        if entry is not None and (code in _AT_GATEWAY or (gateway and code is ErrorCode.UNAVAILABLE)):
            self._hold_back(entry[0], entry[1])
        self._error(code, message, cmid, retry_after)

    def event(self, frame: object) -> None:
        """An ephemeral frame (typing, receipt) for this device."""
        if self.state is State.OPEN:
            self._emit(frame)

    def check_timers(self) -> list[cmd.Command]:
        """Call about once a second: closes connections that never authenticated or went silent."""
        now = self._clock()
        if self.state in (State.AWAIT_AUTH, State.AUTHENTICATING):
            if now - self._opened_at > self.limits.auth_timeout:
                return self.close(ErrorCode.AUTH_TIMEOUT, "no auth frame in time")
        elif self.state is State.OPEN and now - self._last_rx > self.limits.idle_timeout:
            return self.close(ErrorCode.IDLE_TIMEOUT, f"silent for {self.limits.idle_timeout:g}s")
        return []

    def close(self, code: ErrorCode, message: str, reconnect: bool = True) -> list[cmd.Command]:
        """Say ``bye`` and ask the transport to close."""
        if self.state is State.CLOSED:
            return []
        self._emit(Bye(code=code.value, message=message, reconnect=reconnect))
        self.state = State.CLOSED
        return [cmd.Close(code, message)]

    # --- output --------------------------------------------------------------------------------------

    def data_to_send(self) -> list[bytes]:
        """Encoded frames to write, in order; empties the queue."""
        out, self._out = self._out, []
        return out

    @property
    def has_output(self) -> bool:
        return bool(self._out)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def conversations(self) -> dict[str, ConvCursor]:
        return self._convs

    def _write(self, m: StoredMessage) -> None:
        entry = self._in_flight.get(m.cmid) if m.sender == self.uid and m.device == self.device else None
        if entry is not None and entry[2] == m.conv:
            del self._in_flight[m.cmid]
            self._emit(ack_frame(m))
        else:
            self._out.append(self._cache.msg(m, self.encoding or _JSON))
            METRICS.deliveries += 1

    def _maybe_synced(self, convs: int) -> None:
        if self._initial is not None and not self._initial:
            self._initial = None
            self._emit(Synced(convs=convs))

    def _emit(self, frame: object) -> None:
        self._out.append(encode(frame, self.encoding or _JSON))

    def _error(self, code: ErrorCode, message: str, ref: str | None = None, retry_after: float | None = None) -> None:
        self._emit(Error(code=code.value, message=message, ref=ref, retry_after=retry_after))
