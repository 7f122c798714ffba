"""Crypto-shredding of a group whose last member leaves, in process on each engine: two chat cores on
one store, as in a cluster — an API process that commits the membership changes and destroys the keys,
and a transfer node that sealed the group's messages and holds its key in its cache (the live-server run
is in test_shredding_live.py)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence

import msgspec
import pytest

from im.backends.chat.encrypted import UNDECRYPTABLE, EncryptedChatStore
from im.backends.keys.keyring import Keyring, conv_key_name
from im.backends.presence.memory import MemoryPresence
from im.backends.routing.memory import MemoryRouter
from im.core.committer import SendRequest
from im.model.errors import ErrorCode, ImError
from tests.encryption.conftest import Engine
from tests.support.chat import ChatCore, chat_core

MARK = "GROUP-SHRED-MARKER-51c2"


def _send(uid: int, conv: str, text: str) -> SendRequest:
    return SendRequest(uid, "d", f"{conv}-{text}", conv, None, "text", msgspec.json.encode({"text": f"{MARK} {text}"}))


class Node:
    """One process: its encrypted store (with its own keyring) and the chat core on it."""

    def __init__(self, store: EncryptedChatStore, core: ChatCore, shreds: list[list[str]]) -> None:
        self.store, self.core = store, core
        self.shreds = shreds  # the conversations of each shred call, in order

    @property
    def keyring(self) -> Keyring:
        assert self.store.keyring is not None
        return self.store.keyring


@contextlib.asynccontextmanager
async def _node(engine: Engine, *, first: bool, shreds: bool) -> AsyncIterator[Node]:
    inner, keys = (engine.inner, engine.keys) if first else engine.second()
    store = EncryptedChatStore(inner, engine.keyring(keys), owns_keyring=True)
    ring = store.keyring
    assert ring is not None

    calls: list[list[str]] = []

    async def shred(convs: Sequence[str]) -> int:  # as im.compose.build_groups wires it
        calls.append(list(convs))
        return await ring.shred([conv_key_name(c) for c in convs])

    async with store:
        core = chat_core(store, engine.accounts, MemoryRouter(), MemoryPresence(), shred=shred if shreds else None)
        core.committer.start()
        try:
            yield Node(store, core, calls)
        finally:
            await core.committer.stop()


async def _versions(engine: Engine, conv: str) -> list[int]:
    rows = await engine.sql("SELECT version FROM data_keys WHERE name = ? ORDER BY version", conv_key_name(conv))
    return [int(v) for (v,) in rows]


async def _types(store: EncryptedChatStore, conv: str) -> list[str]:
    return [m.type for m in await store.read_range(conv, 0, None, 100)]


async def test_the_last_member_leaving_shreds_the_groups_keys_everywhere(engine: Engine) -> None:
    alice, bob, carol = [(await engine.accounts.create_user(n, n, "h", 1)).uid for n in ("alice", "bob", "carol")]
    async with _node(engine, first=True, shreds=True) as api, _node(engine, first=False, shreds=False) as node:
        groups = api.core.groups
        gone = f"g:{(await groups.create_group(alice, 'gone', [bob])).gid}"
        kept = f"g:{(await groups.create_group(alice, 'kept', [bob, carol])).gid}"
        for i in range(3):  # sealed on the transfer node, which caches both keys
            await node.core.committer.send(_send(alice, gone, f"gone {i}"))
            await node.core.committer.send(_send(bob, kept, f"kept {i}"))
        assert await node.keyring.rotate(conv_key_name(gone)) == 2
        await node.core.committer.send(_send(bob, gone, "under version 2"))
        assert await _versions(engine, gone) == [1, 2]
        assert await _types(node.store, gone) == ["system"] + ["text"] * 4

        await groups.leave_group(bob, int(gone[2:]))  # alice is still in: nothing destroyed
        assert await _versions(engine, gone) == [1, 2]
        await groups.remove_member(alice, int(kept[2:]), bob)  # a removal never empties a group
        await groups.leave_group(carol, int(kept[2:]))
        assert await _versions(engine, kept) == [1]

        await groups.remove_member(alice, int(gone[2:]), alice)  # the DELETE of oneself: leaving, the last one
        assert await _versions(engine, gone) == []
        assert await _versions(engine, kept) == [1]
        # every stored body of the abandoned group reads as undecryptable: in the process that shredded, in
        # the transfer node once it reads its key's versions again (at once here: refresh 0), and in a
        # process started afterwards
        node.keyring.refresh_interval = 0
        for store in (api.store, node.store):
            got = await store.read_range(gone, 0, None, 100)
            assert [(m.type, m.body) for m in got] == [(UNDECRYPTABLE, b"null")] * 7  # + bob's and alice's leaving
        async with _node(engine, first=False, shreds=False) as later:
            assert set(await _types(later.store, gone)) == {UNDECRYPTABLE}
            page, _ = await later.core.reads.history(alice, kept, after=0, before=None, limit=50)
            assert [m.type for m in page] == ["system"] + ["text"] * 3 + ["system"] * 2
            assert all(MARK.encode() in m.body for m in page if m.type == "text")
        # nobody is left to write there, so nothing makes a new key for it
        with pytest.raises(ImError) as refused:
            await api.core.committer.send(_send(alice, gone, "after"))
        assert refused.value.code is ErrorCode.NOT_MEMBER
        with pytest.raises(ImError) as refused:
            await api.core.groups.leave_group(alice, int(gone[2:]))
        assert refused.value.code is ErrorCode.NOT_MEMBER
        assert await _versions(engine, gone) == []


async def test_account_deletion_still_shreds_the_groups_it_empties_in_one_batch(engine: Engine) -> None:
    alice, bob = [(await engine.accounts.create_user(n, n, "h", 1)).uid for n in ("alice", "bob")]
    async with _node(engine, first=True, shreds=True) as api:
        solo = [f"g:{(await api.core.groups.create_group(alice, f's{i}', [])).gid}" for i in range(3)]
        shared = f"g:{(await api.core.groups.create_group(alice, 'shared', [bob])).gid}"
        await api.core.groups.leave_all_groups(alice)
        assert len(api.shreds) == 1 and sorted(api.shreds[0]) == sorted(solo)  # one call for them all
        for conv in solo:
            assert await _versions(engine, conv) == []
        assert await _versions(engine, shared) == [1]
        assert await api.core.reads.group_members(bob, int(shared[2:])) == {bob: "owner"}
