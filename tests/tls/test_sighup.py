"""im.lifecycle: SIGHUP runs the reload hooks while a role runs; without hooks it keeps its default."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

import pytest

from im.lifecycle import Lifecycle, Part


async def test_sighup_runs_every_reload_hook(caplog: pytest.LogCaptureFixture) -> None:
    life = Lifecycle()
    calls: list[str] = []
    reloaded = asyncio.Event()

    def broken() -> None:
        calls.append("broken")
        raise RuntimeError("cannot reload")

    def fine() -> None:
        calls.append("fine")
        reloaded.set()

    life.on_reload(broken)
    life.on_reload(fine)

    async def running() -> None:
        os.kill(os.getpid(), signal.SIGHUP)
        await asyncio.wait_for(reloaded.wait(), 5)
        life.request_stop()

    with caplog.at_level(logging.ERROR, logger="im"):
        await asyncio.wait_for(life.run([Part("noop", lambda: None)], loops=lambda: [("t", running())]), 10)
    assert calls == ["broken", "fine"]  # one failing hook does not keep the next from running
    assert any("reload hook" in r.message for r in caplog.records)
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL  # removed again once stopped


async def test_without_hooks_sighup_is_left_alone() -> None:
    life = Lifecycle()
    seen: list[object] = []

    async def running() -> None:
        seen.append(signal.getsignal(signal.SIGHUP))
        life.request_stop()

    await asyncio.wait_for(life.run([], loops=lambda: [("t", running())]), 10)
    assert seen == [signal.SIG_DFL]
