"""im.lifecycle: parts start in order and stop in reverse, loops are cancelled before the first stop."""

from __future__ import annotations

import asyncio
import logging

import pytest

from im.lifecycle import Lifecycle, Loop, Part


class Trace:
    def __init__(self) -> None:
        self.steps: list[str] = []

    def part(self, name: str, *, fail_start: bool = False, fail_stop: bool = False) -> Part:
        async def start() -> None:
            self.steps.append(f"start {name}")
            if fail_start:
                raise RuntimeError(f"{name} cannot start")

        def stop() -> None:  # a sync step works too
            self.steps.append(f"stop {name}")
            if fail_stop:
                raise RuntimeError(f"{name} cannot stop")

        return Part(name, start, stop)

    async def loop(self, name: str, *, fail_after: float | None = None) -> None:
        self.steps.append(f"loop {name}")
        try:
            if fail_after is not None:
                await asyncio.sleep(fail_after)
                raise RuntimeError(f"{name} broke")
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.steps.append(f"cancelled {name}")
            raise


async def test_parts_start_in_order_and_stop_in_reverse_after_the_loops() -> None:
    t, life = Trace(), Lifecycle()

    def loops() -> list[Loop]:
        return [("l", t.loop("l"))]

    def ready() -> None:
        t.steps.append("ready")
        asyncio.get_running_loop().call_soon(life.request_stop)

    await asyncio.wait_for(life.run([t.part("a"), t.part("b"), t.part("c")], loops=loops, ready=ready), 5)
    assert t.steps == [
        "start a",
        "start b",
        "start c",
        "ready",
        "loop l",
        "cancelled l",
        "stop c",
        "stop b",
        "stop a",
    ]


async def test_a_failed_start_stops_what_started_in_reverse_and_propagates() -> None:
    t = Trace()
    with pytest.raises(RuntimeError, match="b cannot start"):
        await Lifecycle().run([t.part("a"), t.part("x"), t.part("b", fail_start=True), t.part("c")])
    assert t.steps == ["start a", "start x", "start b", "stop x", "stop a"]


async def test_a_failed_stop_is_logged_and_the_others_still_stop(caplog: pytest.LogCaptureFixture) -> None:
    t, life = Trace(), Lifecycle()
    life.request_stop()
    with caplog.at_level(logging.ERROR, logger="im"):
        await life.run([t.part("a"), t.part("b", fail_stop=True), t.part("c")])
    assert t.steps == ["start a", "start b", "start c", "stop c", "stop b", "stop a"]
    assert "stopping b failed" in caplog.text


async def test_a_failed_loop_stops_the_role_in_order_and_propagates() -> None:
    t = Trace()

    def loops() -> list[Loop]:
        return [("ok", t.loop("ok")), ("bad", t.loop("bad", fail_after=0.01))]

    with pytest.raises(ExceptionGroup) as raised:
        await asyncio.wait_for(Lifecycle().run([t.part("a"), t.part("b")], loops=loops), 5)
    assert raised.group_contains(RuntimeError, match="bad broke")
    assert t.steps == ["start a", "start b", "loop ok", "loop bad", "cancelled ok", "stop b", "stop a"]
