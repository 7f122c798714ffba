"""Accounts: registration, password login, access and refresh tokens, session revocation.

Tokens::

    access  = JWT HS256 {sub: "<uid>", sid, iat, exp, typ: "access"}    short-lived, checked on every
                                                                        HTTP request and WebSocket auth
    refresh = "<sid>.<gen>.<mac>"    mac = HMAC(key, "<sid>.<gen>"); only its SHA-256 is stored

A login creates an auth session (``sid``). Every refresh rotates the refresh token (``gen`` + 1);
presenting a refresh token that was already rotated away means it leaked (or a client raced itself), so
the whole session is revoked (refresh-token reuse detection, RFC 9700 section 4.14.2). The MAC is checked
first: a token nobody issued (``<sid>.<anything>``, the sid is readable in any access token) is refused
and revokes nothing; only a genuine earlier token counts as reuse. A session ends when its refresh token
was not used for ``refresh_ttl`` seconds (idle) or ``session_max_age`` seconds after the login (absolute),
whichever comes first. A revoked session's access tokens
stop working too: :meth:`AccountService.authenticate` checks the session, caching a positive answer for
at most ``session_cache_ttl`` seconds (a logout evicts this process's cache at once; other processes
notice within that time).

Passwords are hashed with argon2id in a worker thread so the event loop never blocks on it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import argon2
import jwt

from im.backends.accounts import AccountStore
from im.core.passwords import HashSlots, LoginGuard
from im.model.accounts import AuthSession, Privacy, User
from im.model.errors import Conflict, ErrorCode, ImError

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
class SessionInfo:
    """One live login session of the user, as listed to them (times in seconds since the epoch)."""

    sid: str
    created_at: int
    last_used: int
    expires_at: int
    current: bool


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
        refresh_ttl: float = 14 * 24 * 3600.0,
        session_max_age: float = 60 * 24 * 3600.0,
        argon2_time_cost: int = 3,
        argon2_memory_kib: int = 65536,
        argon2_parallelism: int = 4,
        min_password_length: int = 8,
        session_cache_ttl: float = 2.0,
        clock: Callable[[], float] = time.time,
        guard: LoginGuard | None = None,
        hash_slots: HashSlots | None = None,
        max_blocks: int = 10_000,
    ) -> None:
        if len(secret) < 16:
            raise ValueError("the token secret must be at least 16 bytes")
        self._store = store
        # A fixed-length HMAC key derived from the secret (domain-separated; HS256 wants >= 32 bytes).
        self._secret = hashlib.sha256(b"im access token v1\0" + secret).digest()
        self._access_ttl = access_ttl
        self._refresh_ttl = refresh_ttl
        self._max_age = session_max_age
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
        self._max_blocks = max_blocks
        self._live_sessions: dict[str, tuple[int, float]] = {}  # sid -> (uid, cached until; monotonic)
        self._revoke_listeners: list[Callable[[str], None]] = []
        self._privacy_listeners: list[Callable[[int], None]] = []

    def on_revoke(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(sid)`` when a session is revoked here (the gateway closes its connections).

        In-process only: in distributed mode the API process forwards the sid over the transfer link,
        and each gateway calls :meth:`revoked_elsewhere`.
        """
        self._revoke_listeners.append(listener)

    def on_privacy_change(self, listener: Callable[[int], None]) -> None:
        """Call ``listener(uid)`` when a user's blocks, settings or account change here (the chat core
        in this process drops what it cached about them, so a block takes effect at once)."""
        self._privacy_listeners.append(listener)

    def _privacy_changed(self, uid: int) -> None:
        for listener in self._privacy_listeners:
            listener(uid)

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
            raise ImError(ErrorCode.INVALID, "the user name must be 3 to 32 characters: letters, digits, '_', '.', '-'")
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
        refresh_token = self._refresh_token(sid, 0)
        now = self._clock()
        await self._store.create_session(
            AuthSession(
                sid=sid,
                uid=user.uid,
                refresh_hash=_sha256(refresh_token),
                expires_at=self._expiry(now, now),
                revoked=False,
                created_at=int(now),
                last_used=int(now),
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
        return Tokens(access_token=access, refresh_token=refresh_token, expires_in=int(self._access_ttl), uid=uid)

    def _refresh_token(self, sid: str, gen: int) -> str:
        mac = hmac.new(self._secret, f"im refresh v1\0{sid}.{gen}".encode(), hashlib.sha256).digest()
        return f"{sid}.{gen}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"

    def _genuine(self, refresh_token: str) -> tuple[str, int] | None:
        """(sid, gen) of a refresh token this server issued (its MAC checks out), else None."""
        sid, _, rest = refresh_token.partition(".")
        gen, _, _mac = rest.partition(".")
        if not sid or len(sid) > 64 or not gen.isdigit() or len(gen) > 18:
            return None
        if not hmac.compare_digest(self._refresh_token(sid, int(gen)), refresh_token):
            return None
        return sid, int(gen)

    def _expiry(self, now: float, created_at: float) -> int:
        """When a refresh token issued ``now`` stops working: idle limit, capped by the absolute one."""
        return int(min(now + self._refresh_ttl, created_at + self._max_age))

    async def refresh(self, refresh_token: str) -> Tokens:
        """New tokens for a live session; the presented refresh token stops working.

        Presenting a genuine refresh token that was already rotated away revokes the session; a token
        this server never issued is refused and revokes nothing.
        """
        refused = ImError(ErrorCode.AUTH_FAILED, "invalid or expired refresh token")
        genuine = self._genuine(refresh_token)
        # A token of the format before signatures ("<sid>.<random>", issued by an older version) is
        # honoured while it is the session's current one; it can never prove reuse.
        legacy = genuine is None and refresh_token.count(".") == 1
        if genuine is None and not legacy:
            raise refused
        sid, gen = genuine or (refresh_token.partition(".")[0], 0)
        session = await self._store.get_session(sid) if sid and len(sid) <= 64 else None
        now = self._clock()
        if session is None or session.revoked or session.expires_at <= now:
            raise refused
        old_hash = _sha256(refresh_token)
        if not hmac.compare_digest(old_hash, session.refresh_hash):
            if legacy:
                raise refused
            await self._revoke(sid)  # an earlier token of this session, used again: it leaked
            raise ImError(ErrorCode.AUTH_FAILED, "refresh token reused: the session is revoked, log in again")
        new_token = self._refresh_token(sid, gen + 1)
        expires_at = self._expiry(now, session.created_at or now)
        if expires_at <= now:
            raise refused
        if not await self._store.rotate_refresh(sid, old_hash, _sha256(new_token), expires_at, int(now)):
            # Another refresh with the same token won the race: the same token was used twice.
            await self._revoke(sid)
            raise ImError(ErrorCode.AUTH_FAILED, "refresh token reused: the session is revoked, log in again")
        return self._tokens(session.uid, sid, new_token, now)

    async def logout(self, sid: str) -> None:
        """Revoke the session: its refresh token and access tokens stop working."""
        await self._revoke(sid)

    async def _revoke(self, sid: str) -> None:
        await self._store.revoke_session(sid)
        self._announce_revoked([sid])

    def _announce_revoked(self, sids: Sequence[str]) -> None:
        for sid in sids:
            self._live_sessions.pop(sid, None)
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

    # --- account controls ---------------------------------------------------------------------------------

    async def _check_current_password(self, uid: int, password: str, address: str) -> None:
        """Refuse (``forbidden``) unless ``password`` is the user's password: sensitive changes ask for it
        again, so a stolen access token alone cannot take the account over. The check counts as a login
        attempt (the same ``rates.login_*`` budgets, so a stolen token cannot guess the password faster
        than a login could) and hashes in the same bounded, fair slots."""
        user = await self.user(uid)
        if self._guard is not None:
            await self._guard.login_attempt(user.username, address)
        found = await self._store.find_user(user.username) if len(password) <= MAX_PASSWORD_LENGTH else None
        if found is None or found[0].uid != uid or not await self._slots.run(address, self._verify, found[1], password):
            raise ImError(ErrorCode.FORBIDDEN, "the current password is wrong")

    async def change_password(self, me: Principal, current: str, new: str, *, address: str = "") -> None:
        """Set a new password; every OTHER session of the user is revoked (their sockets close at once)."""
        self._check_password(new)
        await self._check_current_password(me.uid, current, address)
        await self._store.set_password_hash(me.uid, await self._slots.run(address, self._hasher.hash, new))
        self._announce_revoked(await self._store.revoke_sessions(me.uid, keep=me.sid))

    async def sessions(self, me: Principal) -> list[SessionInfo]:
        """The user's live sessions, oldest first; ``current`` marks the caller's."""
        now = self._clock()
        return [
            SessionInfo(s.sid, s.created_at, s.last_used, s.expires_at, s.sid == me.sid)
            for s in await self._store.list_sessions(me.uid)
            if s.expires_at > now
        ]

    async def revoke_session(self, me: Principal, sid: str) -> None:
        """End one of the user's own sessions (404 for any other sid, whoever it belongs to)."""
        session = await self._store.get_session(sid) if len(sid) <= 64 else None
        if session is None or session.uid != me.uid or session.revoked:
            raise ImError(ErrorCode.NOT_FOUND, "no such session")
        await self._revoke(sid)

    async def logout_everywhere(self, uid: int) -> int:
        """Revoke every session of the user, the caller's included; returns how many were live."""
        sids = await self._store.revoke_sessions(uid)
        self._announce_revoked(sids)
        return len(sids)

    async def delete_account(
        self, me: Principal, password: str, leave_groups: Callable[[int], Awaitable[None]], *, address: str = ""
    ) -> None:
        """Delete the account (docs/protocol.md section 18): sessions end first (sockets close), then
        ``leave_groups(uid)`` takes the user out of every group (ownership passes on), then the store
        leaves a tombstone: messages stay, shown from "Deleted user"; the name is free again."""
        await self._check_current_password(me.uid, password, address)
        self._announce_revoked(await self._store.revoke_sessions(me.uid))
        await leave_groups(me.uid)
        self._announce_revoked(await self._store.delete_user(me.uid, int(self._clock())))
        self._privacy_changed(me.uid)

    # --- consent: blocks and settings ---------------------------------------------------------------------

    async def block(self, uid: int, other: int) -> None:
        """Block ``other`` (idempotent): see docs/protocol.md section 18 for what it stops."""
        if other == uid:
            raise ImError(ErrorCode.INVALID, "you cannot block yourself")
        await self.user(other)
        blocked = (await self._store.privacy([uid])).get(uid, Privacy()).blocked
        if other not in blocked and len(blocked) >= self._max_blocks:
            raise ImError(ErrorCode.INVALID, f"you block {len(blocked)} users already, the most one may block")
        await self._store.block(uid, other, int(self._clock()))
        self._privacy_changed(uid)

    async def unblock(self, uid: int, other: int) -> None:
        if not await self._store.unblock(uid, other):
            raise ImError(ErrorCode.NOT_FOUND, f"user {other} is not blocked")
        self._privacy_changed(uid)

    async def blocks(self, uid: int) -> list[User]:
        return await self._store.list_blocks(uid)

    async def settings(self, uid: int) -> Privacy:
        found = (await self._store.privacy([uid])).get(uid)
        if found is None:
            raise ImError(ErrorCode.NOT_FOUND, f"no user {uid}")
        return found

    async def set_contacts_only(self, uid: int, contacts_only: bool) -> None:
        await self._store.set_contacts_only(uid, contacts_only)
        self._privacy_changed(uid)
