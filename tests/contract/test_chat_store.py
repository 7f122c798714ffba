"""The :class:`ChatStore` contract, run against every implementation (see ``conftest.CHAT_STORES``)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from im.backends.chat import ChatStore
from im.model.chat import CommitBatch, ConversationState, Group, MemberChange, StoredMessage, SyncPoint
from im.model.errors import SeqConflict
from im.model.ids import direct_conv, group_conv
from tests.contract.conftest import ChatHarness
from tests.contract.lifecycle import check_lifecycle

_mids = itertools.count(1)


def msg(
    conv: str,
    seq: int,
    sender: int,
    *,
    device: str = "d1",
    cmid: str | None = None,
    ts: int = 1_000,
    type: str = "text",
) -> StoredMessage:
    mid = next(_mids)
    return StoredMessage(
        conv=conv,
        seq=seq,
        mid=mid,
        sender=sender,
        device=device,
        cmid=cmid or f"c{mid}",
        ts=ts,
        type=type,
        body=b'{"text":"m%d"}' % mid,
    )


async def new_direct(store: ChatStore, a: int, b: int, n: int, ts: int = 1_000) -> list[StoredMessage]:
    """Create the direct conversation of ``a`` and ``b`` with ``n`` messages from ``a`` (timestamps ts, ts+1...)."""
    conv = direct_conv(a, b)
    messages = [msg(conv, i, a, ts=ts + i - 1) for i in range(1, n + 1)]
    await store.commit(
        CommitBatch(
            messages=messages,
            heads={conv: (0, n, ts + n - 1)},
            new_conversations=[ConversationState(conv, "direct", 0, {a: "member", b: "member"})],
        )
    )
    return messages


async def append(
    store: ChatStore, conv: str, head: int, senders: Sequence[int], ts: int = 5_000
) -> list[StoredMessage]:
    """Append one message per sender to ``conv`` whose head is ``head``."""
    messages = [msg(conv, head + i, s, ts=ts + i) for i, s in enumerate(senders, start=1)]
    await store.commit(CommitBatch(messages=messages, heads={conv: (head, head + len(senders), ts + len(senders))}))
    return messages


async def new_group(store: ChatStore, name: str, members: dict[int, str], ts: int = 2_000) -> int:
    owner = next(u for u, r in members.items() if r == "owner")
    first = msg("ignored", 1, owner, device="", ts=ts, type="system")
    return await store.create_group(Group(0, name, owner, ts), first, members)


async def everything(
    store: ChatStore, convs: Sequence[str], uids: Sequence[int], gids: Sequence[int]
) -> dict[str, Any]:
    """All that the read side of the interface shows about ``convs``, ``uids`` and ``gids``."""
    return {
        "states": await store.load_conversations(convs),
        "logs": {c: await store.read_range(c, 0, None, 10_000) for c in convs},
        "marks": {c: await store.read_marks(c) for c in convs},
        "sync": {
            (u, d): sorted(await store.sync_points(u, d), key=lambda p: p.conv) for u in uids for d in ("d1", "d2")
        },
        "lists": {u: await store.list_conversations(u) for u in uids},
        "groups": {g: await store.get_group(g) for g in gids},
    }


# --- conversations, heads, messages ---------------------------------------------------------------------


async def test_new_conversation_and_heads_move(chat: ChatHarness) -> None:
    store = chat.store
    conv = direct_conv(1, 2)
    assert await store.load_conversations([conv]) == {}

    first = await new_direct(store, 1, 2, 2)
    states = await store.load_conversations([conv, "d:7:8", "g:999"])
    assert states == {conv: ConversationState(conv, "direct", 2, {1: "member", 2: "member"})}
    assert await store.read_range(conv, 0, None, 100) == first

    more = await append(store, conv, 2, [2, 1, 2])
    assert (await store.load_conversations([conv]))[conv].last_seq == 5
    assert await store.read_range(conv, 0, None, 100) == first + more


async def test_one_batch_spans_conversations(chat: ChatHarness) -> None:
    store = chat.store
    await new_direct(store, 1, 2, 1)
    a, b, c = direct_conv(1, 2), direct_conv(1, 3), direct_conv(2, 3)
    batch = CommitBatch(
        messages=[msg(a, 2, 1), msg(b, 1, 1), msg(b, 2, 3), msg(c, 1, 2)],
        heads={a: (1, 2, 10), b: (0, 2, 10), c: (0, 1, 10)},
        new_conversations=[
            ConversationState(b, "direct", 0, {1: "member", 3: "member"}),
            ConversationState(c, "direct", 0, {2: "member", 3: "member"}),
        ],
    )
    await store.commit(batch)
    states = await store.load_conversations([a, b, c])
    assert {k: v.last_seq for k, v in states.items()} == {a: 2, b: 2, c: 1}
    assert states[c].members == {2: "member", 3: "member"}
    assert [m.seq for m in await store.read_range(b, 0, None, 10)] == [1, 2]


async def test_a_large_batch_is_written_whole_or_not_at_all(chat: ChatHarness) -> None:
    """Batches larger than one statement of a store (several hundred messages, heads, marks and cursors)
    are still one transaction: all of it, or nothing when the last conversation's head moved."""
    store = chat.store
    convs = [direct_conv(1, u) for u in range(2, 302)]  # 300 conversations
    await store.commit(
        CommitBatch(
            new_conversations=[ConversationState(c, "direct", 0, {1: "member", int(c[4:]): "member"}) for c in convs]
        )
    )
    messages = [msg(c, seq, 1) for seq in (1, 2) for c in convs] + [msg(convs[0], seq, 1) for seq in range(3, 104)]
    heads = {c: (0, 2, 10) for c in convs} | {convs[0]: (0, 103, 10)}
    marks = [(int(c[4:]), c, 1) for c in convs]
    await store.commit(CommitBatch(messages=messages, heads=heads, read_marks=marks))
    states = await store.load_conversations(convs)
    assert {c: s.last_seq for c, s in states.items()} == {c: 103 if c == convs[0] else 2 for c in convs}
    assert [m.seq for m in await store.read_range(convs[0], 0, None, 1_000)] == list(range(1, 104))
    assert await store.read_range(convs[-1], 0, None, 10) == [messages[len(convs) - 1], messages[2 * len(convs) - 1]]
    for c in convs[::37]:
        assert (await store.read_marks(c))[int(c[4:])] == 1
    await store.save_cursors([(1, "d1", c, 2) for c in convs] + [(1, "d1", convs[5], 1)])
    assert {p.conv: p.cursor for p in await store.sync_points(1, "d1")} == dict.fromkeys(convs, 2)

    stale = {c: (2, 3, 20) for c in convs[1:]} | {convs[-1]: (1, 3, 20)}  # the last head is not at 1
    before = await everything(store, convs[-2:], [1], [])
    with pytest.raises(SeqConflict):
        await store.commit(CommitBatch(messages=[msg(c, 3, 1) for c in convs[1:]], heads=stale))
    assert await everything(store, convs[-2:], [1], []) == before
    assert (await store.load_conversations(convs[1:2]))[convs[1]].last_seq == 2


