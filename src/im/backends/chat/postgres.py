"""The :class:`ChatStore` on PostgreSQL (asyncpg): one transaction per group commit, a bounded number of
statements per batch whatever its size.

A commit is (each step skipped when the batch has nothing for it):

0. with ``batch.fence`` (node id, token), the node id's recorded token is read under a share lock
   (``im_check_fence``, migration 8: one indexed lookup, inside the first statement) and a lower token in
   the batch refuses it with :class:`FenceRefused`; ``raise_fence`` (an upsert keeping the larger token)
   waits for the commits holding that lock, so no commit of an older claim lands after it returns;
1. new conversations and their members: two ``INSERT ... SELECT FROM unnest(...)``; a conversation
   that exists already is a unique violation, so the batch fails with :class:`SeqConflict`;
2. every head in one ``UPDATE ... FROM unnest(...) WHERE last_seq = before``; fewer rows updated than
   heads given means another writer moved one: :class:`SeqConflict`. The row locks this takes also
   serialise concurrent committers of a conversation: the second waits, then sees the moved head;
3. the messages with ``COPY`` (measured faster than ``unnest`` or ``executemany`` from about 100 rows,
   no slower below); a taken (conv, seq) or (sender, device, cmid) is a unique violation;
4. member changes folded to their net effect (one ``DELETE``, one upsert, one owner ``UPDATE``);
5. file refs (duplicates ignored) and read marks (max semantics);
6. with ``outbox=True``, one ``outbox`` row per message with ``COPY`` (ids assigned in batch order).
   The head row locks of step 2 serialise the committers of a conversation, so its outbox ids follow
   its seq order; across conversations a smaller id may become visible later than a larger one, which
   is why the relay deletes what it published rather than reading past a high-water mark.

A deadlock between two committers (they touch the same conversations in another order) aborts one of
them, with nothing written: that is reported as :class:`SeqConflict` too, and the retry goes through.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import asyncpg

from im.backends.chat import ChatStore, ConversationKeys, OutboxLockLost, StoredBodies, by_conversation
from im.backends.sql.pg_arrays import bigint_array, text_array
from im.backends.sql.postgres_db import PostgresDatabase, rowcount
from im.backends.sql.rows import conversation_summary
from im.backends.sql.shared_db import OnSharedDatabase
from im.cancel import raise_if_cancelling
from im.model.chat import (
    CommitBatch,
    ConversationState,
    ConversationSummary,
    Group,
    MemberChange,
    OutboxEvent,
    StoredMessage,
    SyncPoint,
)
from im.model.errors import FenceRefused, SeqConflict
from im.model.keys import WrappedKey

_MSG_FIELDS = ["conv", "seq", "mid", "sender", "device", "cmid", "ts", "type", "body"]
_MSG_COLUMNS = ", ".join(_MSG_FIELDS)
_RANGE_COLUMNS = ", ".join(f"m.{f}" for f in _MSG_FIELDS)
_OUTBOX_FIELDS = ["conv", "seq", "mid", "sender", "type", "created_at", "traceparent"]

_COMMIT_MESSAGES = (
    "SELECT im_commit_messages($1::text::text[], $2::text::bigint[], $3::text::bigint[], $4::text::bigint[],"
    " $5::text::text[], $6::text::bigint[], $7::text::bigint[], $8::text::bigint[], $9::text::text[],"
    " $10::text::text[], $11::text::bigint[], $12::text::text[], $13::bytea[], $14::text::bigint[],"
    " $15::text::text[], $16::text::bigint[], $17, $18, $19)"
)

# A refused batch wrote nothing; the committer reloads and retries.
_CONFLICTS = (asyncpg.UniqueViolationError, asyncpg.DeadlockDetectedError, asyncpg.SerializationError)
#: What im_check_fence raises (migration 8) for a batch whose fencing token is below the recorded one.
_FENCED = "IMF01"
#: The session holding the outbox lock, in the task that entered ``outbox_exclusive`` (None elsewhere):
#: that task's fetches and deletes go through it, so they fail once the session (and the lock) is gone.
_outbox_session: contextvars.ContextVar[Any] = contextvars.ContextVar("im_outbox_session", default=None)


def _msg(row: Any) -> StoredMessage:
    return StoredMessage(*row)


def net_member_changes(
    changes: Sequence[MemberChange],
) -> tuple[list[tuple[str, int]], list[tuple[str, int, str, int]], dict[int, int]]:
    """Fold changes, applied in order, into what one statement each can write.

    Returns (rows to delete first, rows to upsert after: (conv, uid, role, joined_seq), gid -> new owner).
    An upsert inserts with ``joined_seq`` (and read mark there) or, for an existing member, changes the
    role only; a remove followed by an add is a delete then a fresh insert, as when applied one by one.
    """
    deletes: dict[tuple[str, int], None] = {}
    upserts: dict[tuple[str, int], tuple[str, int]] = {}
    owners: dict[int, int] = {}
    for ch in changes:
        key = (ch.conv, ch.uid)
        if ch.role is None:
            deletes[key] = None
            upserts.pop(key, None)
            continue
        prev = upserts.get(key)
        upserts[key] = (ch.role, prev[1] if prev is not None else ch.joined_seq)
        if ch.role == "owner" and ch.conv.startswith("g:"):
            owners[int(ch.conv[2:])] = ch.uid
    return list(deletes), [(c, u, role, joined) for (c, u), (role, joined) in upserts.items()], owners


class PostgresChatStore(OnSharedDatabase[PostgresDatabase], ChatStore):
    """:class:`ChatStore` on a :class:`PostgresDatabase` (shared with the other stores; opened counted)."""

    def __init__(self, db: PostgresDatabase, *, outbox: bool = False) -> None:
        super().__init__(db)
        self.outbox = outbox

    async def load_conversations(self, convs: Sequence[str]) -> dict[str, ConversationState]:
        if not convs:
            return {}
        rows = await self.db.pool.fetch(
            "SELECT c.conv, c.kind, c.last_seq, m.uid, m.role FROM conversations c"
            " LEFT JOIN members m ON m.conv = c.conv WHERE c.conv = ANY($1::text[])",
            list(convs),
        )
        out: dict[str, ConversationState] = {}
        for conv, kind, last_seq, uid, role in rows:
            state = out.get(conv)
            if state is None:
                state = out[conv] = ConversationState(conv, kind, last_seq, {})
            if uid is not None:
                state.members[uid] = role
        return out

    async def find_sent(self, keys: Sequence[tuple[int, str, str]]) -> dict[tuple[int, str, str], StoredMessage]:
        if not keys:
            return {}
        senders, devices, cmids = zip(*keys, strict=True)
        rows = await self.db.pool.fetch(
            f"SELECT {', '.join('m.' + c for c in _MSG_FIELDS)} FROM messages m"
            " JOIN unnest($1::bigint[], $2::text[], $3::text[]) AS k(sender, device, cmid)"
            " ON m.sender = k.sender AND m.device = k.device AND m.cmid = k.cmid",
            senders,
            devices,
            cmids,
        )
        out = {}
        for row in rows:
            m = _msg(row)
            out[(m.sender, m.device, m.cmid)] = m
        return out

    async def commit(self, batch: CommitBatch) -> None:
        if not (
            batch.messages
            or batch.heads
            or batch.new_conversations
            or batch.member_changes
            or batch.read_marks
            or batch.file_refs
        ):
            return
        try:
            # A batch carrying traced messages (tracing on) writes its outbox rows' trace contexts by COPY.
            if batch.new_conversations or batch.member_changes or batch.file_refs or (self.outbox and batch.traces):
                async with self.db.pool.acquire() as conn, conn.transaction():
                    await self._write(conn, batch)
            else:  # the common case: one function call, one round trip
                await self._commit_messages(batch)
        except _CONFLICTS as exc:
            raise SeqConflict(f"{type(exc).__name__}: {exc}") from None
        except asyncpg.PostgresError as exc:
            if getattr(exc, "sqlstate", None) == _FENCED and batch.fence is not None:
                raise FenceRefused(*batch.fence) from None
            raise

    async def raise_fence(self, node_id: int, token: int) -> int:
        """An upsert keeping the larger token; its row lock waits for the commits under way that hold the
        fence row in share mode, so none of them lands after this returns with a higher token."""
        return int(
            await self.db.pool.fetchval(
                "INSERT INTO node_fences (node_id, token) VALUES ($1, $2) ON CONFLICT (node_id)"
                " DO UPDATE SET token = greatest(node_fences.token, excluded.token) RETURNING token",
                node_id,
                token,
            )
        )

    async def _commit_messages(self, batch: CommitBatch) -> None:
        """Heads, messages, outbox rows and read marks through ``im_commit_messages`` (migration 4):
        the same statements as :meth:`_write`, in one implicit transaction."""
        # Columns (one array per field) from rows: zip(*rows) transposes in C. Every array but the bodies
        # goes as a text literal (pg_arrays: asyncpg's array encoder costs more per element).
        heads = [(conv, *h) for conv, h in sorted(batch.heads.items())]  # one lock order for every committer
        h_conv, h_before, h_after, h_ts = zip(*heads, strict=True) if heads else ((), (), (), ())
        m_conv, m_seq, m_mid, m_sender, m_device, m_cmid, m_ts, m_type, m_body = (
            zip(*batch.message_rows(), strict=True) if batch.messages else ((),) * 9
        )
        r_uid, r_conv, r_seq = zip(*batch.read_marks, strict=True) if batch.read_marks else ((), (), ())
        fence = batch.fence or (None, None)
        await self.db.pool.execute(
            _COMMIT_MESSAGES,
            text_array(h_conv),
            bigint_array(h_before),
            bigint_array(h_after),
            bigint_array(h_ts),
            text_array(m_conv),
            bigint_array(m_seq),
            bigint_array(m_mid),
            bigint_array(m_sender),
            text_array(m_device),
            text_array(m_cmid),
            bigint_array(m_ts),
            text_array(m_type),
            m_body,
            bigint_array(r_uid),
            text_array(r_conv),
            bigint_array(r_seq),
            self.outbox,
            *fence,
        )

    async def _write(self, conn: Any, batch: CommitBatch) -> None:
        if batch.new_conversations:
            new = batch.new_conversations
            await conn.execute(
                "INSERT INTO conversations (conv, kind, last_seq, last_ts)"
                " SELECT conv, kind, 0, 0 FROM unnest($1::text[], $2::text[]) AS n(conv, kind)",
                [c.conv for c in new],
                [c.kind for c in new],
            )
            rows = [(c.conv, uid, role) for c in new for uid, role in c.members.items()]
            if rows:
                await conn.execute(
                    "INSERT INTO members (conv, uid, role, joined_seq) SELECT conv, uid, role, 0"
                    " FROM unnest($1::text[], $2::bigint[], $3::text[]) AS n(conv, uid, role)",
                    *zip(*rows, strict=True),
                )
        fence = batch.fence or (None, None)
        if fence[0] is not None and not batch.heads:  # (a batch with messages always has heads)
            await conn.execute("SELECT im_check_fence($1, $2)", *fence)
        if batch.heads:
            heads = sorted(batch.heads.items())  # one lock order for every committer
            # The fence is checked once (an uncorrelated subquery: one initplan) in the same statement.
            status = await conn.execute(
                "UPDATE conversations c SET last_seq = h.after, last_ts = h.ts"
                " FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[]) AS h(conv, before, after, ts)"
                " WHERE c.conv = h.conv AND c.last_seq = h.before AND (SELECT im_check_fence($5::integer, $6::bigint))",
                [conv for conv, _ in heads],
                [h[0] for _, h in heads],
                [h[1] for _, h in heads],
                [h[2] for _, h in heads],
                *fence,
            )
            if rowcount(status) != len(heads):
                raise SeqConflict("a conversation head moved")
        if batch.messages:
            records = batch.message_rows()
            await conn.copy_records_to_table("messages", records=records, columns=_MSG_FIELDS)
            if self.outbox:
                traces = batch.traces
                events = [(m.conv, m.seq, m.mid, m.sender, m.type, m.ts, traces.get(m.mid)) for m in batch.messages]
                await conn.copy_records_to_table("outbox", records=events, columns=_OUTBOX_FIELDS)
        if batch.member_changes:
            deletes, upserts, owners = net_member_changes(batch.member_changes)
            if deletes:
                await conn.execute(
                    "DELETE FROM members m USING unnest($1::text[], $2::bigint[]) AS d(conv, uid)"
                    " WHERE m.conv = d.conv AND m.uid = d.uid",
                    *zip(*deletes, strict=True),
                )
            if upserts:
                await conn.execute(
                    "INSERT INTO members (conv, uid, role, joined_seq, read_seq)"
                    " SELECT conv, uid, role, joined, joined"
                    " FROM unnest($1::text[], $2::bigint[], $3::text[], $4::bigint[]) AS u(conv, uid, role, joined)"
                    " ON CONFLICT (conv, uid) DO UPDATE SET role = excluded.role",
                    *zip(*upserts, strict=True),
                )
            if owners:
                await conn.execute(
                    "UPDATE groups g SET owner = o.uid FROM unnest($1::bigint[], $2::bigint[]) AS o(gid, uid)"
                    " WHERE g.gid = o.gid",
                    list(owners),
                    list(owners.values()),
                )
        if batch.file_refs:
            await conn.execute(
                "INSERT INTO file_refs (file_id, conv) SELECT * FROM unnest($1::text[], $2::text[])"
                " ON CONFLICT DO NOTHING",
                *zip(*batch.file_refs, strict=True),
            )
        if batch.read_marks:
            await _raise_read_marks(conn, batch.read_marks)

    async def create_group(
        self, group: Group, first: StoredMessage, members: dict[int, str], *, fence: tuple[int, int] | None = None
    ) -> int:
        # One statement: the fence, the group, its conversation at seq 1, the members and the first message.
        try:
            gid = await self.db.pool.fetchval(
                "WITH f AS (SELECT im_check_fence($15::integer, $16::bigint) AS ok),"
                " g AS (INSERT INTO groups (gid, name, owner, created_at)"
                "       SELECT coalesce($14, nextval(pg_get_serial_sequence('groups', 'gid'))), $1, $2, $3"
                "       FROM f WHERE f.ok RETURNING gid),"
                " c AS (INSERT INTO conversations (conv, kind, last_seq, last_ts)"
                "       SELECT 'g:' || gid, 'group', 1, $4 FROM g RETURNING conv),"
                " m AS (INSERT INTO members (conv, uid, role, joined_seq)"
                "       SELECT c.conv, u.uid, u.role, 0 FROM c, unnest($5::bigint[], $6::text[]) AS u(uid, role)),"
                f" x AS (INSERT INTO messages ({_MSG_COLUMNS})"
                "       SELECT c.conv, 1, $7, $8, $9, $10, $11, $12, $13 FROM c)"
                " SELECT gid FROM g",
                group.name,
                group.owner,
                group.created_at,
                first.ts,
                list(members),
                list(members.values()),
                first.mid,
                first.sender,
                first.device,
                first.cmid,
                first.ts,
                first.type,
                first.body,
                group.gid or None,
                *(fence or (None, None)),
            )
        except asyncpg.UniqueViolationError as exc:
            raise SeqConflict(str(exc)) from None
        except asyncpg.PostgresError as exc:
            if getattr(exc, "sqlstate", None) == _FENCED and fence is not None:
                raise FenceRefused(*fence) from None
            raise
        return int(gid)

    async def reserve_gid(self) -> int:
        return int(await self.db.pool.fetchval("SELECT nextval(pg_get_serial_sequence('groups', 'gid'))"))

    async def get_group(self, gid: int) -> Group | None:
        row = await self.db.pool.fetchrow("SELECT gid, name, owner, created_at FROM groups WHERE gid = $1", gid)
        return None if row is None else Group(*row)

    async def read_range(
        self, conv: str, after: int, before: int | None, limit: int, newest_first: bool = False
    ) -> list[StoredMessage]:
        upper = before if before is not None else 2**62
        order = "DESC" if newest_first else "ASC"
        rows = await self.db.pool.fetch(
            f"SELECT {_MSG_COLUMNS} FROM messages WHERE conv = $1 AND seq > $2 AND seq < $3"
            f" ORDER BY seq {order} LIMIT $4",
            conv,
            after,
            upper,
            limit,
        )
        return [_msg(r) for r in rows]

    async def read_ranges(self, ranges: Sequence[tuple[str, int, int]], limit: int) -> dict[str, list[StoredMessage]]:
        if not ranges:
            return {}
        convs, afters, uptos = zip(*ranges, strict=True)
        rows = await self.db.pool.fetch(
            f"SELECT {_RANGE_COLUMNS} FROM unnest($1::text[], $2::bigint[], $3::bigint[]) AS r(conv, after, upto)"
            f" CROSS JOIN LATERAL (SELECT {_MSG_COLUMNS} FROM messages WHERE messages.conv = r.conv"
            " AND messages.seq > r.after AND messages.seq <= r.upto ORDER BY messages.seq LIMIT $4) AS m"
            " ORDER BY r.conv, m.seq",
            list(convs),
            list(afters),
            list(uptos),
            limit,
        )
        return by_conversation(_msg(r) for r in rows)

    async def sync_points(self, uid: int, device: str) -> list[SyncPoint]:
        rows = await self.db.pool.fetch(
            "SELECT m.conv, c.last_seq, greatest(m.joined_seq, coalesce(d.seq, 0))"
            " FROM members m JOIN conversations c ON c.conv = m.conv"
            " LEFT JOIN device_cursors d ON d.uid = m.uid AND d.device = $1 AND d.conv = m.conv"
            " WHERE m.uid = $2",
            device,
            uid,
        )
        return [SyncPoint(conv, last, min(cursor, last)) for conv, last, cursor in rows]

    async def heads(self, uids: Sequence[int]) -> dict[int, dict[str, int]]:
        if not uids:
            return {}
        rows = await self.db.pool.fetch(
            "SELECT m.uid, m.conv, c.last_seq FROM members m JOIN conversations c ON c.conv = m.conv"
            " WHERE m.uid = ANY($1::bigint[])",
            list(uids),
        )
        out: dict[int, dict[str, int]] = {}
        for uid, conv, last in rows:
            out.setdefault(uid, {})[conv] = last
        return out

    async def start_cursor(self, uid: int, device: str, conv: str) -> int:
        value = await self.db.pool.fetchval(
            "SELECT greatest(coalesce((SELECT joined_seq FROM members WHERE conv = $1 AND uid = $2), 0),"
            " coalesce((SELECT seq FROM device_cursors WHERE uid = $2 AND device = $3 AND conv = $1), 0))",
            conv,
            uid,
            device,
        )
        return int(value)

    async def save_cursors(self, cursors: Iterable[tuple[int, str, str, int]]) -> None:
        rows = list(cursors)
        if not rows:
            return
        uids, devices, convs, seqs = zip(*rows, strict=True)
        # One row per key (an upsert may not touch a row twice), in key order (one lock order for all).
        await self.db.pool.execute(
            "INSERT INTO device_cursors (uid, device, conv, seq, saved_at)"
            " SELECT uid, device, conv, max(seq), extract(epoch FROM now())::bigint"
            " FROM unnest($1::text::bigint[], $2::text::text[], $3::text::text[], $4::text::bigint[])"
            "   AS c(uid, device, conv, seq) GROUP BY uid, device, conv ORDER BY uid, device, conv"
            " ON CONFLICT (uid, device, conv) DO UPDATE SET seq = greatest(device_cursors.seq, excluded.seq),"
            " saved_at = excluded.saved_at",
            bigint_array(uids),
            text_array(devices),
            text_array(convs),
            bigint_array(seqs),
        )

    async def save_read_marks(self, marks: Iterable[tuple[int, str, int]]) -> None:
        rows = list(marks)
        if rows:
            async with self.db.pool.acquire() as conn:
                await _raise_read_marks(conn, rows)

    async def read_marks(self, conv: str) -> dict[int, int]:
        rows = await self.db.pool.fetch("SELECT uid, read_seq FROM members WHERE conv = $1", conv)
        return {uid: seq for uid, seq in rows}

    async def delivered_marks(self, conv: str) -> dict[int, int]:
        rows = await self.db.pool.fetch(
            "SELECT m.uid, coalesce(max(d.seq), 0) FROM members m"
            " LEFT JOIN device_cursors d ON d.uid = m.uid AND d.conv = m.conv"
            " WHERE m.conv = $1 GROUP BY m.uid",
            conv,
        )
        return {uid: seq for uid, seq in rows}

    async def devices(self, uid: int) -> list[tuple[str, int]]:
        rows = await self.db.pool.fetch(
            "SELECT device, max(saved_at) FROM device_cursors WHERE uid = $1"
            ' GROUP BY device ORDER BY device COLLATE "C"',
            uid,
        )
        return [(row[0], row[1]) for row in rows]

    async def wrote_in(self, pairs: Sequence[tuple[int, str]]) -> set[tuple[int, str]]:
        wanted = list(dict.fromkeys(pairs))
        if not wanted:
            return set()
        rows = await self.db.pool.fetch(
            "SELECT p.sender, p.conv FROM unnest($1::bigint[], $2::text[]) AS p(sender, conv)"
            " WHERE EXISTS (SELECT 1 FROM messages m WHERE m.conv = p.conv AND m.sender = p.sender)",
            [s for s, _ in wanted],
            [c for _, c in wanted],
        )
        return {(row[0], row[1]) for row in rows}

    async def outbox_fetch(self, limit: int) -> list[OutboxEvent]:
        sql = f"SELECT id, {', '.join(_OUTBOX_FIELDS)} FROM outbox ORDER BY id LIMIT $1"
        session = _outbox_session.get()
        if session is None:
            rows = await self.db.pool.fetch(sql, limit)
        else:
            async with _on_lock_session():
                rows = await session.fetch(sql, limit)
        return [OutboxEvent(*row) for row in rows]

    async def ping(self) -> None:
        """``SELECT 1`` on a pooled connection (the pool's command timeout bounds it)."""
        await self.db.pool.fetchval("SELECT 1")

    @contextlib.asynccontextmanager
    async def outbox_exclusive(self) -> AsyncIterator[None]:
        """A session-level advisory lock on a connection held meanwhile: released when the holder
        leaves, or when its process dies and PostgreSQL drops the connection.

        Fenced: inside, this task's :meth:`outbox_fetch` and :meth:`outbox_delete` run on the session
        that holds the lock, never on the pool. If that session goes (``pg_terminate_backend``, a network
        cut, a server restart) the lock goes with it and another relay may take it; this one's next
        fetch or delete then fails with :class:`OutboxLockLost` instead of reading or deleting beside
        the new holder."""
        key = f"im.outbox:{self.db.schema or ''}"
        async with self.db.pool.acquire() as conn:
            while True:
                try:
                    await conn.execute("SELECT pg_advisory_lock(hashtext($1))", key)
                    break
                except TimeoutError as exc:
                    raise_if_cancelling(exc)  # a stop that became the time-out: give up waiting
                    # The pool's command_timeout cancelled the wait: wait again, on the same session (had
                    # the lock been granted as the timeout hit, this takes it once more; the holder runs
                    # pg_advisory_unlock_all when it leaves).
                    continue
            token = _outbox_session.set(conn)
            try:
                yield
            finally:
                _outbox_session.reset(token)
                try:  # all of them: a wait that timed out as it was granted took the lock twice
                    await conn.execute("SELECT pg_advisory_unlock_all()")
                except Exception:  # the session ended (its locks went with it), or may still hold them:
                    with contextlib.suppress(Exception):  # the pool does not reset sessions, so it must not
                        conn.terminate()  # go back there (a released proxy refuses this: already gone)

    async def outbox_delete(self, ids: Sequence[int]) -> None:
        if not ids:
            return
        sql = "DELETE FROM outbox WHERE id = ANY($1::text::bigint[])"
        session = _outbox_session.get()
        if session is None:
            await self.db.pool.execute(sql, bigint_array(ids))
            return
        async with _on_lock_session():
            await session.execute(sql, bigint_array(ids))

    async def list_conversations(self, uid: int) -> list[ConversationSummary]:
        # The peer of a direct conversation "d:<a>:<b>" is the one of a and b that is not uid. The CASEs
        # keep the casts off the other kind's ids.
        rows = await self.db.pool.fetch(
            "SELECT c.conv, c.kind, c.last_seq, m.read_seq, g.name, p.peer, u.display_name,"
            f" {', '.join('x.' + c for c in _MSG_FIELDS)}"
            " FROM members m JOIN conversations c ON c.conv = m.conv"
            " CROSS JOIN LATERAL (SELECT CASE WHEN c.kind = 'direct' THEN"
            "   CASE WHEN split_part(c.conv, ':', 2)::bigint = m.uid THEN split_part(c.conv, ':', 3)::bigint"
            "   ELSE split_part(c.conv, ':', 2)::bigint END END AS peer) p"
            " LEFT JOIN users u ON u.uid = p.peer"
            " LEFT JOIN groups g ON g.gid = (CASE WHEN c.kind = 'group' THEN substr(c.conv, 3)::bigint END)"
            " LEFT JOIN messages x ON x.conv = c.conv AND x.seq = c.last_seq"
            ' WHERE m.uid = $1 ORDER BY c.last_ts DESC, c.conv COLLATE "C"',
            uid,
        )
        out = []
        for row in rows:
            conv, kind, last_seq, read_seq, gname, peer, peer_name = row[:7]
            last = _msg(row[7:]) if row[7] is not None else None
            title = gname if kind == "group" else (peer_name if peer_name is not None else f"user {peer}")
            out.append(conversation_summary(conv, kind, title, last_seq, read_seq, last, peer))
        return out


@contextlib.asynccontextmanager
async def _on_lock_session() -> AsyncIterator[None]:
    """A statement on the outbox lock's session: the session gone (closed, terminated) is the lock lost.

    A session the server ends while it is idle (``pg_terminate_backend``, a restart) sends its FATAL
    error before it closes the socket. A statement started between the two finds asyncpg still taking
    that error in and fails with ``InternalClientError`` ("another operation is in progress"), not as a
    closed connection: that session is as good as gone, and the holder leaving then terminates it."""
    try:
        yield
    except (
        asyncpg.InterfaceError,
        asyncpg.PostgresConnectionError,
        asyncpg.AdminShutdownError,
        asyncpg.InternalClientError,
        OSError,
    ) as exc:
        raise OutboxLockLost(f"the session holding the outbox lock is gone ({type(exc).__name__}: {exc})") from exc


async def _raise_read_marks(conn: Any, marks: Sequence[tuple[int, str, int]]) -> None:
    """Move (uid, conv, seq) read marks up, never down (several marks of one member: the highest)."""
    uids, convs, seqs = zip(*marks, strict=True)
    await conn.execute(
        "UPDATE members m SET read_seq = greatest(m.read_seq, r.seq)"
        " FROM (SELECT uid, conv, max(seq) AS seq FROM unnest($1::bigint[], $2::text[], $3::bigint[])"
        "       AS r(uid, conv, seq) GROUP BY uid, conv) AS r"
        " WHERE m.uid = r.uid AND m.conv = r.conv",
        uids,
        convs,
        seqs,
    )


_KEY_COLUMNS = "name, version, master_id, wrapped, created_at"


class PostgresConversationKeys(OnSharedDatabase[PostgresDatabase], ConversationKeys):
    """:class:`ConversationKeys` in the ``data_keys`` table of the shared PostgreSQL database."""

    async def load_keys(self, names: Sequence[str]) -> dict[str, list[WrappedKey]]:
        if not names:
            return {}
        rows = await self.db.pool.fetch(
            f"SELECT {_KEY_COLUMNS} FROM data_keys WHERE name = ANY($1::text[]) ORDER BY name, version",
            list(dict.fromkeys(names)),
        )
        out: dict[str, list[WrappedKey]] = {}
        for row in rows:
            out.setdefault(row[0], []).append(WrappedKey(*row))
        return out

    async def add_key(self, key: WrappedKey) -> WrappedKey:
        # Insert-if-absent and read the winner in one statement: the CTE returns our row when inserted;
        # otherwise the existing one (committed by the other writer, whose insert we waited for).
        row = await self.db.pool.fetchrow(
            f"WITH ins AS (INSERT INTO data_keys ({_KEY_COLUMNS}) VALUES ($1, $2, $3, $4, $5)"
            f" ON CONFLICT (name, version) DO NOTHING RETURNING {_KEY_COLUMNS})"
            f" SELECT {_KEY_COLUMNS} FROM ins"
            f" UNION ALL SELECT {_KEY_COLUMNS} FROM data_keys WHERE name = $1 AND version = $2 LIMIT 1",
            key.name,
            key.version,
            key.master_id,
            key.wrapped,
            key.created_at,
        )
        if row is None:  # the conflicting row was not yet visible to this statement's snapshot: read again
            row = await self.db.pool.fetchrow(
                f"SELECT {_KEY_COLUMNS} FROM data_keys WHERE name = $1 AND version = $2", key.name, key.version
            )
        return WrappedKey(*row)

    async def list_keys(self, after: tuple[str, int] | None, limit: int) -> list[WrappedKey]:
        name, version = after if after is not None else ("", -1)
        rows = await self.db.pool.fetch(
            f"SELECT {_KEY_COLUMNS} FROM data_keys WHERE (name, version) > ($1, $2) ORDER BY name, version LIMIT $3",
            name,
            version,
            limit,
        )
        return [WrappedKey(*row) for row in rows]

    async def rewrap(self, old: WrappedKey, new: WrappedKey) -> bool:
        status = await self.db.pool.execute(
            "UPDATE data_keys SET master_id = $1, wrapped = $2"
            " WHERE name = $3 AND version = $4 AND master_id = $5 AND wrapped = $6",
            new.master_id,
            new.wrapped,
            old.name,
            old.version,
            old.master_id,
            old.wrapped,
        )
        return rowcount(status) == 1

    async def masters(self) -> dict[str, int]:
        rows = await self.db.pool.fetch("SELECT master_id, count(*) FROM data_keys GROUP BY master_id")
        return {str(r[0]): int(r[1]) for r in rows}

    async def other_master(self, master_id: str) -> str | None:
        value = await self.db.pool.fetchval(
            "SELECT master_id FROM data_keys WHERE master_id < $1 OR master_id > $1 LIMIT 1", master_id
        )
        return None if value is None else str(value)

    async def delete_keys(self, names: Sequence[str]) -> int:
        if not names:
            return 0
        status = await self.db.pool.execute(
            "DELETE FROM data_keys WHERE name = ANY($1::text[])", list(dict.fromkeys(names))
        )
        return rowcount(status)


class PostgresStoredBodies(OnSharedDatabase[PostgresDatabase], StoredBodies):
    """:class:`StoredBodies` on the shared PostgreSQL database. An ``UPDATE`` leaves the old row version
    behind until ``VACUUM`` (run by :meth:`scrub`) makes its space reusable, and the WAL keeps it until
    its segments are recycled: see docs/security.md 11.3 for what remains and how to remove it."""

    async def count_plaintext(self) -> tuple[int, int]:
        row = await self.db.pool.fetchrow(
            "SELECT count(*) FILTER (WHERE substring(body FROM 1 FOR 1) <> '\\x01'::bytea), count(*) FROM messages"
        )
        return int(row[0]), int(row[1])

    async def plaintext_page(self, after: tuple[str, int] | None, limit: int) -> list[StoredMessage]:
        conv, seq = after if after is not None else ("", -1)
        rows = await self.db.pool.fetch(
            f"SELECT {_MSG_COLUMNS} FROM messages WHERE (conv, seq) > ($1, $2)"
            " AND substring(body FROM 1 FOR 1) <> '\\x01'::bytea ORDER BY conv, seq LIMIT $3",
            conv,
            seq,
            limit,
        )
        return [_msg(r) for r in rows]

    async def replace_bodies(self, changes: Sequence[tuple[StoredMessage, bytes]]) -> int:
        if not changes:
            return 0
        status = await self.db.pool.execute(
            "UPDATE messages m SET body = c.new FROM unnest($1::text[], $2::bigint[], $3::bytea[], $4::bytea[])"
            " AS c(conv, seq, old, new) WHERE m.conv = c.conv AND m.seq = c.seq AND m.body = c.old",
            [m.conv for m, _ in changes],
            [m.seq for m, _ in changes],
            [m.body for m, _ in changes],
            [new for _, new in changes],
        )
        return rowcount(status)

    async def scrub(self) -> bool:
        await self.db.pool.execute("VACUUM messages")
        return True
