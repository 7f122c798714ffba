"""EncryptedChatStore on SQLite and PostgreSQL: what lands in the tables is ciphertext bound to its row;
a ciphertext moved to another row is detected, reported and never shown; key work is batched."""

from __future__ import annotations

import logging

import pytest

from im.backends.chat.encrypted import UNDECRYPTABLE, EncryptedChatStore, is_sealed
from im.backends.keys import KeyUnavailable
from im.model.chat import CommitBatch, ConversationState, Group, StoredMessage
from tests.encryption.conftest import Engine

MARK = "PLAINTEXT-MARKER-7f3a"


def msg(conv: str, seq: int, text: str, *, sender: int = 1, cmid: str | None = None) -> StoredMessage:
    return StoredMessage(
        conv,
        seq,
        1000 + seq + 100 * len(conv),
        sender,
        "dev",
        cmid or f"{conv}-{seq}",
        1,
        "text",
        f'{{"text":"{text}"}}'.encode(),
    )


async def write(store: EncryptedChatStore, conv: str, texts: list[str], *, first_seq: int = 1) -> list[StoredMessage]:
    """New conversation ``conv`` (or more messages in it) with one message per text, in one commit."""
    ms = [msg(conv, first_seq + i, t) for i, t in enumerate(texts)]
    batch = CommitBatch(messages=ms, heads={conv: (first_seq - 1, first_seq - 1 + len(ms), 1)})
    if first_seq == 1:
        batch.new_conversations.append(ConversationState(conv, "direct", 0, {1: "member", 2: "member"}))
    await store.commit(batch)
    return ms


async def test_bodies_are_stored_sealed_and_read_back_in_clear(engine: Engine, store: EncryptedChatStore) -> None:
    sent = await write(store, "d:1:2", [f"{MARK}-{i}" for i in range(5)])
    assert sent[0].body == f'{{"text":"{MARK}-0"}}'.encode()  # the caller's objects are not touched
    rows = await engine.sql("SELECT body FROM messages ORDER BY seq")
    assert len(rows) == 5
    for (body,) in rows:
        assert is_sealed(bytes(body)) and MARK.encode() not in bytes(body)
        assert len(bytes(body)) == len(sent[0].body) + 33
    assert await store.read_range("d:1:2", 0, None, 10) == sent
    assert await store.read_range("d:1:2", 0, None, 2, newest_first=True) == sent[:-3:-1]
    found = await store.find_sent([(1, "dev", "d:1:2-3"), (1, "dev", "nope")])
    assert found == {(1, "dev", "d:1:2-3"): sent[2]}
    uid = (await engine.accounts.create_user("bob", "Bob", "h", 1)).uid
    await engine.accounts.create_user("alice", "Alice", "h", 1)
    summaries = await store.list_conversations(uid)  # uid 1 is a member of d:1:2
    assert [s.last_message for s in summaries] == [sent[-1]]


async def test_a_groups_first_message_is_sealed_for_its_conversation(engine: Engine, store: EncryptedChatStore) -> None:
    first = StoredMessage(
        "", 1, 77, 1, "", "sys-77", 5, "system", f'{{"event":"group_created","name":"{MARK}"}}'.encode()
    )
    gid = await store.create_group(Group(0, "g", 1, 5), first, {1: "owner", 2: "member"})
    assert (await store.get_group(gid)) == Group(gid, "g", 1, 5)
    ((body,),) = await engine.sql("SELECT body FROM messages WHERE conv = ?", f"g:{gid}")
    assert is_sealed(bytes(body)) and MARK.encode() not in bytes(body)
    (got,) = await store.read_range(f"g:{gid}", 0, None, 5)
    assert got.body == first.body and got.conv == f"g:{gid}" and got.type == "system"
    second = StoredMessage("", 1, 78, 1, "", "sys-78", 6, "system", body)
    gid2 = await store.create_group(Group(0, "h", 1, 6), second, {1: "owner"})
    assert gid2 > gid  # reserved gids are never handed out twice


@pytest.mark.parametrize("where", ["same conversation", "another conversation"])
async def test_a_ciphertext_swapped_between_rows_is_detected_and_never_shown(
    engine: Engine, store: EncryptedChatStore, where: str, caplog: pytest.LogCaptureFixture
) -> None:
    a = await write(store, "d:1:2", ["first secret", "second secret", "third"])
    b = await write(store, "d:1:3", ["other conversation"])
    target = ("d:1:2", 2) if where == "same conversation" else ("d:1:3", 1)
    rows = dict(((c, s), bytes(body)) for c, s, body in await engine.sql("SELECT conv, seq, body FROM messages"))
    # The attacker swaps two rows' bodies in the database.
    await engine.sql("UPDATE messages SET body = ? WHERE conv = ? AND seq = ?", rows[target], "d:1:2", 1)
    await engine.sql("UPDATE messages SET body = ? WHERE conv = ? AND seq = ?", rows[("d:1:2", 1)], *target)
    caplog.set_level(logging.ERROR, "im.encryption")
    got = await store.read_range("d:1:2", 0, None, 10)
    assert [m.seq for m in got] == [1, 2, 3]  # no gap in the log
    assert (got[0].type, got[0].body, got[0].mid, got[0].sender) == (UNDECRYPTABLE, b"null", a[0].mid, a[0].sender)
    if where == "same conversation":
        assert got[1].type == UNDECRYPTABLE and got[1].body == b"null"
        assert got[2] == a[2]
    else:
        assert got[1:] == a[1:]
        (other,) = await store.read_range("d:1:3", 0, None, 10)
        assert other.type == UNDECRYPTABLE and other.body == b"null" and b[0].body not in other.body
    assert store.failures == 2
    assert any("did not authenticate" in r.getMessage() for r in caplog.records)
    shown = b"".join(m.body for m in got + await store.read_range("d:1:3", 0, None, 10))
    moved = [b"first secret", b"second secret" if where == "same conversation" else b"other conversation"]
    assert not [text for text in moved if text in shown]  # a moved ciphertext is never shown