# --- atomicity ------------------------------------------------------------------------------------------


D = direct_conv(1, 2)
NEW = direct_conv(1, 3)


async def _conflict_setup(store: ChatStore) -> tuple[int, list[StoredMessage]]:
    """d:1:2 at head 2 (cmids of user 1 on d1), group g:<gid> of {1 owner, 2 member} at head 1."""
    existing = await new_direct(store, 1, 2, 2)
    gid = await new_group(store, "team", {1: "owner", 2: "member"})
    await store.save_read_marks([(1, D, 2)])
    return gid, existing


def _valid_batch(gid: int) -> CommitBatch:
    """Touches every part of the state: two heads, a new conversation, membership, owner, read marks."""
    g = group_conv(gid)
    return CommitBatch(
        messages=[
            msg(D, 3, 2, cmid="fresh-1", ts=9_000),
            msg(g, 2, 1, device="", cmid="sys-fresh", ts=9_000, type="system"),
            msg(NEW, 1, 3, cmid="fresh-2", ts=9_000),
        ],
        heads={D: (2, 3, 9_000), g: (1, 2, 9_000), NEW: (0, 1, 9_000)},
        new_conversations=[ConversationState(NEW, "direct", 0, {1: "member", 3: "member"})],
        member_changes=[
            MemberChange(g, 3, "member", joined_seq=1),
            MemberChange(g, 2, "owner"),
            MemberChange(g, 1, "admin"),
        ],
        read_marks=[(2, D, 3), (1, g, 2)],
    )


