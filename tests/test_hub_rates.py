"""The hub's shared rate limits, on a real ``EmbeddedServer``: leases taken a few units per limiter call,
at most one call per event-loop turn (never one per frame), every send answered in order, and no more
sent than the budget, with the in-memory limiter and with Redis (6379, a private key prefix)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from im.backends.rate_limit import Hit, RateLimiter, Rule
from im.config import load_config
from im.gateway.rates import Lease, lease_cap, lease_size
from im.server import EmbeddedServer
from tests.contract.conftest import REDIS_URL, delete_redis_prefix
from tests.support.client import Account, ChatClient, register
from tests.support.server import RELAXED_RATES_CONFIG
from tests.support.wait import eventually


class Counting(RateLimiter):
    """Counts calls and hits on the way to the real limiter (and, having no ``check_now``, makes the
    gateway batch as it does with Redis)."""

    def __init__(self, inner: RateLimiter) -> None:
        self.inner = inner
        self.calls: list[list[Hit]] = []

    async def check(self, hits: Sequence[Hit]) -> list[float]:
        self.calls.append(list(hits))
        return await self.inner.check(hits)

    def hits(self, rule: str) -> list[Hit]:
        return [h for call in self.calls for h in call if h.rule.name.startswith(f"{rule}/")]


@asynccontextmanager
async def embedded(tmp_path: Path, sends_per_user: str, *, redis: bool = False) -> AsyncIterator[EmbeddedServer]:
    presence = {"kind": "redis", "redis_url": REDIS_URL, "redis_prefix": f"im-test-{uuid.uuid4().hex[:12]}:"}
    config = load_config(
        None,
        {
            "data_dir": str(tmp_path / "data"),
            "log_level": "warning",
            "http": {"port": 0},
            "gateway": {"ws_port": 0, "tcp_port": 0},
            "auth": {"argon2_time_cost": 1, "argon2_memory_kib": 1024, "argon2_parallelism": 1},
            "rates": {**RELAXED_RATES_CONFIG, "sends_per_user": sends_per_user},
            **({"presence": presence} if redis else {}),
            # room for 2,100 sends written back to back on one connection (the session's own limits)
            "limits": {"max_in_flight": 4096, "send_rate": 10000.0},
        },
    )
    srv = EmbeddedServer(config)
    ready = asyncio.Event()
    task = asyncio.create_task(srv.run(lambda _: ready.set()))
    await asyncio.wait_for(ready.wait(), 20)
    try:
        yield srv
    finally:
        srv.request_stop()
        await asyncio.wait_for(task, 20)
        if redis:
            client = aioredis.Redis.from_url(REDIS_URL)
            await delete_redis_prefix(client, presence["redis_prefix"])
            await client.aclose()


def counting(server: EmbeddedServer) -> Counting:
    """Put a :class:`Counting` in front of the server's shared limiter."""
    gate = server.hub.rates
    wrapped = Counting(gate._limiter)  # type: ignore[arg-type]
    gate._limiter = wrapped
    return wrapped


async def alice_and_bob(server: EmbeddedServer) -> tuple[Account, Account]:
    """Two new users of ``server`` (alice sends, bob receives)."""
    api = f"{server.http_url}/api/v1"
    return await register(api, f"alice_{uuid.uuid4().hex[:6]}"), await register(api, f"bob_{uuid.uuid4().hex[:6]}")


async def send_all(dev: ChatClient, to: int, n: int, tag: str) -> list[str]:
    """Write ``n`` sends back to back; wait until each is acked or refused; their cmids in order."""
    before = len(dev.acks) + len(dev.errors)
    cmids = [f"{tag}-{i}" for i in range(n)]
    frames = [json.dumps({"t": "send", "cmid": m, "to": to, "body": i}) for i, m in enumerate(cmids)]
    await asyncio.gather(*(dev.ws.send(f) for f in frames))

    def answered() -> bool:
        return len(dev.acks) + len(dev.errors) >= before + n

    await eventually(answered, lambda: f"{len(dev.acks)} acks, {len(dev.errors)} errors", timeout=60)
    return cmids


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[EmbeddedServer]:
    async with embedded(tmp_path, "150/600") as srv:
        yield srv


