"""The push dedupe: the same contract on the in-memory and the Redis implementation."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from im.backends.dedupe import Dedupe
from im.backends.dedupe.memory import MemoryDedupe
from im.backends.dedupe.redis import RedisDedupe
from tests.contract.conftest import REDIS_URL, FakeClock, delete_redis_prefix


@pytest.fixture(params=["memory", "redis"])
async def dedupe(request: pytest.FixtureRequest) -> AsyncIterator[Dedupe]:
    if request.param == "memory":
        yield MemoryDedupe(ttl=60)
        return
    client = aioredis.Redis.from_url(REDIS_URL)
    prefix = f"im:test:push:{secrets.token_hex(4)}:"
    try:
        await client.ping()
    except Exception as exc:
        pytest.fail(f"Redis at {REDIS_URL} is unreachable ({type(exc).__name__}: {exc})")
    yield RedisDedupe(client, prefix=prefix, ttl=60)
    await delete_redis_prefix(client, prefix)
    await client.aclose()


async def test_recorded_keys_are_seen(dedupe: Dedupe) -> None:
    assert not await dedupe.seen("1")
    await dedupe.record("1")
    await dedupe.record("1")  # recording twice is harmless
    assert await dedupe.seen("1")
    assert not await dedupe.seen("2")


async def test_memory_dedupe_forgets_after_ttl_and_beyond_max_keys() -> None:
    clock = FakeClock()
    d = MemoryDedupe(ttl=10, max_keys=2, clock=clock)
    await d.record("a")
    clock.advance(11)
    assert not await d.seen("a")
    await d.record("b")
    await d.record("c")
    await d.record("d")  # pushes "b" out
    assert [await d.seen(k) for k in "bcd"] == [False, True, True]
