"""File metadata in the shared SQLite database (tables of migration 2: files, file_owners, file_refs).

The ids in the tables are keyed or in clear as ``ids`` says (:mod:`im.backends.files.ids`); every query
matches the forms :class:`IdForms` gives (one, or both while the tables are mixed).
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Sequence

from im.backends.files.ids import COUNT_CLEAR, DATA_COLUMNS, KEYED, TABLES, FileStoreOnSharedDatabase
from im.backends.sql.sqlite_db import SqliteDatabase
from im.model.files import FileMeta


@functools.cache
def _in(n: int) -> str:
    return f"IN ({', '.join('?' * n)})"


@functools.cache
def _can_read(n: int) -> str:
    """The read rule in one place: the file exists, and uid uploaded it or is a member of a conversation
    it was sent to. Parameters: the file's n ids, then (ids, uid, ids, uid)."""
    ids = _in(n)
    return (
        f"SELECT 1 FROM files f WHERE f.file_id {ids} AND ("
        f" EXISTS (SELECT 1 FROM file_owners o WHERE o.file_id {ids} AND o.uid = ?)"
        " OR EXISTS (SELECT 1 FROM file_refs r JOIN members m ON m.conv = r.conv"
        f"            WHERE r.file_id {ids} AND m.uid = ?)) LIMIT 1"
    )


def _readable(conn: sqlite3.Connection, uid: int, ids: tuple[str, ...]) -> bool:
    return conn.execute(_can_read(len(ids)), (*ids, *ids, uid, *ids, uid)).fetchone() is not None


def _move(conn: sqlite3.Connection, changes: Sequence[tuple[str, str, str]]) -> int:
    """Move every row of each (old id, new id, new files.sha256 value) to the new id; a row already
    under the new id wins. Returns the rows moved."""
    conn.executemany(
        f"INSERT OR IGNORE INTO files (file_id, sha256, {DATA_COLUMNS})"
        f" SELECT ?, ?, {DATA_COLUMNS} FROM files WHERE file_id = ?",
        [(new, sha, old) for old, new, sha in changes],
    )
    conn.executemany(
        "INSERT OR IGNORE INTO file_owners (file_id, uid, name, created_at)"
        " SELECT ?, uid, name, created_at FROM file_owners WHERE file_id = ?",
        [(new, old) for old, new, _ in changes],
    )
    conn.executemany(
        "INSERT OR IGNORE INTO file_refs (file_id, conv) SELECT ?, conv FROM file_refs WHERE file_id = ?",
        [(new, old) for old, new, _ in changes],
    )
    moved = 0
    for table in TABLES:
        moved += conn.executemany(f"DELETE FROM {table} WHERE file_id = ?", [(old,) for old, _, _ in changes]).rowcount
    return moved


