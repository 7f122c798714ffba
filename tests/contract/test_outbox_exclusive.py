"""``ChatStore.outbox_exclusive``: one holder at a time across the processes sharing a store.

Every engine enters and leaves it. On PostgreSQL, "processes" are stores with their own pools on one
schema: while one holds it the others wait, the next one gets it when the holder leaves or dies (its
connections dropped), and a wait longer than the pool's command timeout is still a wait.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from im.backends.chat import ChatStore
from im.backends.chat.postgres import PostgresChatStore, _outbox_session
from im.backends.sql.postgres_db import PostgresDatabase
from tests.contract.conftest import ChatHarness, PostgresChatHarness
from tests.support.postgres import DSN, PgSchema, start

#: How long a waiter is given to (wrongly) get in while another holds it. Waiting longer can only let
#: a wrong implementation pass, never fail a right one.
QUIET = 0.3
#: A bound on waiting for what must happen (never the thing asserted).
BOUND = 10.0


class Holder:
    """A task that enters ``store.outbox_exclusive()`` and stays inside until :meth:`leave`."""

    def __init__(self, store: ChatStore, inside: list[Holder], log: list[Holder]) -> None:
        self.store = store
        self.entered = asyncio.Event()
        self._release = asyncio.Event()
        self._inside = inside
        self._log = log  # every holder appends itself on entry
        self.overlapped = False  # someone else was inside when this one entered
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async with self.store.outbox_exclusive():
            self.overlapped = bool(self._inside)
            self._inside.append(self)
            self._log.append(self)
            self.entered.set()
            try:
                await self._release.wait()
            finally:
                self._inside.remove(self)

    async def wait_entered(self) -> None:
        await asyncio.wait_for(self.entered.wait(), BOUND)

    async def leave(self) -> None:
        self._release.set()
        await asyncio.wait_for(self.task, BOUND)


class Holders:
    def __init__(self) -> None:
        self.inside: list[Holder] = []
        self.log: list[Holder] = []
        self.all: list[Holder] = []

    def enter(self, store: ChatStore) -> Holder:
        h = Holder(store, self.inside, self.log)
        self.all.append(h)
        return h

    async def close(self) -> None:
        for h in self.all:
            h.task.cancel()
        await asyncio.gather(*(h.task for h in self.all), return_exceptions=True)


@pytest.fixture
async def holders() -> AsyncIterator[Holders]:
    hs = Holders()
    yield hs
    await hs.close()


@pytest.fixture
async def pg(tmp_path: Path) -> AsyncIterator[PostgresChatHarness]:
    harness = PostgresChatHarness(tmp_path)
    await harness.open()
    yield harness
    await harness.close()


# --- every engine -------------------------------------------------------------------------------------


async def test_enters_and_leaves(chat: ChatHarness, holders: Holders) -> None:
    """On SQLite (one process owns the store) it simply enters; on every engine it can be entered again
    once left, by the same store or another one on the same storage."""
    peer = await chat.peer()
    for store in (chat.store, chat.store, peer, chat.store):
        h = holders.enter(store)
        await h.wait_entered()
        assert await store.outbox_fetch(10) == []  # the store stays usable inside
        await h.leave()
    assert holders.inside == [] and len(holders.log) == 4


# --- PostgreSQL: across processes ---------------------------------------------------------------------


async def test_another_process_waits_until_the_holder_leaves(pg: PostgresChatHarness, holders: Holders) -> None:
    b, c = await pg.peer(), await pg.peer()  # two more "processes", each with its own pool
    first = holders.enter(pg.store)
    await first.wait_entered()
    second, third = holders.enter(b), holders.enter(c)
    await asyncio.sleep(QUIET)
    assert not second.entered.is_set() and not third.entered.is_set()

    await first.leave()
    # one of the waiters gets it, and only one
    done, _ = await asyncio.wait(
        [asyncio.ensure_future(second.entered.wait()), asyncio.ensure_future(third.entered.wait())],
        timeout=BOUND,
        return_when=asyncio.FIRST_COMPLETED,
    )
    assert done
    await asyncio.sleep(QUIET)
    assert len(holders.inside) == 1
    now, then = (second, third) if second.entered.is_set() else (third, second)
    assert not then.entered.is_set()

    await now.leave()
    await then.wait_entered()
    await then.leave()
    assert holders.log == [first, now, then]
    assert not any(h.overlapped for h in holders.log)

    again = holders.enter(pg.store)  # and the first one can have it back
    await again.wait_entered()
    await again.leave()


async def test_a_dead_holder_lets_the_waiter_in(pg: PostgresChatHarness, holders: Holders) -> None:
    doomed = await pg.peer()
    holder = holders.enter(doomed)
    await holder.wait_entered()
    waiter = holders.enter(pg.store)
    await asyncio.sleep(QUIET)
    assert not waiter.entered.is_set()

    # The holder's process dies: its connections drop without a word (no unlock is ever sent).
    assert isinstance(doomed, PostgresChatStore)
    doomed.db.pool.terminate()
    await waiter.wait_entered()
    assert not holder.task.done()  # the dead "process" never left on its own
    await waiter.leave()


async def test_a_holder_on_another_schema_does_not_block(pg: PostgresChatHarness, holders: Holders) -> None:
    other_schema = PgSchema()
    other = PostgresChatStore(other_schema.database())
    try:
        await start(other)
        holder = holders.enter(pg.store)
        await holder.wait_entered()
        elsewhere = holders.enter(other)  # another deployment (another test) on the same server
        await elsewhere.wait_entered()
        await elsewhere.leave()
        await holder.leave()
    finally:
        await holders.close()  # a waiter still blocked would hold a connection of the pool closed below
        await other.close()
        await other_schema.drop()


async def test_a_wait_outlasts_the_command_timeout(pg: PostgresChatHarness, holders: Holders) -> None:
    """A standby waits as long as the holder holds, not ``command_timeout`` (60 s by default) and then
    fails: the relay would count a failure and log a warning every minute, and take over late."""
    command_timeout = 0.2

    def database() -> PostgresDatabase:
        return PostgresDatabase(DSN, schema=pg.schema.name, min_size=1, max_size=4, command_timeout=command_timeout)

    a, b = PostgresChatStore(database()), PostgresChatStore(database())
    try:
        await start(a, b)
        holder = holders.enter(a)
        await holder.wait_entered()
        waiter = holders.enter(b)
        await asyncio.sleep(command_timeout * 5)
        assert not waiter.task.done(), waiter.task.exception() if waiter.task.done() else None
        assert not waiter.entered.is_set()
        await holder.leave()
        await waiter.wait_entered()
        await waiter.leave()
    finally:
        await holders.close()
        await a.close()
        await b.close()


async def test_leaving_releases_a_lock_taken_twice(pg: PostgresChatHarness) -> None:
    """A wait that timed out just as the lock was granted takes it a second time on the same session; the
    pool does not reset released sessions, so leaving must release both, or the pooled session would
    keep the lock and no other process could enter again."""
    b = await pg.peer()
    async with pg.store.outbox_exclusive():
        session = _outbox_session.get()
        assert session is not None
        await session.execute("SELECT pg_advisory_lock(hashtext($1))", f"im.outbox:{pg.schema.name}")
    async with asyncio.timeout(BOUND), b.outbox_exclusive():
        pass