async def test_an_altered_ciphertext_is_detected(engine: Engine, store: EncryptedChatStore) -> None:
    await write(store, "d:1:2", ["x"])
    ((body,),) = await engine.sql("SELECT body FROM messages")
    altered = bytearray(bytes(body))
    altered[20] ^= 0x40
    await engine.sql("UPDATE messages SET body = ?", bytes(altered))
    (got,) = await store.read_range("d:1:2", 0, None, 1)
    assert got.type == UNDECRYPTABLE and store.failures == 1


async def test_plaintext_rows_from_before_encryption_read_as_they_are(engine: Engine) -> None:
    plain = msg("d:1:2", 1, "written in clear")
    await engine.inner.commit(
        CommitBatch(
            messages=[plain],
            heads={"d:1:2": (0, 1, 1)},
            new_conversations=[ConversationState("d:1:2", "direct", 0, {1: "member", 2: "member"})],
        )
    )
    async with EncryptedChatStore(engine.inner, engine.keyring(), owns_keyring=True) as store:
        (sealed,) = await write(store, "d:1:2", ["sealed"], first_seq=2)
        assert await store.read_range("d:1:2", 0, None, 5) == [plain, sealed]
        assert store.failures == 0


async def test_shredded_keys_leave_nothing_readable(engine: Engine, store: EncryptedChatStore) -> None:
    await write(store, "d:1:2", ["gone for good"])
    await write(store, "d:1:3", ["kept"])
    assert await engine.keys.delete_keys(["conv:d:1:2"]) == 1
    fresh = EncryptedChatStore(engine.second()[0], engine.keyring(), owns_keyring=True)  # nothing cached
    async with fresh:
        (gone,) = await fresh.read_range("d:1:2", 0, None, 5)
        (kept,) = await fresh.read_range("d:1:3", 0, None, 5)
    assert gone.type == UNDECRYPTABLE and kept.body == b'{"text":"kept"}'


async def test_key_work_is_one_load_per_commit_and_per_read(engine: Engine) -> None:
    calls: list[int] = []
    load = engine.keys.load_keys

    async def counted(names):  # type: ignore[no-untyped-def]
        calls.append(len(names))
        return await load(names)

    engine.keys.load_keys = counted  # type: ignore[method-assign]
    ring = engine.keyring(engine.keys, cache_size=1000)
    async with EncryptedChatStore(engine.inner, ring, owns_keyring=True) as store:
        convs = [f"d:1:{i}" for i in range(2, 52)]
        batch = CommitBatch(
            messages=[msg(c, s, f"m{s}") for c in convs for s in (1, 2, 3)],
            heads={c: (0, 3, 1) for c in convs},
            new_conversations=[ConversationState(c, "direct", 0, {1: "member"}) for c in convs],
        )
        await store.commit(batch)
        assert calls == [50]  # 150 messages in 50 conversations: one store round trip
        await store.commit(
            CommitBatch(messages=[msg(c, 4, "again") for c in convs], heads={c: (3, 4, 1) for c in convs})
        )
        assert calls == [50]  # all cached now
        await store.read_range("d:1:2", 0, None, 10)
        assert calls == [50]
        assert ring.created == 50


async def test_a_commit_whose_key_does_not_unwrap_writes_nothing(engine: Engine, store: EncryptedChatStore) -> None:
    await write(store, "d:1:2", ["one"])
    await engine.sql("UPDATE data_keys SET wrapped = ?", b"\x01" + bytes(60))
    fresh = EncryptedChatStore(engine.second()[0], engine.keyring(), owns_keyring=True)
    async with fresh:
        with pytest.raises(KeyUnavailable):
            await fresh.commit(CommitBatch(messages=[msg("d:1:2", 2, "two")], heads={"d:1:2": (1, 2, 1)}))
        (one,) = await fresh.read_range("d:1:2", 0, None, 5)
        assert one.type == UNDECRYPTABLE  # never plaintext, never a crash
    assert [r[0] for r in await engine.sql("SELECT seq FROM messages")] == [1]


async def test_turned_off_new_bodies_go_in_clear_and_sealed_ones_still_open(
    engine: Engine, store: EncryptedChatStore
) -> None:
    (old,) = await write(store, "d:1:2", ["sealed while on"])
    async with EncryptedChatStore(engine.second()[0], engine.keyring(), seal=False, owns_keyring=True) as off:
        (new,) = await write(off, "d:1:2", ["written while off"], first_seq=2)
        assert await off.read_range("d:1:2", 0, None, 5) == [old, new]
    assert [is_sealed(bytes(b)) for (b,) in await engine.sql("SELECT body FROM messages ORDER BY seq")] == [True, False]
    async with EncryptedChatStore(engine.second()[0], None, seal=False) as blind:  # off, and no master key
        first, second = await blind.read_range("d:1:2", 0, None, 5)
    assert (first.type, first.body) == (UNDECRYPTABLE, b"null") and second == new  # never raw ciphertext