def _head_moved(b: CommitBatch, gid: int, existing: list[StoredMessage]) -> None:
    g = group_conv(gid)
    b.heads = {D: (2, 3, 9_000), NEW: (0, 1, 9_000), g: (0, 2, 9_000)}  # g is at 1: the last head is wrong


def _head_ahead(b: CommitBatch, gid: int, existing: list[StoredMessage]) -> None:
    b.heads[D] = (3, 4, 9_000)
    b.messages[0] = msg(D, 4, 2, cmid="fresh-1")


def _seq_taken(b: CommitBatch, gid: int, existing: list[StoredMessage]) -> None:
    b.messages.append(msg(D, 2, 2, cmid="fresh-3"))  # the head matches, but seq 2 exists


def _seq_twice_in_batch(b: CommitBatch, gid: int, existing: list[StoredMessage]) -> None:
    b.messages.append(msg(D, 3, 2, cmid="fresh-3"))


def _cmid_used(b: CommitBatch, gid: int, existing: list[StoredMessage]) -> None:
    old = existing[0]
    b.messages.append(msg(NEW, 2, old.sender, device=old.device, cmid=old.cmid))
    b.heads[NEW] = (0, 2, 9_000)


def _cmid_twice_in_batch(b: CommitBatch, gid: int, existing: list[StoredMessage]) -> None:
    b.messages.append(msg(NEW, 2, 2, cmid="fresh-1"))  # same (sender 2, d1, fresh-1) as the D message
    b.heads[NEW] = (0, 2, 9_000)


def _conversation_exists(b: CommitBatch, gid: int, existing: list[StoredMessage]) -> None:
    # Another core created d:1:2 first; this one believed it new.
    b.new_conversations.append(ConversationState(D, "direct", 0, {1: "member", 2: "member"}))
    b.heads[D] = (0, 1, 9_000)
    b.messages[0] = msg(D, 1, 2, cmid="fresh-1")


CONFLICTS: dict[str, Callable[[CommitBatch, int, list[StoredMessage]], None]] = {
    "head_moved": _head_moved,
    "head_ahead": _head_ahead,
    "seq_taken": _seq_taken,
    "seq_twice_in_batch": _seq_twice_in_batch,
    "cmid_used": _cmid_used,
    "cmid_twice_in_batch": _cmid_twice_in_batch,
    "conversation_exists": _conversation_exists,
}


async def test_valid_batch_writes_all_of_it(chat: ChatHarness) -> None:
    """The batch the conflict cases start from is valid, and each of its parts shows."""
    store = chat.store
    gid, _ = await _conflict_setup(store)
    g = group_conv(gid)
    await store.commit(_valid_batch(gid))
    states = await store.load_conversations([D, g, NEW])
    assert {c: s.last_seq for c, s in states.items()} == {D: 3, g: 2, NEW: 1}
    assert states[g].members == {1: "admin", 2: "owner", 3: "member"}
    assert (await store.get_group(gid)) == Group(gid, "team", 2, 2_000)
    assert (await store.read_marks(D))[2] == 3
    assert (await store.read_marks(g))[1] == 2


@pytest.mark.parametrize("mutate", list(CONFLICTS.values()), ids=list(CONFLICTS))
async def test_conflicting_batch_writes_nothing(
    chat: ChatHarness, mutate: Callable[[CommitBatch, int, list[StoredMessage]], None]
) -> None:
    store = chat.store
    gid, existing = await _conflict_setup(store)
    convs, uids = [D, group_conv(gid), NEW], [1, 2, 3]
    before = await everything(store, convs, uids, [gid])
    sent_before = await store.find_sent([(2, "d1", "fresh-1"), (3, "d1", "fresh-2"), (2, "d1", "fresh-3")])

    batch = _valid_batch(gid)
    mutate(batch, gid, existing)
    with pytest.raises(SeqConflict):
        await store.commit(batch)

    assert await everything(store, convs, uids, [gid]) == before
    assert await store.find_sent([(2, "d1", "fresh-1"), (3, "d1", "fresh-2"), (2, "d1", "fresh-3")]) == sent_before
    # The store is still usable, and the failed batch did not leave the heads half-moved.
    await store.commit(_valid_batch(gid))
    assert (await store.load_conversations([D]))[D].last_seq == 3


