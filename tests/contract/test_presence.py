"""The :class:`Presence` contract, run against every implementation (see ``conftest.PRESENCES``)."""

from __future__ import annotations

import asyncio

from im.backends.presence import Presence
from im.model.cluster import DeviceLocation
from tests.contract.conftest import PresenceHarness
from tests.contract.lifecycle import check_lifecycle


def loc(uid: int, device: str, node: str, conn: str = "") -> DeviceLocation:
    return DeviceLocation(uid, device, node, conn)


async def located(h: PresenceHarness, uids: list[int]) -> dict[int, set[DeviceLocation]]:
    return {uid: set(locs) for uid, locs in (await h.presence.locate(uids)).items()}


async def test_set_online_locate_set_offline(presence_harness: PresenceHarness) -> None:
    h = presence_harness
    assert await h.presence.locate([1, 2]) == {}
    await h.presence.set_online([loc(1, "phone", "gw-1"), loc(2, "web", "gw-2")], h.ttl)
    assert await located(h, [1, 2, 3]) == {1: {loc(1, "phone", "gw-1")}, 2: {loc(2, "web", "gw-2")}}
    assert await located(h, [2]) == {2: {loc(2, "web", "gw-2")}}
    assert await h.presence.locate([]) == {}

    await h.presence.set_offline([loc(1, "phone", "gw-1")])
    assert await located(h, [1, 2]) == {2: {loc(2, "web", "gw-2")}}
    # Offline for an entry that is not there, or on another node, changes nothing and does not raise.
    await h.presence.set_offline([loc(2, "web", "gw-9"), loc(7, "x", "gw-1")])
    await h.presence.set_offline([])
    assert await located(h, [1, 2]) == {2: {loc(2, "web", "gw-2")}}


async def test_many_devices_and_nodes_per_user(presence_harness: PresenceHarness) -> None:
    h = presence_harness
    entries = [loc(1, "phone", "gw-1"), loc(1, "web", "gw-2"), loc(1, "desktop", "gw-1"), loc(1, "phone", "gw-3")]
    await h.presence.set_online(entries, h.ttl)
    await h.presence.set_online([loc(1, "web", "gw-2")], h.ttl)  # a refresh is not a second entry
    locs = (await h.presence.locate([1]))[1]
    assert sorted(locs, key=lambda x: (x.device, x.node)) == sorted(entries, key=lambda x: (x.device, x.node))

    await h.presence.set_offline([loc(1, "phone", "gw-1")])  # only that (device, node) goes
    assert await located(h, [1]) == {1: {loc(1, "web", "gw-2"), loc(1, "desktop", "gw-1"), loc(1, "phone", "gw-3")}}
    await h.presence.set_offline([loc(1, "web", "gw-2"), loc(1, "desktop", "gw-1"), loc(1, "phone", "gw-3")])
    assert await h.presence.locate([1]) == {}  # a user with no entry left is left out


async def test_entries_expire_after_ttl(presence_harness: PresenceHarness) -> None:
    h = presence_harness
    await h.presence.set_online([loc(1, "phone", "gw-1")], h.ttl)
    await h.presence.set_online([loc(1, "web", "gw-1"), loc(2, "web", "gw-2")], h.ttl * 10)
    await h.advance(h.ttl * 0.5)
    assert await located(h, [1, 2]) == {1: {loc(1, "phone", "gw-1"), loc(1, "web", "gw-1")}, 2: {loc(2, "web", "gw-2")}}
    await h.advance(h.ttl)
    assert await located(h, [1, 2]) == {1: {loc(1, "web", "gw-1")}, 2: {loc(2, "web", "gw-2")}}


