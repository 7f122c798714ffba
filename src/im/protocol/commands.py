"""What a :class:`~im.protocol.session.ServerSession` asks its transport to do.

Commands are msgspec structs: they are made per frame on the hot path, where a frozen dataclass costs
ten times as much. Each command is carried out by the pump (asyncio gateway, test harness, ...) which then reports the
result back to the session. None of them is awaited by the session itself.
"""

from __future__ import annotations

import msgspec

from im.model.errors import ErrorCode


class Authenticate(msgspec.Struct, frozen=True):
    """Verify ``token``; then call ``auth_succeeded`` with the user's sync points, or ``auth_failed``."""

    token: str
    device: str
    cursors: dict[str, int]


class Submit(msgspec.Struct, frozen=True, gc=False):
    """Commit a send through the core; then ``send_done`` or ``send_failed``. ``body`` is JSON text."""

    cmid: str
    conv: str | None
    to: int | None
    type: str
    body: bytes


class Fetch(msgspec.Struct, frozen=True, gc=False):
    """Read stored messages of ``conv`` with after < seq <= upto (a page of them is enough); then
    ``fetched``. ``after`` None: start from the device's stored cursor (or the user's join point)."""

    conv: str
    after: int | None
    upto: int


class AwaitLive(msgspec.Struct, frozen=True, gc=False):
    """The device's own result (``seq``) came ahead of earlier messages of ``conv`` that are on their way
    live (their commit is answered before it is routed): call ``live_wait_over(conv, seq)`` after a short
    wait, which asks for a ``Fetch`` only if they did not come meanwhile."""

    conv: str
    seq: int


class SaveCursor(msgspec.Struct, frozen=True, gc=False):
    """The device holds ``conv`` up to ``seq``: store its delivery cursor (may be coalesced)."""

    conv: str
    seq: int


class MarkRead(msgspec.Struct, frozen=True, gc=False):
    """The user read ``conv`` up to ``seq``: store it and tell the other members."""

    conv: str
    seq: int


class SendTyping(msgspec.Struct, frozen=True, gc=False):
    conv: str


class Close(msgspec.Struct, frozen=True, gc=False):
    """Write what is queued, then close the connection."""

    code: ErrorCode
    reason: str


Command = Authenticate | Submit | Fetch | AwaitLive | SaveCursor | MarkRead | SendTyping | Close
