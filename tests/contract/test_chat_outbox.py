"""The :class:`ChatStore` outbox contract (``outbox_fetch`` / ``outbox_delete``), on every implementation."""

from __future__ import annotations

import pytest

from im.model.chat import CommitBatch
from im.model.errors import SeqConflict
from im.model.ids import direct_conv
from tests.contract.conftest import ChatHarness
from tests.contract.test_chat_store import append, msg, new_direct


async def test_no_outbox_rows_when_off(chat: ChatHarness) -> None:
    a, b = await chat.add_user("a", "A"), await chat.add_user("b", "B")
    await new_direct(chat.store, a, b, 3)
    assert await chat.store.outbox_fetch(100) == []


async def test_one_row_per_committed_message_in_order(outbox_chat: ChatHarness) -> None:
    store = outbox_chat.store
    a, b, c = [await outbox_chat.add_user(n, n.upper()) for n in "abc"]
    ab = await new_direct(store, a, b, 3, ts=1_000)
    ac = await new_direct(store, a, c, 2, ts=2_000)
    ab += await append(store, direct_conv(a, b), 3, [b, a], ts=3_000)
    events = await store.outbox_fetch(100)
    assert [(e.conv, e.seq, e.mid, e.sender, e.type, e.created_at) for e in events] == [
        (m.conv, m.seq, m.mid, m.sender, m.type, m.ts) for m in ab[:3] + ac + ab[3:]
    ]
    ids = [e.id for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert await store.outbox_fetch(2) == events[:2]


async def test_delete_and_survive_reopen(outbox_chat: ChatHarness) -> None:
    a, b = await outbox_chat.add_user("a", "A"), await outbox_chat.add_user("b", "B")
    await new_direct(outbox_chat.store, a, b, 4)
    events = await outbox_chat.store.outbox_fetch(100)
    await outbox_chat.store.outbox_delete([events[0].id, events[2].id, 10**12])  # unknown ids are ignored
    await outbox_chat.store.outbox_delete([])
    store = await outbox_chat.reopen()
    assert await store.outbox_fetch(100) == [events[1], events[3]]
    # ids are never reused, even once the table was emptied
    await store.outbox_delete([events[1].id, events[3].id])
    assert await store.outbox_fetch(100) == []
    await append(store, direct_conv(a, b), 4, [b])
    (later,) = await store.outbox_fetch(100)
    assert later.id > events[3].id


async def test_refused_batch_writes_no_outbox_row(outbox_chat: ChatHarness) -> None:
    store = outbox_chat.store
    a, b = await outbox_chat.add_user("a", "A"), await outbox_chat.add_user("b", "B")
    await new_direct(store, a, b, 1)
    before = await store.outbox_fetch(100)
    conv = direct_conv(a, b)
    with pytest.raises(SeqConflict):  # stale head
        await store.commit(CommitBatch(messages=[msg(conv, 2, a)], heads={conv: (0, 2, 9)}))
    assert await store.outbox_fetch(100) == before


async def test_a_traced_message_keeps_its_trace_context_in_its_row(outbox_chat: ChatHarness) -> None:
    """Tracing on: ``CommitBatch.traces`` (mid -> traceparent) lands in the rows of those messages only,
    on the one-call path as on the transactional one (a new conversation)."""
    store = outbox_chat.store
    a, b = await outbox_chat.add_user("a", "A"), await outbox_chat.add_user("b", "B")
    first = await new_direct(store, a, b, 1)
    conv = direct_conv(a, b)
    messages = [msg(conv, 2, a), msg(conv, 3, b)]
    tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    await store.commit(CommitBatch(messages=messages, heads={conv: (1, 3, 9)}, traces={messages[1].mid: tp}))
    events = await store.outbox_fetch(100)
    assert [(e.mid, e.traceparent) for e in events] == [
        (first[0].mid, None),
        (messages[0].mid, None),
        (messages[1].mid, tp),
    ]
