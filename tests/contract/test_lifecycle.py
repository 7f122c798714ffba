"""The rules of :class:`im.backends.lifecycle.Service` itself, on a service that records its hooks (every
implementation is checked against them by its harness: ``tests/contract/lifecycle.py``)."""

from __future__ import annotations

import asyncio

import pytest

from im.backends.lifecycle import Service
from tests.contract.lifecycle import check_lifecycle


class Recorder(Service):
    def __init__(self, *, fail: int = 0, gate: asyncio.Event | None = None) -> None:
        self.calls: list[str] = []
        self.fail = fail  # how many starts raise before one succeeds
        self.gate = gate

    async def _acquire(self) -> None:
        self.calls.append("acquire")
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            self.fail -= 1
            raise ConnectionError("engine not up yet")

    async def _release(self) -> None:
        self.calls.append("release")


async def test_the_common_checks_hold_and_hooks_run_once() -> None:
    made: list[Recorder] = []

    def make() -> Recorder:
        made.append(Recorder())
        return made[-1]

    async def probe(r: Recorder) -> None:
        assert r.started

    await check_lifecycle(make, probe)
    assert [r.calls for r in made] == [
        ["acquire", "release"],
        ["release"],
        ["acquire", "release"],
        ["acquire", "release"],
    ]


async def test_a_failed_start_may_be_retried_and_close_after_it_releases_once() -> None:
    r = Recorder(fail=1)
    with pytest.raises(ConnectionError):
        await r.start()
    assert not r.started and not r.closed
    await r.start()  # the engine came up
    assert r.started
    await r.close()
    await r.close()
    assert r.calls == ["acquire", "acquire", "release"]

    failed = Recorder(fail=1)
    with pytest.raises(ConnectionError):
        await failed.start()
    await failed.close()
    await failed.close()
    assert failed.calls == ["acquire", "release"] and failed.closed


async def test_close_during_start_waits_for_it() -> None:
    gate = asyncio.Event()
    r = Recorder(gate=gate)
    starting = asyncio.create_task(r.start())
    await asyncio.sleep(0)
    closing = asyncio.create_task(r.close())
    concurrent_start = asyncio.create_task(r.start())
    await asyncio.sleep(0.01)
    assert r.calls == ["acquire"] and not closing.done()
    gate.set()
    await starting
    await closing
    with pytest.raises(RuntimeError, match="closed"):
        await concurrent_start  # queued behind the close
    assert r.calls == ["acquire", "release"]
