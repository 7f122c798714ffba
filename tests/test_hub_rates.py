"""The hub's shared rate limits, in process: one limiter call per event-loop turn (never one per frame),
and every send answered in order, on a real ``EmbeddedServer``."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from im.backends.rate_limit import Hit, RateLimiter, Rule
from im.config import load_config
from im.gateway.rates import lease_size
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


@asynccontextmanager
async def embedded(tmp_path: Path, sends_per_user: str) -> AsyncIterator[EmbeddedServer]:
    config = load_config(
        None,
        {
            "data_dir": str(tmp_path / "data"),
            "log_level": "warning",
            "http": {"port": 0},
            "gateway": {"ws_port": 0, "tcp_port": 0},
            "auth": {"argon2_time_cost": 1, "argon2_memory_kib": 1024, "argon2_parallelism": 1},
            "rates": {**RELAXED_RATES_CONFIG, "sends_per_user": sends_per_user},
        },
    )
    srv = EmbeddedServer(config)
    ready = asyncio.Event()
    task = asyncio.create_task(srv.run(lambda _: ready.set()))
    await asyncio.wait_for(ready.wait(), 20)
    yield srv
    srv.request_stop()
    await asyncio.wait_for(task, 20)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[EmbeddedServer]:
    async with embedded(tmp_path, "150/600") as srv:
        yield srv


async def test_one_limiter_call_per_loop_turn_and_sends_answered_in_order(server: EmbeddedServer) -> None:
    api = f"{server.http_url}/api/v1"
    alice = await register(api, f"alice_{uuid.uuid4().hex[:6]}")
    bob = await register(api, f"bob_{uuid.uuid4().hex[:6]}")
    counting = Counting(server.hub.rates._limiter)  # type: ignore[arg-type]
    server.hub.rates._limiter = counting
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


def test_lease_size_keeps_small_budgets_exact() -> None:
    assert lease_size(Rule("r", 150, 600)) == 1  # below 512 units: one unit per limiter call
    assert lease_size(Rule("r", 2048, 600)) == 8
    assert lease_size(Rule("r", 6000, 2)) == 23  # the default sends_per_user
    assert lease_size(Rule("r", 10**6, 1)) == 32


async def test_leased_sends_never_exceed_the_users_budget(tmp_path: Path) -> None:
    """Four devices of one user draw from one budget of 2,048 sends (leases of 8 units, decided inline by
    the in-memory limiter): no more than the budget is acked, and at most the units the devices still
    hold (4 x 8) go unused; every refusal is rate_limited with a retry time, or (sends after a refused
    one) unavailable until that one is resent."""
    async with embedded(tmp_path, "2048/86400") as server:  # refills about one unit a minute
        api = f"{server.http_url}/api/v1"
        alice = await register(api, f"alice_{uuid.uuid4().hex[:6]}")
        bob = await register(api, f"bob_{uuid.uuid4().hex[:6]}")
        devices = [ChatClient(server.ws_url, alice, f"dev{d}") for d in range(4)]
        for dev in devices:
            assert (await dev.connect())["t"] == "auth_ok"
        try:
            for n, dev in enumerate(devices):
                frames = [json.dumps({"t": "send", "cmid": f"d{n}-{i}", "to": bob.uid, "body": i}) for i in range(600)]
                await asyncio.gather(*(dev.ws.send(f) for f in frames))
            for dev in devices:

                def all_answered(dev: ChatClient = dev) -> bool:
                    return len(dev.acks) + len(dev.errors) == 600

                def answers(dev: ChatClient = dev) -> str:
                    return f"{len(dev.acks)} acks, {len(dev.errors)} errors"

                await eventually(all_answered, answers)
            acked = sum(len(dev.acks) for dev in devices)
            assert 2048 - 4 * 8 <= acked <= 2048 + 1, acked  # (+1: a unit that came back meanwhile)
            errors = [e for dev in devices for e in dev.errors]
            limited = [e for e in errors if e["code"] == "rate_limited"]
            assert limited and all(e["retry_after"] > 0 for e in limited)
            # The sends after a refused one wait for it to be resent (docs/protocol.md section 8, "Sender order").
            held = [e for e in errors if e["code"] != "rate_limited"]
            assert all(e["code"] == "unavailable" and "resend it first" in e["message"] for e in held), held[:3]
        finally:
            for dev in devices:
                await dev.close()
