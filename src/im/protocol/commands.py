"""What a :class:`~im.protocol.session.ServerSession` asks its transport to do.

Each command is carried out by the pump (asyncio gateway, test harness, ...) which then reports the
result back to the session. None of them is awaited by the session itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from im.protocol.errors import ErrorCode


@dataclass(frozen=True, slots=True)
class Authenticate:
    """Verify ``token``; then call ``auth_succeeded`` with the user's sync points, or ``auth_failed``."""

    token: str
    device: str
    cursors: dict[str, int]


@dataclass(frozen=True, slots=True)
class Submit:
    """Commit a send through the core; then ``send_done`` or ``send_failed``. ``body`` is JSON text."""

    cmid: str
    conv: str | None
    to: int | None
    type: str
    body: bytes


@dataclass(frozen=True, slots=True)
class Fetch:
    """Read stored messages of ``conv`` with after < seq <= upto (a page of them is enough); then
    ``fetched``. ``after`` None: start from the device's stored cursor (or the user's join point)."""

    conv: str
    after: int | None
    upto: int


@dataclass(frozen=True, slots=True)
class SaveCursor:
    """The device holds ``conv`` up to ``seq``: store its delivery cursor (may be coalesced)."""

    conv: str
    seq: int


@dataclass(frozen=True, slots=True)
class MarkRead:
    """The user read ``conv`` up to ``seq``: store it and tell the other members."""

    conv: str
    seq: int


@dataclass(frozen=True, slots=True)
class SendTyping:
    conv: str


@dataclass(frozen=True, slots=True)
class Close:
    """Write what is queued, then close the connection."""

    code: ErrorCode
    reason: str


Command = Authenticate | Submit | Fetch | SaveCursor | MarkRead | SendTyping | Close
