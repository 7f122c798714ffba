"""The push consumer's dedupe in Redis, as the composition root builds it (``events.dedupe=redis``):
kept under the cluster's ``presence.redis_prefix`` (clusters sharing a Redis do not share records), and
bounded in time, so that a hung Redis fails the event's attempt instead of stalling the consumer (its
attempt is then tried again in place: im.events.push)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest
import redis.asyncio as aioredis
import redis.exceptions

from im.compose import build_push_dedupe
from im.config import Config, load_config
from im.faultproxy import FaultProxy
from tests.contract.conftest import REDIS_URL


@pytest.fixture
def proxy() -> Iterator[FaultProxy]:
    host, port = REDIS_URL.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)
    p = FaultProxy((host, int(port)))
    p.start()
    try:
        yield p
    finally:
        p.close()


def config_through(proxy: FaultProxy, prefix: str) -> Config:
    return load_config(
        overrides={
            "presence": {"kind": "redis", "redis_url": f"redis://{proxy.address}/0", "redis_prefix": prefix},
            "events": {"kind": "rabbitmq", "webhook_url": "http://127.0.0.1:9/hook", "dedupe": "redis"},
        }
    )


async def test_records_are_kept_under_the_clusters_prefix(proxy: FaultProxy) -> None:
    prefix = f"imtest{uuid.uuid4().hex[:8]}:"
    mid = str(uuid.uuid4().int >> 64)
    async with build_push_dedupe(config_through(proxy, prefix)) as dedupe:
        assert not await dedupe.seen(mid)
        await dedupe.record(mid)
        assert await dedupe.seen(mid)
    async with build_push_dedupe(config_through(proxy, f"other{prefix}")) as other:
        assert not await other.seen(mid), "another cluster's prefix saw this cluster's record"
    direct = aioredis.from_url(REDIS_URL)
    try:
        assert await direct.exists(f"{prefix}push:{mid}") == 1
        await direct.delete(f"{prefix}push:{mid}")
    finally:
        await direct.aclose()


async def test_a_hung_redis_fails_the_call_within_the_timeout(proxy: FaultProxy) -> None:
    """The call raises the client's own time-out. Without one it would wait for ever: the test's bound
    (20 times the client's 0.5 s) stops it, and that is a failure too."""
    async with build_push_dedupe(config_through(proxy, "imtest:"), timeout=0.5) as dedupe:
        assert not await dedupe.seen("warm")  # connected
        proxy.blackhole()
        try:
            async with asyncio.timeout(10):
                with pytest.raises(redis.exceptions.TimeoutError):
                    await dedupe.seen("while-hung")
        finally:
            proxy.heal()