async def test_find_sent(chat: ChatHarness) -> None:
    store = chat.store
    sent = await new_direct(store, 1, 2, 3)
    other_device = msg(D, 4, 1, device="d2", cmid=sent[0].cmid)
    await store.commit(CommitBatch(messages=[other_device], heads={D: (3, 4, 5)}))
    keys = [(1, "d1", sent[0].cmid), (1, "d1", sent[2].cmid), (1, "d2", sent[0].cmid), (2, "d1", sent[0].cmid)]
    found = await store.find_sent([*keys, (1, "d1", "never")])
    assert found == {keys[0]: sent[0], keys[1]: sent[2], keys[2]: other_device}
    assert await store.find_sent([]) == {}


_AWKWARD_TEXT = ['a"b', "c\\d", "e,f", "{g}", " h ", "i\nj", "NULL", "k\u00e9\u4e2d\U0001f600", "\x01\x7f", '\\"']


async def test_any_text_a_client_chooses_round_trips(chat: ChatHarness) -> None:
    """Devices, cmids and types are the client's text: quotes, backslashes, commas, braces, spaces, control
    characters and any script come back as they went in, alone in a batch and beside others."""
    store = chat.store
    await new_direct(store, 1, 2, 0)
    plain = [msg(D, 1, 1, device="p", cmid="plain-1"), msg(D, 2, 1, device="p", cmid="plain-2", type="x.y")]
    await store.commit(CommitBatch(messages=plain, heads={D: (0, 2, 9)}))
    awkward = [msg(D, 3 + i, 1, device=t, cmid=t or "x", type=t or "t") for i, t in enumerate(_AWKWARD_TEXT)]
    for m in awkward:
        await store.commit(CommitBatch(messages=[m], heads={D: (m.seq - 1, m.seq, 9)}))
    keys = [(1, m.device, m.cmid) for m in awkward]
    assert await store.find_sent(keys) == {k: m for k, m in zip(keys, awkward, strict=True)}
    after = 2 + len(awkward)
    mixed = [msg(D, after + i, 1, device=t, cmid="again-" + t, type="t") for i, t in enumerate(_AWKWARD_TEXT, 1)]
    await store.commit(CommitBatch(messages=mixed, heads={D: (mixed[0].seq - 1, mixed[-1].seq, 9)}))
    assert await store.read_range(D, 0, None, 100) == [*plain, *awkward, *mixed]
    await store.save_cursors([(1, t, D, 3) for t in _AWKWARD_TEXT])
    assert sorted(d for d, _ in await store.devices(1)) == sorted(_AWKWARD_TEXT)


# --- groups and membership ------------------------------------------------------------------------------


async def test_create_group(chat: ChatHarness) -> None:
    store = chat.store
    gid1 = await new_group(store, "one", {1: "owner", 2: "member"}, ts=100)
    gid2 = await new_group(store, "two", {2: "owner"}, ts=200)
    assert 0 < gid1 < gid2
    assert await store.get_group(gid1) == Group(gid1, "one", 1, 100)
    assert await store.get_group(gid2) == Group(gid2, "two", 2, 200)
    assert await store.get_group(gid2 + 1000) is None

    g = group_conv(gid1)
    assert await store.load_conversations([g]) == {g: ConversationState(g, "group", 1, {1: "owner", 2: "member"})}
    (first,) = await store.read_range(g, 0, None, 10)
    assert (first.conv, first.seq, first.sender, first.type, first.ts) == (g, 1, 1, "system", 100)
    # The next message goes on top of seq 1.
    await append(store, g, 1, [2])
    assert [m.seq for m in await store.read_range(g, 0, None, 10)] == [1, 2]


