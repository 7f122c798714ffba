"""Chat protocol frames: small immutable types, one per frame kind.

Every frame is an object whose ``t`` field names its kind. docs/protocol.md is the contract; this module
is its executable form. Client frames are validated strictly on decode (types, required fields); server
frames are encoded by the server and decoded by the SDK.

Conversation ids are strings: ``d:<uid>:<uid>`` (direct, smaller uid first) and ``g:<gid>`` (group).

Ranges are checked here, at decode time, by msgspec constraints (``Meta``), which cost nothing measurable
per frame: an integer a store cannot hold never reaches the core (docs/protocol.md section 15, "Ranges").
A value out of its range is ``invalid``; a value of the wrong type is ``bad_frame`` (protocol/codec.py).
Lengths that are configurable (cmid, device) are checked by the session against its limits.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from im.model.ids import MAX_ID

#: Longest conversation id accepted (a valid one is at most 41 characters: ``d:`` + two 19-digit uids).
MAX_CONV_LENGTH = 64
#: Most conversations one ``auth`` may name in ``cursors`` (fixed; the others resume from stored cursors).
MAX_AUTH_CURSORS = 10_000
#: Longest access token accepted in ``auth`` (real ones are about 200 characters).
MAX_TOKEN_LENGTH = 4096
#: Marks the messages of checks that are about a value, not a shape (the codec answers them ``invalid``).
NUL_REFUSED = "must not contain NUL characters"

Uid = Annotated[int, msgspec.Meta(ge=1, le=MAX_ID)]
Seq = Annotated[int, msgspec.Meta(ge=0, le=MAX_ID)]
Conv = Annotated[str, msgspec.Meta(max_length=MAX_CONV_LENGTH)]


def _nul_in(field: str) -> ValueError:
    """Text no store keeps: PostgreSQL text columns reject NUL (SQLite would keep it)."""
    return ValueError(f"{field} {NUL_REFUSED}")


# --- client -> server ---------------------------------------------------------------------------------


class Auth(msgspec.Struct, tag_field="t", tag="auth", frozen=True, forbid_unknown_fields=False):
    """First frame of a connection: the access token, the device name, and the client's cursors.

    ``cursors`` maps conversation id -> last seq the device holds; the server replays what follows.
    Conversations not named resume from the device's cursor stored on the server.
    """

    token: Annotated[str, msgspec.Meta(max_length=MAX_TOKEN_LENGTH)]
    device: str
    cursors: Annotated[dict[Conv, Seq], msgspec.Meta(max_length=MAX_AUTH_CURSORS)] = {}

    def __post_init__(self) -> None:
        if "\x00" in self.device:
            raise _nul_in("device")


class Send(msgspec.Struct, tag_field="t", tag="send", frozen=True):
    """Send a message. ``cmid`` (client message id) makes a retry idempotent per device.

    Exactly one of ``conv`` (a conversation id) and ``to`` (a user id, for a direct conversation) is set.
    """

    cmid: str
    body: Any
    conv: Conv | None = None
    to: Uid | None = None
    type: str = "text"

    def __post_init__(self) -> None:  # one ``in`` per field: the cheapest check msgspec can run per frame
        if "\x00" in self.cmid:
            raise _nul_in("cmid")
        if "\x00" in self.type:
            raise _nul_in("type")


class Recv(msgspec.Struct, tag_field="t", tag="recv", frozen=True):
    """The device durably holds every message of ``conv`` up to ``seq`` (its delivery cursor)."""

    conv: Conv
    seq: Seq


class Read(msgspec.Struct, tag_field="t", tag="read", frozen=True):
    """The user has read ``conv`` up to ``seq``; other members get a ``receipt``."""

    conv: Conv
    seq: Seq


class Typing(msgspec.Struct, tag_field="t", tag="typing", frozen=True):
    """The user is typing in ``conv`` (ephemeral; sent to the other members' online devices)."""

    conv: Conv


class Ping(msgspec.Struct, tag_field="t", tag="ping", frozen=True):
    """Keepalive; answered with ``pong`` carrying the same ``id``."""

    id: Seq | None = None


ClientFrame = Auth | Send | Recv | Read | Typing | Ping
CLIENT_FRAME_TAGS = frozenset({"auth", "send", "recv", "read", "typing", "ping"})

# --- server -> client ---------------------------------------------------------------------------------


class AuthOk(msgspec.Struct, tag_field="t", tag="auth_ok", frozen=True):
    """Authentication accepted. ``heartbeat``: seconds of silence after which the server closes."""

    uid: int
    device: str
    heartbeat: float
    max_frame: int


class Msg(msgspec.Struct, tag_field="t", tag="msg", frozen=True, rename={"sender": "from"}):
    """A stored message of a conversation, delivered in seq order with no gap."""

    conv: str
    seq: int
    mid: str
    sender: int
    dev: str
    cmid: str
    ts: int
    type: str
    body: Any


class Ack(msgspec.Struct, tag_field="t", tag="ack", frozen=True):
    """The send ``cmid`` is durably stored as ``seq`` of ``conv``. ``dup``: that seq was already
    delivered on this connection (as a ``msg`` of a replay, or an earlier ack), so this ack does not
    advance the device's stream; otherwise the ack is the message's place in the stream."""

    cmid: str
    conv: str
    seq: int
    mid: str
    ts: int
    dup: bool = False


class Synced(msgspec.Struct, tag_field="t", tag="synced", frozen=True):
    """Every stored message after the connect-time cursors has been delivered."""

    convs: int


class Receipt(msgspec.Struct, tag_field="t", tag="receipt", frozen=True):
    """Member ``uid`` has ``kind`` ("read" or "delivered") every message of ``conv`` up to ``seq``."""

    conv: str
    uid: int
    kind: str
    seq: int


class TypingEvent(msgspec.Struct, tag_field="t", tag="typing", frozen=True):
    conv: str
    uid: int


class Pong(msgspec.Struct, tag_field="t", tag="pong", frozen=True):
    id: int | None = None


class Error(msgspec.Struct, tag_field="t", tag="error", frozen=True):
    """A refused frame. ``ref`` is the cmid of the refused send, when there is one. ``retry_after``: seconds
    to wait before sending the same again (``rate_limited``; ``unavailable`` refusing a login, before
    ``bye``: before connecting again), else null."""

    code: str
    message: str
    ref: str | None = None
    retry_after: float | None = None


class Bye(msgspec.Struct, tag_field="t", tag="bye", frozen=True):
    """The server is closing this connection; ``reconnect`` says whether to come back (elsewhere)."""

    code: str
    message: str
    reconnect: bool = True


ServerFrame = AuthOk | Msg | Ack | Synced | Receipt | TypingEvent | Pong | Error | Bye
