"""Accounts: registration, password login, access and refresh tokens, session revocation.

Tokens::

    access  = JWT HS256 {sub: "<uid>", sid, iat, exp, typ: "access"}    short-lived, checked on every
                                                                        HTTP request and WebSocket auth
    refresh = "<sid>.<random>"                                          opaque; only its SHA-256 is stored

A login creates an auth session (``sid``). Every refresh rotates the refresh token; presenting a refresh
token that was already rotated away means it leaked (or a client raced itself), so the whole session is
revoked (refresh-token reuse detection, RFC 9700 section 4.14.2). A revoked session's access tokens
stop working too: :meth:`AccountService.authenticate` checks the session, caching a positive answer for
at most ``session_cache_ttl`` seconds (a logout evicts this process's cache at once; other processes
notice within that time).

Passwords are hashed with argon2id in a worker thread so the event loop never blocks on it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import argon2
import jwt

from im.backends.base import AccountStore, AuthSession, Conflict, User
from im.core.passwords import HashSlots, LoginGuard
from im.protocol.errors import ErrorCode, ImError

USERNAME_RE = re.compile(r"[A-Za-z0-9_.\-]{3,32}")
MAX_PASSWORD_LENGTH = 1024
MAX_DISPLAY_NAME_LENGTH = 64
_BAD_CREDENTIALS = "wrong user name or password"
_BAD_TOKEN = "invalid or expired token"


@dataclass(frozen=True, slots=True)
class Tokens:
    access_token: str
    refresh_token: str
    expires_in: int  # seconds the access token is valid
    uid: int
    token_type: str = "bearer"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a valid access token speaks for: the user and their login session."""

    uid: int
    sid: str


