"""A cancellation lost by a library on the way (Python 3.11's ``asyncio.wait_for`` race) still stops the
loops that run until cancelled (im.cancel): seen in a full suite run as an outbox relay that never
stopped (its broker connect swallowed the cancel, and its retry loop went on)."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import pytest

from im.backends.chat.sqlite import SqliteChatStore
from im.backends.sql.sqlite_db import SqliteDatabase
from im.cancel import raise_if_cancelling, retry_pause
from im.events import topology
from im.events.relay import OutboxRelay


async def test_a_swallowed_cancellation_is_raised_at_the_next_check() -> None:
    passed: list[str] = []

    async def loop() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:  # a library losing it
            passed.append("swallowed")
        raise_if_cancelling()
        passed.append("went on")

    task = asyncio.create_task(loop())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert passed == ["swallowed"]


async def test_retry_pause_sleeps_when_nobody_asked_to_stop() -> None:
    started = asyncio.get_running_loop().time()
    await retry_pause(0.05)
    assert asyncio.get_running_loop().time() - started >= 0.04


async def test_the_outbox_relay_stops_when_its_broker_connect_swallows_the_cancel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    attempts = 0

    async def connect_losing_the_cancel(*_args: Any, **_kw: Any) -> Any:
        nonlocal attempts
        attempts += 1
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(0.05)
        raise ConnectionError("broker away")

    monkeypatch.setattr(topology, "connect", connect_losing_the_cancel)
    store = SqliteChatStore(SqliteDatabase(tmp_path / "im.sqlite3"), outbox=True)
    async with store:
        relay = OutboxRelay(store, "amqp://127.0.0.1:1/", backoff=0.01, max_backoff=0.01)
        task = asyncio.create_task(relay.run())
        while attempts < 3:
            await asyncio.sleep(0.01)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(task), 3)
        assert task.done(), "the relay went on retrying after its cancellation"
        task.cancel()  # (if it did not stop: let the test end)


async def test_the_etcd_keepalive_stops_when_a_renewal_swallows_the_cancel(monkeypatch: pytest.MonkeyPatch) -> None:
    """A registry keepalive whose lease renewal loses the cancellation (and succeeds) stops at its next
    round instead of renewing forever (a stopping node would hang on it)."""
    from im.backends.registry.etcd import EtcdRegistry, _Registration
    from im.model.cluster import ServiceInstance

    renewing = asyncio.Event()
    renewals = 0

    class Reply:
        TTL = 30

    async def renew_losing_the_cancel(_lease: int, *, within: float | None = None) -> Reply:
        nonlocal renewals
        renewals += 1
        renewing.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(0.05)
        renewing.clear()
        return Reply()

    registry = EtcdRegistry("127.0.0.1:1")
    monkeypatch.setattr(registry.client, "refresh_lease", renew_losing_the_cancel)
    reg = _Registration(ServiceInstance("gateway", "gw-1", {}), ttl=0.03, key=b"k")
    task = asyncio.create_task(registry._keep_alive(reg))
    await renewing.wait()
    task.cancel()  # lands in the renewal, which swallows it
    with contextlib.suppress(asyncio.CancelledError, TimeoutError):
        await asyncio.wait_for(asyncio.shield(task), 1)
    assert task.done(), f"the keepalive went on renewing after its cancellation ({renewals} renewals)"
