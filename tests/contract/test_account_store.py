"""The :class:`AccountStore` contract, run against every implementation (see ``conftest.ACCOUNT_STORES``:
a SQLite file, a PostgreSQL schema; no skip when the server is down)."""

from __future__ import annotations

import pytest

from im.backends.accounts import AccountStore
from im.model.accounts import AuthSession, Privacy
from im.model.errors import Conflict
from tests.contract.conftest import AccountHarness
from tests.contract.lifecycle import check_lifecycle


@pytest.fixture
def store(account_harness: AccountHarness) -> AccountStore:
    return account_harness.store


async def test_create_and_get_user(store: AccountStore) -> None:
    alice = await store.create_user("Alice", "Alice A.", "hash-a", 100)
    assert alice.uid > 0 and alice.username == "Alice" and alice.created_at == 100
    assert await store.get_user(alice.uid) == alice
    assert await store.get_user(alice.uid + 1000) is None
    bob = await store.create_user("bob", "Bob", "hash-b", 101)
    assert await store.get_users([bob.uid, alice.uid, 999, bob.uid]) == {alice.uid: alice, bob.uid: bob}
    assert await store.get_users([]) == {}


async def test_usernames_unique_ignoring_case(store: AccountStore) -> None:
    await store.create_user("Alice", "A", "h", 1)
    for name in ("alice", "ALICE", "Alice"):
        with pytest.raises(Conflict):
            await store.create_user(name, "other", "h", 2)
    found = await store.find_user("aLiCe")
    assert found is not None
    user, password_hash = found
    assert user.username == "Alice" and password_hash == "h"
    assert await store.find_user("alic") is None


async def test_set_password_hash(store: AccountStore) -> None:
    u = await store.create_user("carol", "Carol", "old", 1)
    await store.set_password_hash(u.uid, "new")
    found = await store.find_user("carol")
    assert found is not None and found[1] == "new"


async def test_search_prefix_on_name_and_display_name(store: AccountStore) -> None:
    await store.create_user("alice", "Wonderland", "h", 1)
    await store.create_user("alfred", "Butler", "h", 1)
    await store.create_user("bob", "Alien Bob", "h", 1)
    await store.create_user("a_b", "x", "h", 1)
    await store.create_user("axb", "x", "h", 1)
    names = [u.username for u in await store.search_users("AL", 10)]
    assert names == ["alfred", "alice", "bob"]
    assert [u.username for u in await store.search_users("wonder", 10)] == ["alice"]
    assert len(await store.search_users("al", 2)) == 2
    # LIKE wildcards in the prefix are literal.
    assert [u.username for u in await store.search_users("a_", 10)] == ["a_b"]
    assert await store.search_users("%", 10) == []


async def test_sessions_rotate_and_revoke(store: AccountStore) -> None:
    u = await store.create_user("dave", "Dave", "h", 1)
    await store.create_session(AuthSession("s1", u.uid, refresh_hash="r1", expires_at=50, revoked=False))
    assert await store.get_session("s1") == AuthSession("s1", u.uid, "r1", 50, False)
    assert await store.get_session("nope") is None

    assert await store.rotate_refresh("s1", "r1", "r2", 60)
    assert await store.get_session("s1") == AuthSession("s1", u.uid, "r2", 60, False)
    # The old hash no longer matches: no swap.
    assert not await store.rotate_refresh("s1", "r1", "r3", 70)
    assert (s := await store.get_session("s1")) is not None and s.refresh_hash == "r2"

    await store.revoke_session("s1")
    revoked = await store.get_session("s1")
    assert revoked is not None and revoked.revoked
    # A revoked session never rotates again, even with the current hash.
    assert not await store.rotate_refresh("s1", "r2", "r4", 80)
    assert not await store.rotate_refresh("unknown", "r2", "r4", 80)


async def test_contacts(store: AccountStore) -> None:
    a = await store.create_user("ann", "Ann", "h", 1)
    b = await store.create_user("Ben", "Ben", "h", 1)
    c = await store.create_user("cid", "Cid", "h", 1)
    await store.add_contact(a.uid, c.uid, 5)
    await store.add_contact(a.uid, b.uid, 5)
    await store.add_contact(a.uid, b.uid, 6)  # idempotent
    assert [u.uid for u in await store.list_contacts(a.uid)] == [b.uid, c.uid]
    assert await store.list_contacts(b.uid) == []  # contacts are one-way
    assert await store.remove_contact(a.uid, b.uid)
    assert not await store.remove_contact(a.uid, b.uid)
    assert [u.uid for u in await store.list_contacts(a.uid)] == [c.uid]


