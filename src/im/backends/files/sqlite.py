"""File metadata in the shared SQLite database (tables of migration 2: files, file_owners, file_refs)."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from im.backends.files import FileStore
from im.backends.sql.shared_db import OnSharedDatabase
from im.backends.sql.sqlite_db import SqliteDatabase
from im.model.files import FileMeta

_META = "file_id, sha256, size, content_type, width, height, created_at"

# The read rule in one place: the file exists, and uid uploaded it or is a member of a conversation it
# was sent to. Parameters: (file_id, uid, uid).
_CAN_READ = (
    "SELECT 1 FROM files f WHERE f.file_id = ? AND ("
    " EXISTS (SELECT 1 FROM file_owners o WHERE o.file_id = f.file_id AND o.uid = ?)"
    " OR EXISTS (SELECT 1 FROM file_refs r JOIN members m ON m.conv = r.conv"
    "            WHERE r.file_id = f.file_id AND m.uid = ?))"
)


def _meta(row: tuple[str, str, int, str, int | None, int | None, int]) -> FileMeta:
    return FileMeta(*row)


class SqliteFileStore(OnSharedDatabase[SqliteDatabase], FileStore):
    """:class:`FileStore` on a :class:`SqliteDatabase` (shared with the other stores; opened counted)."""

    async def add_upload(self, meta: FileMeta, uid: int, name: str, now: int) -> tuple[FileMeta, str, bool]:
        def add(conn: sqlite3.Connection) -> tuple[FileMeta, str, bool]:
            conn.execute(
                f"INSERT OR IGNORE INTO files ({_META}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (meta.file_id, meta.sha256, meta.size, meta.content_type, meta.width, meta.height, meta.created_at),
            )
            cur = conn.execute(
                "INSERT OR IGNORE INTO file_owners (file_id, uid, name, created_at) VALUES (?, ?, ?, ?)",
                (meta.file_id, uid, name, now),
            )
            new_owner = cur.rowcount == 1
            row = conn.execute(f"SELECT {_META} FROM files WHERE file_id = ?", (meta.file_id,)).fetchone()
            (stored_name,) = conn.execute(
                "SELECT name FROM file_owners WHERE file_id = ? AND uid = ?", (meta.file_id, uid)
            ).fetchone()
            return _meta(row), stored_name, new_owner

        return await self.db.write(add)

    async def hashes(self, after: str | None, limit: int) -> list[str]:
        rows = await self.db.read(
            lambda conn: conn.execute(
                "SELECT sha256 FROM files WHERE sha256 > ? ORDER BY sha256 LIMIT ?", (after or "", limit)
            ).fetchall()
        )
        return [str(r[0]) for r in rows]

    async def lookup(self, uid: int, file_id: str) -> tuple[FileMeta, str | None] | None:
        def get(conn: sqlite3.Connection) -> tuple[FileMeta, str | None] | None:
            if conn.execute(_CAN_READ, (file_id, uid, uid)).fetchone() is None:
                return None
            row = conn.execute(f"SELECT {_META} FROM files WHERE file_id = ?", (file_id,)).fetchone()
            owned = conn.execute(
                "SELECT name FROM file_owners WHERE file_id = ? AND uid = ?", (file_id, uid)
            ).fetchone()
            return _meta(row), None if owned is None else owned[0]

        return await self.db.read(get)

    async def readable(self, pairs: Sequence[tuple[int, str]]) -> set[tuple[int, str]]:
        wanted = list(dict.fromkeys(pairs))

        def check(conn: sqlite3.Connection) -> set[tuple[int, str]]:
            return {(uid, fid) for uid, fid in wanted if conn.execute(_CAN_READ, (fid, uid, uid)).fetchone()}

        return await self.db.read(check) if wanted else set()

    async def add_refs(self, refs: Sequence[tuple[str, str]]) -> None:
        rows = list(refs)
        if rows:
            sql = "INSERT OR IGNORE INTO file_refs (file_id, conv) VALUES (?, ?)"
            await self.db.write(lambda conn: conn.executemany(sql, rows))
