"""``ConversationStates(ttl=...)``: a reader's cached conversation state is read again once older than
the TTL, so it sees membership changed by another process's committer on the same store (and not
before)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from im.backends.accounts.sqlite import SqliteAccountStore
from im.backends.chat.sqlite import SqliteChatStore
from im.backends.presence.memory import MemoryPresence
from im.backends.routing.memory import MemoryRouter
from im.backends.sql.sqlite_db import SqliteDatabase
from im.model.errors import ErrorCode, ImError
from tests.support.chat import ChatCore, chat_core

TTL = 2.0


class Clock:
    """Wall-clock seconds that only the test moves."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Services:
    """Chat cores on one SQLite file, each with its own database object (as separate processes would
    open it); closed at teardown."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.opened: list[ChatCore] = []

    async def open(self, *, state_ttl: float | None = None, clock: Callable[[], float] = time.time) -> ChatCore:
        db = SqliteDatabase(self.path)
        store, accounts = SqliteChatStore(db), SqliteAccountStore(db)
        await store.start()
        await accounts.start()
        svc = chat_core(store, accounts, MemoryRouter(), MemoryPresence(), state_ttl=state_ttl, clock=clock)
        svc.committer.start()
        self.opened.append(svc)
        return svc

    async def close(self) -> None:
        for svc in self.opened:
            await svc.committer.stop()
            await svc.accounts.close()
            await svc.store.close()


@pytest.fixture
async def chats(tmp_path: Path) -> AsyncIterator[Services]:
    services = Services(tmp_path / "im.db")
    yield services
    await services.close()


async def writer_and_reader(chats: Services, state_ttl: float | None, clock: Clock) -> tuple[ChatCore, ChatCore]:
    """A writer (no TTL: its own writes keep its cache true) and the reader under test."""
    writer = await chats.open()
    reader = await chats.open(state_ttl=state_ttl, clock=clock)
    for name in ("ann", "ben", "cat", "dan"):
        await writer.accounts.create_user(name, name, "hash", 0)
    return writer, reader


async def test_members_of_reflects_a_change_elsewhere_once_the_ttl_passed(chats: Services) -> None:
    clock = Clock()
    writer, reader = await writer_and_reader(chats, TTL, clock)
    group = await writer.groups.create_group(1, "g", [2])
    conv = f"g:{group.gid}"
    assert await reader.reads.members_of(conv) == {1: "owner", 2: "member"}  # cached now

    await writer.groups.add_members(1, group.gid, [3])  # another process changes the membership
    clock.advance(TTL * 0.5)
    assert await reader.reads.members_of(conv) == {1: "owner", 2: "member"}  # not yet: the cache is young
    clock.advance(TTL * 0.49)
    assert await reader.reads.members_of(conv) == {1: "owner", 2: "member"}
    clock.advance(TTL * 0.02)  # now older than the TTL: read again
    assert await reader.reads.members_of(conv) == {1: "owner", 2: "member", 3: "member"}

    # the re-read state is cached afresh: the next change shows a TTL after that read, not at once
    await writer.groups.remove_member(1, group.gid, 2)
    clock.advance(TTL * 0.9)
    assert await reader.reads.members_of(conv) == {1: "owner", 2: "member", 3: "member"}
    assert await reader.reads.group_members(2, group.gid) == {1: "owner", 2: "member", 3: "member"}
    clock.advance(TTL * 0.2)
    assert await reader.reads.members_of(conv) == {1: "owner", 3: "member"}
    with pytest.raises(ImError) as refused:  # the membership checks of reads use the same state
        await reader.reads.group_members(2, group.gid)
    assert refused.value.code is ErrorCode.NOT_MEMBER


async def test_each_conversation_ages_on_its_own(chats: Services) -> None:
    clock = Clock()
    writer, reader = await writer_and_reader(chats, TTL, clock)
    g1, g2 = await writer.groups.create_group(1, "one", [2]), await writer.groups.create_group(1, "two", [2])
    c1, c2 = f"g:{g1.gid}", f"g:{g2.gid}"
    assert await reader.reads.members_of(c1) == {1: "owner", 2: "member"}
    clock.advance(TTL * 0.6)
    assert await reader.reads.members_of(c2) == {1: "owner", 2: "member"}  # read 0.6 TTL later than c1
    await writer.groups.add_members(1, g1.gid, [4])
    await writer.groups.add_members(1, g2.gid, [4])
    clock.advance(TTL * 0.6)  # c1 is 1.2 TTL old, c2 0.6 TTL
    assert await reader.reads.members_of(c1) == {1: "owner", 2: "member", 4: "member"}
    assert await reader.reads.members_of(c2) == {1: "owner", 2: "member"}
    clock.advance(TTL * 0.6)
    assert await reader.reads.members_of(c2) == {1: "owner", 2: "member", 4: "member"}


async def test_without_a_ttl_the_cached_state_is_kept(chats: Services) -> None:
    clock = Clock()
    writer, reader = await writer_and_reader(chats, None, clock)
    group = await writer.groups.create_group(1, "g", [2])
    conv = f"g:{group.gid}"
    assert await reader.reads.members_of(conv) == {1: "owner", 2: "member"}
    await writer.groups.add_members(1, group.gid, [3])
    clock.advance(10 * 24 * 3600.0)
    # the only-writer mode: this core's cache is the truth, whatever the clock says
    assert await reader.reads.members_of(conv) == {1: "owner", 2: "member"}
    # (a reader with a fresh cache sees the change: the store has it)
    fresh = await chats.open()
    assert await fresh.reads.members_of(conv) == {1: "owner", 2: "member", 3: "member"}
