"""One SQLite database file shared by the SQLite stores: connection setup and versioned migrations.

WAL mode with ``synchronous=FULL``: a commit is on disk when it returns, which is what an ack promises.
Writes go through one connection (SQLite has one writer anyway), on the event loop's thread; group commit
keeps that fast (:class:`SqliteDatabase` says why not on a thread). Reads use a second connection on a
thread of its own, so a long history read never waits behind a commit nor holds the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

# Each entry upgrades the schema by one version; never edit an entry that has shipped, append one.
MIGRATIONS: list[str] = [
    # 1: accounts, conversations, messages, cursors
    """
    CREATE TABLE users (
        uid INTEGER PRIMARY KEY AUTOINCREMENT,
        username TEXT NOT NULL,
        display_name TEXT NOT NULL,
        password_hash TEXT NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE UNIQUE INDEX users_username ON users (lower(username));
    CREATE TABLE auth_sessions (
        sid TEXT PRIMARY KEY,
        uid INTEGER NOT NULL REFERENCES users (uid),
        refresh_hash TEXT NOT NULL,
        expires_at INTEGER NOT NULL,
        revoked INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE contacts (
        uid INTEGER NOT NULL,
        contact INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        PRIMARY KEY (uid, contact)
    ) WITHOUT ROWID;
    CREATE TABLE groups (
        gid INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT NOT NULL,
        owner INTEGER NOT NULL,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE conversations (
        conv TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        last_seq INTEGER NOT NULL,
        last_ts INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE members (
        conv TEXT NOT NULL,
        uid INTEGER NOT NULL,
        role TEXT NOT NULL,
        joined_seq INTEGER NOT NULL,
        read_seq INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (conv, uid)
    ) WITHOUT ROWID;
    CREATE INDEX members_uid ON members (uid);
    CREATE TABLE messages (
        conv TEXT NOT NULL,
        seq INTEGER NOT NULL,
        mid INTEGER NOT NULL,
        sender INTEGER NOT NULL,
        device TEXT NOT NULL,
        cmid TEXT NOT NULL,
        ts INTEGER NOT NULL,
        type TEXT NOT NULL,
        body BLOB NOT NULL,
        PRIMARY KEY (conv, seq)
    ) WITHOUT ROWID;
    CREATE UNIQUE INDEX messages_dedupe ON messages (sender, device, cmid);
    CREATE TABLE device_cursors (
        uid INTEGER NOT NULL,
        device TEXT NOT NULL,
        conv TEXT NOT NULL,
        seq INTEGER NOT NULL,
        PRIMARY KEY (uid, device, conv)
    ) WITHOUT ROWID;
    """,
    # 2: uploaded files (im.files): content-addressed metadata, uploaders, and the conversations a file
    # was sent to (written by the chat commit; members of those conversations may read the file)
    """
    CREATE TABLE files (
        file_id TEXT PRIMARY KEY,
        sha256 TEXT NOT NULL UNIQUE,
        size INTEGER NOT NULL,
        content_type TEXT NOT NULL,
        width INTEGER,
        height INTEGER,
        created_at INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE file_owners (
        file_id TEXT NOT NULL,
        uid INTEGER NOT NULL,
        name TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        PRIMARY KEY (file_id, uid)
    ) WITHOUT ROWID;
    CREATE TABLE file_refs (file_id TEXT NOT NULL, conv TEXT NOT NULL, PRIMARY KEY (file_id, conv)) WITHOUT ROWID;
    """,
    # 3: transactional outbox (im.events): one row per committed message, written by the chat commit when
    # the store is built with outbox=True, drained by the relay. AUTOINCREMENT: ids are never reused, so
    # id order stays commit order even after the table was emptied.
    """
    CREATE TABLE outbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        conv TEXT NOT NULL,
        seq INTEGER NOT NULL,
        mid INTEGER NOT NULL,
        sender INTEGER NOT NULL,
        type TEXT NOT NULL,
        created_at INTEGER NOT NULL
    );
    """,
    # 4: account controls and consent: session times, blocks, the contacts-only setting, deleted accounts,
    # when a device last saved a cursor (its last activity)
    """
    ALTER TABLE auth_sessions ADD COLUMN created_at INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE auth_sessions ADD COLUMN last_used INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX auth_sessions_uid ON auth_sessions (uid);
    ALTER TABLE users ADD COLUMN contacts_only INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE users ADD COLUMN deleted_at INTEGER;
    CREATE TABLE blocks (
        uid INTEGER NOT NULL,
        blocked INTEGER NOT NULL,
        created_at INTEGER NOT NULL,
        PRIMARY KEY (uid, blocked)
    ) WITHOUT ROWID;
    CREATE INDEX blocks_blocked ON blocks (blocked);
    CREATE INDEX contacts_contact ON contacts (contact);
    ALTER TABLE device_cursors ADD COLUMN saved_at INTEGER NOT NULL DEFAULT 0;
    """,
    # 5: encryption at rest (im.backends.keys.keyring): data keys, each wrapped by the master key master_id;
    # name is conv:<conversation> or named:<purpose>; versions of a rotated key stay beside the new one
    """
    CREATE TABLE data_keys (
        name TEXT NOT NULL,
        version INTEGER NOT NULL,
        master_id TEXT NOT NULL,
        wrapped BLOB NOT NULL,
        created_at INTEGER NOT NULL,
        PRIMARY KEY (name, version)
    ) WITHOUT ROWID;
    CREATE INDEX data_keys_master ON data_keys (master_id);
    """,
    # 6: tracing (im.observability.tracing): the trace context of a sampled message, for the relay
    """
    ALTER TABLE outbox ADD COLUMN traceparent TEXT;
    """,
    # 7: fencing (ChatStore.raise_fence): the highest claim token seen per node id of message ids
    """
    CREATE TABLE node_fences (node_id INTEGER PRIMARY KEY, token INTEGER NOT NULL);
    """,
]


def private_files(path: str) -> None:
    """Make the database file (created empty when missing) and its -wal and -shm files mode 0600: SQLite
    creates the -wal and -shm files with the database file's permissions, so this holds for new ones too."""
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    for name in (path, path + "-wal", path + "-shm"):
        with contextlib.suppress(FileNotFoundError):
            if os.stat(name).st_mode & 0o077:
                os.chmod(name, 0o600)


def _settle(answer: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    """On the loop: hand a worker's result or exception to its caller, unless the caller stopped waiting
    (cancelled: the work ran anyway, as with ``run_in_executor``)."""
    if answer.done():
        return
    if exc is not None:
        answer.set_exception(exc)
    else:
        answer.set_result(result)


#: SQLite's primary result code for "another connection holds the lock" (``SQLITE_BUSY``).
_SQLITE_BUSY = 5
#: How long a write on the worker thread waits for another process's write lock (``busy_timeout``).
BUSY_TIMEOUT_MS = 5000


class _Connection:
    """A sqlite3 connection with a worker thread of its own; every call runs there, in submission order.

    The thread is its own, fed by a ``queue.SimpleQueue``, not a ``ThreadPoolExecutor``: the executor's
    ``submit`` (a lock, a concurrent future with its condition, a semaphore) and its worker's bookkeeping
    after each call ran as Python on both threads, once per commit. The worker's bookkeeping came after
    it had woken the loop, so the loop then waited for the GIL: at low rates, where each commit carries
    one or two messages, that was a part of every message's latency."""

    def __init__(self, path: str, *pragmas: str) -> None:
        self._calls: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="sqlite", daemon=True)
        self._path = path
        self._pragmas = pragmas
        self.conn: sqlite3.Connection | None = None

    def _serve(self) -> None:
        """The worker: run each call as it comes; ``None`` ends it. A call reports its own result, and the
        worker goes straight back to ``get``, which releases the GIL while it waits."""
        get = self._calls.get
        while (run := get()) is not None:
            run()
            del run  # nothing of a finished call stays alive while the worker waits

    async def open(self) -> None:
        def connect() -> None:
            self.conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
            for pragma in self._pragmas:
                self.conn.execute(pragma)

        self._thread.start()
        await self.submit(lambda _conn: connect(), need_open=False)

    def submit(self, fn: Callable[[sqlite3.Connection], T], need_open: bool = True) -> asyncio.Future[T]:
        """Run ``fn(connection)`` on the worker thread; the future settles when it has run. Its answer
        comes back with one ``call_soon_threadsafe`` onto an asyncio future: ``run_in_executor``'s
        chaining of a concurrent future to an asyncio one cost about 25 µs more per call here."""
        conn = self.conn
        if need_open and conn is None:
            raise RuntimeError("database not open")
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[T] = loop.create_future()

        def run() -> None:
            try:
                result = fn(conn)  # type: ignore[arg-type]
            except BaseException as exc:
                settle: tuple[Any, BaseException | None] = (None, exc)
            else:
                settle = (result, None)
            # A loop closed while the call ran has nobody waiting; the worker must outlive it all the same.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle, answer, *settle)

        self._calls.put(run)
        return answer

    async def close(self) -> None:
        if self.conn is not None:
            await self.submit(lambda conn: conn.close())
            self.conn = None
        if self._thread.is_alive():
            self._calls.put(None)
            self._thread.join()  # its queue is empty: the close above was its last call


def _transaction(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    """``fn`` in one write transaction (see :func:`_finish_transaction`)."""
    conn.execute("BEGIN IMMEDIATE")
    return _finish_transaction(conn, fn)


def _finish_transaction(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    """``fn`` in the write transaction just begun: committed, or rolled back when ``fn`` or the commit
    fails (a failed COMMIT leaves the transaction open, and the next BEGIN would fail)."""
    try:
        result = fn(conn)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return result


def _waiting_for_locks(fn: Callable[[sqlite3.Connection], T]) -> Callable[[sqlite3.Connection], T]:
    """``fn`` run with the busy timeout on (on the worker thread: there, waiting for another process's
    lock blocks nobody), and off again after it."""

    def run(conn: sqlite3.Connection) -> T:
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        try:
            return fn(conn)
        finally:
            conn.execute("PRAGMA busy_timeout=0")

    return run


class SqliteDatabase:
    """A writer and a reader connection to one file in WAL mode, shared by the SQLite stores.

    **Writes run on the event loop's thread**, in the caller's turn, not on a worker thread. A group
    commit is a few hundred short statement steps, and the sqlite3 module gives up the GIL around each:
    with the loop's thread busy meanwhile, each step waited for the GIL, and the thread switches cost
    more than the statements (``im bench``, window 16, on 2026-12-07: 9 % less CPU per message inline and
    19 % more messages per second, medians of 7 pairs; docs/performance.md). The loop is blocked while a
    commit runs and fsyncs (a fraction of a millisecond; clients waiting for acks wait for it anyway), so
    a write first gives the loop one turn: what is ready (the previous commit's acks and deliveries,
    flushed by call_soon; frames that arrived) goes before the fsync, not after it. What could block the
    loop longer does not run there:

    - a write lock held by another process (``im keys`` beside a running server): the writer connection
      has no busy timeout, so ``BEGIN IMMEDIATE`` fails at once and the write runs on the worker thread,
      which waits up to :data:`BUSY_TIMEOUT_MS`;
    - batch maintenance (``write(fn, background=True)``: rewriting stored bodies, converting file ids),
      checkpoints, ``VACUUM`` and the migrations run on the worker thread.

    A write that touches pages not in the OS's cache (a database much larger than memory) also waits for
    the disk on the loop; a group commit touches recent pages and the indexes' upper levels, which stay
    cached, and reads, which may touch any page, are not inline.

    Inline writes are atomic on the loop (no await inside); a worker write holds the connection until
    the worker has finished it, even when its caller was cancelled, and inline writes wait for it.
    Reads run on the reader connection's own thread (a long history read never waits behind a commit
    nor blocks the loop)."""

    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        self._writer: _Connection | None = None
        self._reader: _Connection | None = None
        self._users = 0
        self._lock = asyncio.Lock()
        self._worker_write: asyncio.Future[Any] | None = None  # the writer's call on its worker, running
        self.inline_writes = 0
        self.worker_writes = 0

    async def open(self) -> None:
        """Open (counted: both stores share one database and each opens and closes it)."""
        async with self._lock:
            if self._writer is not None:
                self._users += 1
                return
            Path(self.path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            private_files(self.path)
            writer = _Connection(
                self.path, "PRAGMA journal_mode=WAL", "PRAGMA synchronous=FULL", "PRAGMA busy_timeout=0"
            )
            reader = _Connection(self.path, f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}", "PRAGMA query_only=1")
            try:
                await writer.open()
                await writer.submit(_waiting_for_locks(self._migrate))
                await reader.open()
            except BaseException:  # a failed open holds nothing and counts no user
                for conn in (reader, writer):
                    with contextlib.suppress(Exception):
                        await conn.close()
                raise
            self._writer, self._reader = writer, reader
            self._users += 1

    async def close(self) -> None:
        async with self._lock:
            self._users -= 1
            if self._users > 0:
                return
            await self._worker_done()
            for conn in (self._reader, self._writer):
                if conn is not None:
                    await conn.close()
            self._reader = self._writer = None

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            conn.executescript(f"BEGIN;\n{script}\nPRAGMA user_version={number};\nCOMMIT;")

    async def write(self, fn: Callable[[sqlite3.Connection], T], *, background: bool = False) -> T:
        """Run ``fn`` inside one transaction (committed, or rolled back on error): inline on the loop's
        thread, or with ``background`` (batch maintenance: many rows, secure deletes) on the worker thread."""
        if background:
            return await self._on_worker(lambda c: _transaction(c, fn))
        await asyncio.sleep(0)  # the turn before blocking (class docstring); no task starves either
        conn = (await self._free_writer()).conn
        assert conn is not None
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode & 0xFF != _SQLITE_BUSY:
                raise
        else:
            result = _finish_transaction(conn, fn)
            self.inline_writes += 1
            return result
        # Another process writes: wait for its lock on the worker thread, not here.
        return await self._on_worker(lambda c: _transaction(c, fn))

    async def _worker_done(self) -> None:
        """Until no write runs on the writer's worker thread (it has the connection meanwhile)."""
        while self._worker_write is not None:
            await asyncio.wait([self._worker_write])

    async def _free_writer(self) -> _Connection:
        """The writer connection, once no write runs on its worker thread."""
        if self._writer is None:
            raise RuntimeError("database not open")
        await self._worker_done()
        if self._writer is None:  # closed meanwhile
            raise RuntimeError("database not open")
        return self._writer

    async def _on_worker(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` on the writer's worker thread (waiting for other processes' locks), holding the
        connection until it has run, even if the caller stops waiting."""
        answer = (await self._free_writer()).submit(_waiting_for_locks(fn))
        self._worker_write = answer
        self.worker_writes += 1

        def released(_: asyncio.Future[T]) -> None:
            if self._worker_write is answer:
                self._worker_write = None

        answer.add_done_callback(released)
        return await asyncio.shield(answer)

    async def checkpoint(self, *, truncate: bool = False, timeout: float = 60.0) -> bool:
        """Copy the WAL into the database file; with ``truncate``, then cut the WAL file to zero bytes (so
        overwritten page versions do not stay in it). A checkpoint that other connections keep from
        finishing (a busy writer, readers on older snapshots: another process under load) is retried
        for up to ``timeout`` seconds; True when it finished. Until one finishes, the database file can
        still hold page versions older than those in the WAL."""
        mode = "TRUNCATE" if truncate else "PASSIVE"
        deadline = time.monotonic() + timeout
        while True:
            busy, _log, _done = await self._on_worker(
                lambda conn: conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
            )
            if not busy:
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)

    async def vacuum(self) -> None:
        """Rebuild the database file (``VACUUM``): every page is written anew, so nothing survives of
        deleted or moved rows in pages' unallocated space or on the free list (``secure_delete`` only
        zeroes what is freed while it is on). Writers wait meanwhile (about 1.2 s per 100 MB here); the
        rebuilt pages go through the WAL, so a :meth:`checkpoint` with ``truncate`` must follow."""
        await self._on_worker(lambda conn: conn.execute("VACUUM"))

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` on the reader's thread."""
        if self._reader is None:
            raise RuntimeError("database not open")
        return await self._reader.submit(fn)
