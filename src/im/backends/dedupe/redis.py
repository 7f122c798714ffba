"""Dedupe records in Redis: ``SET NX EX`` per key, shared by every consumer."""

from __future__ import annotations

import redis.asyncio as aioredis

from im.backends.dedupe import Dedupe


class RedisDedupe(Dedupe):
    def __init__(
        self, client: aioredis.Redis, *, prefix: str = "im:push:", ttl: float = 86_400.0, owns_client: bool = False
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.ttl = ttl
        self._owns_client = owns_client  # close it with this store (else its owner does)

    async def _release(self) -> None:
        if self._owns_client:
            await self.client.aclose()

    async def seen(self, key: str) -> bool:
        return bool(await self.client.exists(self.prefix + key))

    async def record(self, key: str) -> None:
        await self.client.set(self.prefix + key, b"1", nx=True, ex=max(1, int(self.ttl)))
