"""What :class:`RedisPresence` promises beyond the shared contract: one round trip per call, whatever its
size; per-device expiry; recovery from lost keys by the gateways' refresh. Needs the Redis at
``REDIS_URL``: these tests fail, never skip, when it is down."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterable

import pytest
import redis.asyncio as aioredis
import redis.exceptions

from im.backends.presence.redis import RedisPresence
from im.model.cluster import DeviceLocation
from im.procs import free_port
from tests.contract.conftest import REDIS_URL, delete_redis_prefix

TTL = 0.5


def loc(uid: int, device: str, node: str) -> DeviceLocation:
    return DeviceLocation(uid, device, node)


class CountingConnection(aioredis.Connection):
    """Counts writes to the socket: a pipeline is one write, so writes are round trips."""

    sends = 0

    async def send_packed_command(self, command: bytes | str | Iterable[bytes], check_health: bool = True) -> None:
        type(self).sends += 1
        await super().send_packed_command(command, check_health)


class Counted:
    def __init__(self, presence: RedisPresence, prefix: str) -> None:
        self.presence = presence
        self.prefix = prefix

    @property
    def round_trips(self) -> int:
        return CountingConnection.sends

    def reset(self) -> None:
        CountingConnection.sends = 0

    async def keys(self) -> list[bytes]:
        return [k async for k in self.presence.client.scan_iter(match=f"{self.prefix}*", count=1000)]


@pytest.fixture
async def counted() -> AsyncIterator[Counted]:
    prefix = f"im-test-{uuid.uuid4().hex[:12]}:"
    client = aioredis.Redis.from_pool(aioredis.ConnectionPool.from_url(REDIS_URL, connection_class=CountingConnection))
    await client.ping()  # connect (HELLO, CLIENT SETINFO) before counting
    c = Counted(RedisPresence(prefix=prefix, client=client), prefix)
    c.reset()
    yield c
    try:
        await delete_redis_prefix(client, prefix)
    finally:
        await c.presence.close()  # not the owner: leaves the client open
        await client.aclose()


async def test_each_call_is_one_round_trip_whatever_its_size(counted: Counted) -> None:
    p = counted.presence
    entries = [loc(uid, dev, f"gw-{uid % 3}") for uid in range(2500) for dev in ("phone", "web")]  # 3 chunks
    await p.set_online(entries, 30)
    assert counted.round_trips == 1

    counted.reset()
    found = await p.locate(range(2500))
    assert counted.round_trips == 1
    assert len(found) == 2500 and {d.device for d in found[1234]} == {"phone", "web"}

    counted.reset()
    await p.set_offline(entries[::2])  # every phone
    assert counted.round_trips == 1
    assert {d.device for locs in (await p.locate(range(2500))).values() for d in locs} == {"web"}

    counted.reset()  # nothing to do: no round trip at all
    await p.set_online([], 30)
    await p.set_offline([])
    assert await p.locate([]) == {}
    assert counted.round_trips == 0


async def test_a_claim_is_one_round_trip_and_its_holders_expire_with_the_entries(counted: Counted) -> None:
    p = counted.presence
    long = 30.0  # the claims must outlive a slow machine's round trips; the expiry is checked below
    claims = [DeviceLocation(uid, "phone", "gw-1", f"c{uid}") for uid in range(2500)]  # 3 chunks
    assert await p.claim(claims, long) == []
    assert counted.round_trips == 1
    counted.reset()
    newer = [DeviceLocation(uid, "phone", "gw-2", f"n{uid}") for uid in range(2500)]
    assert await p.claim(newer, long) == claims  # every older holder handed back, in order
    assert counted.round_trips == 1
    holders, entries = await p.client.pttl(p.holders_key(7)), await p.client.pttl(p.key(7))
    assert 0 < holders <= long * 1000 and abs(holders - entries) < 5000  # the holders live as the entries do
    await p.claim(newer, TTL)  # claimed again, with a short lease: holders and entries both expire with it
    await asyncio.sleep(TTL * 1.5)
    assert await counted.keys() == []  # nothing left behind
    with pytest.raises(ValueError, match="connection id"):
        await p.claim([DeviceLocation(1, "phone", "gw-1", "")], TTL)


async def test_locate_a_thousand_users_in_one_call(counted: Counted) -> None:
    p = counted.presence
    online = range(0, 2000, 2)  # 1,000 users online; their odd neighbours are not
    await p.set_online([loc(uid, "phone", f"gw-{uid % 5}") for uid in online], 30)
    counted.reset()
    found = await p.locate([*online, *range(1, 2000, 2), 0, 0])  # absent and repeated uids are fine
    assert counted.round_trips == 1
    assert found == {uid: [loc(uid, "phone", f"gw-{uid % 5}")] for uid in online}


async def test_one_device_expires_while_another_of_the_same_user_stays(counted: Counted) -> None:
    p = counted.presence
    await p.set_online([loc(1, "phone", "gw-1")], TTL)
    await p.set_online([loc(1, "web", "gw-2")], TTL * 3)
    key = p.key(1)
    assert TTL * 2 * 1000 < await p.client.pttl(key) <= TTL * 3 * 1000  # the key lives as its longest entry
    await asyncio.sleep(TTL * 1.5)
    assert await p.locate([1]) == {1: [loc(1, "web", "gw-2")]}
    assert await p.client.zcard(key) == 2  # the expired member is only skipped, until the next write
    await p.set_online([loc(1, "desktop", "gw-2")], TTL)
    assert await p.client.zcard(key) == 2  # that write pruned it
    await asyncio.sleep(TTL * 2)
    assert await p.locate([1]) == {}
    assert await counted.keys() == []  # nothing left behind once every entry expired


async def test_lost_keys_come_back_with_the_next_refresh(counted: Counted) -> None:
    # What a Redis restart (nothing on disk) or flush does, on this prefix only; the gateways re-announce
    # their sessions every ttl/3, which this second set_online stands for.
    p = counted.presence
    sessions = [loc(uid, "phone", "gw-1") for uid in range(100)]
    await p.set_online(sessions, 30)
    assert await delete_redis_prefix(p.client, counted.prefix) == 100
    assert await p.locate(range(100)) == {}
    await p.set_online(sessions, 30)
    assert await p.locate(range(100)) == {e.uid: [e] for e in sessions}


async def test_names_round_trip_and_prefixes_do_not_mix(counted: Counted) -> None:
    p = counted.presence
    odd = loc(1, "dev|with|bars ünïcode", "gw-1")
    await p.set_online([odd], 30)
    assert await p.locate([1]) == {1: [odd]}
    with pytest.raises(ValueError, match="node name"):
        await p.set_online([loc(1, "phone", "gw|1")], 30)

    other = RedisPresence(REDIS_URL, prefix=f"{counted.prefix}other:")  # under ours: cleaned up with it
    try:
        assert await other.locate([1]) == {}
        await other.set_online([loc(1, "phone", "gw-9")], 30)
        assert await p.locate([1]) == {1: [odd]}
    finally:
        await other.close()


async def test_an_unreachable_redis_raises() -> None:
    p = RedisPresence(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    try:
        with pytest.raises(redis.exceptions.ConnectionError):
            await p.locate([1])
    finally:
        await p.close()
