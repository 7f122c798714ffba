"""SqliteDatabase's writes: inline on the loop's thread, durable when they return, and never blocking the
loop for another process's lock, batch maintenance, or a cancelled caller (see its docstring)."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from im.backends.sql.sqlite_db import SqliteDatabase
from tests.support.wait import eventually


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[SqliteDatabase]:
    d = SqliteDatabase(tmp_path / "im.sqlite3")
    await d.open()
    await d.write(lambda conn: conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, who TEXT NOT NULL)"))
    try:
        yield d
    finally:
        await d.close()


def _rows(path: str) -> list[str]:
    """The table as another connection (another process would) sees it."""
    with sqlite3.connect(path) as other:
        return [str(r[0]) for r in other.execute("SELECT who FROM t ORDER BY id")]


def _insert(who: str) -> Callable[[sqlite3.Connection], object]:
    return lambda conn: conn.execute("INSERT INTO t (who) VALUES (?)", (who,))


async def test_a_write_runs_on_the_loops_thread_and_is_on_disk_when_it_returns(db: SqliteDatabase) -> None:
    threads: list[int] = []

    def insert(conn: sqlite3.Connection) -> None:
        threads.append(threading.get_ident())
        conn.execute("INSERT INTO t (who) VALUES ('a')")

    before = db.inline_writes
    await db.write(insert)
    assert threads == [threading.get_ident()]
    assert db.inline_writes == before + 1
    assert _rows(db.path) == ["a"]


async def test_a_write_that_fails_is_rolled_back_and_the_next_one_works(db: SqliteDatabase) -> None:
    def half(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO t (who) VALUES ('lost')")
        raise ValueError("refused")

    with pytest.raises(ValueError):
        await db.write(half)
    await db.write(lambda conn: conn.execute("INSERT INTO t (who) VALUES ('kept')"))
    assert _rows(db.path) == ["kept"]


@pytest.mark.parametrize("background", [False, True])
async def test_a_commit_that_fails_is_rolled_back(db: SqliteDatabase, background: bool) -> None:
    """A deferred foreign key fails at COMMIT, which leaves the transaction open unless rolled back."""
    await db.write(
        lambda conn: conn.execute(
            "CREATE TABLE child (id INTEGER PRIMARY KEY, parent INTEGER"
            " REFERENCES t (id) DEFERRABLE INITIALLY DEFERRED)"
        )
    )
    writer = db._writer
    assert writer is not None and writer.conn is not None
    writer.conn.execute("PRAGMA foreign_keys=ON")  # outside a transaction, on the loop (the writer's thread)

    def orphan(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO t (who) VALUES ('orphan parent')")
        conn.execute("INSERT INTO child (parent) VALUES (999)")

    with pytest.raises(sqlite3.IntegrityError):
        await db.write(orphan, background=background)
    await db.write(lambda conn: conn.execute("INSERT INTO t (who) VALUES ('after')"), background=background)
    assert _rows(db.path) == ["after"]


HOLDER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
conn.execute("INSERT INTO t (who) VALUES ('other process')")
print("locked", flush=True)
sys.stdin.readline()  # holds the write lock until told to let go
conn.execute("COMMIT")
"""


async def _turns(n: int = 20) -> None:
    """Give the loop ``n`` turns (a write on the worker thread may finish meanwhile; one on the loop cannot
    be waiting then)."""
    for _ in range(n):
        await asyncio.sleep(0.005)