async def test_session_times_list_and_revoke_all(store: AccountStore) -> None:
    u = await store.create_user("fay", "Fay", "h", 1)
    other = await store.create_user("gus", "Gus", "h", 1)
    for n, sid in enumerate(("s1", "s2", "s3")):
        await store.create_session(AuthSession(sid, u.uid, f"r{n}", 100, False, created_at=10 + n, last_used=10 + n))
    await store.create_session(AuthSession("g1", other.uid, "rg", 100, False, created_at=5))
    assert await store.rotate_refresh("s2", "r1", "r1b", 200, used_at=42)
    s2 = await store.get_session("s2")
    assert s2 == AuthSession("s2", u.uid, "r1b", 200, False, created_at=11, last_used=42)
    assert [s.sid for s in await store.list_sessions(u.uid)] == ["s1", "s2", "s3"]
    assert await store.revoke_sessions(u.uid, keep="s2") == ["s1", "s3"]
    assert [s.sid for s in await store.list_sessions(u.uid)] == ["s2"]
    assert await store.revoke_sessions(u.uid) == ["s2"]
    assert await store.revoke_sessions(u.uid) == []  # already revoked: nothing to report
    assert [s.sid for s in await store.list_sessions(other.uid)] == ["g1"]  # another user's stay


async def test_blocks_settings_and_privacy(store: AccountStore) -> None:
    a = await store.create_user("hal", "Hal", "h", 1)
    b = await store.create_user("ida", "Ida", "h", 1)
    c = await store.create_user("jon", "Jon", "h", 1)
    await store.block(a.uid, b.uid, 5)
    await store.block(a.uid, b.uid, 6)  # idempotent
    await store.block(a.uid, c.uid, 6)
    assert [u.uid for u in await store.list_blocks(a.uid)] == [b.uid, c.uid]
    assert await store.list_blocks(b.uid) == []  # one-way
    await store.set_contacts_only(b.uid, True)
    found = await store.privacy([a.uid, b.uid, c.uid, 9999, a.uid])
    assert found == {
        a.uid: Privacy(frozenset({b.uid, c.uid}), False, False),
        b.uid: Privacy(frozenset(), True, False),
        c.uid: Privacy(),
    }
    assert await store.unblock(a.uid, c.uid)
    assert not await store.unblock(a.uid, c.uid)
    assert (await store.privacy([a.uid]))[a.uid].blocked == {b.uid}
    await store.add_contact(b.uid, a.uid, 7)
    assert await store.contact_pairs([(b.uid, a.uid), (a.uid, b.uid), (b.uid, a.uid)]) == {(b.uid, a.uid)}
    assert await store.privacy([]) == {} and await store.contact_pairs([]) == set()


async def test_delete_user_leaves_a_tombstone_and_frees_the_name(store: AccountStore) -> None:
    a = await store.create_user("kim", "Kim", "h", 1)
    b = await store.create_user("lou", "Lou", "h", 1)
    await store.create_session(AuthSession("k1", a.uid, "r", 100, False))
    await store.create_session(AuthSession("k2", a.uid, "r2", 100, False))
    await store.add_contact(a.uid, b.uid, 1)
    await store.add_contact(b.uid, a.uid, 1)
    await store.block(b.uid, a.uid, 1)
    await store.block(a.uid, b.uid, 1)
    assert await store.delete_user(a.uid, 50) == ["k1", "k2"]
    assert all(s is not None and s.revoked for s in [await store.get_session("k1"), await store.get_session("k2")])
    tomb = await store.get_user(a.uid)
    assert tomb is not None and tomb.display_name == "Deleted user" and tomb.username == f"~deleted~{a.uid}"
    assert await store.find_user("kim") is None
    assert await store.search_users("Del", 10) == []
    assert await store.list_contacts(b.uid) == [] and await store.list_blocks(b.uid) == []
    assert (await store.privacy([a.uid]))[a.uid] == Privacy(deleted=True)
    again = await store.create_user("KIM", "Kim 2", "h", 60)  # the name is free again
    assert again.uid != a.uid


async def test_data_survives_reopen(account_harness: AccountHarness) -> None:
    u = await account_harness.store.create_user("erin", "Erin", "h", 1)
    s = await account_harness.reopen()
    assert await s.get_user(u.uid) == u
    with pytest.raises(Conflict):
        await s.create_user("ERIN", "E", "h", 2)


async def test_lifecycle(account_harness: AccountHarness) -> None:
    async def probe(s: AccountStore) -> None:
        assert await s.get_user(10**9) is None

    await check_lifecycle(account_harness.unstarted, probe)
