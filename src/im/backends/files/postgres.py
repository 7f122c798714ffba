"""File metadata in the shared PostgreSQL database (tables of migration 2: files, file_owners, file_refs).

The ids in the tables are keyed or in clear as ``ids`` says (:mod:`im.backends.files.ids`); every query
matches the forms :class:`IdForms` gives (one, or both while the tables are mixed), as an array.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from im.backends.files.ids import COUNT_CLEAR, DATA_COLUMNS, KEYED, TABLES, FileStoreOnSharedDatabase
from im.backends.sql.postgres_db import PostgresDatabase
from im.model.files import FileMeta

# The read rule in one place: uid uploaded the file or is a member of a conversation it was sent to.
# ``{ids}`` is a text[] of the file's ids (its forms), ``{uid}`` the user.
_MAY_READ = (
    "(EXISTS (SELECT 1 FROM file_owners o WHERE o.file_id = ANY({ids}) AND o.uid = {uid})"
    " OR EXISTS (SELECT 1 FROM file_refs r JOIN members m ON m.conv = r.conv"
    "            WHERE r.file_id = ANY({ids}) AND m.uid = {uid}))"
)


def _meta(sha256: str, row: Any) -> FileMeta:
    return FileMeta(sha256, sha256, *row[:5])


async def _move(conn: Any, changes: Sequence[tuple[str, str, str]]) -> int:
    """Move every row of each (old id, new id, new files.sha256 value) to the new id: the rows deleted are
    the rows inserted (a row already under the new id wins). Returns the rows moved."""
    old, new, sha = (list(c) for c in zip(*changes, strict=True))
    data = ", ".join("f." + c.strip() for c in DATA_COLUMNS.split(","))
    moved = await conn.fetchval(
        "WITH c AS (SELECT * FROM unnest($1::text[], $2::text[], $3::text[]) AS c(old, new, sha)),"
        f" df AS (DELETE FROM files f USING c WHERE f.file_id = c.old RETURNING c.new, c.sha, {data}),"
        f" fi AS (INSERT INTO files (file_id, sha256, {DATA_COLUMNS}) SELECT * FROM df ON CONFLICT DO NOTHING),"
        " do_ AS (DELETE FROM file_owners o USING c WHERE o.file_id = c.old"
        "         RETURNING c.new, o.uid, o.name, o.created_at),"
        " oi AS (INSERT INTO file_owners (file_id, uid, name, created_at) SELECT * FROM do_ ON CONFLICT DO NOTHING),"
        " dr AS (DELETE FROM file_refs r USING c WHERE r.file_id = c.old RETURNING c.new, r.conv),"
        " ri AS (INSERT INTO file_refs (file_id, conv) SELECT * FROM dr ON CONFLICT DO NOTHING)"
        " SELECT (SELECT count(*) FROM df) + (SELECT count(*) FROM do_) + (SELECT count(*) FROM dr)",
        old,
        new,
        sha,
    )
    return int(moved)


class PostgresFileStore(FileStoreOnSharedDatabase[PostgresDatabase]):
    """:class:`FileStore` on a :class:`PostgresDatabase` (shared with the other stores; opened counted), and
    the :class:`~im.backends.files.ids.StoredFileIds` of a conversion to keyed ids (``ids``, ``recheck``:
    see :class:`~im.backends.files.ids.FileStoreOnSharedDatabase`)."""

    async def _any_row(self, where: str) -> bool:
        query = " OR ".join(f"EXISTS (SELECT 1 FROM {t} WHERE {where})" for t in TABLES)
        return bool(await self.db.pool.fetchval(f"SELECT {query}"))

    async def add_upload(self, meta: FileMeta, uid: int, name: str, now: int) -> tuple[FileMeta, str, bool]:
        sha = meta.sha256
        fid = self.ids.stored(sha)
        value = self.ids.seal(sha, fid)
        other = self.forms.other(sha)
        async with self.db.pool.acquire() as conn, conn.transaction():
            if other is not None:  # its rows in the other form (a conversion under way) come first
                await _move(conn, [(other, fid, value)])
            # A concurrent first upload of the same bytes: this insert waits for it, then does nothing.
            await conn.execute(
                f"INSERT INTO files (file_id, sha256, {DATA_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)"
                " ON CONFLICT DO NOTHING",
                fid,
                value,
                meta.size,
                meta.content_type,
                meta.width,
                meta.height,
                meta.created_at,
            )
            new_owner = await conn.fetchval(
                "INSERT INTO file_owners (file_id, uid, name, created_at) VALUES ($1, $2, $3, $4)"
                " ON CONFLICT DO NOTHING RETURNING true",
                fid,
                uid,
                name,
                now,
            )
            row = await conn.fetchrow(
                f"SELECT {', '.join('f.' + c.strip() for c in DATA_COLUMNS.split(','))}, o.name FROM files f"
                " JOIN file_owners o ON o.file_id = f.file_id AND o.uid = $2 WHERE f.file_id = $1",
                fid,
                uid,
            )
        return _meta(sha, row), row[5], bool(new_owner)

    async def hashes(self, after: str | None, limit: int) -> tuple[list[str], str | None]:
        rows = await self.db.pool.fetch(
            "SELECT file_id, sha256 FROM files WHERE file_id > $1 ORDER BY file_id LIMIT $2", after or "", limit
        )
        return self._hashes_page([(str(r[0]), str(r[1])) for r in rows], limit)

    async def lookup(self, uid: int, file_id: str) -> tuple[FileMeta, str | None] | None:
        await self._recheck()
        ids = list(self.forms.forms(file_id))
        row = await self.db.pool.fetchrow(
            f"SELECT {DATA_COLUMNS}, (SELECT o.name FROM file_owners o WHERE o.file_id = ANY($1::text[]) AND o.uid = $2"
            "                 ORDER BY o.created_at LIMIT 1)"
            f" FROM files f WHERE f.file_id = ANY($1::text[]) AND {_MAY_READ.format(ids='$1::text[]', uid='$2')}"
            " ORDER BY f.created_at LIMIT 1",
            ids,
            uid,
        )
        return None if row is None else (_meta(file_id, row), row[5])

    async def readable(self, pairs: Sequence[tuple[int, str]]) -> set[tuple[int, str]]:
        wanted = list(dict.fromkeys(pairs))
        if not wanted:
            return set()
        await self._recheck()
        forms = [self.forms.forms(sha) for _, sha in wanted]
        rows = await self.db.pool.fetch(
            "SELECT p.i FROM unnest($1::bigint[], $2::text[], $3::text[], $4::int[]) AS p(uid, a, b, i)"
            " WHERE EXISTS (SELECT 1 FROM files f WHERE f.file_id IN (p.a, p.b)"
            f" AND {_MAY_READ.format(ids='ARRAY[p.a, p.b]', uid='p.uid')})",
            [uid for uid, _ in wanted],
            [f[0] for f in forms],
            [f[-1] for f in forms],
            list(range(len(wanted))),
        )
        return {wanted[r[0]] for r in rows}

    async def add_refs(self, refs: Sequence[tuple[str, str]]) -> None:
        rows = self.ids.stored_refs(refs)
        if rows:
            await self.db.pool.execute(
                "INSERT INTO file_refs (file_id, conv) SELECT * FROM unnest($1::text[], $2::text[])"
                " ON CONFLICT DO NOTHING",
                [f for f, _ in rows],
                [c for _, c in rows],
            )

    # --- StoredFileIds: the conversion to keyed ids ------------------------------------------------------

    async def count_unconverted(self) -> int:
        if not self.ids.keyed:
            return 0
        return int(await self.db.pool.fetchval(COUNT_CLEAR))

    async def unconverted(self, after: str | None, limit: int) -> list[str]:
        if not self.ids.keyed:
            return []
        part = f"(SELECT file_id FROM {{}} WHERE file_id > $1 AND file_id < '{KEYED}' ORDER BY file_id LIMIT $2)"
        query = " UNION ".join(part.format(t) for t in TABLES) + " ORDER BY 1 LIMIT $2"
        rows = await self.db.pool.fetch(query, after or "", limit)
        return [str(r[0]) for r in rows]

    async def convert(self, ids: Sequence[str]) -> int:
        changes = self.ids.conversions(ids)
        if not changes:
            return 0
        async with self.db.pool.acquire() as conn, conn.transaction():
            return await _move(conn, changes)
