"""Waiting for a condition in a test: a bound on how long to wait, never the thing asserted."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
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