async def test_member_changes(chat: ChatHarness) -> None:
    store = chat.store
    gid = await new_group(store, "g", {1: "owner", 2: "member"})
    g = group_conv(gid)
    await append(store, g, 1, [1, 2, 1, 2])  # head 5

    # Add 3 (joined at 5) with the system message as seq 6.
    await store.commit(
        CommitBatch(
            messages=[msg(g, 6, 1, device="", type="system")],
            heads={g: (5, 6, 6_000)},
            member_changes=[MemberChange(g, 3, "member", joined_seq=5)],
        )
    )
    assert (await store.load_conversations([g]))[g].members == {1: "owner", 2: "member", 3: "member"}
    assert await store.start_cursor(3, "d1", g) == 5
    assert await store.sync_points(3, "d1") == [SyncPoint(g, 6, 5)]

    # Role change of a member (joined_seq 0 as the core sends it for existing members) keeps the join point.
    await store.commit(
        CommitBatch(
            messages=[msg(g, 7, 1, device="", type="system")],
            heads={g: (6, 7, 7_000)},
            member_changes=[MemberChange(g, 3, "admin")],
        )
    )
    assert (await store.load_conversations([g]))[g].members == {1: "owner", 2: "member", 3: "admin"}
    assert await store.start_cursor(3, "d1", g) == 5

    # Owner leaves, 3 becomes owner: the group's owner follows.
    await store.commit(
        CommitBatch(
            messages=[msg(g, 8, 1, device="", type="system")],
            heads={g: (7, 8, 8_000)},
            member_changes=[MemberChange(g, 1, None), MemberChange(g, 3, "owner")],
        )
    )
    assert (await store.load_conversations([g]))[g].members == {2: "member", 3: "owner"}
    group = await store.get_group(gid)
    assert group is not None and group.owner == 3
    assert [p.conv for p in await store.sync_points(1, "d1")] == []
    assert [s.conv for s in await store.list_conversations(1)] == []
    assert set(await store.read_marks(g)) == {2, 3}

    # 1 comes back later: joins at the new head, not at the old membership.
    await store.save_cursors([(1, "d1", g, 4)])
    await store.commit(
        CommitBatch(
            messages=[msg(g, 9, 3, device="", type="system")],
            heads={g: (8, 9, 9_000)},
            member_changes=[MemberChange(g, 1, "member", joined_seq=8)],
        )
    )
    assert await store.sync_points(1, "d1") == [SyncPoint(g, 9, 8)]
    assert await store.start_cursor(1, "d1", g) == 8


async def test_member_joined_late_has_no_unread_history(chat: ChatHarness) -> None:
    store = chat.store
    gid = await new_group(store, "g", {1: "owner"})
    g = group_conv(gid)
    await append(store, g, 1, [1, 1, 1])  # head 4
    await store.commit(
        CommitBatch(
            messages=[msg(g, 5, 1, device="", type="system")],
            heads={g: (4, 5, 6_000)},
            member_changes=[MemberChange(g, 2, "member", joined_seq=4)],
        )
    )
    (summary,) = await store.list_conversations(2)
    assert summary.last_seq == 5 and summary.unread == 1


# --- reads ----------------------------------------------------------------------------------------------


async def test_read_range_bounds_limit_and_direction(chat: ChatHarness) -> None:
    store = chat.store
    await new_direct(store, 1, 2, 10)

    async def seqs(after: int, before: int | None, limit: int, newest_first: bool = False) -> list[int]:
        return [m.seq for m in await store.read_range(D, after, before, limit, newest_first)]

    assert await seqs(0, None, 100) == list(range(1, 11))
    assert await seqs(3, None, 100) == list(range(4, 11))
    assert await seqs(3, 7, 100) == [4, 5, 6]
    assert await seqs(3, 7, 2) == [4, 5]
    assert await seqs(3, 4, 100) == []
    assert await seqs(10, None, 100) == []
    assert await seqs(0, None, 0) == []
    assert await seqs(0, None, 100, newest_first=True) == list(range(10, 0, -1))
    assert await seqs(0, 8, 3, newest_first=True) == [7, 6, 5]
    assert await seqs(5, 8, 100, newest_first=True) == [7, 6]
    assert await store.read_range("d:98:99", 0, None, 100) == []


async def test_read_ranges_reads_many_conversations_at_once(chat: ChatHarness) -> None:
    store = chat.store
    await new_direct(store, 1, 2, 10)
    gid = await new_group(store, "g", {1: "owner", 3: "member"})
    g = group_conv(gid)
    await store.commit(CommitBatch(messages=[msg(g, s, 1) for s in range(2, 6)], heads={g: (1, 5, 5_000)}))
    one_by_one = {D: await store.read_range(D, 3, 8 + 1, 100), g: await store.read_range(g, 0, 5 + 1, 100)}

    got = await store.read_ranges([(D, 3, 8), (g, 0, 5), ("d:98:99", 0, 5)], 100)
    assert got == one_by_one  # bodies as read_range gives them (opened, where sealed); an empty range absent
    assert [m.seq for m in got[D]] == [4, 5, 6, 7, 8] and [m.seq for m in got[g]] == [1, 2, 3, 4, 5]
    limited = await store.read_ranges([(D, 0, 10), (g, 1, 5)], 2)  # the limit is per conversation
    assert {c: [m.seq for m in ms] for c, ms in limited.items()} == {D: [1, 2], g: [2, 3]}
    assert await store.read_ranges([(D, 10, 10), (g, 5, 9)], 100) == {}
    assert await store.read_ranges([], 100) == {}