async def test_refresh_extends_ttl(presence_harness: PresenceHarness) -> None:
    h = presence_harness
    await h.presence.set_online([loc(1, "phone", "gw-1"), loc(2, "phone", "gw-1")], h.ttl)
    await h.advance(h.ttl * 0.6)
    await h.presence.set_online([loc(1, "phone", "gw-1")], h.ttl)  # only user 1 refreshes
    await h.advance(h.ttl * 0.6)
    assert await located(h, [1, 2]) == {1: {loc(1, "phone", "gw-1")}}  # 2 expired, 1 lives on
    await h.advance(h.ttl * 0.6)
    assert await h.presence.locate([1, 2]) == {}


async def test_back_online_after_expiry(presence_harness: PresenceHarness) -> None:
    h = presence_harness
    await h.presence.set_online([loc(1, "phone", "gw-1")], h.ttl)
    await h.advance(h.ttl * 1.5)
    assert await h.presence.locate([1]) == {}
    await h.presence.set_online([loc(1, "phone", "gw-2")], h.ttl)
    assert await located(h, [1]) == {1: {loc(1, "phone", "gw-2")}}


async def test_a_refresh_says_which_entries_were_not_there(presence_harness: PresenceHarness) -> None:
    """What a gateway needs to tell that presence lost its devices (its data emptied, entries expired):
    they were routed to nowhere meanwhile and must check the log."""
    h = presence_harness
    first = await h.presence.refresh([loc(1, "phone", "gw-1", "c1"), loc(2, "web", "gw-1")], h.ttl)
    assert (first.left_out, first.absent) == ([], [loc(1, "phone", "gw-1", "c1"), loc(2, "web", "gw-1")])
    again = await h.presence.refresh([loc(1, "phone", "gw-1", "c1"), loc(2, "web", "gw-1")], h.ttl)
    assert (again.left_out, again.absent) == ([], [])  # live: nothing lost
    await h.presence.set_offline([loc(2, "web", "gw-1")])
    await h.presence.set_online([loc(3, "phone", "gw-1")], h.ttl)
    await h.advance(h.ttl * 0.6)
    await h.presence.set_online([loc(1, "phone", "gw-1", "c1")], h.ttl)
    await h.advance(h.ttl * 0.6)  # 3's entry expired, 1's lives on
    later = await h.presence.refresh([loc(u, d, "gw-1") for u, d in ((1, "phone"), (2, "web"), (3, "phone"))], h.ttl)
    assert later.absent == [loc(2, "web", "gw-1"), loc(3, "phone", "gw-1")]
    # Left out (claimed on another node since) is not written, so not reported absent either.
    await h.presence.claim([loc(1, "phone", "gw-2", "c2")], h.ttl)
    moved = await h.presence.refresh([loc(1, "phone", "gw-1", "c1")], h.ttl)
    assert (moved.left_out, moved.absent) == ([loc(1, "phone", "gw-1", "c1")], [])