def _sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class AccountService:
    """The account rules above an :class:`AccountStore`."""

    def __init__(
        self,
        store: AccountStore,
        *,
        secret: bytes,
        access_ttl: float = 900.0,
        refresh_ttl: float = 30 * 24 * 3600.0,
        argon2_time_cost: int = 3,
        argon2_memory_kib: int = 65536,
        argon2_parallelism: int = 4,
        min_password_length: int = 8,
        session_cache_ttl: float = 2.0,
        clock: Callable[[], float] = time.time,
        guard: LoginGuard | None = None,
        hash_slots: HashSlots | None = None,
    ) -> None:
        if len(secret) < 16:
            raise ValueError("the token secret must be at least 16 bytes")
        self._store = store
        # A fixed-length HMAC key derived from the secret (domain-separated; HS256 wants >= 32 bytes).
        self._secret = hashlib.sha256(b"im access token v1\0" + secret).digest()
        self._access_ttl = access_ttl
        self._refresh_ttl = refresh_ttl
        self._min_password_length = min_password_length
        self._clock = clock
        self._hasher = argon2.PasswordHasher(
            time_cost=argon2_time_cost,
            memory_cost=argon2_memory_kib,
            parallelism=argon2_parallelism,
            type=argon2.Type.ID,
        )
        self._dummy_hash: str | None = None
        self._dummy_lock = asyncio.Lock()
        #: Login and registration rate limits (None: unlimited), and the fair, bounded hashing queue.
        self._guard = self.guard = guard
        self._slots = hash_slots or HashSlots()
        self._cache_ttl = session_cache_ttl
        self._live_sessions: dict[str, tuple[int, float]] = {}  # sid -> (uid, cached until; monotonic)
        self._revoke_listeners: list[Callable[[str], None]] = []

    def on_revoke(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(sid)`` when a session is revoked here (the gateway closes its connections).

        In-process only: in distributed mode the API process forwards the sid over the transfer link,
        and each gateway calls :meth:`revoked_elsewhere`.
        """
        self._revoke_listeners.append(listener)

    def revoked_elsewhere(self, sid: str) -> None:
        """Another process revoked ``sid``: forget that it was live, so the next check asks the store."""
        self._live_sessions.pop(sid, None)

    @property
    def store(self) -> AccountStore:
        return self._store

    # --- registration and login ---------------------------------------------------------------------------

    async def register(
        self, username: str, password: str, display_name: str | None = None, *, address: str = ""
    ) -> User:
        """Create an account; ``address`` is the client's (registrations per address are limited)."""
        if self._guard is not None:
            await self._guard.register_attempt(address)
        if not USERNAME_RE.fullmatch(username):
            raise ImError(
                ErrorCode.INVALID, "the user name must be 3 to 32 characters: letters, digits, '_', '.', '-'"
            )
        self._check_password(password)
        name = username if display_name is None else display_name.strip()
        if not name or len(name) > MAX_DISPLAY_NAME_LENGTH or not name.isprintable():
            raise ImError(
                ErrorCode.INVALID,
                f"the display name must be 1 to {MAX_DISPLAY_NAME_LENGTH} printable characters",
            )
        if await self._store.find_user(username) is not None:  # cheap refusal before the costly hash
            raise ImError(ErrorCode.CONFLICT, "this user name is taken")
        password_hash = await self._slots.run(address, self._hasher.hash, password)
        try:
            return await self._store.create_user(username, name, password_hash, int(self._clock()))
        except Conflict:
            raise ImError(ErrorCode.CONFLICT, "this user name is taken") from None

    def _check_password(self, password: str) -> None:
        if not self._min_password_length <= len(password) <= MAX_PASSWORD_LENGTH:
            raise ImError(
                ErrorCode.INVALID,
                f"the password must be {self._min_password_length} to {MAX_PASSWORD_LENGTH} characters",
            )

    async def login(self, username: str, password: str, *, address: str = "") -> Tokens:
        """A new session; ``address`` is the client's (attempts are limited per account and address, and
        its password checks share the hashing slots fairly with other addresses)."""
        if self._guard is not None:
            await self._guard.login_attempt(username, address)
        found = await self._store.find_user(username) if len(username) <= 64 else None
        if found is None:
            # Spend the same time as a real check so response times do not reveal which names exist.
            await self._slots.run(address, self._verify, await self._dummy(), password)
            raise ImError(ErrorCode.BAD_CREDENTIALS, _BAD_CREDENTIALS)
        user, password_hash = found
        if not await self._slots.run(address, self._verify, password_hash, password):
            raise ImError(ErrorCode.BAD_CREDENTIALS, _BAD_CREDENTIALS)
        if self._hasher.check_needs_rehash(password_hash):
            new_hash = await self._slots.run(address, self._hasher.hash, password)
            await self._store.set_password_hash(user.uid, new_hash)
        sid = secrets.token_urlsafe(16)
        refresh_token = f"{sid}.{secrets.token_urlsafe(32)}"
        now = self._clock()
        await self._store.create_session(
            AuthSession(
                sid=sid,
                uid=user.uid,
                refresh_hash=_sha256(refresh_token),
                expires_at=int(now + self._refresh_ttl),
                revoked=False,
            )
        )
        return self._tokens(user.uid, sid, refresh_token, now)

    def _verify(self, password_hash: str, password: str) -> bool:
        try:
            return self._hasher.verify(password_hash, password)
        except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
            return False  # a mismatch (VerifyMismatchError is a VerificationError), or a corrupt hash

    async def _dummy(self) -> str:
        async with self._dummy_lock:  # computed once, even under a flood of unknown names
            if self._dummy_hash is None:
                self._dummy_hash = await asyncio.to_thread(self._hasher.hash, secrets.token_urlsafe(16))
        return self._dummy_hash

    # --- tokens -------------------------------------------------------------------------------------------

    def _tokens(self, uid: int, sid: str, refresh_token: str, now: float) -> Tokens:
        claims = {
            "sub": str(uid),
            "sid": sid,
            "iat": int(now),
            "exp": int(now + self._access_ttl),
            "typ": "access",
        }
        access = jwt.encode(claims, self._secret, algorithm="HS256")
        return Tokens(
            access_token=access, refresh_token=refresh_token, expires_in=int(self._access_ttl), uid=uid
        )

    async def refresh(self, refresh_token: str) -> Tokens:
        """New tokens for a live session; the presented refresh token stops working.

        Presenting a refresh token that was already rotated away revokes the session.
        """
        sid, dot, _ = refresh_token.partition(".")
        session = await self._store.get_session(sid) if dot and sid else None
        now = self._clock()
        if session is None or session.revoked or session.expires_at <= now:
            raise ImError(ErrorCode.AUTH_FAILED, "invalid or expired refresh token")
        old_hash = _sha256(refresh_token)
        if not hmac.compare_digest(old_hash, session.refresh_hash):
            await self._revoke(sid)
            raise ImError(ErrorCode.AUTH_FAILED, "refresh token reused: the session is revoked, log in again")
        new_token = f"{sid}.{secrets.token_urlsafe(32)}"
        expires_at = int(now + self._refresh_ttl)
        if not await self._store.rotate_refresh(sid, old_hash, _sha256(new_token), expires_at):
            # Another refresh with the same token won the race: the same token was used twice.
            await self._revoke(sid)
            raise ImError(ErrorCode.AUTH_FAILED, "refresh token reused: the session is revoked, log in again")
        return self._tokens(session.uid, sid, new_token, now)

    async def logout(self, sid: str) -> None:
        """Revoke the session: its refresh token and access tokens stop working."""
        await self._revoke(sid)

    async def _revoke(self, sid: str) -> None:
        self._live_sessions.pop(sid, None)
        await self._store.revoke_session(sid)
        for listener in self._revoke_listeners:
            listener(sid)

    async def authenticate(self, access_token: str) -> Principal:
        """The principal of a valid access token of a live session; else ImError(AUTH_FAILED)."""
        try:
            claims: dict[str, Any] = jwt.decode(
                access_token,
                self._secret,
                algorithms=["HS256"],
                # exp is checked below against our clock, so tests can move time.
                options={"require": ["exp", "iat", "sub"], "verify_exp": False, "verify_iat": False},
            )
        except jwt.InvalidTokenError:
            raise ImError(ErrorCode.AUTH_FAILED, _BAD_TOKEN) from None
        sid, sub, exp = claims.get("sid"), claims.get("sub"), claims.get("exp")
        if (
            claims.get("typ") != "access"
            or not isinstance(sid, str)
            or not isinstance(sub, str)
            or not sub.isdigit()
            or not isinstance(exp, int)
            or exp <= self._clock()
        ):
            raise ImError(ErrorCode.AUTH_FAILED, _BAD_TOKEN)
        uid = int(sub)
        if not await self._session_live(sid, uid):
            raise ImError(ErrorCode.AUTH_FAILED, "the session has ended: log in again")
        return Principal(uid=uid, sid=sid)

    async def _session_live(self, sid: str, uid: int) -> bool:
        now = time.monotonic()
        cached = self._live_sessions.get(sid)
        if cached is not None and cached[1] > now:
            return cached[0] == uid
        session = await self._store.get_session(sid)
        if session is None or session.revoked or session.uid != uid:
            self._live_sessions.pop(sid, None)
            return False
        if len(self._live_sessions) >= 100_000:  # bound memory: drop expired entries, else everything
            self._live_sessions = {k: v for k, v in self._live_sessions.items() if v[1] > now}
            if len(self._live_sessions) >= 100_000:
                self._live_sessions.clear()
        self._live_sessions[sid] = (uid, now + self._cache_ttl)
        return True

    # --- users and contacts -------------------------------------------------------------------------------

    async def user(self, uid: int) -> User:
        user = await self._store.get_user(uid)
        if user is None:
            raise ImError(ErrorCode.NOT_FOUND, f"no user {uid}")
        return user

    async def user_by_name(self, username: str) -> User:
        found = await self._store.find_user(username) if len(username) <= 64 else None
        if found is None:
            raise ImError(ErrorCode.NOT_FOUND, "no user by that name")
        return found[0]

    async def search(self, prefix: str, limit: int) -> list[User]:
        return await self._store.search_users(prefix, limit)

    async def add_contact(self, uid: int, contact: int) -> None:
        if contact == uid:
            raise ImError(ErrorCode.INVALID, "you cannot add yourself as a contact")
        await self.user(contact)
        await self._store.add_contact(uid, contact, int(self._clock()))

    async def remove_contact(self, uid: int, contact: int) -> None:
        if not await self._store.remove_contact(uid, contact):
            raise ImError(ErrorCode.NOT_FOUND, f"user {contact} is not a contact")

    async def contacts(self, uid: int) -> list[User]:
        return await self._store.list_contacts(uid)