# --- cursors and read marks -----------------------------------------------------------------------------


async def test_sync_points_and_start_cursor(chat: ChatHarness) -> None:
    store = chat.store
    await new_direct(store, 1, 2, 5)
    gid = await new_group(store, "g", {1: "owner", 3: "member"})
    g = group_conv(gid)

    # No device cursor: the join point (0 for founders).
    assert sorted(await store.sync_points(1, "d1"), key=lambda p: p.conv) == [SyncPoint(D, 5, 0), SyncPoint(g, 1, 0)]
    assert await store.sync_points(2, "d1") == [SyncPoint(D, 5, 0)]
    assert await store.sync_points(99, "d1") == []
    assert await store.start_cursor(1, "d1", D) == 0

    await store.save_cursors([(1, "d1", D, 3), (1, "d2", g, 1)])
    assert sorted(await store.sync_points(1, "d1"), key=lambda p: p.conv) == [SyncPoint(D, 5, 3), SyncPoint(g, 1, 0)]
    assert sorted(await store.sync_points(1, "d2"), key=lambda p: p.conv) == [SyncPoint(D, 5, 0), SyncPoint(g, 1, 1)]
    assert await store.start_cursor(1, "d1", D) == 3
    assert await store.start_cursor(1, "d2", D) == 0
    assert await store.start_cursor(1, "d2", g) == 1
    assert await store.sync_points(2, "d1") == [SyncPoint(D, 5, 0)]  # other users' cursors are their own

    # Cursors never move back; a sync point is capped at the head.
    await store.save_cursors([(1, "d1", D, 2)])
    assert await store.start_cursor(1, "d1", D) == 3
    await store.save_cursors([(1, "d1", D, 4), (1, "d1", D, 1)])
    assert await store.start_cursor(1, "d1", D) == 4
    await store.save_cursors([(1, "d1", D, 50)])
    assert SyncPoint(D, 5, 5) in await store.sync_points(1, "d1")
    await store.save_cursors([])


async def test_a_batch_stores_the_bodies_it_carries_in_place_of_its_messages_own(chat: ChatHarness) -> None:
    store = chat.store
    messages = [msg(D, i, 1) for i in (1, 2)]
    own = [m.body for m in messages]
    await store.commit(
        CommitBatch(
            messages=messages,
            heads={D: (0, 2, 1_002)},
            new_conversations=[ConversationState(D, "direct", 0, {1: "member", 2: "member"})],
            bodies=[b'"one"', b'"two"'],
        )
    )
    assert [m.body for m in await store.read_range(D, 0, None, 10)] == [b'"one"', b'"two"']
    assert [m.body for m in messages] == own  # the messages stay as they were


async def test_heads_of_many_users_in_one_read(chat: ChatHarness) -> None:
    store = chat.store
    await new_direct(store, 1, 2, 5)
    gid = await new_group(store, "g", {1: "owner", 3: "member"})
    g = group_conv(gid)
    assert await store.heads([1, 2, 3, 99]) == {1: {D: 5, g: 1}, 2: {D: 5}, 3: {g: 1}}
    assert await store.heads([]) == {}
    await append(store, g, 1, [1, 3])  # heads move with commits
    assert await store.heads([3]) == {3: {g: 3}}
    many = list(range(1000, 2200))  # more users than one statement binds
    assert await store.heads([*many, 2]) == {2: {D: 5}}


async def test_sync_point_is_max_of_joined_and_cursor(chat: ChatHarness) -> None:
    store = chat.store
    gid = await new_group(store, "g", {1: "owner"})
    g = group_conv(gid)
    await append(store, g, 1, [1] * 6)  # head 7
    await store.commit(
        CommitBatch(
            messages=[msg(g, 8, 1, device="", type="system")],
            heads={g: (7, 8, 8_000)},
            member_changes=[MemberChange(g, 2, "member", joined_seq=7)],
        )
    )
    await store.save_cursors([(2, "d1", g, 3)])  # a stale cursor below the join point
    assert await store.sync_points(2, "d1") == [SyncPoint(g, 8, 7)]
    assert await store.start_cursor(2, "d1", g) == 7
    await store.save_cursors([(2, "d1", g, 8)])
    assert await store.sync_points(2, "d1") == [SyncPoint(g, 8, 8)]
    assert await store.start_cursor(2, "d1", g) == 8


