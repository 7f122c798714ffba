"""Conversations and their logs: what the core reasons about and the stores keep."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True, init=False)
class StoredMessage:
    """One entry of a conversation's log. ``body`` is the message body as JSON text.

    Never encoded as it is (frames are made by im.protocol.messages). In the compiled build (im.compiled)
    it is a native class: compiled code reads its fields directly, about 40 reads per message on its way
    from the committer to a recipient's frame. ``__init__`` is written out because the dataclass one would
    run as Python code there."""

    conv: str
    seq: int
    mid: int
    sender: int
    device: str
    cmid: str
    ts: int  # milliseconds since the Unix epoch
    type: str
    body: bytes

    def __init__(
        self, conv: str, seq: int, mid: int, sender: int, device: str, cmid: str, ts: int, type: str, body: bytes
    ) -> None:
        self.conv = conv
        self.seq = seq
        self.mid = mid
        self.sender = sender
        self.device = device
        self.cmid = cmid
        self.ts = ts
        self.type = type
        self.body = body


@dataclass(slots=True)
class ConversationState:
    """What the core needs to accept a send: the log head and who may write."""

    conv: str
    kind: str  # "direct" | "group"
    last_seq: int
    members: dict[int, str]  # uid -> role ("owner" | "admin" | "member")


@dataclass(frozen=True, slots=True)
class MemberChange:
    """Add (role set) or remove (role None) a member; ``joined_seq`` is the log head before they joined."""

    conv: str
    uid: int
    role: str | None
    joined_seq: int = 0


@dataclass(slots=True)
class CommitBatch:
    """Everything one group commit writes, atomically.

    ``heads`` maps conv -> (expected last_seq before, new last_seq, ts of the newest message); a store
    must refuse the whole batch with :class:`SeqConflict` when any expected head does not match, when a
    (conv, seq) exists already, or when a (sender, device, cmid) exists already.
    """

    messages: list[StoredMessage] = field(default_factory=list)
    heads: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    new_conversations: list[ConversationState] = field(default_factory=list)
    member_changes: list[MemberChange] = field(default_factory=list)
    read_marks: list[tuple[int, str, int]] = field(default_factory=list)  # (uid, conv, seq)
    file_refs: list[tuple[str, str]] = field(default_factory=list)  # (file_id, conv): grants members read
    #: mid -> W3C traceparent of a sampled message (tracing on): kept in its outbox row for the relay.
    traces: dict[int, str] = field(default_factory=dict)
    #: (node id, fencing token) of the claim the batch's ids were minted under: the store refuses the
    #: batch (FenceRefused) when it records a higher token for that node id. None: not fenced.
    fence: tuple[int, int] | None = None
    #: What to store as ``messages[i]``'s body instead of its own (sealed by an encrypting store in
    #: front, which leaves the messages, still routed to members, as they are). None: their own.
    bodies: list[bytes] | None = None

    def message_rows(
        self, *, bytearray_bodies: bool = False
    ) -> list[tuple[str, int, int, int, str, str, int, str, bytes | bytearray]]:
        """(conv, seq, mid, sender, device, cmid, ts, type, stored body) of each message, in order.

        ``bytearray_bodies`` for sqlite3: it binds a bytearray as a blob at once, but first looks a
        ``bytes`` up among its adapters, raising and clearing an AttributeError per value (0.7 µs a row;
        the copy costs 0.1)."""
        bodies = [m.body for m in self.messages] if self.bodies is None else self.bodies
        if bytearray_bodies:
            return [
                (m.conv, m.seq, m.mid, m.sender, m.device, m.cmid, m.ts, m.type, bytearray(body))
                for m, body in zip(self.messages, bodies, strict=True)
            ]
        return [
            (m.conv, m.seq, m.mid, m.sender, m.device, m.cmid, m.ts, m.type, body)
            for m, body in zip(self.messages, bodies, strict=True)
        ]


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    """One committed message waiting in the transactional outbox to be published (no body: the event
    says that something arrived, the log has the content). ``created_at`` is the message ts (ms)."""

    id: int
    conv: str
    seq: int
    mid: int
    sender: int
    type: str
    created_at: int
    traceparent: str | None = None  # the message's trace (sampled with tracing on), for the relay


@dataclass(frozen=True, slots=True)
class SyncPoint:
    """Per conversation of a user: the log head and where this device resumes when it says nothing."""

    conv: str
    last_seq: int
    cursor: int


@dataclass(frozen=True, slots=True)
class ConversationSummary:
    conv: str
    kind: str
    title: str
    last_seq: int
    read_seq: int
    unread: int
    last_message: StoredMessage | None
    peer: int | None  # the other user of a direct conversation


@dataclass(frozen=True, slots=True)
class Group:
    gid: int
    name: str
    owner: int
    created_at: int
