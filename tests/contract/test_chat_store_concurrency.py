"""Several stores on the same storage, as several server processes would open it, committing at once.

The :class:`ChatStore` guarantee under test: of two batches written on the same head, one is stored and
the other refused whole with :class:`SeqConflict`; writers that reload and retry leave a log without
holes or duplicates.
"""

from __future__ import annotations

import asyncio
import itertools

from im.backends.chat import ChatStore
from im.model.chat import CommitBatch, ConversationState, StoredMessage
from im.model.errors import SeqConflict
from im.model.ids import direct_conv
from tests.contract.conftest import ChatHarness

X, Y = direct_conv(1, 2), direct_conv(1, 3)
_mids = itertools.count(1)


def msg(conv: str, seq: int, sender: int, cmid: str) -> StoredMessage:
    return StoredMessage(conv, seq, next(_mids), sender, "d1", cmid, seq, "text", b'{"text":"%s"}' % cmid.encode())


async def create(store: ChatStore, *convs: str) -> None:
    await store.commit(
        CommitBatch(
            new_conversations=[
                ConversationState(c, "direct", 0, {int(c.split(":")[1]): "member", int(c.split(":")[2]): "member"})
                for c in convs
            ]
        )
    )


async def test_same_head_exactly_one_wins(chat: ChatHarness) -> None:
    a, b = chat.store, await chat.peer()
    await create(a, X)
    for head in range(20):
        batches = [
            CommitBatch(messages=[msg(X, head + 1, sender, f"r{head}-{sender}")], heads={X: (head, head + 1, head + 1)})
            for sender in (1, 2)
        ]
        results = await asyncio.gather(a.commit(batches[0]), b.commit(batches[1]), return_exceptions=True)
        assert sorted(type(r).__name__ for r in results) == ["NoneType", "SeqConflict"], results
        winner = 1 if results[0] is None else 2
        loser = 3 - winner
        assert [(m.seq, m.sender) for m in await b.read_range(X, head, None, 10)] == [(head + 1, winner)]
        assert await a.find_sent([(loser, "d1", f"r{head}-{loser}")]) == {}
    assert [m.seq for m in await a.read_range(X, 0, None, 100)] == list(range(1, 21))
    assert (await b.load_conversations([X]))[X].last_seq == 20


async def test_retrying_committers_leave_no_hole(chat: ChatHarness) -> None:
    """Three writers append to two conversations (each batch touches both) until each has sent its share."""
    stores = [chat.store, await chat.peer(), await chat.peer()]
    await create(stores[0], X, Y)
    per_writer = 15

    async def writer(store: ChatStore, sender: int) -> None:
        for i in range(per_writer):
            while True:
                states = await store.load_conversations([X, Y])
                hx, hy = states[X].last_seq, states[Y].last_seq
                batch = CommitBatch(
                    messages=[msg(X, hx + 1, sender, f"x{sender}-{i}"), msg(Y, hy + 1, sender, f"y{sender}-{i}")],
                    # Opposite head orders on alternate writers: a store must not deadlock on them.
                    heads=dict(sorted({X: (hx, hx + 1, 1), Y: (hy, hy + 1, 1)}.items(), reverse=sender % 2 == 0)),
                )
                try:
                    await store.commit(batch)
                    break
                except SeqConflict:
                    await asyncio.sleep(0)  # reload and retry, as the core does

    await asyncio.wait_for(asyncio.gather(*(writer(s, n) for n, s in enumerate(stores, start=1))), 60)
    total = per_writer * len(stores)
    for conv, prefix in ((X, "x"), (Y, "y")):
        log = await stores[1].read_range(conv, 0, None, 1000)
        assert [m.seq for m in log] == list(range(1, total + 1))
        assert sorted(m.cmid for m in log) == sorted(f"{prefix}{s}-{i}" for s in (1, 2, 3) for i in range(per_writer))
        assert (await stores[2].load_conversations([conv]))[conv].last_seq == total