async def test_read_marks_never_move_back(chat: ChatHarness) -> None:
    store = chat.store
    await new_direct(store, 1, 2, 6)
    assert await store.read_marks(D) == {1: 0, 2: 0}
    await store.save_read_marks([(2, D, 4), (1, D, 2)])
    assert await store.read_marks(D) == {1: 2, 2: 4}
    await store.save_read_marks([(2, D, 3)])
    assert await store.read_marks(D) == {1: 2, 2: 4}
    await store.save_read_marks([(2, D, 5), (2, D, 1)])
    assert await store.read_marks(D) == {1: 2, 2: 5}
    await store.save_read_marks([(1, D, 3), (1, D, 6), (1, D, 4)])  # several of one member: the highest
    assert await store.read_marks(D) == {1: 6, 2: 5}
    # Through a commit too.
    await store.commit(CommitBatch(messages=[msg(D, 7, 1)], heads={D: (6, 7, 7)}, read_marks=[(2, D, 2), (1, D, 7)]))
    assert await store.read_marks(D) == {1: 7, 2: 5}
    await store.save_read_marks([])
    assert await store.read_marks("d:98:99") == {}


async def test_delivered_marks_are_the_best_device_of_each_member(chat: ChatHarness) -> None:
    store = chat.store
    await new_direct(store, 1, 2, 6)
    assert await store.delivered_marks(D) == {1: 0, 2: 0}
    await store.save_cursors([(2, "phone", D, 3), (2, "laptop", D, 5), (1, "d1", D, 2)])
    assert await store.delivered_marks(D) == {1: 2, 2: 5}
    await store.save_cursors([(2, "laptop", D, 4), (2, "phone", D, 6)])  # laptop's cursor does not move back
    assert await store.delivered_marks(D) == {1: 2, 2: 6}
    # Only members are listed, and only their cursors of this conversation count.
    gid = await new_group(store, "g", {1: "owner", 3: "member"})
    g = group_conv(gid)
    await store.save_cursors([(3, "d1", g, 1), (2, "d1", g, 1)])
    assert await store.delivered_marks(g) == {1: 0, 3: 1}
    assert await store.delivered_marks("d:98:99") == {}


# --- conversation list ----------------------------------------------------------------------------------


async def test_list_conversations(chat: ChatHarness) -> None:
    store = chat.store
    ann = await chat.add_user("ann", "Ann A.")
    bob = await chat.add_user("bob", "Bob B.")
    cat = await chat.add_user("cat", "Cat C.")
    ab, ac = direct_conv(ann, bob), direct_conv(ann, cat)

    await new_direct(store, ann, bob, 3, ts=1_000)  # last ts 1002
    gid = await new_group(store, "Book club", {ann: "owner", bob: "member"}, ts=2_000)
    g = group_conv(gid)
    await new_direct(store, cat, ann, 2, ts=3_000)  # last ts 3001
    await store.save_read_marks([(ann, ab, 1), (ann, ac, 2)])

    summaries = await store.list_conversations(ann)
    assert [s.conv for s in summaries] == [ac, g, ab]
    by_conv = {s.conv: s for s in summaries}

    s = by_conv[ab]
    assert (s.kind, s.title, s.peer, s.last_seq, s.read_seq, s.unread) == ("direct", "Bob B.", bob, 3, 1, 2)
    assert s.last_message == (await store.read_range(ab, 2, None, 10))[0]
    s = by_conv[ac]
    assert (s.kind, s.title, s.peer, s.last_seq, s.read_seq, s.unread) == ("direct", "Cat C.", cat, 2, 2, 0)
    s = by_conv[g]
    assert (s.kind, s.title, s.peer, s.last_seq, s.read_seq, s.unread) == ("group", "Book club", None, 1, 0, 1)
    assert s.last_message is not None and (s.last_message.conv, s.last_message.seq) == (g, 1)

    # The other side names ann; new activity moves a conversation to the top.
    assert [(x.conv, x.title) for x in await store.list_conversations(bob)] == [(g, "Book club"), (ab, "Ann A.")]
    newest = await append(store, ab, 3, [bob], ts=9_000)
    summaries = await store.list_conversations(ann)
    assert [x.conv for x in summaries] == [ab, ac, g]
    assert summaries[0].last_message == newest[0] and summaries[0].unread == 3
    assert await store.list_conversations(4242) == []


