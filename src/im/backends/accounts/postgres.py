"""Users, login sessions, contacts and blocks in the shared PostgreSQL database (migrations 1 and 5).

User names are unique case-insensitively through the ``users_username`` index on ``lower(username)``.
Name order is bytewise (``COLLATE "C"``), as in SQLite, whatever the database's collation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg

from im.backends.accounts import AccountStore
from im.backends.sql.postgres_db import PostgresDatabase, rowcount
from im.backends.sql.rows import USER_COLUMNS, like_prefix, user_from_row
from im.backends.sql.shared_db import OnSharedDatabase
from im.model.accounts import AuthSession, Privacy, User
from im.model.errors import Conflict


class PostgresAccountStore(OnSharedDatabase[PostgresDatabase], AccountStore):
    """:class:`AccountStore` on a :class:`PostgresDatabase` (shared with the chat store; opened counted)."""

    # --- users ------------------------------------------------------------------------------------------

    async def create_user(self, username: str, display_name: str, password_hash: str, now: int) -> User:
        try:
            uid = await self.db.pool.fetchval(
                "INSERT INTO users (username, display_name, password_hash, created_at) VALUES ($1, $2, $3, $4)"
                " RETURNING uid",
                username,
                display_name,
                password_hash,
                now,
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
            f"SELECT {USER_COLUMNS} FROM users WHERE deleted_at IS NULL AND"
            " (lower(username) LIKE lower($1) ESCAPE '\\' OR lower(display_name) LIKE lower($1) ESCAPE '\\')"
            ' ORDER BY lower(username) COLLATE "C" LIMIT $2',
            like_prefix(prefix),
            limit,
        )
        return [user_from_row(row) for row in rows]

    async def set_password_hash(self, uid: int, password_hash: str) -> None:
        await self.db.pool.execute("UPDATE users SET password_hash = $1 WHERE uid = $2", password_hash, uid)

    # --- sessions ---------------------------------------------------------------------------------------

    async def create_session(self, session: AuthSession) -> None:
        await self.db.pool.execute(
            "INSERT INTO auth_sessions (sid, uid, refresh_hash, expires_at, revoked, created_at, last_used)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7)",
            session.sid,
            session.uid,
            session.refresh_hash,
            session.expires_at,
            session.revoked,
            session.created_at,
            session.last_used,
        )

    async def get_session(self, sid: str) -> AuthSession | None:
        row = await self.db.pool.fetchrow(f"SELECT {_SESSION_COLUMNS} FROM auth_sessions WHERE sid = $1", sid)
        return None if row is None else _session(row)

    async def rotate_refresh(self, sid: str, old_hash: str, new_hash: str, expires_at: int, used_at: int = 0) -> bool:
        status = await self.db.pool.execute(
            "UPDATE auth_sessions SET refresh_hash = $1, expires_at = $2,"
            " last_used = CASE WHEN $5::bigint > 0 THEN $5::bigint ELSE last_used END"
            " WHERE sid = $3 AND refresh_hash = $4 AND NOT revoked",
            new_hash,
            expires_at,
            sid,
            old_hash,
            used_at,
        )
        return rowcount(status) == 1

    async def revoke_session(self, sid: str) -> None:
        await self.db.pool.execute("UPDATE auth_sessions SET revoked = true WHERE sid = $1", sid)

    async def list_sessions(self, uid: int) -> list[AuthSession]:
        rows = await self.db.pool.fetch(
            f"SELECT {_SESSION_COLUMNS} FROM auth_sessions WHERE uid = $1 AND NOT revoked ORDER BY created_at, sid",
            uid,
        )
        return [_session(row) for row in rows]

    async def revoke_sessions(self, uid: int, keep: str | None = None) -> list[str]:
        return await _revoke_all(self.db.pool, uid, keep)

    async def delete_user(self, uid: int, now: int) -> list[str]:
        async with self.db.pool.acquire() as conn, conn.transaction():
            sids = await _revoke_all(conn, uid, None)
            await conn.execute(
                "UPDATE users SET username = $1, display_name = 'Deleted user', password_hash = '',"
                " contacts_only = false, deleted_at = $2 WHERE uid = $3",
                f"~deleted~{uid}",
                now,
                uid,
            )
            await conn.execute("DELETE FROM contacts WHERE uid = $1 OR contact = $1", uid)
            await conn.execute("DELETE FROM blocks WHERE uid = $1 OR blocked = $1", uid)
            await conn.execute("DELETE FROM device_cursors WHERE uid = $1", uid)
            await conn.execute("DELETE FROM file_owners WHERE uid = $1", uid)
            return sids

    # --- contacts ---------------------------------------------------------------------------------------

    async def add_contact(self, uid: int, contact: int, now: int) -> None:
        await self.db.pool.execute(
            "INSERT INTO contacts (uid, contact, created_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            uid,
            contact,
            now,
        )

    async def remove_contact(self, uid: int, contact: int) -> bool:
        status = await self.db.pool.execute("DELETE FROM contacts WHERE uid = $1 AND contact = $2", uid, contact)
        return rowcount(status) == 1

    async def contact_pairs(self, pairs: Sequence[tuple[int, int]]) -> set[tuple[int, int]]:
        wanted = list(dict.fromkeys(pairs))
        if not wanted:
            return set()
        rows = await self.db.pool.fetch(
            "SELECT c.uid, c.contact FROM contacts c"
            " JOIN unnest($1::bigint[], $2::bigint[]) AS p(uid, contact) ON c.uid = p.uid AND c.contact = p.contact",
            [u for u, _ in wanted],
            [c for _, c in wanted],
        )
        return {(row[0], row[1]) for row in rows}

    # --- consent ----------------------------------------------------------------------------------------

    async def block(self, uid: int, other: int, now: int) -> None:
        await self.db.pool.execute(
            "INSERT INTO blocks (uid, blocked, created_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING", uid, other, now
        )

    async def unblock(self, uid: int, other: int) -> bool:
        status = await self.db.pool.execute("DELETE FROM blocks WHERE uid = $1 AND blocked = $2", uid, other)
        return rowcount(status) == 1

    async def list_blocks(self, uid: int) -> list[User]:
        rows = await self.db.pool.fetch(
            "SELECT u.uid, u.username, u.display_name, u.created_at FROM blocks b"
            ' JOIN users u ON u.uid = b.blocked WHERE b.uid = $1 ORDER BY lower(u.username) COLLATE "C"',
            uid,
        )
        return [user_from_row(row) for row in rows]

    async def set_contacts_only(self, uid: int, contacts_only: bool) -> None:
        await self.db.pool.execute("UPDATE users SET contacts_only = $1 WHERE uid = $2", contacts_only, uid)

    async def privacy(self, uids: Sequence[int]) -> dict[int, Privacy]:
        wanted = list(dict.fromkeys(uids))
        if not wanted:
            return {}
        rows = await self.db.pool.fetch(
            "SELECT u.uid, u.contacts_only, u.deleted_at IS NOT NULL,"
            " coalesce((SELECT array_agg(b.blocked) FROM blocks b WHERE b.uid = u.uid), '{}')"
            " FROM users u WHERE u.uid = ANY($1::bigint[])",
            wanted,
        )
        return {row[0]: Privacy(frozenset(row[3]), row[1], row[2]) for row in rows}

    async def list_contacts(self, uid: int) -> list[User]:
        rows = await self.db.pool.fetch(
            "SELECT u.uid, u.username, u.display_name, u.created_at FROM contacts c"
            ' JOIN users u ON u.uid = c.contact WHERE c.uid = $1 ORDER BY lower(u.username) COLLATE "C"',
            uid,
        )
        return [user_from_row(row) for row in rows]


_SESSION_COLUMNS = "sid, uid, refresh_hash, expires_at, revoked, created_at, last_used"


def _session(row: Any) -> AuthSession:
    return AuthSession(
        sid=row[0],
        uid=row[1],
        refresh_hash=row[2],
        expires_at=row[3],
        revoked=row[4],
        created_at=row[5],
        last_used=row[6],
    )


async def _revoke_all(conn: Any, uid: int, keep: str | None) -> list[str]:
    """On a pool or a connection (asyncpg ships no type hints)."""
    rows = await conn.fetch(
        "UPDATE auth_sessions SET revoked = true WHERE uid = $1 AND NOT revoked AND sid IS DISTINCT FROM $2"
        " RETURNING sid",
        uid,
        keep,
    )
    return sorted(row[0] for row in rows)
