"""What the chat screen shows, as plain data: conversations, their timelines, the outbox, typing and the
connection. No Textual and no I/O: the app feeds it SDK events and API answers, then renders it.

Rules kept here (docs/protocol.md sections 8, 10, 11, 18):

- a timeline is keyed by ``seq``, so history pages, replayed and live messages merge without duplicates
  and always show in seq order; a hole between loaded seqs is reported by :meth:`ConvState.gap` for the
  app to fetch;
- ``unread`` is ``last_seq - read_seq`` as the server counts it; sending a message reads up to it;
- a send shows as ``sending`` until its ``ack`` turns it into the stored message, or ``failed`` on a
  final refusal (it can then be retried under a new cmid).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from im.client import (
    Ack,
    AuthOk,
    Bye,
    ClientEvent,
    Conversation,
    Disconnected,
    Message,
    Receipt,
    SendFailed,
    Synced,
    TypingEvent,
)

__all__ = ["TYPING_SECONDS", "ChatState", "ConvState", "Outgoing", "Update", "direct_conv"]

#: How long "… is typing" stays up after the last typing event (the protocol says nothing; clients
#: usually send one every few seconds while the user types).
TYPING_SECONDS = 5.0

Connection = Literal["connecting", "connected", "reconnecting", "offline"]


def direct_conv(a: int, b: int) -> str:
    """The id of the direct conversation of two users (docs/protocol.md section 6)."""
    lo, hi = sorted((a, b))
    return f"d:{lo}:{hi}"


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class Outgoing:
    """A message typed here and not stored yet."""

    cmid: str
    conv: str
    body: Any
    status: Literal["sending", "failed"] = "sending"
    error: str = ""


@dataclass
class ConvState:
    conv: str
    kind: str  # "direct" | "group"
    title: str
    peer: int | None = None
    last_seq: int = 0
    read_seq: int = 0
    last_message: Message | None = None
    activity: int = 0  # ms: when something last happened here (the list's order)
    messages: dict[int, Message] = field(default_factory=dict)  # seq -> message
    pending: dict[str, Outgoing] = field(default_factory=dict)  # cmid -> outgoing, in typing order
    history_loaded: bool = False
    has_older: bool = False
    others_read: int = 0  # highest seq another member has read (from receipts)
    typing: dict[int, float] = field(default_factory=dict)  # uid -> until (monotonic seconds)

    @property
    def unread(self) -> int:
        return max(0, self.last_seq - self.read_seq)

    def timeline(self) -> list[Message]:
        return [self.messages[s] for s in sorted(self.messages)]

    @property
    def oldest_seq(self) -> int | None:
        return min(self.messages) if self.messages else None

    def gap(self) -> tuple[int, int] | None:
        """The first hole ``(after, before)`` between loaded messages, if any."""
        seqs = sorted(self.messages)
        for a, b in itertools.pairwise(seqs):
            if b != a + 1:
                return a, b
        return None

    def _store(self, msg: Message) -> bool:
        """Keep ``msg``; False when its seq was already there."""
        if msg.seq in self.messages:
            return False
        self.messages[msg.seq] = msg
        if msg.seq >= self.last_seq:
            self.last_seq = msg.seq
            self.last_message = msg
            self.activity = max(self.activity, msg.ts)
        return True


@dataclass
class Update:
    """What an event changed, so the app redraws only that and fetches what is missing."""

    convs: set[str] = field(default_factory=set)  # conversations whose row or timeline changed
    unknown_conv: bool = False  # a message of a conversation the list does not have: refresh it
    status: bool = False  # the connection line changed
    read: tuple[str, int] | None = None  # the open conversation should be marked read up to this seq
    typing_until: float | None = None  # redraw the typing line at this monotonic time


class ChatState:
    """Everything one logged-in user sees. ``uid`` is that user; ``device`` this client's device name."""

    def __init__(self, uid: int, username: str, *, device: str) -> None:
        self.uid = uid
        self.username = username
        self.device = device
        self.convs: dict[str, ConvState] = {}
        self.names: dict[int, str] = {uid: username}
        self.open_conv: str | None = None
        self.connection: Connection = "connecting"
        self.connection_detail = ""

    # --- the conversation list ------------------------------------------------------------------------

    def load_conversations(self, convs: list[Conversation]) -> None:
        """Merge ``GET /conversations``: the server's counters win unless this client has seen more."""
        for c in convs:
            state = self.convs.get(c.conv)
            if state is None:
                state = self.convs[c.conv] = ConvState(c.conv, c.kind, c.title, c.peer)
            state.kind, state.title, state.peer = c.kind, c.title, c.peer
            if c.peer is not None:
                self.names.setdefault(c.peer, c.title)
            if c.last_seq >= state.last_seq:
                state.last_seq = c.last_seq
                state.last_message = c.last_message
                if c.last_message is not None:
                    state.activity = max(state.activity, c.last_message.ts)
            state.read_seq = max(state.read_seq, c.read_seq)
            if c.conv == self.open_conv:
                state.read_seq = state.last_seq

    def ordered(self) -> list[ConvState]:
        """Most recently active first (the order of ``GET /conversations``)."""
        return sorted(self.convs.values(), key=lambda c: (-c.activity, c.conv))

    def ensure(self, conv: str, kind: str, title: str, peer: int | None = None) -> ConvState:
        """The conversation ``conv``; added (as active now) when this client did not list it yet, e.g. a
        direct chat whose first message is not sent yet or a group just created."""
        state = self.convs.get(conv)
        if state is None:
            state = self.convs[conv] = ConvState(conv, kind, title, peer, activity=now_ms())
        return state

    def start_direct(self, peer: int, title: str) -> ConvState:
        """The direct conversation with ``peer``; created locally until its first message is stored."""
        self.names.setdefault(peer, title)
        return self.ensure(direct_conv(self.uid, peer), "direct", title, peer)

    def open(self, conv: str) -> tuple[str, int] | None:
        """Show ``conv``; returns the read mark to send, if there is something unread."""
        self.open_conv = conv
        return self._read_open()

    def _read_open(self) -> tuple[str, int] | None:
        state = self.convs.get(self.open_conv or "")
        if state is None or state.read_seq >= state.last_seq:
            return None
        state.read_seq = state.last_seq
        return state.conv, state.last_seq

    # --- history --------------------------------------------------------------------------------------

    def merge_history(self, conv: str, messages: list[Message]) -> Update:
        """Add a page of ``GET /conversations/{conv}/messages`` (any page: newest, older, a gap)."""
        state = self.convs[conv]
        for m in messages:
            state._store(m)
        state.history_loaded = True
        oldest = state.oldest_seq
        state.has_older = oldest is not None and oldest > 1  # seqs are dense from 1 (section 8)
        self._note_names(messages)
        return Update(convs={conv}, read=self._read_open() if conv == self.open_conv else None)

    # --- sending --------------------------------------------------------------------------------------

    def add_outgoing(self, conv: str, cmid: str, body: Any) -> Outgoing:
        out = Outgoing(cmid, conv, body)
        state = self.convs[conv]
        state.pending[cmid] = out
        state.activity = max(state.activity, now_ms())
        return out

    def failed(self, conv: str, cmid: str, error: str) -> None:
        out = self.convs[conv].pending.get(cmid)
        if out is not None:
            out.status, out.error = "failed", error

    def retry(self, conv: str, new_cmid: str) -> Outgoing | None:
        """The first failed send of ``conv``, moved to ``new_cmid`` and marked sending again."""
        state = self.convs[conv]
        for cmid, out in state.pending.items():
            if out.status == "failed":
                del state.pending[cmid]
                renewed = Outgoing(new_cmid, conv, out.body)
                state.pending[new_cmid] = renewed
                return renewed
        return None

    # --- SDK events -----------------------------------------------------------------------------------

    def apply(self, event: ClientEvent, now: float | None = None) -> Update:
        """Take one event of :meth:`im.client.Client.events`. ``now``: monotonic seconds (for typing)."""
        now = time.monotonic() if now is None else now
        if isinstance(event, Message):
            return self._message(event)
        if isinstance(event, Ack):
            return self._ack(event)
        if isinstance(event, SendFailed):
            return self._send_failed(event)
        if isinstance(event, Receipt):
            return self._receipt(event)
        if isinstance(event, TypingEvent):
            return self._typing(event, now)
        return self._connection_event(event)

    def _connection_event(self, event: ClientEvent) -> Update:
        if isinstance(event, AuthOk):
            self.connection, self.connection_detail = "connected", ""
        elif isinstance(event, Synced):
            self.connection, self.connection_detail = "connected", f"synced {event.convs} conversations"
        elif isinstance(event, Disconnected):
            self.connection = "reconnecting" if event.reconnect else "offline"
            self.connection_detail = event.reason
        elif isinstance(event, Bye):
            self.connection_detail = f"bye {event.code}: {event.message}"
        else:
            return Update()
        return Update(status=True)

    def _send_failed(self, event: SendFailed) -> Update:
        for state in self.convs.values():
            if event.send.cmid in state.pending:
                self.failed(state.conv, event.send.cmid, f"{event.code}: {event.message}")
                return Update(convs={state.conv})
        return Update()

    def _receipt(self, event: Receipt) -> Update:
        state = self.convs.get(event.conv)
        if state is None or event.uid == self.uid or event.kind != "read" or event.seq <= state.others_read:
            return Update()
        state.others_read = event.seq
        return Update(convs={event.conv})

    def _typing(self, event: TypingEvent, now: float) -> Update:
        state = self.convs.get(event.conv)
        if state is None or event.uid == self.uid:
            return Update()
        state.typing[event.uid] = now + TYPING_SECONDS
        return Update(convs={event.conv}, typing_until=now + TYPING_SECONDS)

    def _message(self, msg: Message) -> Update:
        update = Update(convs={msg.conv})
        state = self.convs.get(msg.conv)
        if state is None:
            kind = "group" if msg.conv.startswith("g:") else "direct"
            state = self.convs[msg.conv] = ConvState(msg.conv, kind, msg.conv)
            update.unknown_conv = True
        state._store(msg)
        if msg.sender == self.uid and msg.dev == self.device:  # our own send, replayed before its ack
            state.pending.pop(msg.cmid, None)
        if msg.sender == self.uid:
            state.read_seq = max(state.read_seq, msg.seq)  # the server counts a sender as having read it
        state.typing.pop(msg.sender, None)
        self._note_names([msg])
        if msg.conv == self.open_conv:
            update.read = self._read_open()
        return update

    def _ack(self, ack: Ack) -> Update:
        state = self.convs.get(ack.conv)
        out = None
        if state is not None:
            out = state.pending.pop(ack.cmid, None)
        else:  # sent to a conversation this client did not list (e.g. by uid): the ack names it
            for s in self.convs.values():
                out = s.pending.pop(ack.cmid, None) or out
        if out is None:
            return Update()
        if state is None:
            state = self.convs[ack.conv] = ConvState(ack.conv, "direct", ack.conv, activity=now_ms())
        msg = Message(
            conv=ack.conv,
            seq=ack.seq,
            mid=ack.mid,
            sender=self.uid,
            dev=self.device,
            cmid=ack.cmid,
            ts=ack.ts,
            type="text",
            body=out.body,
        )
        state._store(msg)
        state.read_seq = max(state.read_seq, ack.seq)
        return Update(convs={ack.conv}, read=self._read_open() if ack.conv == self.open_conv else None)

    # --- names and typing -----------------------------------------------------------------------------

    def _note_names(self, messages: list[Message]) -> None:
        for m in messages:
            if m.type == "system" and isinstance(m.body, dict):
                uids = [*(m.body.get("uids") or ()), m.body.get("uid"), m.body.get("new_owner")]
                for uid in uids:
                    if isinstance(uid, int):
                        self.names.setdefault(uid, "")

    def unknown_uids(self) -> set[int]:
        """Users whose names are needed and not known yet."""
        wanted = {uid for uid, name in self.names.items() if not name}
        for state in self.convs.values():
            wanted.update(m.sender for m in state.messages.values() if m.sender not in self.names)
            wanted.update(uid for uid in state.typing if uid not in self.names)
        return wanted

    def name(self, uid: int) -> str:
        return self.names.get(uid) or f"user {uid}"

    def typing_names(self, conv: str, now: float | None = None) -> list[str]:
        """Who is typing in ``conv`` now; expired entries are dropped."""
        state = self.convs.get(conv)
        if state is None:
            return []
        now = time.monotonic() if now is None else now
        for uid in [u for u, until in state.typing.items() if until <= now]:
            del state.typing[uid]
        return sorted(self.name(uid) for uid in state.typing)