# --- durability -----------------------------------------------------------------------------------------


async def test_data_survives_close_and_reopen(chat: ChatHarness) -> None:
    store = chat.store
    ann = await chat.add_user("ann", "Ann")
    bob = await chat.add_user("bob", "Bob")
    conv = direct_conv(ann, bob)
    sent = await new_direct(store, ann, bob, 3)
    gid = await new_group(store, "G", {ann: "owner", bob: "admin"})
    await store.save_cursors([(bob, "d1", conv, 2)])
    await store.save_read_marks([(bob, conv, 1)])
    convs, uids = [conv, group_conv(gid)], [ann, bob]
    before = await everything(store, convs, uids, [gid])

    store = await chat.reopen()
    assert await everything(store, convs, uids, [gid]) == before
    key = (ann, "d1", sent[1].cmid)
    assert await store.find_sent([key]) == {key: sent[1]}
    # And it keeps working: heads, gids and cursors carry on from where they were.
    await append(store, conv, 3, [bob])
    assert await new_group(store, "H", {bob: "owner"}) > gid
    assert await store.start_cursor(bob, "d1", conv) == 2


async def test_member_changes_in_one_batch_apply_in_order(chat: ChatHarness) -> None:
    """Several changes of one member in one batch end as if applied one by one."""
    store = chat.store
    gid = await new_group(store, "g", {1: "owner", 2: "member", 3: "member"})
    g = group_conv(gid)
    await append(store, g, 1, [1, 1, 1])  # head 4
    await store.save_read_marks([(2, g, 4)])
    await store.commit(
        CommitBatch(
            messages=[msg(g, 5, 1, device="", type="system")],
            heads={g: (4, 5, 6_000)},
            member_changes=[
                MemberChange(g, 2, None),
                MemberChange(g, 2, "member", joined_seq=4),  # leave and rejoin: fresh row
                MemberChange(g, 4, "member", joined_seq=4),
                MemberChange(g, 4, "admin"),  # join, then promoted
                MemberChange(g, 3, "admin"),
                MemberChange(g, 3, None),  # promoted, then removed
                MemberChange(g, 1, "admin"),
                MemberChange(g, 4, "owner"),
                MemberChange(g, 2, "owner"),
            ],
        )
    )
    assert (await store.load_conversations([g]))[g].members == {1: "admin", 2: "owner", 4: "owner"}
    assert await store.read_marks(g) == {1: 0, 2: 4, 4: 4}
    assert await store.start_cursor(4, "d1", g) == 4
    group = await store.get_group(gid)
    assert group is not None and group.owner == 2


async def test_wrote_in(chat: ChatHarness) -> None:
    store = chat.store
    conv = direct_conv(31, 32)
    await new_direct(store, 31, 32, 3)
    assert await store.wrote_in([(31, conv), (32, conv), (31, "d:1:99"), (31, conv)]) == {(31, conv)}
    await append(store, conv, 3, [32])
    assert await store.wrote_in([(32, conv)]) == {(32, conv)}
    assert await store.wrote_in([]) == set()


async def test_devices(chat: ChatHarness) -> None:
    store = chat.store
    await store.save_cursors([(41, "phone", "d:41:42", 1), (41, "laptop", "d:41:42", 1), (41, "phone", "g:9", 2)])
    await store.save_cursors([(42, "web", "d:41:42", 1)])
    devices = await store.devices(41)
    assert [d for d, _ in devices] == ["laptop", "phone"]
    assert all(abs(t - time.time()) < 60 for _, t in devices)
    assert await store.devices(43) == []


async def test_lifecycle(chat: ChatHarness) -> None:
    async def probe(store: ChatStore) -> None:
        assert await store.get_group(10**9) is None

    await check_lifecycle(chat.unstarted, probe)


async def test_stores_on_one_database_count_once_however_often_started_or_closed(chat: ChatHarness) -> None:
    """Stores share one database object, opened counted: a store started twice and closed twice gives
    back one count only, so the other store's connections stay open."""
    store, accounts = chat.on_one_database()
    try:
        await store.start()
        await store.start()
        await accounts.start()
        for _ in range(3):  # more closes than starts: still one count given back
            await store.close()
        assert await accounts.get_user(10**9) is None  # still open
    finally:
        await store.close()
        await accounts.close()
    with pytest.raises(RuntimeError):
        await accounts.get_user(10**9)  # the last user closed the database
