"""The embedded :class:`ChatStore`: SQLite in WAL mode, one transaction per group commit.

With ``outbox=True`` the commit also appends one ``outbox`` row per message (one ``executemany`` in the
same transaction), for :class:`im.events.relay.OutboxRelay` to publish.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any

from im.backends.chat import ChatStore, ConversationKeys, StoredBodies
from im.backends.sql.rows import conversation_summary
from im.backends.sql.shared_db import OnSharedDatabase
from im.backends.sql.sqlite_db import SqliteDatabase
from im.model.chat import (
    CommitBatch,
    ConversationState,
    ConversationSummary,
    Group,
    OutboxEvent,
    StoredMessage,
    SyncPoint,
)
from im.model.errors import FenceRefused, SeqConflict
from im.model.keys import WrappedKey

_MSG_COLUMNS = "conv, seq, mid, sender, device, cmid, ts, type, body"
_CHUNK = 500  # bound on host parameters per statement


def _msg(row: tuple[Any, ...]) -> StoredMessage:
    conv, seq, mid, sender, device, cmid, ts, type_, body = row
    return StoredMessage(
        conv=str(conv),
        seq=int(seq),
        mid=int(mid),
        sender=int(sender),
        device=str(device),
        cmid=str(cmid),
        ts=int(ts),
        type=str(type_),
        body=bytes(body),
    )


def _chunks(items: Sequence[object], size: int = _CHUNK) -> Iterable[Sequence[object]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


class SqliteChatStore(OnSharedDatabase[SqliteDatabase], ChatStore):
    def __init__(self, db: SqliteDatabase, *, outbox: bool = False) -> None:
        super().__init__(db)
        self.outbox = outbox

    async def load_conversations(self, convs: Sequence[str]) -> dict[str, ConversationState]:
        def run(conn: sqlite3.Connection) -> dict[str, ConversationState]:
            out: dict[str, ConversationState] = {}
            for chunk in _chunks(list(convs)):
                marks = ",".join("?" * len(chunk))
                for conv, kind, last_seq in conn.execute(
                    f"SELECT conv, kind, last_seq FROM conversations WHERE conv IN ({marks})", chunk
                ):
                    out[conv] = ConversationState(conv, kind, last_seq, {})
                for conv, uid, role in conn.execute(
                    f"SELECT conv, uid, role FROM members WHERE conv IN ({marks})", chunk
                ):
                    if conv in out:
                        out[conv].members[uid] = role
            return out

        return await self.db.write(run)  # the writer sees its own latest commit, no snapshot lag

    async def find_sent(self, keys: Sequence[tuple[int, str, str]]) -> dict[tuple[int, str, str], StoredMessage]:
        def run(conn: sqlite3.Connection) -> dict[tuple[int, str, str], StoredMessage]:
            out = {}
            for key in keys:
                row = conn.execute(
                    f"SELECT {_MSG_COLUMNS} FROM messages WHERE sender=? AND device=? AND cmid=?", key
                ).fetchone()
                if row is not None:
                    out[key] = _msg(row)
            return out

        return await self.db.read(run)

    async def ping(self) -> None:
        """``SELECT 1`` on the reader's thread: the file is open and its thread answers."""
        await self.db.read(lambda conn: conn.execute("SELECT 1").fetchone())

    async def raise_fence(self, node_id: int, token: int) -> int:
        def run(conn: sqlite3.Connection) -> int:
            conn.execute(
                "INSERT INTO node_fences (node_id, token) VALUES (?, ?)"
                " ON CONFLICT (node_id) DO UPDATE SET token = max(token, excluded.token)",
                (node_id, token),
            )
            return int(conn.execute("SELECT token FROM node_fences WHERE node_id = ?", (node_id,)).fetchone()[0])

        return await self.db.write(run)

    async def commit(self, batch: CommitBatch) -> None:
        def run(conn: sqlite3.Connection) -> None:
            try:
                _check_fence(conn, batch.fence)
                for c in batch.new_conversations:
                    conn.execute(
                        "INSERT INTO conversations (conv, kind, last_seq, last_ts) VALUES (?, ?, 0, 0)",
                        (c.conv, c.kind),
                    )
                    conn.executemany(
                        "INSERT INTO members (conv, uid, role, joined_seq) VALUES (?, ?, ?, 0)",
                        [(c.conv, uid, role) for uid, role in c.members.items()],
                    )
                for conv, (before, after, ts) in batch.heads.items():
                    cur = conn.execute(
                        "UPDATE conversations SET last_seq=?, last_ts=? WHERE conv=? AND last_seq=?",
                        (after, ts, conv, before),
                    )
                    if cur.rowcount != 1:
                        raise SeqConflict(conv)
                conn.executemany(
                    f"INSERT INTO messages ({_MSG_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    batch.message_rows(bytearray_bodies=True),
                )
                if self.outbox and batch.messages:
                    traces = batch.traces
                    conn.executemany(
                        "INSERT INTO outbox (conv, seq, mid, sender, type, created_at, traceparent)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?)",
                        [(m.conv, m.seq, m.mid, m.sender, m.type, m.ts, traces.get(m.mid)) for m in batch.messages],
                    )
                for ch in batch.member_changes:
                    if ch.role is None:
                        conn.execute("DELETE FROM members WHERE conv=? AND uid=?", (ch.conv, ch.uid))
                    else:
                        if ch.role == "owner" and ch.conv.startswith("g:"):
                            conn.execute("UPDATE groups SET owner=? WHERE gid=?", (ch.uid, int(ch.conv[2:])))
                        conn.execute(
                            "INSERT INTO members (conv, uid, role, joined_seq, read_seq) VALUES (?, ?, ?, ?, ?)"
                            " ON CONFLICT (conv, uid) DO UPDATE SET role=excluded.role",
                            (ch.conv, ch.uid, ch.role, ch.joined_seq, ch.joined_seq),
                        )
                if batch.file_refs:
                    conn.executemany("INSERT OR IGNORE INTO file_refs (file_id, conv) VALUES (?, ?)", batch.file_refs)
                if batch.read_marks:
                    conn.executemany(
                        "UPDATE members SET read_seq=max(read_seq, ?) WHERE uid=? AND conv=?",
                        [(seq, uid, conv) for uid, conv, seq in batch.read_marks],
                    )
            except sqlite3.IntegrityError as exc:
                raise SeqConflict(str(exc)) from None

        await self.db.write(run)

    async def create_group(
        self, group: Group, first: StoredMessage, members: dict[int, str], *, fence: tuple[int, int] | None = None
    ) -> int:
        def run(conn: sqlite3.Connection) -> int:
            _check_fence(conn, fence)
            cur = conn.execute(
                "INSERT INTO groups (gid, name, owner, created_at) VALUES (?, ?, ?, ?)",
                (group.gid or None, group.name, group.owner, group.created_at),
            )
            gid = int(cur.lastrowid or 0)
            conv = f"g:{gid}"
            conn.execute(
                "INSERT INTO conversations (conv, kind, last_seq, last_ts) VALUES (?, 'group', 1, ?)",
                (conv, first.ts),
            )
            conn.executemany(
                "INSERT INTO members (conv, uid, role, joined_seq) VALUES (?, ?, ?, 0)",
                [(conv, uid, role) for uid, role in members.items()],
            )
            conn.execute(
                f"INSERT INTO messages ({_MSG_COLUMNS}) VALUES (?, 1, ?, ?, ?, ?, ?, ?, ?)",
                (conv, first.mid, first.sender, first.device, first.cmid, first.ts, first.type, first.body),
            )
            return gid

        return await self.db.write(run)

    async def reserve_gid(self) -> int:
        def run(conn: sqlite3.Connection) -> int:
            # AUTOINCREMENT keeps the largest gid ever used in sqlite_sequence; moving it on reserves one.
            row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'groups'").fetchone()
            gid = (int(row[0]) if row else 0) + 1
            if row is None:
                conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('groups', ?)", (gid,))
            else:
                conn.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'groups'", (gid,))
            return gid

        return await self.db.write(run)

    async def get_group(self, gid: int) -> Group | None:
        row = await self.db.read(
            lambda conn: conn.execute("SELECT gid, name, owner, created_at FROM groups WHERE gid=?", (gid,)).fetchone()
        )
        return Group(*row) if row else None

    async def read_range(
        self, conv: str, after: int, before: int | None, limit: int, newest_first: bool = False
    ) -> list[StoredMessage]:
        upper = before if before is not None else 2**62
        order = "DESC" if newest_first else "ASC"

        def run(conn: sqlite3.Connection) -> list[StoredMessage]:
            rows = conn.execute(
                f"SELECT {_MSG_COLUMNS} FROM messages WHERE conv=? AND seq>? AND seq<? ORDER BY seq {order} LIMIT ?",
                (conv, after, upper, limit),
            ).fetchall()
            return [_msg(r) for r in rows]

        return await self.db.read(run)

    async def read_ranges(self, ranges: Sequence[tuple[str, int, int]], limit: int) -> dict[str, list[StoredMessage]]:
        if not ranges:
            return {}

        sql = f"SELECT {_MSG_COLUMNS} FROM messages WHERE conv=? AND seq>? AND seq<=? ORDER BY seq LIMIT ?"

        def run(conn: sqlite3.Connection) -> dict[str, list[StoredMessage]]:  # one job: a statement per range
            out: dict[str, list[StoredMessage]] = {}
            for conv, after, upto in ranges:
                rows = conn.execute(sql, (conv, after, upto, limit)).fetchall()
                if rows:
                    out[conv] = [_msg(r) for r in rows]
            return out

        return await self.db.read(run)

    async def sync_points(self, uid: int, device: str) -> list[SyncPoint]:
        def run(conn: sqlite3.Connection) -> list[SyncPoint]:
            rows = conn.execute(
                "SELECT m.conv, c.last_seq, max(m.joined_seq, coalesce(d.seq, 0))"
                " FROM members m JOIN conversations c ON c.conv = m.conv"
                " LEFT JOIN device_cursors d ON d.uid = m.uid AND d.device = ? AND d.conv = m.conv"
                " WHERE m.uid = ?",
                (device, uid),
            ).fetchall()
            return [SyncPoint(conv, last, min(cursor, last)) for conv, last, cursor in rows]

        return await self.db.read(run)

    async def heads(self, uids: Sequence[int]) -> dict[int, dict[str, int]]:
        def run(conn: sqlite3.Connection) -> dict[int, dict[str, int]]:
            out: dict[int, dict[str, int]] = {}
            for chunk in _chunks(list(uids)):
                rows = conn.execute(
                    "SELECT m.uid, m.conv, c.last_seq FROM members m JOIN conversations c ON c.conv = m.conv"
                    f" WHERE m.uid IN ({','.join('?' * len(chunk))})",
                    chunk,
                )
                for uid, conv, last in rows:
                    out.setdefault(uid, {})[conv] = last
            return out

        return await self.db.read(run) if uids else {}

    async def start_cursor(self, uid: int, device: str, conv: str) -> int:
        def run(conn: sqlite3.Connection) -> int:
            row = conn.execute(
                "SELECT max(coalesce((SELECT joined_seq FROM members WHERE conv=? AND uid=?), 0),"
                " coalesce((SELECT seq FROM device_cursors WHERE uid=? AND device=? AND conv=?), 0))",
                (conv, uid, uid, device, conv),
            ).fetchone()
            return int(row[0]) if row else 0

        return await self.db.read(run)

    async def save_cursors(self, cursors: Iterable[tuple[int, str, str, int]]) -> None:
        rows = list(cursors)
        if not rows:
            return
        await self.db.write(
            lambda conn: conn.executemany(
                "INSERT INTO device_cursors (uid, device, conv, seq, saved_at)"
                " VALUES (?, ?, ?, ?, CAST(strftime('%s', 'now') AS INTEGER))"
                " ON CONFLICT (uid, device, conv) DO UPDATE SET seq=max(seq, excluded.seq), saved_at=excluded.saved_at",
                rows,
            )
        )

    async def save_read_marks(self, marks: Iterable[tuple[int, str, int]]) -> None:
        rows = [(seq, uid, conv) for uid, conv, seq in marks]
        if rows:
            await self.db.write(
                lambda conn: conn.executemany(
                    "UPDATE members SET read_seq=max(read_seq, ?) WHERE uid=? AND conv=?", rows
                )
            )

    async def read_marks(self, conv: str) -> dict[int, int]:
        rows = await self.db.read(
            lambda conn: conn.execute("SELECT uid, read_seq FROM members WHERE conv=?", (conv,)).fetchall()
        )
        return {int(uid): int(seq) for uid, seq in rows}

    async def delivered_marks(self, conv: str) -> dict[int, int]:
        rows = await self.db.read(
            lambda conn: conn.execute(
                "SELECT m.uid, coalesce(max(d.seq), 0) FROM members m"
                " LEFT JOIN device_cursors d ON d.uid = m.uid AND d.conv = m.conv"
                " WHERE m.conv = ? GROUP BY m.uid",
                (conv,),
            ).fetchall()
        )
        return {int(uid): int(seq) for uid, seq in rows}

    async def devices(self, uid: int) -> list[tuple[str, int]]:
        rows = await self.db.read(
            lambda conn: conn.execute(
                "SELECT device, max(saved_at) FROM device_cursors WHERE uid = ? GROUP BY device ORDER BY device",
                (uid,),
            ).fetchall()
        )
        return [(row[0], int(row[1])) for row in rows]

    async def wrote_in(self, pairs: Sequence[tuple[int, str]]) -> set[tuple[int, str]]:
        wanted = list(dict.fromkeys(pairs))

        def get(conn: sqlite3.Connection) -> set[tuple[int, str]]:
            sql = "SELECT 1 FROM messages WHERE conv = ? AND sender = ? LIMIT 1"
            return {(s, c) for s, c in wanted if conn.execute(sql, (c, s)).fetchone() is not None}

        return await self.db.read(get) if wanted else set()

    async def outbox_fetch(self, limit: int) -> list[OutboxEvent]:
        rows = await self.db.read(
            lambda conn: conn.execute(
                "SELECT id, conv, seq, mid, sender, type, created_at, traceparent FROM outbox ORDER BY id LIMIT ?",
                (limit,),
            ).fetchall()
        )
        return [OutboxEvent(*row) for row in rows]

    async def outbox_delete(self, ids: Sequence[int]) -> None:
        rows = [(i,) for i in ids]
        if rows:
            await self.db.write(lambda conn: conn.executemany("DELETE FROM outbox WHERE id=?", rows))

    async def list_conversations(self, uid: int) -> list[ConversationSummary]:
        def run(conn: sqlite3.Connection) -> list[ConversationSummary]:
            rows = conn.execute(
                "SELECT c.conv, c.kind, c.last_seq, m.read_seq, g.name,"
                f" {', '.join('x.' + c.strip() for c in _MSG_COLUMNS.split(','))}"
                " FROM members m JOIN conversations c ON c.conv = m.conv"
                " LEFT JOIN groups g ON c.kind = 'group' AND g.gid = CAST(substr(c.conv, 3) AS INTEGER)"
                " LEFT JOIN messages x ON x.conv = c.conv AND x.seq = c.last_seq"
                " WHERE m.uid = ? ORDER BY c.last_ts DESC, c.conv",
                (uid,),
            ).fetchall()
            peers = {}
            for row in rows:
                if row[1] == "direct":
                    a, b = (int(x) for x in row[0][2:].split(":"))
                    peers[row[0]] = b if a == uid else a
            names: dict[int, str] = {}
            if peers:
                ids = sorted(set(peers.values()))
                for chunk in _chunks(ids):
                    marks = ",".join("?" * len(chunk))
                    names.update(
                        conn.execute(f"SELECT uid, display_name FROM users WHERE uid IN ({marks})", chunk).fetchall()
                    )
            out = []
            for row in rows:
                conv, kind, last_seq, read_seq, gname = row[:5]
                last = _msg(row[5:]) if row[5] is not None else None
                peer = peers.get(conv)
                title = gname if kind == "group" else names.get(peer or 0, f"user {peer}")
                out.append(conversation_summary(conv, kind, title, last_seq, read_seq, last, peer))
            return out

        return await self.db.read(run)