class SqliteFileStore(FileStoreOnSharedDatabase[SqliteDatabase]):
    """:class:`FileStore` on a :class:`SqliteDatabase` (shared with the other stores; opened counted), and
    the :class:`~im.backends.files.ids.StoredFileIds` of a conversion to keyed ids (``ids``, ``recheck``:
    see :class:`~im.backends.files.ids.FileStoreOnSharedDatabase`)."""

    async def _any_row(self, where: str) -> bool:
        query = " UNION ALL ".join(f"SELECT 1 FROM (SELECT 1 FROM {t} WHERE {where} LIMIT 1)" for t in TABLES)
        return bool(await self.db.read(lambda conn: conn.execute(query).fetchall()))

    async def add_upload(self, meta: FileMeta, uid: int, name: str, now: int) -> tuple[FileMeta, str, bool]:
        sha = meta.sha256
        fid = self.ids.stored(sha)
        value = self.ids.seal(sha, fid)
        other = self.forms.other(sha)

        def add(conn: sqlite3.Connection) -> tuple[FileMeta, str, bool]:
            if other is not None:  # its rows in the other form (a conversion under way) come first
                _move(conn, [(other, fid, value)])
            conn.execute(
                f"INSERT OR IGNORE INTO files (file_id, sha256, {DATA_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (fid, value, meta.size, meta.content_type, meta.width, meta.height, meta.created_at),
            )
            cur = conn.execute(
                "INSERT OR IGNORE INTO file_owners (file_id, uid, name, created_at) VALUES (?, ?, ?, ?)",
                (fid, uid, name, now),
            )
            new_owner = cur.rowcount == 1
            row = conn.execute(f"SELECT {DATA_COLUMNS} FROM files WHERE file_id = ?", (fid,)).fetchone()
            (stored_name,) = conn.execute(
                "SELECT name FROM file_owners WHERE file_id = ? AND uid = ?", (fid, uid)
            ).fetchone()
            return FileMeta(sha, sha, *row), stored_name, new_owner

        return await self.db.write(add)

    async def hashes(self, after: str | None, limit: int) -> tuple[list[str], str | None]:
        rows = await self.db.read(
            lambda conn: conn.execute(
                "SELECT file_id, sha256 FROM files WHERE file_id > ? ORDER BY file_id LIMIT ?", (after or "", limit)
            ).fetchall()
        )
        return self._hashes_page([(str(fid), str(value)) for fid, value in rows], limit)

    async def lookup(self, uid: int, file_id: str) -> tuple[FileMeta, str | None] | None:
        await self._recheck()
        ids = self.forms.forms(file_id)
        where = _in(len(ids))

        def get(conn: sqlite3.Connection) -> tuple[FileMeta, str | None] | None:
            if not _readable(conn, uid, ids):
                return None
            row = conn.execute(
                f"SELECT {DATA_COLUMNS} FROM files WHERE file_id {where} ORDER BY created_at LIMIT 1", ids
            ).fetchone()
            owned = conn.execute(
                f"SELECT name FROM file_owners WHERE file_id {where} AND uid = ? ORDER BY created_at LIMIT 1",
                (*ids, uid),
            ).fetchone()
            return FileMeta(file_id, file_id, *row), None if owned is None else owned[0]

        return await self.db.read(get)

    async def readable(self, pairs: Sequence[tuple[int, str]]) -> set[tuple[int, str]]:
        wanted = list(dict.fromkeys(pairs))
        if not wanted:
            return set()
        await self._recheck()
        forms = self.forms.forms
        checks = [(uid, sha, forms(sha)) for uid, sha in wanted]

        def check(conn: sqlite3.Connection) -> set[tuple[int, str]]:
            return {(uid, sha) for uid, sha, ids in checks if _readable(conn, uid, ids)}

        return await self.db.read(check)

    async def add_refs(self, refs: Sequence[tuple[str, str]]) -> None:
        rows = self.ids.stored_refs(refs)
        if rows:
            sql = "INSERT OR IGNORE INTO file_refs (file_id, conv) VALUES (?, ?)"
            await self.db.write(lambda conn: conn.executemany(sql, rows))

    # --- StoredFileIds: the conversion to keyed ids ------------------------------------------------------

    async def count_unconverted(self) -> int:
        if not self.ids.keyed:
            return 0
        return int((await self.db.read(lambda conn: conn.execute(COUNT_CLEAR).fetchone()))[0])

    async def unconverted(self, after: str | None, limit: int) -> list[str]:
        if not self.ids.keyed:
            return []
        part = (
            "SELECT file_id FROM (SELECT file_id FROM {}"
            f" WHERE file_id > ? AND file_id < '{KEYED}' ORDER BY file_id LIMIT ?)"
        )
        query = " UNION ".join(part.format(t) for t in TABLES) + " ORDER BY 1 LIMIT ?"
        params = (after or "", limit) * len(TABLES) + (limit,)
        rows = await self.db.read(lambda conn: conn.execute(query, params).fetchall())
        return [str(r[0]) for r in rows]

    async def convert(self, ids: Sequence[str]) -> int:
        changes = self.ids.conversions(ids)
        if not changes:
            return 0

        def run(conn: sqlite3.Connection) -> int:
            conn.execute("PRAGMA secure_delete = ON")  # the hashes zeroed in the pages, not left in free space
            try:
                return _move(conn, changes)
            finally:
                conn.execute("PRAGMA secure_delete = OFF")

        return await self.db.write(run, background=True)  # a batch of rows: off the loop's thread
