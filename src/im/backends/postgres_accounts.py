"""Users, login sessions and contacts in the shared PostgreSQL database (tables of migration 1).

User names are unique case-insensitively through the ``users_username`` index on ``lower(username)``.
Name order is bytewise (``COLLATE "C"``), as in SQLite, whatever the database's collation.
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from im.backends.base import AccountStore, AuthSession, Conflict, User
from im.backends.postgres_db import PostgresDatabase, rowcount
from im.backends.shared_db import OnSharedDatabase
from im.backends.sqlrows import USER_COLUMNS, like_prefix, user_from_row


class PostgresAccountStore(OnSharedDatabase[PostgresDatabase], AccountStore):
    """:class:`AccountStore` on a :class:`PostgresDatabase` (shared with the chat store; opened counted)."""

    # --- users ------------------------------------------------------------------------------------------

    async def create_user(self, username: str, display_name: str, password_hash: str, now: int) -> User:
        try:
            uid = await self.db.pool.fetchval(
                "INSERT INTO users (username, display_name, password_hash, created_at) VALUES ($1, $2, $3, $4)"
                " RETURNING uid",
                username, display_name, password_hash, now,
            )
        except asyncpg.UniqueViolationError:
            raise Conflict(f"user name {username!r} is taken") from None
        return User(uid=int(uid), username=username, display_name=display_name, created_at=now)

    async def get_user(self, uid: int) -> User | None:
        row = await self.db.pool.fetchrow(f"SELECT {USER_COLUMNS} FROM users WHERE uid = $1", uid)
        return None if row is None else user_from_row(row)

    async def get_users(self, uids: Sequence[int]) -> dict[int, User]:
        wanted = list(dict.fromkeys(uids))
        if not wanted:
            return {}
        rows = await self.db.pool.fetch(f"SELECT {USER_COLUMNS} FROM users WHERE uid = ANY($1::bigint[])", wanted)
        return {row[0]: user_from_row(row) for row in rows}

    async def find_user(self, username: str) -> tuple[User, str] | None:
        row = await self.db.pool.fetchrow(
            f"SELECT {USER_COLUMNS}, password_hash FROM users WHERE lower(username) = lower($1)", username
        )
        return None if row is None else (user_from_row(row), row[4])

    async def search_users(self, prefix: str, limit: int) -> list[User]:
        rows = await self.db.pool.fetch(
            f"SELECT {USER_COLUMNS} FROM users"
            " WHERE lower(username) LIKE lower($1) ESCAPE '\\' OR lower(display_name) LIKE lower($1) ESCAPE '\\'"
            ' ORDER BY lower(username) COLLATE "C" LIMIT $2',
            like_prefix(prefix), limit,
        )
        return [user_from_row(row) for row in rows]

    async def set_password_hash(self, uid: int, password_hash: str) -> None:
        await self.db.pool.execute("UPDATE users SET password_hash = $1 WHERE uid = $2", password_hash, uid)

    # --- sessions ---------------------------------------------------------------------------------------

    async def create_session(self, session: AuthSession) -> None:
        await self.db.pool.execute(
            "INSERT INTO auth_sessions (sid, uid, refresh_hash, expires_at, revoked) VALUES ($1, $2, $3, $4, $5)",
            session.sid, session.uid, session.refresh_hash, session.expires_at, session.revoked,
        )

    async def get_session(self, sid: str) -> AuthSession | None:
        row = await self.db.pool.fetchrow(
            "SELECT sid, uid, refresh_hash, expires_at, revoked FROM auth_sessions WHERE sid = $1", sid
        )
        if row is None:
            return None
        return AuthSession(sid=row[0], uid=row[1], refresh_hash=row[2], expires_at=row[3], revoked=row[4])

    async def rotate_refresh(self, sid: str, old_hash: str, new_hash: str, expires_at: int) -> bool:
        status = await self.db.pool.execute(
            "UPDATE auth_sessions SET refresh_hash = $1, expires_at = $2"
            " WHERE sid = $3 AND refresh_hash = $4 AND NOT revoked",
            new_hash, expires_at, sid, old_hash,
        )
        return rowcount(status) == 1

    async def revoke_session(self, sid: str) -> None:
        await self.db.pool.execute("UPDATE auth_sessions SET revoked = true WHERE sid = $1", sid)

    # --- contacts ---------------------------------------------------------------------------------------

    async def add_contact(self, uid: int, contact: int, now: int) -> None:
        await self.db.pool.execute(
            "INSERT INTO contacts (uid, contact, created_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            uid, contact, now,
        )

    async def remove_contact(self, uid: int, contact: int) -> bool:
        status = await self.db.pool.execute("DELETE FROM contacts WHERE uid = $1 AND contact = $2", uid, contact)
        return rowcount(status) == 1

    async def list_contacts(self, uid: int) -> list[User]:
        rows = await self.db.pool.fetch(
            "SELECT u.uid, u.username, u.display_name, u.created_at FROM contacts c"
            ' JOIN users u ON u.uid = c.contact WHERE c.uid = $1 ORDER BY lower(u.username) COLLATE "C"',
            uid,
        )
        return [user_from_row(row) for row in rows]
