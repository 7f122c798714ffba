"""HashSlots: bounded, fair password hashing (im.core.passwords), with a blocking function we release by hand."""

from __future__ import annotations

import asyncio
import threading

import pytest

from im.core.passwords import HashSlots
from im.model.errors import ErrorCode, ImError
from tests.support.wait import eventually


class Gate:
    """A blocking 'hash' that records its order and waits until released."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.release: dict[str, threading.Event] = {}

    def __call__(self, name: str) -> str:
        self.started.append(name)
        self.release.setdefault(name, threading.Event()).wait(10)
        return name

    def let_go(self, name: str) -> None:
        self.release.setdefault(name, threading.Event()).set()


async def test_one_address_cannot_take_every_slot() -> None:
    slots, gate = HashSlots(concurrency=2, queue=10, per_source=2), Gate()
    flood = [asyncio.create_task(slots.run("1.1.1.1", gate, f"f{i}")) for i in range(2)]
    await eventually(lambda: gate.started == ["f0"])
    assert slots.running == 1 and slots.waiting == 1  # the second waits: one slot stays free
    with pytest.raises(ImError) as refused:
        await slots.run("1.1.1.1", gate, "f2")  # a third from that address: refused at once
    assert refused.value.code is ErrorCode.RATE_LIMITED and refused.value.retry_after
    real = asyncio.create_task(slots.run("2.2.2.2", gate, "real"))
    await eventually(lambda: "real" in gate.started)  # starts at once, in the free slot
    gate.let_go("real")
    assert await real == "real"
    for name in ("f0", "f1"):
        gate.let_go(name)
    assert await asyncio.gather(*flood) == ["f0", "f1"]
    assert slots.running == slots.waiting == 0


async def test_freed_slot_goes_to_the_address_with_fewest_running() -> None:
    slots, gate = HashSlots(concurrency=1, queue=10, per_source=3), Gate()
    tasks = [asyncio.create_task(slots.run("a", gate, f"a{i}")) for i in range(3)]
    await eventually(lambda: gate.started == ["a0"])
    tasks.append(asyncio.create_task(slots.run("b", gate, "b0")))
    await eventually(lambda: slots.waiting == 3)
    gate.let_go("a0")
    await eventually(lambda: len(gate.started) == 2)
    assert gate.started[1] == "b0"  # none running either: b was never served, a just was
    gate.let_go("b0")
    await eventually(lambda: len(gate.started) == 3)
    assert gate.started[2] == "a1"
    for name in ("a1", "a2"):
        gate.let_go(name)
    await asyncio.gather(*tasks)


async def test_full_queue_refuses_with_unavailable() -> None:
    slots, gate = HashSlots(concurrency=1, queue=1, per_source=5), Gate()
    first = asyncio.create_task(slots.run("a", gate, "1"))
    await eventually(lambda: gate.started == ["1"])
    second = asyncio.create_task(slots.run("b", gate, "2"))
    await eventually(lambda: slots.waiting == 1)
    with pytest.raises(ImError) as refused:
        await slots.run("c", gate, "3")
    assert refused.value.code is ErrorCode.UNAVAILABLE and refused.value.retry_after
    gate.let_go("1")
    gate.let_go("2")
    await asyncio.gather(first, second)


async def test_a_cancelled_waiter_leaves_the_queue() -> None:
    slots, gate = HashSlots(concurrency=1, queue=5, per_source=5), Gate()
    first = asyncio.create_task(slots.run("a", gate, "1"))
    await eventually(lambda: gate.started == ["1"])
    waiting = asyncio.create_task(slots.run("b", gate, "2"))
    await eventually(lambda: slots.waiting == 1)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert slots.waiting == 0
    gate.let_go("1")
    await first
    assert slots.running == 0
    gate.let_go("3")
    assert await slots.run("b", gate, "3") == "3"  # b's count was given back