_KEY_COLUMNS = "name, version, master_id, wrapped, created_at"


def _key(row: tuple[Any, ...]) -> WrappedKey:
    name, version, master_id, wrapped, created_at = row
    return WrappedKey(str(name), int(version), str(master_id), bytes(wrapped), int(created_at))


class SqliteConversationKeys(OnSharedDatabase[SqliteDatabase], ConversationKeys):
    """:class:`ConversationKeys` in the ``data_keys`` table of the shared SQLite database."""

    async def load_keys(self, names: Sequence[str]) -> dict[str, list[WrappedKey]]:
        wanted = list(dict.fromkeys(names))

        def run(conn: sqlite3.Connection) -> dict[str, list[WrappedKey]]:
            out: dict[str, list[WrappedKey]] = {}
            for chunk in _chunks(wanted):
                marks = ",".join("?" * len(chunk))
                for row in conn.execute(
                    f"SELECT {_KEY_COLUMNS} FROM data_keys WHERE name IN ({marks}) ORDER BY name, version", chunk
                ):
                    key = _key(row)
                    out.setdefault(key.name, []).append(key)
            return out

        # The writer: a key added a moment ago by this process is seen at once (no reader snapshot lag).
        return await self.db.write(run) if wanted else {}

    async def add_key(self, key: WrappedKey) -> WrappedKey:
        def run(conn: sqlite3.Connection) -> WrappedKey:
            conn.execute(
                f"INSERT INTO data_keys ({_KEY_COLUMNS}) VALUES (?, ?, ?, ?, ?) ON CONFLICT (name, version) DO NOTHING",
                (key.name, key.version, key.master_id, key.wrapped, key.created_at),
            )
            row = conn.execute(
                f"SELECT {_KEY_COLUMNS} FROM data_keys WHERE name = ? AND version = ?", (key.name, key.version)
            ).fetchone()
            return _key(row)

        return await self.db.write(run)

    async def list_keys(self, after: tuple[str, int] | None, limit: int) -> list[WrappedKey]:
        name, version = after if after is not None else ("", -1)
        rows = await self.db.read(
            lambda conn: conn.execute(
                f"SELECT {_KEY_COLUMNS} FROM data_keys WHERE (name, version) > (?, ?) ORDER BY name, version LIMIT ?",
                (name, version, limit),
            ).fetchall()
        )
        return [_key(r) for r in rows]

    async def rewrap(self, old: WrappedKey, new: WrappedKey) -> bool:
        cur = await self.db.write(
            lambda conn: conn.execute(
                "UPDATE data_keys SET master_id = ?, wrapped = ?"
                " WHERE name = ? AND version = ? AND master_id = ? AND wrapped = ?",
                (new.master_id, new.wrapped, old.name, old.version, old.master_id, old.wrapped),
            )
        )
        return cur.rowcount == 1

    async def masters(self) -> dict[str, int]:
        rows = await self.db.read(
            lambda conn: conn.execute("SELECT master_id, count(*) FROM data_keys GROUP BY master_id").fetchall()
        )
        return {str(m): int(n) for m, n in rows}

    async def other_master(self, master_id: str) -> str | None:
        row = await self.db.read(
            lambda conn: conn.execute(
                "SELECT master_id FROM data_keys WHERE master_id < ? OR master_id > ? LIMIT 1", (master_id, master_id)
            ).fetchone()
        )
        return None if row is None else str(row[0])

    async def delete_keys(self, names: Sequence[str]) -> int:
        wanted = list(dict.fromkeys(names))

        def run(conn: sqlite3.Connection) -> int:
            deleted = 0
            for chunk in _chunks(wanted):
                marks = ",".join("?" * len(chunk))
                deleted += conn.execute(f"DELETE FROM data_keys WHERE name IN ({marks})", chunk).rowcount
            return deleted

        return await self.db.write(run) if wanted else 0


