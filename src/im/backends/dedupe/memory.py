"""Dedupe records in one process's memory (lost on restart)."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from im.backends.dedupe import Dedupe


class MemoryDedupe(Dedupe):
    def __init__(
        self, *, ttl: float = 86_400.0, max_keys: int = 1_000_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl = ttl
        self.max_keys = max_keys
        self._clock = clock
        self._keys: OrderedDict[str, float] = OrderedDict()  # key -> expiry, oldest first

    async def seen(self, key: str) -> bool:
        expiry = self._keys.get(key)
        return expiry is not None and expiry > self._clock()

    async def record(self, key: str) -> None:
        now = self._clock()
        self._keys[key] = now + self.ttl
        self._keys.move_to_end(key)
        while self._keys:
            oldest, expiry = next(iter(self._keys.items()))
            if expiry > now and len(self._keys) <= self.max_keys:
                break
            del self._keys[oldest]
