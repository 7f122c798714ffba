"""The outbox lock fences its holder (PostgreSQL): inside ``outbox_exclusive`` a relay fetches and deletes
on the session that holds the lock, so once that session is gone (``pg_terminate_backend``, as a network
cut or an operator would end it) its fetches and deletes are refused (``OutboxLockLost``) while the next
holder drains the rows."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from im.backends.chat import ChatStore, OutboxLockLost
from im.backends.chat.postgres import PostgresChatStore
from tests.contract.conftest import PostgresChatHarness
from tests.contract.test_chat_store import new_direct
from tests.support.postgres import connect

BOUND = 10.0


@pytest.fixture
async def pg(tmp_path: Path) -> AsyncIterator[PostgresChatHarness]:
    harness = PostgresChatHarness(tmp_path, outbox=True)
    await harness.open()
    yield harness
    await harness.close()


async def lock_holders(store: PostgresChatStore) -> list[int]:
    """The backend pids holding the store's outbox advisory lock (one bigint key: classid is its high
    32 bits, objid its low 32 bits)."""
    conn = await connect()
    try:
        key = int(await conn.fetchval("SELECT hashtext($1)::bigint", f"im.outbox:{store.db.schema or ''}"))
        rows = await conn.fetch(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 1"
            " AND classid::bigint = $1 AND objid::bigint = $2",
            (key >> 32) & 0xFFFFFFFF,
            key & 0xFFFFFFFF,
        )
        return [int(r[0]) for r in rows]
    finally:
        await conn.close()


async def test_a_relay_whose_lock_session_ended_is_refused(pg: PostgresChatHarness) -> None:
    old = pg.store
    new = await pg.peer()
    assert isinstance(old, PostgresChatStore) and isinstance(new, PostgresChatStore)
    await new_direct(old, 1, 2, 5)  # five outbox rows
    inside, terminated, outcome = asyncio.Event(), asyncio.Event(), asyncio.get_running_loop().create_future()

    async def old_relay() -> None:
        async with old.outbox_exclusive():
            rows = await old.outbox_fetch(100)
            assert len(rows) == 5
            inside.set()
            await terminated.wait()
            refused: list[str] = []
            for attempt in (lambda: old.outbox_fetch(100), lambda: old.outbox_delete([r.id for r in rows])):
                try:
                    await attempt()
                except OutboxLockLost:
                    refused.append("refused")
                else:
                    refused.append("done")
            outcome.set_result(refused)

    async def new_relay() -> list[int]:
        async with new.outbox_exclusive():
            rows = await new.outbox_fetch(100)
            await new.outbox_delete([r.id for r in rows])
            return [r.seq for r in rows]

    old_task = asyncio.create_task(old_relay())
    await asyncio.wait_for(inside.wait(), BOUND)
    new_task = asyncio.create_task(new_relay())
    await asyncio.sleep(0.3)
    assert not new_task.done()  # waits for the lock
    (pid,) = await lock_holders(old)
    conn = await connect()
    try:
        assert await conn.fetchval("SELECT pg_terminate_backend($1)", pid)
    finally:
        await conn.close()
    assert await asyncio.wait_for(new_task, BOUND) == [1, 2, 3, 4, 5]  # the next holder drained them
    terminated.set()
    assert await asyncio.wait_for(outcome, BOUND) == ["refused", "refused"]
    await asyncio.wait_for(old_task, BOUND)
    assert await old.outbox_fetch(100) == []  # outside the lock the store still works (its pool)
    await _reenter(old)


async def _reenter(store: ChatStore) -> None:
    """The refused relay can take the lock again once it is free."""
    async with asyncio.timeout(BOUND), store.outbox_exclusive():
        assert await store.outbox_fetch(10) == []