class SqliteStoredBodies(OnSharedDatabase[SqliteDatabase], StoredBodies):
    """:class:`StoredBodies` on the shared SQLite database: rewrites with ``secure_delete`` (the old
    bytes are zeroed in the page, not left in its free space); :meth:`scrub` rebuilds the file and
    truncates the WAL, for the copies that page splits made while ``secure_delete`` was off."""

    async def count_plaintext(self) -> tuple[int, int]:
        row = await self.db.read(
            lambda conn: conn.execute(
                "SELECT coalesce(sum(substr(body, 1, 1) <> x'01'), 0), count(*) FROM messages"
            ).fetchone()
        )
        return int(row[0]), int(row[1])

    async def plaintext_page(self, after: tuple[str, int] | None, limit: int) -> list[StoredMessage]:
        conv, seq = after if after is not None else ("", -1)
        rows = await self.db.read(
            lambda conn: conn.execute(
                f"SELECT {_MSG_COLUMNS} FROM messages WHERE (conv, seq) > (?, ?) AND substr(body, 1, 1) <> x'01'"
                " ORDER BY conv, seq LIMIT ?",
                (conv, seq, limit),
            ).fetchall()
        )
        return [_msg(r) for r in rows]

    async def replace_bodies(self, changes: Sequence[tuple[StoredMessage, bytes]]) -> int:
        if not changes:
            return 0
        params = [(new, m.conv, m.seq, m.body) for m, new in changes]

        def run(conn: sqlite3.Connection) -> int:
            conn.execute("PRAGMA secure_delete = ON")
            try:
                cur = conn.executemany("UPDATE messages SET body = ? WHERE conv = ? AND seq = ? AND body = ?", params)
                return int(cur.rowcount)
            finally:
                conn.execute("PRAGMA secure_delete = OFF")

        return await self.db.write(run, background=True)  # a batch of rows: off the loop's thread

    async def scrub(self) -> bool:
        await self.db.vacuum()
        return await self.db.checkpoint(truncate=True)


def _check_fence(conn: sqlite3.Connection, fence: tuple[int, int] | None) -> None:
    """Refuse a write fenced by a token below the one recorded for its node id (in the writer's
    transaction: serialised with raise_fence)."""
    if fence is not None:
        node_id, token = fence
        row = conn.execute("SELECT token FROM node_fences WHERE node_id = ?", (node_id,)).fetchone()
        if row is not None and row[0] > token:
            raise FenceRefused(node_id, token, row[0])
