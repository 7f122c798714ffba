"""Users, login sessions, contacts and blocks in the shared SQLite database (tables of migrations 1 and 4).

User names are unique case-insensitively through the ``users_username`` index on ``lower(username)``;
``lower()`` folds ASCII only, which is all a user name may contain (see ``im.core.accounts``).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from im.backends.accounts import AccountStore
from im.backends.sql.rows import USER_COLUMNS, like_prefix, user_from_row
from im.backends.sql.shared_db import OnSharedDatabase
from im.backends.sql.sqlite_db import SqliteDatabase
from im.model.accounts import AuthSession, Privacy, User
from im.model.errors import Conflict


class SqliteAccountStore(OnSharedDatabase[SqliteDatabase], AccountStore):
    """:class:`AccountStore` on a :class:`SqliteDatabase` (shared with the chat store; opened counted)."""

    # --- users ------------------------------------------------------------------------------------------

    async def create_user(self, username: str, display_name: str, password_hash: str, now: int) -> User:
        def insert(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "INSERT INTO users (username, display_name, password_hash, created_at) VALUES (?, ?, ?, ?)",
                (username, display_name, password_hash, now),
            )
            assert cur.lastrowid is not None
            return cur.lastrowid

        try:
            uid = await self.db.write(insert)
        except sqlite3.IntegrityError:
            raise Conflict(f"user name {username!r} is taken") from None
        return User(uid=uid, username=username, display_name=display_name, created_at=now)

    async def get_user(self, uid: int) -> User | None:
        def get(conn: sqlite3.Connection) -> User | None:
            row = conn.execute(f"SELECT {USER_COLUMNS} FROM users WHERE uid = ?", (uid,)).fetchone()
            return None if row is None else user_from_row(row)

        return await self.db.read(get)

    async def get_users(self, uids: Sequence[int]) -> dict[int, User]:
        wanted = list(dict.fromkeys(uids))

        def get(conn: sqlite3.Connection) -> dict[int, User]:
            found: dict[int, User] = {}
            for start in range(0, len(wanted), 500):  # stay below SQLite's bound-parameter limit
                chunk = wanted[start : start + 500]
                marks = ",".join("?" * len(chunk))
                for row in conn.execute(f"SELECT {USER_COLUMNS} FROM users WHERE uid IN ({marks})", chunk):
                    found[row[0]] = user_from_row(row)
            return found

        return await self.db.read(get) if wanted else {}

    async def find_user(self, username: str) -> tuple[User, str] | None:
        def get(conn: sqlite3.Connection) -> tuple[User, str] | None:
            row = conn.execute(
                f"SELECT {USER_COLUMNS}, password_hash FROM users WHERE lower(username) = lower(?)",
                (username,),
            ).fetchone()
            return None if row is None else (user_from_row(row[:4]), row[4])

        return await self.db.read(get)

    async def search_users(self, prefix: str, limit: int) -> list[User]:
        pattern = like_prefix(prefix)

        def search(conn: sqlite3.Connection) -> list[User]:
            # LIKE is case-insensitive for ASCII in SQLite (case_sensitive_like is off by default).
            rows = conn.execute(
                f"SELECT {USER_COLUMNS} FROM users WHERE deleted_at IS NULL"
                " AND (username LIKE ? ESCAPE '\\' OR display_name LIKE ? ESCAPE '\\')"
                " ORDER BY lower(username) LIMIT ?",
                (pattern, pattern, limit),
            ).fetchall()
            return [user_from_row(row) for row in rows]

        return await self.db.read(search)

    async def set_password_hash(self, uid: int, password_hash: str) -> None:
        sql = "UPDATE users SET password_hash = ? WHERE uid = ?"
        await self.db.write(lambda conn: conn.execute(sql, (password_hash, uid)))

    # --- sessions ---------------------------------------------------------------------------------------

    async def create_session(self, session: AuthSession) -> None:
        sql = (
            "INSERT INTO auth_sessions (sid, uid, refresh_hash, expires_at, revoked, created_at, last_used)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)"
        )
        row = (
            session.sid,
            session.uid,
            session.refresh_hash,
            session.expires_at,
            int(session.revoked),
            session.created_at,
            session.last_used,
        )
        await self.db.write(lambda conn: conn.execute(sql, row))

    async def get_session(self, sid: str) -> AuthSession | None:
        def get(conn: sqlite3.Connection) -> AuthSession | None:
            row = conn.execute(f"SELECT {_SESSION_COLUMNS} FROM auth_sessions WHERE sid = ?", (sid,)).fetchone()
            return None if row is None else _session(row)

        return await self.db.read(get)

    async def rotate_refresh(self, sid: str, old_hash: str, new_hash: str, expires_at: int, used_at: int = 0) -> bool:
        def rotate(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE auth_sessions SET refresh_hash = ?, expires_at = ?,"
                " last_used = CASE WHEN ? > 0 THEN ? ELSE last_used END"
                " WHERE sid = ? AND refresh_hash = ? AND revoked = 0",
                (new_hash, expires_at, used_at, used_at, sid, old_hash),
            )
            return cur.rowcount == 1

        return await self.db.write(rotate)

    async def revoke_session(self, sid: str) -> None:
        sql = "UPDATE auth_sessions SET revoked = 1 WHERE sid = ?"
        await self.db.write(lambda conn: conn.execute(sql, (sid,)))

    async def list_sessions(self, uid: int) -> list[AuthSession]:
        def get(conn: sqlite3.Connection) -> list[AuthSession]:
            rows = conn.execute(
                f"SELECT {_SESSION_COLUMNS} FROM auth_sessions WHERE uid = ? AND revoked = 0 ORDER BY created_at, sid",
                (uid,),
            ).fetchall()
            return [_session(row) for row in rows]

        return await self.db.read(get)

    async def revoke_sessions(self, uid: int, keep: str | None = None) -> list[str]:
        return await self.db.write(lambda conn: _revoke_all(conn, uid, keep))

    async def delete_user(self, uid: int, now: int) -> list[str]:
        def delete(conn: sqlite3.Connection) -> list[str]:
            sids = _revoke_all(conn, uid, None)
            conn.execute(
                "UPDATE users SET username = ?, display_name = 'Deleted user', password_hash = '',"
                " contacts_only = 0, deleted_at = ? WHERE uid = ?",
                (f"~deleted~{uid}", now, uid),
            )
            conn.execute("DELETE FROM contacts WHERE uid = ? OR contact = ?", (uid, uid))
            conn.execute("DELETE FROM blocks WHERE uid = ? OR blocked = ?", (uid, uid))
            conn.execute("DELETE FROM device_cursors WHERE uid = ?", (uid,))
            conn.execute("DELETE FROM file_owners WHERE uid = ?", (uid,))
            return sids

        return await self.db.write(delete)

    # --- contacts ---------------------------------------------------------------------------------------

    async def add_contact(self, uid: int, contact: int, now: int) -> None:
        sql = "INSERT OR IGNORE INTO contacts (uid, contact, created_at) VALUES (?, ?, ?)"
        await self.db.write(lambda conn: conn.execute(sql, (uid, contact, now)))

    async def remove_contact(self, uid: int, contact: int) -> bool:
        def remove(conn: sqlite3.Connection) -> bool:
            cur = conn.execute("DELETE FROM contacts WHERE uid = ? AND contact = ?", (uid, contact))
            return cur.rowcount == 1

        return await self.db.write(remove)

    async def contact_pairs(self, pairs: Sequence[tuple[int, int]]) -> set[tuple[int, int]]:
        wanted = list(dict.fromkeys(pairs))

        def get(conn: sqlite3.Connection) -> set[tuple[int, int]]:
            sql = "SELECT 1 FROM contacts WHERE uid = ? AND contact = ?"
            return {pair for pair in wanted if conn.execute(sql, pair).fetchone() is not None}

        return await self.db.read(get) if wanted else set()

    # --- consent ----------------------------------------------------------------------------------------

    async def block(self, uid: int, other: int, now: int) -> None:
        sql = "INSERT OR IGNORE INTO blocks (uid, blocked, created_at) VALUES (?, ?, ?)"
        await self.db.write(lambda conn: conn.execute(sql, (uid, other, now)))

    async def unblock(self, uid: int, other: int) -> bool:
        def remove(conn: sqlite3.Connection) -> bool:
            return conn.execute("DELETE FROM blocks WHERE uid = ? AND blocked = ?", (uid, other)).rowcount == 1

        return await self.db.write(remove)

    async def list_blocks(self, uid: int) -> list[User]:
        def get(conn: sqlite3.Connection) -> list[User]:
            rows = conn.execute(
                "SELECT u.uid, u.username, u.display_name, u.created_at FROM blocks b"
                " JOIN users u ON u.uid = b.blocked WHERE b.uid = ? ORDER BY lower(u.username)",
                (uid,),
            ).fetchall()
            return [user_from_row(row) for row in rows]

        return await self.db.read(get)

    async def set_contacts_only(self, uid: int, contacts_only: bool) -> None:
        sql = "UPDATE users SET contacts_only = ? WHERE uid = ?"
        await self.db.write(lambda conn: conn.execute(sql, (int(contacts_only), uid)))

    async def privacy(self, uids: Sequence[int]) -> dict[int, Privacy]:
        wanted = list(dict.fromkeys(uids))

        def get(conn: sqlite3.Connection) -> dict[int, Privacy]:
            found: dict[int, tuple[bool, bool]] = {}
            blocked: dict[int, set[int]] = {}
            for start in range(0, len(wanted), 500):  # stay below SQLite's bound-parameter limit
                chunk = wanted[start : start + 500]
                marks = ",".join("?" * len(chunk))
                for uid, only, deleted in conn.execute(
                    f"SELECT uid, contacts_only, deleted_at IS NOT NULL FROM users WHERE uid IN ({marks})", chunk
                ):
                    found[uid] = (bool(only), bool(deleted))
                for uid, other in conn.execute(f"SELECT uid, blocked FROM blocks WHERE uid IN ({marks})", chunk):
                    blocked.setdefault(uid, set()).add(other)
            return {
                uid: Privacy(frozenset(blocked.get(uid, ())), only, deleted) for uid, (only, deleted) in found.items()
            }

        return await self.db.read(get) if wanted else {}

    async def list_contacts(self, uid: int) -> list[User]:
        def get(conn: sqlite3.Connection) -> list[User]:
            rows = conn.execute(
                "SELECT u.uid, u.username, u.display_name, u.created_at FROM contacts c"
                " JOIN users u ON u.uid = c.contact WHERE c.uid = ? ORDER BY lower(u.username)",
                (uid,),
            ).fetchall()
            return [user_from_row(row) for row in rows]

        return await self.db.read(get)


_SESSION_COLUMNS = "sid, uid, refresh_hash, expires_at, revoked, created_at, last_used"


def _session(row: Sequence[Any]) -> AuthSession:
    return AuthSession(
        sid=row[0],
        uid=row[1],
        refresh_hash=row[2],
        expires_at=row[3],
        revoked=bool(row[4]),
        created_at=row[5],
        last_used=row[6],
    )


def _revoke_all(conn: sqlite3.Connection, uid: int, keep: str | None) -> list[str]:
    rows = conn.execute(
        "UPDATE auth_sessions SET revoked = 1 WHERE uid = ? AND revoked = 0 AND sid IS NOT ? RETURNING sid",
        (uid, keep),
    ).fetchall()
    return sorted(row[0] for row in rows)
