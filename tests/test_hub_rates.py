"""The hub's shared rate limits, in process: one limiter call per event-loop turn (never one per frame),
and every send answered in order, on a real ``EmbeddedServer``."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from im.backends.rate_limiter import Hit, RateLimiter
from im.config import load_config
from im.server import EmbeddedServer
from tests.support.client import ChatClient, register
from tests.support.server import RELAXED_RATES_CONFIG
from tests.support.wait import eventually


class Counting(RateLimiter):
    """Counts calls and hits on the way to the real limiter."""

    def __init__(self, inner: RateLimiter) -> None:
        self.inner = inner
        self.calls: list[int] = []

    async def check(self, hits: Sequence[Hit]) -> list[float]:
        self.calls.append(len(hits))
        return await self.inner.check(hits)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[EmbeddedServer]:
    config = load_config(None, {
        "data_dir": str(tmp_path / "data"),
        "log_level": "warning",
        "http": {"port": 0},
        "gateway": {"ws_port": 0, "tcp_port": 0},
        "auth": {"argon2_time_cost": 1, "argon2_memory_kib": 1024, "argon2_parallelism": 1},
        "rates": {**RELAXED_RATES_CONFIG, "sends_per_user": "150/600"},
    })
    srv = EmbeddedServer(config)
    ready = asyncio.Event()
    task = asyncio.create_task(srv.run(lambda _: ready.set()))
    await asyncio.wait_for(ready.wait(), 20)
    yield srv
    srv.request_stop()
    await asyncio.wait_for(task, 20)


async def test_one_limiter_call_per_loop_turn_and_sends_answered_in_order(server: EmbeddedServer) -> None:
    api = f"{server.http_url}/api/v1"
    alice = await register(api, f"alice_{uuid.uuid4().hex[:6]}")
    bob = await register(api, f"bob_{uuid.uuid4().hex[:6]}")
    counting = Counting(server.hub._limiter)  # type: ignore[arg-type]
    server.hub._limiter = counting
    c = ChatClient(server.ws_url, alice, "phone")
    assert (await c.connect())["t"] == "auth_ok"
    try:
        cmids = [f"m{i}" for i in range(200)]
        frames = [json.dumps({"t": "send", "cmid": m, "to": bob.uid, "body": i}) for i, m in enumerate(cmids)]
        await asyncio.gather(*(c.ws.send(f) for f in frames))  # written back to back
        await eventually(lambda: len(c.acks) + len(c.errors) == 200, lambda: f"{len(c.acks)} acks {c.errors[:2]}")
        sends = sum(counting.calls) // 2  # two hits per send
        assert sends == 200
        assert len(counting.calls) < 100, counting.calls  # batched: far fewer calls than sends
        # The user's budget is 150: the first 150 sends pass, the last 50 are refused, none out of order.
        assert sorted(c.acks, key=lambda m: int(m[1:])) == cmids[:150]
        assert [e["ref"] for e in c.errors] == cmids[150:]
        seqs = [c.acks[m]["seq"] for m in cmids[:150]]
        assert seqs == sorted(seqs)
    finally:
        await c.close()
