"""The :class:`RateLimiter` contract, run against every implementation (memory, and Redis on 6379 under a
private key prefix; no skip when Redis is down). Redis has no injectable clock, so its harness lets real
time pass: rules here have short periods, with margins for a busy 2-core machine."""

from __future__ import annotations

import abc
import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.exceptions

from im.backends.rate_limit import FailOpen, Hit, RateLimiter, Rule
from im.backends.rate_limit.memory import MemoryRateLimiter
from im.backends.rate_limit.redis import RedisRateLimiter
from tests.contract.conftest import REDIS_URL, FakeClock, delete_redis_prefix
from tests.contract.lifecycle import check_lifecycle
from tests.support.tls_redis import shared_tls_redis


class LimiterHarness(abc.ABC):
    limiter: RateLimiter

    @abc.abstractmethod
    async def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass for the limiter (a fake clock, or a real sleep)."""

    @abc.abstractmethod
    async def peer(self) -> RateLimiter:
        """Another limiter on the same storage, as a second node would hold."""

    @abc.abstractmethod
    def unstarted(self) -> RateLimiter:
        """A new, not yet started limiter on the same storage."""

    async def close(self) -> None:  # noqa: B027 - optional
        pass


class MemoryHarness(LimiterHarness):
    def __init__(self) -> None:
        self.clock = FakeClock()
        self.limiter = MemoryRateLimiter(clock=self.clock)

    async def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    async def peer(self) -> RateLimiter:
        return self.limiter  # one process: the same object is the whole storage

    def unstarted(self) -> RateLimiter:
        return MemoryRateLimiter(clock=self.clock)


class RedisHarness(LimiterHarness):
    def __init__(self) -> None:
        self.prefix = f"im-test-{uuid.uuid4().hex[:12]}:"
        self.redis = RedisRateLimiter(REDIS_URL, prefix=self.prefix)
        self.limiter = self.redis
        self._peers: list[RedisRateLimiter] = []

    async def advance(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def peer(self) -> RateLimiter:
        other = RedisRateLimiter(REDIS_URL, prefix=self.prefix)  # its own connection pool
        self._peers.append(other)
        return other

    def unstarted(self) -> RateLimiter:
        return RedisRateLimiter(REDIS_URL, prefix=self.prefix)  # its own pool, closed by close()

    async def close(self) -> None:
        try:
            await delete_redis_prefix(self.redis.client, self.prefix)
        finally:
            for p in [self.redis, *self._peers]:
                await p.close()


class RedisTlsHarness(RedisHarness):
    """The same on a private Redis that speaks only TLS and requires a client certificate."""

    def __init__(self) -> None:
        self.prefix = f"im-test-{uuid.uuid4().hex[:12]}:"
        self.redis = self.unstarted()
        self.limiter = self.redis
        self._peers: list[RedisRateLimiter] = []

    async def peer(self) -> RateLimiter:
        other = self.unstarted()
        self._peers.append(other)
        return other

    def unstarted(self) -> RedisRateLimiter:
        r = shared_tls_redis()
        return RedisRateLimiter(r.url, prefix=self.prefix, tls=r.client_tls())


@pytest.fixture(
    params=[
        pytest.param(MemoryHarness, id="memory"),
        pytest.param(RedisHarness, id="redis"),
        pytest.param(RedisTlsHarness, id="redis-tls"),
    ]
)
async def h(request: pytest.FixtureRequest) -> AsyncIterator[LimiterHarness]:
    harness: LimiterHarness = request.param()
    yield harness
    await harness.close()


def hits(rule: Rule, key: str, n: int, cost: int = 1) -> list[Hit]:
    return [Hit(rule, key, cost)] * n


async def test_burst_then_refusal_with_retry_time(h: LimiterHarness) -> None:
    rule = Rule("send", limit=5, period=10.0)  # one unit back every 2 s
    assert await h.limiter.check(hits(rule, "1", 5)) == [0.0] * 5
    [wait] = await h.limiter.check([Hit(rule, "1")])
    assert 1.5 < wait <= 2.0 + 1e-6  # the next unit is about 2 s away (less the time the calls took)
    # A refusal takes nothing: asking again gives (about) the same wait, not a longer one.
    [again] = await h.limiter.check([Hit(rule, "1")])
    assert 1.5 < again <= wait + 1e-6


async def test_hits_of_one_call_are_decided_in_order(h: LimiterHarness) -> None:
    rule = Rule("send", limit=3, period=60.0)
    got = await h.limiter.check([*hits(rule, "a", 4), Hit(rule, "b"), Hit(rule, "a")])
    assert [w == 0.0 for w in got] == [True, True, True, False, True, False]
    assert got[3] > 15.0 and got[5] > 15.0  # 20 s per unit


async def test_keys_and_rules_have_separate_budgets(h: LimiterHarness) -> None:
    user, conv = Rule("user", 2, 60.0), Rule("conv", 2, 60.0)
    assert await h.limiter.check([*hits(user, "1", 2), *hits(conv, "1", 2), *hits(user, "2", 2)]) == [0.0] * 6
    got = await h.limiter.check([Hit(user, "1"), Hit(conv, "1"), Hit(user, "2"), Hit(user, "3")])
    assert [w > 0 for w in got] == [True, True, True, False]


async def test_cost_counts_units_and_oversized_hits_never_pass(h: LimiterHarness) -> None:
    quota = Rule("bytes", limit=1000, period=3600.0)
    assert await h.limiter.check([Hit(quota, "7", 600)]) == [0.0]
    [wait] = await h.limiter.check([Hit(quota, "7", 600)])  # 200 more units needed: 720 s
    assert 700 < wait <= 720 + 1e-6
    assert await h.limiter.check([Hit(quota, "7", 400)]) == [0.0]  # what remains still fits
    [never] = await h.limiter.check([Hit(quota, "8", 1001)])  # beyond the burst: refused, even fresh
    assert never == 3600.0
    assert await h.limiter.check([Hit(quota, "8", 1000)]) == [0.0]  # and it took nothing


async def test_budget_comes_back_at_the_rule_rate(h: LimiterHarness) -> None:
    rule = Rule("typing", limit=4, period=0.8)  # a unit every 0.2 s
    assert await h.limiter.check(hits(rule, "1", 4)) == [0.0] * 4
    [wait] = await h.limiter.check([Hit(rule, "1")])
    assert 0 < wait <= 0.2 + 1e-6
    await h.advance(wait + 0.05)
    got = await h.limiter.check(hits(rule, "1", 2))
    assert got[0] == 0.0 and got[1] > 0  # one unit came back, not two
    await h.advance(0.85)  # a whole period: the full burst is back
    assert await h.limiter.check(hits(rule, "1", 4)) == [0.0] * 4


async def test_two_nodes_share_one_budget(h: LimiterHarness) -> None:
    rule = Rule("send", limit=10, period=60.0)
    other = await h.peer()
    first, second = await asyncio.gather(h.limiter.check(hits(rule, "42", 6)), other.check(hits(rule, "42", 6)))
    allowed = [w == 0.0 for w in first + second]
    assert allowed.count(True) == 10  # not 10 each
    assert await other.check([Hit(rule, "42")]) != [0.0]
    assert await h.limiter.check([Hit(rule, "43")]) == [0.0]


async def test_empty_batch(h: LimiterHarness) -> None:
    assert await h.limiter.check([]) == []


async def test_many_hits_in_one_call(h: LimiterHarness) -> None:
    rule = Rule("recv", limit=1000, period=60.0)
    batch = [Hit(rule, str(i % 50)) for i in range(2500)]  # 50 per key
    assert await h.limiter.check(batch) == [0.0] * 2500
    got = await h.limiter.check([Hit(rule, str(i), 951) for i in range(50)])
    assert all(w > 0 for w in got)  # 50 taken + 951 > 1000


async def test_redis_keys_expire_with_a_full_budget() -> None:
    harness = RedisHarness()
    try:
        rule = Rule("short", limit=2, period=0.5)
        await harness.limiter.check(hits(rule, "1", 2))
        ttl = await harness.redis.client.pttl(f"{harness.prefix}rl:short:1")
        assert 0 < ttl <= 501
    finally:
        await harness.close()


async def test_memory_sweeps_full_budgets() -> None:
    clock = FakeClock()
    limiter = MemoryRateLimiter(clock=clock, max_keys=10)
    rule = Rule("r", limit=1, period=1.0)
    await limiter.check([Hit(rule, str(i)) for i in range(10)])
    clock.advance(2.0)
    await limiter.check([Hit(rule, "x"), Hit(rule, "y")])
    assert len(limiter._tat) == 2  # the ten old keys held nothing and were dropped


async def test_fail_open_allows_when_the_engine_is_away() -> None:
    down = RedisRateLimiter("redis://127.0.0.1:1/0", prefix="im-test-down:", timeout=0.5)
    limiter = FailOpen(down)
    try:
        rule = Rule("r", limit=1, period=60.0)
        with pytest.raises(redis.exceptions.ConnectionError):
            await down.check([Hit(rule, "1")])
        assert await limiter.check([Hit(rule, "1"), Hit(rule, "1")]) == [0.0, 0.0]
        assert limiter.failures == 1
    finally:
        await limiter.close()


async def test_lifecycle(h: LimiterHarness) -> None:
    async def probe(limiter: RateLimiter) -> None:
        assert len(await limiter.check([Hit(Rule("probe", 1, 60.0), "1")])) == 1  # storage shared: allowed once

    await check_lifecycle(h.unstarted, probe)


async def test_fail_open_starts_and_closes_the_limiter_it_wraps_once(h: LimiterHarness) -> None:
    async def probe(limiter: RateLimiter) -> None:
        assert await limiter.check([]) == []

    inner: list[RateLimiter] = []

    def make() -> RateLimiter:
        inner.append(h.unstarted())
        return FailOpen(inner[-1])

    await check_lifecycle(make, probe)
    assert all(limiter.closed for limiter in inner)
    assert [limiter.started for limiter in inner] == [False] * len(inner)


def test_rule_validation() -> None:
    for bad in [("", 1, 1.0), ("a:b", 1, 1.0), ("a", 0, 1.0), ("a", 1, 0.0)]:
        with pytest.raises(ValueError):
            Rule(*bad)
