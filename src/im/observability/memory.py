"""Memory handed back on a timer: a full garbage collection every ``memory.collect_interval`` seconds,
then glibc's ``malloc_trim`` (``memory.trim``).

Why: the roles collect the young generation only after 50,000 net allocations and keep the start-up
heap out of every collection (``im.cli.tune_gc``): cheaper per message, but once a node's caches are full
it allocates almost nothing net, so a collection may not run for minutes. Cyclic garbage then waits —
an engine outage's failed connection attempts (exceptions, tracebacks, frames, one TLS context each)
are thousands of objects — and glibc keeps the freed pages of what is collected at last. A collection a
minute bounds how long garbage lives; the trim gives the freed pages back, so the process's size
returns after the outage instead of staying at its high-water mark. The collection runs on the event
loop (a pause of milliseconds, once a ``collect_interval``); the frozen start-up heap is not walked.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


def malloc_trim() -> Callable[[], bool] | None:
    """glibc's ``malloc_trim(0)`` (True when memory went back to the system), or None without glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to call
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: bool(trim(0))


async def collect_every(
    interval: float,
    trim: Callable[[], bool] | None,
    *,
    collect: Callable[[], int] = gc.collect,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
) -> None:
    """Forever: wait ``interval`` seconds, collect every generation, then ``trim`` (when given). A
    collection that takes over 100 ms is logged (the loop stood still that long)."""
    while True:
        await sleep(interval)
        started = time.perf_counter()
        found = collect()
        trimmed = trim() if trim is not None else False
        took = time.perf_counter() - started
        if took > 0.1:
            log.warning("full garbage collection took %.0f ms (%d objects freed)", took * 1000, found)
        else:
            log.debug("full garbage collection: %d objects freed in %.1f ms, trimmed %s", found, took * 1000, trimmed)
