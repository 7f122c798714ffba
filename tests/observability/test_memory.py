"""The timed full collection and trim (im.observability.memory): it frees cyclic garbage that the
allocation-driven collector has not reached, trims after each collection, and runs in a real im serve."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from pathlib import Path

import pytest

from im.compose import memory_loops
from im.config import ConfigError, load_config
from im.observability.memory import collect_every, malloc_trim
from tests.support.server import running_server


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def _cycle() -> weakref.ref[_Node]:
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    return weakref.ref(a)


async def test_each_round_frees_cycles_the_collector_has_not_reached_and_trims() -> None:
    rounds: list[float] = []
    trims: list[int] = []

    def trim() -> bool:
        trims.append(1)
        return True

    async def sleep(seconds: float) -> None:
        rounds.append(seconds)
        if len(rounds) > 2:
            raise asyncio.CancelledError

    gc.disable()  # only the loop's own collection may free the cycle
    try:
        garbage = _cycle()
        assert garbage() is not None  # unreachable, but alive until a collection
        with pytest.raises(asyncio.CancelledError):
            await collect_every(7.5, trim, sleep=sleep)
        assert garbage() is None
    finally:
        gc.enable()
    assert rounds == [7.5, 7.5, 7.5] and len(trims) == 2


def test_glibc_trim_is_found_and_callable() -> None:
    trim = malloc_trim()
    assert trim is not None  # this machine runs glibc
    assert isinstance(trim(), bool)


def test_the_loop_is_on_by_default_and_off_at_zero() -> None:
    loops = memory_loops(load_config(None, {}))
    for _, coro in loops:
        coro.close()  # made, never run
    assert [name for name, _ in loops] == ["im-memory"]
    assert memory_loops(load_config(None, {"memory": {"collect_interval": 0}})) == []
    for bad in (-1, 86_401):
        with pytest.raises(ConfigError, match=r"memory\.collect_interval"):
            load_config(None, {"memory": {"collect_interval": bad}})


def test_im_serve_collects_on_its_timer(tmp_path: Path) -> None:
    extra = ["--set", "memory.collect_interval=0.3", "--log-level", "debug"]
    with running_server(tmp_path / "data", extra) as server:
        until = time.monotonic() + 10
        while server.log().count("full garbage collection:") < 3 and time.monotonic() < until:
            time.sleep(0.1)
        assert server.log().count("full garbage collection:") >= 3, server.log()[-3000:]