async def test_a_claim_hands_back_the_previous_holder_wherever_it_is(presence_harness: PresenceHarness) -> None:
    h, ttl = presence_harness, presence_harness.ttl * 10  # nothing here waits for an expiry
    p = h.presence
    await p.set_online([loc(1, "web", "gw-1")], ttl)  # another device of the user: never touched
    assert await p.claim([loc(1, "phone", "gw-1", "x")], ttl) == []
    assert await located(h, [1]) == {1: {loc(1, "web", "gw-1"), loc(1, "phone", "gw-1")}}
    assert await p.claim([loc(1, "phone", "gw-1", "x")], ttl) == []  # claiming again: nothing displaced

    # Another node: the older holder is handed back, its entry removed at once.
    assert await p.claim([loc(1, "phone", "gw-2", "y")], ttl) == [loc(1, "phone", "gw-1", "x")]
    assert await located(h, [1]) == {1: {loc(1, "web", "gw-1"), loc(1, "phone", "gw-2")}}
    # The older connection's refresh (its node missed the request to close it) is left out and handed
    # back; its removal does not touch the newer entry.
    assert await p.set_online([loc(1, "phone", "gw-1", "x"), loc(1, "web", "gw-1")], ttl) == [
        loc(1, "phone", "gw-1", "x")
    ]
    await p.set_offline([loc(1, "phone", "gw-1", "x")])
    assert await located(h, [1]) == {1: {loc(1, "web", "gw-1"), loc(1, "phone", "gw-2")}}
    assert await p.set_online([loc(1, "phone", "gw-2", "y")], ttl) == []  # the holder refreshes freely

    # The same node: the older holder is handed back too; the node's one entry stays, and the older
    # connection's late removal leaves it to the newer one.
    assert await p.claim([loc(1, "phone", "gw-2", "z")], ttl) == [loc(1, "phone", "gw-2", "y")]
    await p.set_offline([loc(1, "phone", "gw-2", "y")])
    assert await located(h, [1]) == {1: {loc(1, "web", "gw-1"), loc(1, "phone", "gw-2")}}
    # A late refresh of the older one (it raced the newer claim) does not take the device back.
    assert await p.set_online([loc(1, "phone", "gw-2", "y")], ttl) == []
    assert await p.claim([loc(1, "phone", "gw-3", "v")], ttl) == [loc(1, "phone", "gw-2", "z")]
    assert await p.claim([loc(1, "phone", "gw-2", "z")], ttl) == [loc(1, "phone", "gw-3", "v")]
    await p.set_offline([loc(1, "phone", "gw-2", "z")])
    assert await located(h, [1]) == {1: {loc(1, "web", "gw-1")}}
    # The device's holder left: a connection that claims it next displaces no one.
    assert await p.claim([loc(1, "phone", "gw-1", "w")], ttl) == []


async def test_claims_apply_in_order_and_leave_one_holder(presence_harness: PresenceHarness) -> None:
    h, ttl = presence_harness, presence_harness.ttl * 10
    p = h.presence
    # In one call, in order: each claim displaces the one before it; other users are independent.
    batch = [loc(1, "phone", "gw-1", "a"), loc(2, "phone", "gw-1", "b"), loc(1, "phone", "gw-2", "c")]
    assert await p.claim(batch, ttl) == [loc(1, "phone", "gw-1", "a")]
    assert await located(h, [1, 2]) == {1: {loc(1, "phone", "gw-2")}, 2: {loc(2, "phone", "gw-1")}}

    # Near-simultaneous claims of one device from many nodes (concurrent calls): each but the last
    # applied is handed back exactly once, and the one never handed back is the only entry left.
    claims = [loc(3, "phone", f"gw-{i}", f"c{i}") for i in range(12)]
    results = await asyncio.gather(*(p.claim([c], ttl) for c in claims))
    handed_back = [prev for result in results for prev in result]
    assert len(handed_back) == len(set(handed_back)) == len(claims) - 1
    (survivor,) = set(claims) - set(handed_back)
    assert await located(h, [3]) == {3: {loc(3, "phone", survivor.node)}}
    left_out = await p.set_online(claims, ttl)  # every displaced connection's refresh is left out
    assert sorted(left_out, key=lambda e: e.node) == sorted(handed_back, key=lambda e: e.node)


async def test_an_expired_holder_is_not_handed_back(presence_harness: PresenceHarness) -> None:
    h = presence_harness
    p = h.presence
    await p.claim([loc(1, "phone", "gw-1", "x")], h.ttl)
    await h.advance(h.ttl * 1.5)  # its node died without a word
    assert await p.claim([loc(1, "phone", "gw-2", "y")], h.ttl) == []
    await h.advance(h.ttl * 1.5)  # and so did the next: a refresh of the first takes the device back
    assert await p.set_online([loc(1, "phone", "gw-1", "x")], h.ttl) == []
    assert await located(h, [1]) == {1: {loc(1, "phone", "gw-1")}}


async def test_lifecycle(presence_harness: PresenceHarness) -> None:
    async def probe(presence: Presence) -> None:
        assert await presence.locate([10**9]) == {}

    await check_lifecycle(presence_harness.unstarted, probe)
