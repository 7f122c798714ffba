"""Which message ids were already pushed, so a redelivered event never pushes twice.

Protocol: :meth:`Dedupe.seen` before the webhook, :meth:`Dedupe.record` only after it succeeded. A
crash between the two pushes again on redelivery with the same ``Idempotency-Key: <mid>``, which the
push provider deduplicates; nothing is ever recorded for a push that did not happen.

Choose :class:`MemoryDedupe` for one consumer process (records are lost on restart: only the
Idempotency-Key protects events redelivered after a restart), :class:`RedisDedupe` when consumers restart
or several run (a key ``<prefix><mid>`` set with ``SET NX EX ttl``).
"""

from __future__ import annotations

import abc
import time
from collections import OrderedDict
from collections.abc import Callable

import redis.asyncio as aioredis


class Dedupe(abc.ABC):
    """A set of keys with a time to live. Guarantee: a key recorded stays seen for at least ``ttl``
    seconds (the in-memory one: unless more than ``max_keys`` newer keys pushed it out)."""

    @abc.abstractmethod
    async def seen(self, key: str) -> bool: ...

    @abc.abstractmethod
    async def record(self, key: str) -> None: ...


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


class RedisDedupe(Dedupe):
    def __init__(self, client: aioredis.Redis, *, prefix: str = "im:push:", ttl: float = 86_400.0) -> None:
        self.client = client
        self.prefix = prefix
        self.ttl = ttl

    async def seen(self, key: str) -> bool:
        return bool(await self.client.exists(self.prefix + key))

    async def record(self, key: str) -> None:
        await self.client.set(self.prefix + key, b"1", nx=True, ex=max(1, int(self.ttl)))