async def test_one_limiter_call_per_loop_turn_and_sends_answered_in_order(server: EmbeddedServer) -> None:
    alice, bob = await alice_and_bob(server)
    counted = counting(server)
    c = ChatClient(server.ws_url, alice, "phone")
    assert (await c.connect())["t"] == "auth_ok"
    try:
        cmids = [f"m{i}" for i in range(200)]
        frames = [json.dumps({"t": "send", "cmid": m, "to": bob.uid, "body": i}) for i, m in enumerate(cmids)]
        await asyncio.gather(*(c.ws.send(f) for f in frames))  # written back to back
        await eventually(lambda: len(c.acks) + len(c.errors) == 200, lambda: f"{len(c.acks)} acks {c.errors[:2]}")
        # The budget is 150: the first 150 sends pass, the rest are refused, none out of order. A refused
        # send holds its conversation's later sends back (im.model.send_order): those that reach the
        # session after the first refusal came back are refused there, without a limiter call; how many
        # depends on how the 200 frames were split into reads.
        refusals = {e["ref"]: e for e in c.errors}
        assert list(refusals) == cmids[150:], list(refusals)[:3]
        limited = [m for m in cmids[150:] if refusals[m]["code"] == "rate_limited"]
        assert limited == cmids[150 : 150 + len(limited)] and limited, [refusals[m]["code"] for m in cmids[150:]]
        for m in cmids[150 + len(limited) :]:
            assert refusals[m]["code"] == "unavailable" and "resend it first" in refusals[m]["message"], refusals[m]
        # The user's budget (150 units) is too small to lease ahead: one unit per send it decided, exactly.
        assert [h.cost for h in counted.hits("send-user")] == [1] * (150 + len(limited))
        conv = counted.hits("send-conv")  # 10,000 units: leased 32 at a time, then 64, 128 (a busy sender)
        assert conv and conv[0].cost == 32 and len(conv) <= 200 // 32 + 2, conv
        assert [h.cost for h in conv] == sorted(h.cost for h in conv) and max(h.cost for h in conv) <= 256
        assert len(counted.calls) < 100, [len(call) for call in counted.calls]  # batched: far fewer calls
        assert sorted(c.acks, key=lambda m: int(m[1:])) == cmids[:150]
        seqs = [c.acks[m]["seq"] for m in cmids[:150]]
        assert seqs == sorted(seqs)
    finally:
        await c.close()


async def test_sends_after_a_refusal_are_held_back_without_spending_the_budget(server: EmbeddedServer) -> None:
    """What the test above allows for, made certain: once a send was refused ``rate_limited``, the later
    sends of that conversation are refused ``unavailable`` by the session (resend the refused one first)
    and never reach the limiter."""
    alice, bob = await alice_and_bob(server)
    counted = counting(server)
    c = ChatClient(server.ws_url, alice, "phone")
    assert (await c.connect())["t"] == "auth_ok"
    try:
        first = await send_all(c, bob.uid, 151, "a")  # the budget is 150: the last one is refused
        assert [e["ref"] for e in c.errors] == first[150:] and c.errors[0]["code"] == "rate_limited", c.errors
        spent = len(counted.hits("send-user"))
        later = await send_all(c, bob.uid, 10, "b")
        held = c.errors[1:]
        assert [e["ref"] for e in held] == later
        assert all(e["code"] == "unavailable" and "resend it first" in e["message"] for e in held), held[:2]
        assert len(counted.hits("send-user")) == spent  # none of them was decided by the limiter
    finally:
        await c.close()


def test_lease_size_keeps_small_budgets_exact() -> None:
    assert lease_size(Rule("r", 150, 600)) == lease_cap(Rule("r", 150, 600)) == 1  # below 512: one unit per call
    assert (lease_size(Rule("r", 2048, 600)), lease_cap(Rule("r", 2048, 600))) == (8, 64)
    assert (lease_size(Rule("r", 6000, 2)), lease_cap(Rule("r", 6000, 2))) == (23, 187)  # sends_per_user
    assert (lease_size(Rule("r", 10**6, 1)), lease_cap(Rule("r", 10**6, 1))) == (32, 256)


def test_a_busy_lease_grows_to_its_cap_and_a_quiet_one_starts_again_small() -> None:
    lease = Lease(Hit(Rule("r", 6000, 2), "u"))
    sizes, now = [], 100.0
    for _ in range(6):  # refilled every 0.1 s: each refill twice the last, up to the cap
        lease.granted(lease.size, now)
        sizes.append(lease.size)
        now += 0.1
    assert sizes == [23, 46, 92, 184, 187, 187]
    assert lease.credit == 23 + 23 + 46 + 92 + 184 + 187
    lease.granted(1, now)  # one unit (the exact round): held, the size unchanged
    assert (lease.credit, lease.size) == (23 + 23 + 46 + 92 + 184 + 187 + 1, 187)
    lease.granted(187, now + 5)  # refilled after a quiet while: back to the first size
    assert lease.size == 23


async def test_leased_sends_never_exceed_the_users_budget(tmp_path: Path) -> None:
    """Four devices of one user draw from one budget of 2,048 sends (leases of 8 units growing to 64,
    decided inline by the in-memory limiter): no more than the budget is acked, and at most the units the
    devices still hold (4 x 64) go unused; every refusal is rate_limited with a retry time, or (sends
    after a refused one) unavailable until that one is resent."""
    async with embedded(tmp_path, "2048/86400") as server:  # refills about one unit a minute
        alice, bob = await alice_and_bob(server)
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
            assert 2048 - 4 * 64 <= acked <= 2048 + 1, acked  # (+1: a unit that came back meanwhile)
            errors = [e for dev in devices for e in dev.errors]
            limited = [e for e in errors if e["code"] == "rate_limited"]
            assert limited and all(e["retry_after"] > 0 for e in limited)
            # The sends after a refused one wait for it to be resent (docs/protocol.md section 8, "Sender order").
            held = [e for e in errors if e["code"] != "rate_limited"]
            assert all(e["code"] == "unavailable" and "resend it first" in e["message"] for e in held), held[:3]
        finally:
            for dev in devices:
                await dev.close()