async def test_another_process_holding_the_write_lock_does_not_block_the_loop(db: SqliteDatabase) -> None:
    """The write waits for the lock on the worker thread: the loop runs other tasks meanwhile (waiting on
    the loop, this test could not run until the write gave up), and the next write runs inline again
    (the worker's busy timeout does not stay on the connection)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, db.path], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdin is not None and holder.stdout is not None
    try:
        assert (await asyncio.to_thread(holder.stdout.readline)).strip() == "locked"
        before = (db.inline_writes, db.worker_writes)
        write = asyncio.create_task(db.write(_insert("server")))
        await eventually(lambda: db.worker_writes == before[1] + 1, "the write handed to the worker thread")
        await _turns()
        assert not write.done(), "the write went through while another process held the lock"
        holder.stdin.write("go\n")
        holder.stdin.flush()
        await asyncio.wait_for(write, 10)
        assert db.inline_writes == before[0]
    finally:
        holder.stdin.close()
        holder.wait(10)
        holder.stdout.close()
    assert _rows(db.path) == ["other process", "server"]

    writer = db._writer
    assert writer is not None and writer.conn is not None
    assert writer.conn.execute("PRAGMA busy_timeout").fetchone()[0] == 0
    await db.write(_insert("inline again"))
    assert db.inline_writes == before[0] + 1


async def test_a_background_write_runs_off_the_loop_and_inline_writes_wait_for_it(db: SqliteDatabase) -> None:
    """The background write waits, on its thread, for the test (on the loop) to let it go: on the loop it
    would wait in vain."""
    threads: list[int] = []
    release = threading.Event()
    released: list[bool] = []

    def slow(conn: sqlite3.Connection) -> None:
        threads.append(threading.get_ident())
        conn.execute("INSERT INTO t (who) VALUES ('background')")
        released.append(release.wait(10))  # a long batch, until the test lets it go

    background = asyncio.create_task(db.write(slow, background=True))
    await _turns()
    inline = asyncio.create_task(db.write(_insert("inline")))
    await _turns()
    assert not background.done() and not inline.done()  # the inline write waits for the connection
    release.set()
    await asyncio.wait_for(asyncio.gather(background, inline), 10)
    assert released == [True]
    assert threads and threads[0] != threading.get_ident()
    assert _rows(db.path) == ["background", "inline"]


async def test_a_cancelled_background_write_keeps_the_connection_until_it_has_run(db: SqliteDatabase) -> None:
    """Cancelling the caller does not stop the worker: the next write must not start a transaction on
    the connection while the worker is still inside one."""
    release = threading.Event()

    def slow(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO t (who) VALUES ('cancelled caller')")
        assert release.wait(10)

    task = asyncio.create_task(db.write(slow, background=True))
    await _turns()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    following = asyncio.create_task(db.write(_insert("next")))
    await _turns()
    assert not following.done()  # the worker is still inside its transaction
    release.set()
    await asyncio.wait_for(following, 10)
    assert _rows(db.path) == ["cancelled caller", "next"]


async def test_checkpoints_and_vacuum_run_off_the_loop(db: SqliteDatabase) -> None:
    for i in range(200):
        await db.write(_insert(f"row {i}" * 20))
    assert Path(db.path + "-wal").stat().st_size > 0
    before = db.worker_writes
    await db.vacuum()
    assert await db.checkpoint(truncate=True)
    assert db.worker_writes == before + 2
    assert Path(db.path + "-wal").stat().st_size == 0
    assert len(_rows(db.path)) == 200


async def test_a_task_that_only_writes_lets_the_others_run(db: SqliteDatabase) -> None:
    """An inline write takes a turn of the loop, as one on the worker thread did: a task committing in
    a loop does not keep every other task waiting."""
    others = 0

    async def other() -> None:
        nonlocal others
        while True:
            others += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(other())
    await asyncio.sleep(0)
    try:
        start = others
        for i in range(20):
            await db.write(_insert(str(i)))
        assert others - start >= 19
    finally:
        task.cancel()


async def test_what_is_ready_runs_before_a_write_blocks_the_loop(db: SqliteDatabase) -> None:
    """The loop's thread waits for an inline write's fsync: callbacks already scheduled (an earlier
    commit's acks and deliveries, flushed with call_soon) run before the transaction starts, not after."""
    order: list[str] = []
    inline_before = db.inline_writes
    asyncio.get_running_loop().call_soon(order.append, "flush")

    def write(conn: sqlite3.Connection) -> None:
        order.append("write")
        _insert("x")(conn)

    await db.write(write)
    assert order == ["flush", "write"]
    assert db.inline_writes == inline_before + 1
