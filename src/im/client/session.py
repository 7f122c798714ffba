"""The client side of one chat connection, as a state machine with no I/O.

:class:`ClientSession` builds the frames a client sends and consumes the frames the server sends. It never
awaits and owns no socket: a pump (:class:`im.client.Client`, a load generator, a test) moves bytes
between it and a transport. Its contract is three calls, as in python-websockets' sans-I/O core::

    out = session.connect(token)         # bytes of the auth frame; the session starts a new connection
    event = session.receive(data)        # one server frame in, at most one application event out
    frames = session.data_to_send()      # frames the session wants written (resends, recv, ...)

The session outlives its connections: cursors and the outbox carry over from one connection to the next,
which is what makes a reconnect resume where the last one stopped (docs/protocol.md sections 7-9).

Rules it keeps (docs/protocol.md, "Ordering guarantees" and "Client checklist"):

1. **Each message once, in order.** Per conversation it holds ``cursors[conv]``, the highest seq it has
   (from ``msg`` and non-``dup`` ``ack``). A ``msg`` with ``seq <= cursor`` is a duplicate and dropped. A
   ``msg`` past ``cursor + 1`` of a conversation it already holds is a gap, which the server promises
   never to produce; the session drops it and sets :attr:`~ClientSession.reconnect_reason`, and the pump
   reconnects stating its cursors so the server replays the gap.
2. **Every send acked once.** A send stays in the *outbox* (cmid -> :class:`~im.protocol.frames.Send`,
   in order) until its first ``ack`` or a final refusal; after ``auth_ok`` every outbox entry is written
   again, in the original order, with its original cmid. At most ``max_in_flight`` sends are written and
   unanswered at a time (the server refuses more with ``too_many_in_flight``); the rest wait their turn.
3. **Retryable refusals are retried, final ones reported.** ``unavailable``, ``rate_limited``,
   ``too_many_in_flight`` and ``unauthenticated`` keep the send in the outbox and hold back every later
   send; :meth:`retry`, called after the pump's back-off, writes them again once every send in flight is
   answered, refused ones first and in their original order (so the server stores them in the order they
   were sent: docs/protocol.md section 8, "Sender order"). Any other
   refusal removes the send and yields :class:`SendFailed`.

It cannot tell time: the pump decides when to ping (:meth:`ping`), when to retry (:meth:`retry`) and when
to report delivery (:meth:`flush_recv`).

Example, with no network at all::

    >>> from im.protocol.codec import Encoding
    >>> s = ClientSession("phone", encoding=Encoding.JSON)
    >>> s.connect("token")
    b'{"t":"auth","token":"token","device":"phone","cursors":{}}'
    >>> s.receive(b'{"t":"auth_ok","uid":1,"device":"phone","heartbeat":60.0,"max_frame":65536}')
    AuthOk(uid=1, device='phone', heartbeat=60.0, max_frame=65536)
    >>> send = s.send({"text": "hi"}, to=2, cmid="c-1")
    >>> s.data_to_send()
    [b'{"t":"send","cmid":"c-1","body":{"text":"hi"},"conv":null,"to":2,"type":"text"}']
    >>> s.receive(b'{"t":"ack","cmid":"c-1","conv":"d:1:2","seq":1,"mid":"9","ts":5,"dup":false}')
    Ack(cmid='c-1', conv='d:1:2', seq=1, mid='9', ts=5, dup=False)
    >>> s.cursors, len(s.outbox)
    ({'d:1:2': 1}, 0)
"""

from __future__ import annotations

import itertools
import secrets
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

import msgspec

from im.model.errors import ErrorCode
from im.protocol.codec import Encoding
from im.protocol.frames import (
    Ack,
    Auth,
    AuthOk,
    Bye,
    Error,
    Msg,
    Ping,
    Read,
    Receipt,
    Recv,
    Send,
    ServerFrame,
    Synced,
    Typing,
    TypingEvent,
)

__all__ = ["RETRYABLE", "ClientSession", "Event", "SendFailed", "State"]

#: Refusals of a ``send`` that are retried with the same cmid (docs/protocol.md section 7, rule 3).
RETRYABLE = frozenset(
    {ErrorCode.UNAVAILABLE, ErrorCode.RATE_LIMITED, ErrorCode.TOO_MANY_IN_FLIGHT, ErrorCode.UNAUTHENTICATED}
)


@dataclass(frozen=True, slots=True)
class SendFailed:
    """A send was refused for good (``invalid``, ``not_found``, ``not_member``, ``too_large``, ...).

    It has left the outbox; sending the same content again needs a new cmid.
    """

    send: Send
    code: str
    message: str