async def test_redis_leases_keep_the_limiter_off_most_sends_and_spend_the_budget_exactly(tmp_path: Path) -> None:
    """With Redis, sends are decided from leases too: a connection takes 8 units of a 2,050-unit budget
    per call at first, then more as it keeps sending (up to 64), not one hit per send. When fewer units
    are left than a lease, it takes them one by one (an exact round), so exactly the budget is acked,
    then every further send is refused rate_limited."""
    async with embedded(tmp_path, "2050/86400", redis=True) as server:  # refills about one unit a minute
        alice, bob = await alice_and_bob(server)
        counted = counting(server)
        dev = ChatClient(server.ws_url, alice, "phone")
        assert (await dev.connect())["t"] == "auth_ok"
        try:
            cmids = await send_all(dev, bob.uid, 2100, "a")
            assert 2050 <= len(dev.acks) <= 2051, len(dev.acks)  # (2,051: a unit that came back meanwhile)
            assert sorted(dev.acks, key=lambda m: int(m.split("-")[1])) == cmids[: len(dev.acks)]
            seqs = [dev.acks[m]["seq"] for m in cmids[: len(dev.acks)]]
            assert seqs == sorted(seqs)  # committed in the order sent, leased inline or decided in a call
            refused = [e for e in dev.errors if e["code"] == "rate_limited"]
            assert refused and all(e["retry_after"] > 0 for e in refused)
            user = counted.hits("send-user")
            assert {8, 16, 32, 64} <= {h.cost for h in user}  # the lease grew from 8 units to its cap
            assert any(h.cost == 1 for h in user)  # the exact round took the last units one by one
            assert len(user) < 2100 // 20, len(user)  # far fewer hits than sends
            assert len(counted.calls) < 2100 // 10, len(counted.calls)
        finally:
            await dev.close()


async def test_redis_leases_of_four_devices_never_exceed_the_users_budget(tmp_path: Path) -> None:
    """Four devices of one user on the Redis limiter draw from one budget of 2,048 sends: no more than
    the budget is acked, and at most what the devices still hold (4 x 64 units, a grown lease each) goes unused."""
    async with embedded(tmp_path, "2048/86400", redis=True) as server:
        alice, bob = await alice_and_bob(server)
        devices = [ChatClient(server.ws_url, alice, f"dev{d}") for d in range(4)]
        for dev in devices:
            assert (await dev.connect())["t"] == "auth_ok"
        try:
            await asyncio.gather(*(send_all(dev, bob.uid, 600, f"d{n}") for n, dev in enumerate(devices)))
            acked = sum(len(dev.acks) for dev in devices)
            assert 2048 - 4 * 64 <= acked <= 2048 + 1, acked
            assert any(e["code"] == "rate_limited" for dev in devices for e in dev.errors)
        finally:
            for dev in devices:
                await dev.close()


async def test_limits_changed_while_a_limiter_call_is_in_flight_apply_to_the_commands_it_decides(
    tmp_path: Path,
) -> None:
    """A dynamic change of the rates while a batch waits for the limiter: the leases that call was
    filling are dropped, and the batch is decided again under the new rule (3 sends), in order."""
    async with embedded(tmp_path, "6000/2") as server:
        alice, bob = await alice_and_bob(server)
        gate = server.hub.rates
        release = asyncio.Event()

        class Held(Counting):
            async def check(self, hits: Sequence[Hit]) -> list[float]:
                self.calls.append(list(hits))
                await release.wait()
                return await self.inner.check(hits)

        held = Held(gate._limiter)  # type: ignore[arg-type]
        gate._limiter = held
        dev = ChatClient(server.ws_url, alice, "phone")
        assert (await dev.connect())["t"] == "auth_ok"
        try:
            frames = [json.dumps({"t": "send", "cmid": f"s-{i}", "to": bob.uid, "body": i}) for i in range(10)]
            await asyncio.gather(*(dev.ws.send(f) for f in frames))
            await eventually(lambda: held.calls, "a limiter call")
            assert gate._rates is not None
            gate.set_rates(dataclasses.replace(gate._rates, sends_per_user=Rule("send-user/3/600", 3, 600.0)))
            release.set()
            await eventually(lambda: len(dev.acks) + len(dev.errors) == 10, lambda: f"{dev.acks} {dev.errors}")
            assert sorted(dev.acks) == ["s-0", "s-1", "s-2"]
            assert [e["code"] for e in dev.errors][:1] == ["rate_limited"]
            new_rule = [h for h in held.hits("send-user") if h.rule.limit == 3]
            assert new_rule and {h.cost for h in new_rule} == {1}  # the new rule: exact, one unit each
        finally:
            await dev.close()
