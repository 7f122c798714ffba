"""Waiting for a condition in a test: a bound on how long to wait, never the thing asserted; and jobs that
run in the background of a block."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any


async def eventually(
    check: Callable[[], Any], what: str | Callable[[], str] = "", timeout: float = 30.0, *, interval: float = 0.01
) -> None:
    """Poll ``check()`` (a value, or an awaitable of one) until it is truthy; after ``timeout`` seconds
    fail with ``what`` (a text, or a function giving one: state worth seeing in the failure)."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if inspect.isawaitable(got):
            got = await got
        if got:
            return
        if time.monotonic() > deadline:
            detail = what() if callable(what) else what
            raise AssertionError(f"not reached within {timeout}s" + (f": {detail}" if detail else ""))
        await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def running(*jobs: Coroutine[Any, Any, None]) -> AsyncIterator[list[asyncio.Task[None]]]:
    """Run ``jobs`` as tasks for the block (yields them); at its end they are cancelled and awaited, so a
    job that failed meanwhile fails the block with its own exception."""
    tasks = [asyncio.create_task(job) for job in jobs]
    try:
        yield tasks
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
