"""Users, their logins and their consent settings."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class User:
    uid: int
    username: str
    display_name: str
    created_at: int


@dataclass(frozen=True, slots=True)
class AuthSession:
    """A login: the refresh token's hash, and whether logout revoked it.

    ``expires_at`` is when the refresh token stops working (the idle limit, moved on by each refresh but
    never past the absolute limit); ``created_at`` is the login and ``last_used`` the last refresh
    (seconds since the epoch; 0 for sessions stored before these were kept)."""

    sid: str
    uid: int
    refresh_hash: str
    expires_at: int
    revoked: bool
    created_at: int = 0
    last_used: int = 0


@dataclass(frozen=True, slots=True)
class Privacy:
    """What the consent rules need to know about one user: whom they block, whether only their
    contacts may start a direct conversation with them, and whether the account was deleted."""

    blocked: frozenset[int] = frozenset()
    contacts_only: bool = False
    deleted: bool = False
