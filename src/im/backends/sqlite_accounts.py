"""Users, login sessions and contacts in the shared SQLite database (tables of migration 1).

User names are unique case-insensitively through the ``users_username`` index on ``lower(username)``;
``lower()`` folds ASCII only, which is all a user name may contain (see ``im.core.accounts``).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from im.backends.base import AccountStore, AuthSession, Conflict, User
from im.backends.shared_db import OnSharedDatabase
from im.backends.sqlite_db import SqliteDatabase
from im.backends.sqlrows import USER_COLUMNS, like_prefix, user_from_row


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
                f"SELECT {USER_COLUMNS} FROM users"
                " WHERE username LIKE ? ESCAPE '\\' OR display_name LIKE ? ESCAPE '\\'"
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
        sql = "INSERT INTO auth_sessions (sid, uid, refresh_hash, expires_at, revoked) VALUES (?, ?, ?, ?, ?)"
        row = (session.sid, session.uid, session.refresh_hash, session.expires_at, int(session.revoked))
        await self.db.write(lambda conn: conn.execute(sql, row))

    async def get_session(self, sid: str) -> AuthSession | None:
        def get(conn: sqlite3.Connection) -> AuthSession | None:
            row = conn.execute(
                "SELECT sid, uid, refresh_hash, expires_at, revoked FROM auth_sessions WHERE sid = ?", (sid,)
            ).fetchone()
            if row is None:
                return None
            return AuthSession(
                sid=row[0], uid=row[1], refresh_hash=row[2], expires_at=row[3], revoked=bool(row[4])
            )

        return await self.db.read(get)

    async def rotate_refresh(self, sid: str, old_hash: str, new_hash: str, expires_at: int) -> bool:
        def rotate(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE auth_sessions SET refresh_hash = ?, expires_at = ?"
                " WHERE sid = ? AND refresh_hash = ? AND revoked = 0",
                (new_hash, expires_at, sid, old_hash),
            )
            return cur.rowcount == 1

        return await self.db.write(rotate)

    async def revoke_session(self, sid: str) -> None:
        sql = "UPDATE auth_sessions SET revoked = 1 WHERE sid = ?"
        await self.db.write(lambda conn: conn.execute(sql, (sid,)))

    # --- contacts ---------------------------------------------------------------------------------------

    async def add_contact(self, uid: int, contact: int, now: int) -> None:
        sql = "INSERT OR IGNORE INTO contacts (uid, contact, created_at) VALUES (?, ?, ?)"
        await self.db.write(lambda conn: conn.execute(sql, (uid, contact, now)))

    async def remove_contact(self, uid: int, contact: int) -> bool:
        def remove(conn: sqlite3.Connection) -> bool:
            cur = conn.execute("DELETE FROM contacts WHERE uid = ? AND contact = ?", (uid, contact))
            return cur.rowcount == 1

        return await self.db.write(remove)

    async def list_contacts(self, uid: int) -> list[User]:
        def get(conn: sqlite3.Connection) -> list[User]:
            rows = conn.execute(
                "SELECT u.uid, u.username, u.display_name, u.created_at FROM contacts c"
                " JOIN users u ON u.uid = c.contact WHERE c.uid = ? ORDER BY lower(u.username)",
                (uid,),
            ).fetchall()
            return [user_from_row(row) for row in rows]

        return await self.db.read(get)
