"""The fencing part of the :class:`ChatStore` contract (``raise_fence`` and ``CommitBatch.fence``), on every
store, each time through a second store on the same storage, as another process (the new holder of a
node id) would open it: the old holder's commits are refused once the new holder's token is recorded."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from im.model.chat import CommitBatch, ConversationState, Group, StoredMessage
from im.model.errors import FenceRefused
from im.model.ids import direct_conv
from tests.contract.conftest import ChatHarness
from tests.contract.test_chat_store import append, msg, new_direct


async def test_raise_fence_keeps_the_highest_token(chat: ChatHarness) -> None:
    store = chat.store
    assert await store.raise_fence(7, 100) == 100
    assert await store.raise_fence(7, 90) == 100  # never goes down
    assert await store.raise_fence(7, 120) == 120
    assert await store.raise_fence(8, 5) == 5  # per node id
    assert await (await chat.peer()).raise_fence(7, 0) == 120  # stored, seen by another process


async def test_a_lower_token_is_refused_and_writes_nothing(chat: ChatHarness) -> None:
    old, new = chat.store, await chat.peer()
    conv = direct_conv(1, 2)
    await new_direct(old, 1, 2, 2)
    assert await old.raise_fence(3, 10) == 10
    await old.commit(dataclasses.replace(await _batch(conv, 3, 1), fence=(3, 10)))  # its own token passes
    assert await new.raise_fence(3, 11) == 11  # another process claimed node id 3
    # The old holder's next batches (both write paths: the common one, and one with a new conversation)
    # are refused, whole, and the log is as it was.
    with pytest.raises(FenceRefused) as refused:
        await old.commit(dataclasses.replace(await _batch(conv, 4, 1), fence=(3, 10)))
    assert (refused.value.node_id, refused.value.token) == (3, 10)
    other = direct_conv(1, 5)
    fresh = CommitBatch(
        messages=[msg(other, 1, 1)],
        heads={other: (0, 1, 1_000)},
        new_conversations=[_state(other, 1, 5)],
        fence=(3, 10),
    )
    with pytest.raises(FenceRefused):
        await old.commit(fresh)
    assert (await new.load_conversations([conv, other])).keys() == {conv}
    assert [m.seq for m in await new.read_range(conv, 0, None, 10)] == [1, 2, 3]
    # The new holder commits under its token; other node ids and unfenced batches are not affected.
    await new.commit(dataclasses.replace(await _batch(conv, 4, 2), fence=(3, 11)))
    await old.commit(dataclasses.replace(await _batch(conv, 5, 1), fence=(4, 1)))
    await append(old, conv, 5, [2])
    assert [m.seq for m in await old.read_range(conv, 0, None, 10)] == [1, 2, 3, 4, 5, 6]


async def test_no_commit_under_the_old_token_lands_after_the_raise(chat: ChatHarness) -> None:
    """Commits of the old holder racing the new holder's raise: what the log holds right after the raise
    returned is all the old holder ever wrote; its next commit is refused."""
    old, new = chat.store, await chat.peer()
    conv = direct_conv(1, 2)
    await new_direct(old, 1, 2, 1)
    await old.raise_fence(9, 1)
    head = 1
    committed = 0

    async def old_holder() -> None:
        nonlocal head, committed
        while True:
            try:
                await old.commit(dataclasses.replace(await _batch(conv, head + 1, 1), fence=(9, 1)))
            except FenceRefused:
                return
            head += 1
            committed += 1

    task = asyncio.create_task(old_holder())
    await asyncio.sleep(0.1)
    assert await new.raise_fence(9, 2) == 2
    at_raise = (await new.load_conversations([conv]))[conv].last_seq
    await asyncio.wait_for(task, 10)
    assert committed > 0  # the race was run
    assert (await new.load_conversations([conv]))[conv].last_seq == at_raise == head
    assert [m.seq for m in await new.read_range(conv, 0, None, 10_000)] == list(range(1, head + 1))


async def _batch(conv: str, seq: int, sender: int) -> CommitBatch:
    return CommitBatch(messages=[msg(conv, seq, sender)], heads={conv: (seq - 1, seq, 1_000 + seq)})


def _state(conv: str, a: int, b: int) -> ConversationState:
    return ConversationState(conv, "direct", 0, {a: "member", b: "member"})


async def test_a_group_created_under_a_lower_token_is_refused(chat: ChatHarness) -> None:
    old, new = chat.store, await chat.peer()
    assert await new.raise_fence(4, 8) == 8
    members = {1: "owner", 2: "member"}
    with pytest.raises(FenceRefused):
        await old.create_group(Group(0, "late", 1, 2_000), _first(), members, fence=(4, 7))
    assert await new.list_conversations(1) == []  # nothing of it was written
    gid = await old.create_group(Group(0, "ok", 1, 2_000), _first(), members, fence=(4, 8))
    assert await new.get_group(gid) == Group(gid, "ok", 1, 2_000)
    assert [c.conv for c in await new.list_conversations(2)] == [f"g:{gid}"]


def _first() -> StoredMessage:
    return msg("ignored", 1, 1, device="", ts=2_000, type="system")
