"""The :class:`Presence` contract, run against every implementation (see ``conftest.PRESENCES``)."""

from __future__ import annotations

from im.backends.presence import Presence
from im.model.cluster import DeviceLocation
from tests.contract.conftest import PresenceHarness
from tests.contract.lifecycle import check_lifecycle


def loc(uid: int, device: str, node: str) -> DeviceLocation:
    return DeviceLocation(uid, device, node)


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


async def test_lifecycle(presence_harness: PresenceHarness) -> None:
    async def probe(presence: Presence) -> None:
        assert await presence.locate([10**9]) == {}

    await check_lifecycle(presence_harness.unstarted, probe)
