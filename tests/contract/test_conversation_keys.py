"""The :class:`ConversationKeys` contract (the wrapped data keys), on every engine (``conftest.KEY_STORES``)."""

from __future__ import annotations

import asyncio

from im.model.keys import WrappedKey
from tests.contract.conftest import KeyStoreHarness
from tests.contract.lifecycle import check_lifecycle


def _key(name: str, version: int = 1, wrapped: bytes = b"w", master: str = "m1") -> WrappedKey:
    return WrappedKey(name, version, master, wrapped, 1700000000)


async def test_add_then_load_many_names_in_one_call(key_store: KeyStoreHarness) -> None:
    s = key_store.store
    assert await s.load_keys([]) == {}
    assert await s.load_keys(["conv:d:1:2"]) == {}
    a1, a2, b1 = _key("conv:d:1:2", 1, b"a1"), _key("conv:d:1:2", 2, b"a2"), _key("conv:g:7", 1, b"\x00\xff")
    for k in (a2, b1, a1):
        assert await s.add_key(k) == k
    got = await s.load_keys(["conv:d:1:2", "conv:g:7", "conv:absent", "conv:g:7"])
    assert got == {"conv:d:1:2": [a1, a2], "conv:g:7": [b1]}  # versions oldest first, absent left out


async def test_add_is_insert_if_absent_and_returns_the_stored_row(key_store: KeyStoreHarness) -> None:
    s = key_store.store
    first = _key("named:blob-names", 1, b"first")
    assert await s.add_key(first) == first
    assert await s.add_key(_key("named:blob-names", 1, b"second", "m2")) == first
    assert await s.load_keys(["named:blob-names"]) == {"named:blob-names": [first]}


async def test_two_processes_adding_the_first_key_at_once_agree(key_store: KeyStoreHarness) -> None:
    other = await key_store.peer()
    for round_ in range(20):
        name = f"conv:d:{round_}:99"
        mine, theirs = await asyncio.gather(
            key_store.store.add_key(_key(name, 1, b"mine")), other.add_key(_key(name, 1, b"theirs"))
        )
        assert mine == theirs
        assert (await other.load_keys([name]))[name] == [mine]


async def test_list_pages_through_every_key_in_order(key_store: KeyStoreHarness) -> None:
    s = key_store.store
    keys = [_key(f"conv:d:{i}:{i + 1}", v, bytes([i, v])) for i in range(7) for v in (1, 2)]
    for k in reversed(keys):
        await s.add_key(k)
    seen: list[WrappedKey] = []
    after = None
    while page := await s.list_keys(after, 3):
        assert len(page) <= 3
        seen.extend(page)
        after = (page[-1].name, page[-1].version)
    assert seen == sorted(keys, key=lambda k: (k.name, k.version))


async def test_rewrap_is_a_compare_and_set(key_store: KeyStoreHarness) -> None:
    s = key_store.store
    old = await s.add_key(_key("conv:g:1", 1, b"old", "m1"))
    new = _key("conv:g:1", 1, b"new", "m2")
    assert await s.rewrap(old, new)
    assert not await s.rewrap(old, _key("conv:g:1", 1, b"other", "m3"))  # it changed meanwhile
    assert (await s.load_keys(["conv:g:1"]))["conv:g:1"] == [WrappedKey("conv:g:1", 1, "m2", b"new", old.created_at)]
    assert not await s.rewrap(_key("conv:gone"), new)


async def test_other_master_names_a_foreign_wrapping(key_store: KeyStoreHarness) -> None:
    s = key_store.store
    assert await s.other_master("m1") is None
    await s.add_key(_key("conv:a", master="m1"))
    assert await s.other_master("m1") is None
    assert await s.other_master("m0") == "m1"
    assert await s.other_master("m2") == "m1"
    await s.add_key(_key("conv:b", master="m2"))
    assert await s.other_master("m1") == "m2"


async def test_delete_shreds_every_version_for_good(key_store: KeyStoreHarness) -> None:
    s = key_store.store
    for v in (1, 2, 3):
        await s.add_key(_key("conv:g:5", v))
    await s.add_key(_key("conv:g:6"))
    assert await s.delete_keys([]) == 0
    assert await s.delete_keys(["conv:g:5", "conv:absent"]) == 3
    assert await s.load_keys(["conv:g:5", "conv:g:6"]) == {"conv:g:6": [_key("conv:g:6")]}
    assert await s.delete_keys(["conv:g:5"]) == 0


async def test_keys_survive_a_reopen(key_store: KeyStoreHarness) -> None:
    k = await key_store.store.add_key(_key("conv:d:1:2", 1, bytes(range(60))))
    other = await key_store.peer()
    assert await other.load_keys(["conv:d:1:2"]) == {"conv:d:1:2": [k]}


async def test_lifecycle(key_store: KeyStoreHarness) -> None:
    await check_lifecycle(key_store.unstarted, lambda s: s.load_keys(["conv:x"]))


async def test_masters_counts_the_rows_each_master_key_wraps(key_store: KeyStoreHarness) -> None:
    s = key_store.store
    assert await s.masters() == {}
    await s.add_key(_key("conv:a", master="m1"))
    await s.add_key(_key("conv:b", master="m1"))
    old = await s.add_key(_key("conv:c", master="m2"))
    assert await s.masters() == {"m1": 2, "m2": 1}
    assert await s.rewrap(old, _key("conv:c", master="m1"))
    assert await s.masters() == {"m1": 3}
