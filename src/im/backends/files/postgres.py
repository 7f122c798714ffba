"""File metadata in the shared PostgreSQL database (tables of migration 2: files, file_owners, file_refs)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from im.backends.files import FileStore
from im.backends.sql.postgres_db import PostgresDatabase
from im.backends.sql.shared_db import OnSharedDatabase
from im.model.files import FileMeta

_META = "file_id, sha256, size, content_type, width, height, created_at"

# The read rule in one place: uid uploaded the file or is a member of a conversation it was sent to.
# ``f`` is the files row; the uid is a parameter (``{uid}``).
_MAY_READ = (
    "(EXISTS (SELECT 1 FROM file_owners o WHERE o.file_id = f.file_id AND o.uid = {uid})"
    " OR EXISTS (SELECT 1 FROM file_refs r JOIN members m ON m.conv = r.conv"
    "            WHERE r.file_id = f.file_id AND m.uid = {uid}))"
)


def _meta(row: Any) -> FileMeta:
    return FileMeta(*row[:7])


class PostgresFileStore(OnSharedDatabase[PostgresDatabase], FileStore):
    """:class:`FileStore` on a :class:`PostgresDatabase` (shared with the other stores; opened counted)."""

    async def add_upload(self, meta: FileMeta, uid: int, name: str, now: int) -> tuple[FileMeta, str, bool]:
        async with self.db.pool.acquire() as conn, conn.transaction():
            # A concurrent first upload of the same bytes: this insert waits for it, then does nothing.
            await conn.execute(
                f"INSERT INTO files ({_META}) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
                meta.file_id,
                meta.sha256,
                meta.size,
                meta.content_type,
                meta.width,
                meta.height,
                meta.created_at,
            )
            new_owner = await conn.fetchval(
                "INSERT INTO file_owners (file_id, uid, name, created_at) VALUES ($1, $2, $3, $4)"
                " ON CONFLICT DO NOTHING RETURNING true",
                meta.file_id,
                uid,
                name,
                now,
            )
            row = await conn.fetchrow(
                f"SELECT {', '.join('f.' + c.strip() for c in _META.split(','))}, o.name FROM files f"
                " JOIN file_owners o ON o.file_id = f.file_id AND o.uid = $2 WHERE f.file_id = $1",
                meta.file_id,
                uid,
            )
        return _meta(row), row[7], bool(new_owner)

    async def hashes(self, after: str | None, limit: int) -> list[str]:
        rows = await self.db.pool.fetch(
            "SELECT sha256 FROM files WHERE sha256 > $1 ORDER BY sha256 LIMIT $2", after or "", limit
        )
        return [str(r[0]) for r in rows]

    async def lookup(self, uid: int, file_id: str) -> tuple[FileMeta, str | None] | None:
        row = await self.db.pool.fetchrow(
            f"SELECT {', '.join('f.' + c.strip() for c in _META.split(','))}, o.name FROM files f"
            " LEFT JOIN file_owners o ON o.file_id = f.file_id AND o.uid = $2"
            f" WHERE f.file_id = $1 AND {_MAY_READ.format(uid='$2')}",
            file_id,
            uid,
        )
        return None if row is None else (_meta(row), row[7])

    async def readable(self, pairs: Sequence[tuple[int, str]]) -> set[tuple[int, str]]:
        wanted = list(dict.fromkeys(pairs))
        if not wanted:
            return set()
        rows = await self.db.pool.fetch(
            "SELECT p.uid, p.file_id FROM unnest($1::bigint[], $2::text[]) AS p(uid, file_id)"
            f" WHERE EXISTS (SELECT 1 FROM files f WHERE f.file_id = p.file_id AND {_MAY_READ.format(uid='p.uid')})",
            [uid for uid, _ in wanted],
            [fid for _, fid in wanted],
        )
        return {(uid, fid) for uid, fid in rows}

    async def add_refs(self, refs: Sequence[tuple[str, str]]) -> None:
        rows = list(refs)
        if rows:
            await self.db.pool.execute(
                "INSERT INTO file_refs (file_id, conv) SELECT * FROM unnest($1::text[], $2::text[])"
                " ON CONFLICT DO NOTHING",
                [f for f, _ in rows],
                [c for _, c in rows],
            )