#: What :meth:`ClientSession.receive` hands the application. The frame types are the wire frames of
#: :mod:`im.protocol.frames` themselves (no copy): ``Msg`` a message, ``Ack`` one of our sends stored,
#: ``AuthOk`` connected, ``Synced`` caught up, ``Receipt``, ``TypingEvent``, ``Error`` (a refusal not tied
#: to a send), ``Bye`` (the server closes).
Event = AuthOk | Msg | Ack | Synced | Receipt | TypingEvent | Error | Bye | SendFailed


class State(Enum):
    """Connection states. The one table of what each allows is :data:`_SENDS_ALLOWED`."""

    IDLE = "idle"  # between connections (or before the first)
    AUTHENTICATING = "authenticating"  # auth written, waiting for auth_ok
    OPEN = "open"  # auth_ok received: sends, recv, read and typing go out
    CLOSED = "closed"  # the server said bye; connect() starts over


# Only ``auth`` and ``ping`` may precede ``auth_ok`` (docs/protocol.md section 3); anything else is queued
# (sends) or dropped (recv/read/typing: they describe state the next connection restates anyway).
_SENDS_ALLOWED = frozenset({State.OPEN})


class ClientSession:
    """One device's protocol state across connections: cursors, outbox, the connection state.

    Every tunable is keyword-only: ``encoding`` (JSON or MessagePack, fixed per connection), ``cursors``
    and ``outbox`` to resume from (e.g. loaded from disk), ``max_in_flight`` (unanswered sends written at
    once; the server's default limit is 1024) and ``cmid_prefix`` (cmids are ``<prefix>-<n>``; random by
    default, so two processes of one device never collide).
    """

    def __init__(
        self,
        device: str,
        *,
        encoding: Encoding = Encoding.JSON,
        cursors: Mapping[str, int] | None = None,
        outbox: Iterable[Send] = (),
        max_in_flight: int = 1024,
        cmid_prefix: str | None = None,
    ) -> None:
        self.device = device
        self.encoding = encoding
        self.max_in_flight = max_in_flight
        self.state = State.IDLE
        #: conv -> highest seq held (received as ``msg`` or non-dup ``ack``). Sent in every ``auth``.
        self.cursors: dict[str, int] = dict(cursors or {})
        #: conv -> highest seq the application has taken (see :meth:`handled`); what a restarted process
        #: may safely resume from, and what ``recv`` reports to the server.
        self.handled_cursors: dict[str, int] = dict(self.cursors)
        #: cmid -> send, unacked, in the order they were made.
        self.outbox: dict[str, Send] = {s.cmid: s for s in outbox}
        #: Set when the connection must be dropped and resumed (a gap in a conversation's seqs).
        self.reconnect_reason: str | None = None
        #: Seconds the server asked this device to wait before connecting again (a refused login's
        #: ``retry_after``, docs/protocol.md "Login admission"); None when it asked nothing. Reset by connect().
        self.reconnect_after: float | None = None
        self.auth_ok: AuthOk | None = None
        self.synced = False
        #: Counters, for tests and load generators.
        self.duplicates = 0
        self.ignored = 0
        self._prefix = cmid_prefix if cmid_prefix is not None else secrets.token_hex(4)
        self._counter = itertools.count(1)
        self._out: list[bytes] = []
        self._unsent: deque[str] = deque()  # outbox cmids not written on this connection, in order
        self._in_flight: set[str] = set()  # written on this connection, not answered yet
        self._refused: list[str] = []  # refused with a retryable code; waiting for retry()
        self._hold = False  # a retryable refusal arrived: write no new sends until retry()
        self._retry_waiting = False  # retry() was called with sends in flight: it runs once they are answered
        #: The longest ``retry_after`` the server gave with the refusals waiting for retry() (0: none).
        self.retry_after = 0.0
        self._recv_sent: dict[str, int] = {}  # conv -> seq last reported with recv on this connection
        self._dirty: set[str] = set()  # conversations whose handled cursor moved since the last recv
        self._ping_id = itertools.count(1)
        if encoding is Encoding.JSON:
            self._encode = msgspec.json.Encoder().encode
            self._decoder: msgspec.json.Decoder[ServerFrame] | msgspec.msgpack.Decoder[ServerFrame] = (
                msgspec.json.Decoder(ServerFrame)
            )
        else:
            self._encode = msgspec.msgpack.Encoder().encode
            self._decoder = msgspec.msgpack.Decoder(ServerFrame)

    # --- connection lifecycle -------------------------------------------------------------------------

    def connect(self, token: str) -> bytes:
        """Start a new connection: return the ``auth`` frame naming every cursor held.

        Frames queued for the previous connection are discarded; the outbox is kept and written again
        once ``auth_ok`` arrives.
        """
        self.state = State.AUTHENTICATING
        self.auth_ok = None
        self.synced = False
        self.reconnect_reason = None
        self.reconnect_after = None
        self._out.clear()
        self._unsent.clear()
        self._in_flight.clear()
        self._refused.clear()
        self._hold = False
        self._retry_waiting = False
        self._recv_sent = dict(self.cursors)
        return self._encode(Auth(token=token, device=self.device, cursors=self.cursors))

    def connection_lost(self) -> None:
        """The transport closed. Unanswered sends stay in the outbox for the next connection."""
        if self.state is not State.CLOSED:
            self.state = State.IDLE
        self._out.clear()
        self._in_flight.clear()
        self._unsent.clear()
        self._refused.clear()
        self._retry_waiting = False

    # --- building frames ------------------------------------------------------------------------------

    def next_cmid(self) -> str:
        return f"{self._prefix}-{next(self._counter)}"

    def send(
        self, body: Any, *, conv: str | None = None, to: int | None = None, type: str = "text", cmid: str | None = None
    ) -> Send:
        """Add a message to the outbox; it is written now if the connection allows, else after ``auth_ok``.

        Give exactly one of ``conv`` and ``to``. A ``cmid`` already in the outbox is not sent twice.
        """
        if (conv is None) == (to is None):
            raise ValueError("give exactly one of conv and to")
        if cmid is None:
            cmid = self.next_cmid()
        elif cmid in self.outbox:
            return self.outbox[cmid]
        send = Send(cmid=cmid, body=body, conv=conv, to=to, type=type)
        self.outbox[cmid] = send
        open_ = self.state is State.OPEN and not self._hold
        if open_ and not self._unsent and len(self._in_flight) < self.max_in_flight:
            self._in_flight.add(cmid)  # the common case, without a trip through the queue
            self._out.append(self._encode(send))
        else:
            self._unsent.append(cmid)
            self._pump()
        return send

    def read(self, conv: str, seq: int) -> None:
        """Queue a read mark: the user has seen ``conv`` up to ``seq``. Dropped when not connected."""
        if self.state in _SENDS_ALLOWED:
            self._out.append(self._encode(Read(conv=conv, seq=seq)))

    def typing(self, conv: str) -> None:
        """Queue a typing notice for ``conv``. Dropped when not connected (it is ephemeral anyway)."""
        if self.state in _SENDS_ALLOWED:
            self._out.append(self._encode(Typing(conv=conv)))

    def ping(self) -> int:
        """Queue a ``ping`` (allowed in any state but idle) and return its id."""
        ping_id = next(self._ping_id)
        if self.state is not State.IDLE:
            self._out.append(self._encode(Ping(id=ping_id)))
        return ping_id

    def handled(self, conv: str, seq: int) -> None:
        """The application has taken message ``seq`` of ``conv``: it may be reported with ``recv``."""
        if seq > self.handled_cursors.get(conv, 0):
            self.handled_cursors[conv] = seq
            self._dirty.add(conv)

    def flush_recv(self) -> None:
        """Queue one ``recv`` per conversation whose handled cursor moved since the last report."""
        if self.state is not State.OPEN or not self._dirty:
            return
        sent, handled, held = self._recv_sent, self.handled_cursors, self.cursors
        for conv in self._dirty:
            seq = handled[conv]
            # Only what this connection delivered or started from may be reported (section 10).
            if seq > sent.get(conv, 0) and seq <= held.get(conv, 0):
                sent[conv] = seq
                self._out.append(self._encode(Recv(conv=conv, seq=seq)))
        self._dirty.clear()

    def retry(self) -> None:
        """Write again the sends refused with a retryable code (call after a back-off), in the order they
        were made (the outbox's), whatever order the refusals came in: the server stores a device's sends
        to a conversation in the order it sent them only if refused ones are resent first, in order
        (docs/protocol.md section 8, "Sender order")."""
        if self._in_flight:
            # Answers still on their way may be refusals too: resend nothing until every one is in, so
            # the refused sends go out complete and in order, before anything newer (section 8).
            self._retry_waiting = True
            return
        self._retry_waiting = False
        self._hold = False
        self.retry_after = 0.0
        refused, self._refused = set(self._refused), []
        ordered: list[str] = []
        if refused:
            for cmid in self.outbox:  # refused sends are the outbox's oldest: this stops early
                if cmid in refused:
                    ordered.append(cmid)
                    if len(ordered) == len(refused):
                        break
        self._unsent.extendleft(reversed(ordered))
        self._pump()

    @property
    def wants_retry(self) -> bool:
        """Sends refused with a retryable code are waiting for :meth:`retry`."""
        return bool(self._refused)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def data_to_send(self) -> list[bytes]:
        """Frames to write, in order; the session forgets them."""
        out, self._out = self._out, []
        return out

    @property
    def has_data_to_send(self) -> bool:
        return bool(self._out)

    # --- consuming frames -----------------------------------------------------------------------------

    def receive(self, data: bytes) -> Event | None:
        """Consume one encoded server frame; return the event for the application, if any.

        Duplicates, ``pong``, repeated acks and frames of an unknown kind return ``None``. Frames the
        session wants written in answer (resends after ``auth_ok``) are in :meth:`data_to_send`.
        """
        try:
            frame = self._decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            self.ignored += 1  # an unknown kind, or a newer server's frame: ignore (section 4)
            return None
        return self.receive_frame(frame)

    def receive_frame(self, frame: ServerFrame) -> Event | None:
        """Consume one decoded server frame (see :meth:`receive`)."""
        if type(frame) is Msg:
            return self._on_msg(frame)
        if type(frame) is Ack:
            return self._on_ack(frame)
        if type(frame) is Error:
            return self._on_error(frame)
        if type(frame) is AuthOk:
            self.state = State.OPEN
            self.auth_ok = frame
            self._unsent.clear()
            self._unsent.extend(self.outbox)  # section 19 step 3: resend every unacked entry, in order
            self._pump()
            return frame
        if type(frame) is Synced:
            self.synced = True
            return frame
        if type(frame) is Bye:
            self.state = State.CLOSED
            return frame
        if type(frame) is Receipt or type(frame) is TypingEvent:
            return frame
        return None  # Pong

    def _on_msg(self, msg: Msg) -> Msg | None:
        held = self.cursors.get(msg.conv, 0)
        seq = msg.seq
        if seq <= held:
            self.duplicates += 1
            return None
        if seq != held + 1 and held:
            # Section 8: "a msg with seq > held + 1 should not happen - reconnect stating your cursors".
            self.reconnect_reason = f"gap in {msg.conv}: holding {held}, got {seq}"
            return None
        self.cursors[msg.conv] = seq
        return msg

    def _on_ack(self, ack: Ack) -> Ack | None:
        if not ack.dup:
            held = self.cursors.get(ack.conv, 0)
            if ack.seq == held + 1 or (not held and ack.seq > held):
                self.cursors[ack.conv] = ack.seq
            elif ack.seq > held:
                self.reconnect_reason = f"gap in {ack.conv}: holding {held}, acked {ack.seq}"
        send = self.outbox.pop(ack.cmid, None)
        if send is None:
            return None  # an ack we already had (a resend answered twice): the app saw the first
        self._in_flight.discard(ack.cmid)
        if self._retry_waiting and not self._in_flight:
            self.retry()
        self._pump()
        return ack

    def _on_error(self, error: Error) -> Error | SendFailed | None:
        cmid = error.ref
        if cmid is None and self.state is State.AUTHENTICATING and error.retry_after is not None:
            # A login the gateway would not start now (docs/protocol.md, "Login admission"): a bye follows.
            self.reconnect_after = error.retry_after
        if cmid is None or cmid not in self.outbox:
            return error
        self._in_flight.discard(cmid)
        if error.code in RETRYABLE:
            # Later sends would meet the same limit: hold them all until the pump's back-off is over.
            self._refused.append(cmid)
            self._hold = True
            if error.retry_after is not None and error.retry_after > self.retry_after:
                self.retry_after = error.retry_after
            if self._retry_waiting and not self._in_flight:
                self.retry()
            return None
        send = self.outbox.pop(cmid)
        if self._retry_waiting and not self._in_flight:
            self.retry()
        self._pump()
        return SendFailed(send, error.code, error.message)

    def _pump(self) -> None:
        """Write waiting sends while the in-flight window has room."""
        if self.state is not State.OPEN or self._hold:
            return
        unsent, in_flight, outbox = self._unsent, self._in_flight, self.outbox
        while unsent and len(in_flight) < self.max_in_flight:
            cmid = unsent.popleft()
            send = outbox.get(cmid)
            if send is not None and cmid not in in_flight:
                in_flight.add(cmid)
                self._out.append(self._encode(send))
