"""Rate limits in Redis: one budget per key for every process of a cluster (GCRA, see
:mod:`im.backends.rate_limit`).

Data model: one string per (rule, key), ``<prefix>rl:<rule>:<key>``, holding the key's theoretical arrival
time in microseconds of the **Redis server's clock** (``TIME`` inside the script, so processes with skewed
clocks agree). It expires when its budget is full again, so idle keys cost nothing.

Round trips: :meth:`RedisRateLimiter.check` is **one** script call whatever the number of hits (loaded
with ``register_script``: ``EVALSHA``, and ``EVAL`` once after a Redis restart). The script decides the
hits in order and remembers, within the call, what earlier hits took, so a batch with many hits on one
key (a burst of sends of one user) is decided exactly as the same hits one by one.

Limits: a script names many keys, so this needs one Redis (or a primary with replicas), not Redis Cluster.
Nothing here is durable: losing Redis forgives past hits, never refuses more.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec
import redis.asyncio as aioredis

from im.backends.rate_limit import Hit, RateLimiter
from im.backends.tls import ClientTls, redis_client

# KEYS: the distinct (rule, key) keys. ARGV[1]: one MessagePack array of 4 integers per hit: index into
# KEYS, interval (us per unit), period (us, the burst tolerance), cost (one argument, not four per hit:
# the client spent more time packing arguments than the script deciding them). Returns per hit 0
# (allowed) or the microseconds to wait.
_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local a = cmsgpack.unpack(ARGV[1])
local tats, dirty, out = {}, {}, {}
for i = 1, #a / 4 do
    local b = (i - 1) * 4
    local k = a[b + 1]
    local interval, period, cost = a[b + 2], a[b + 3], a[b + 4]
    local tat = tats[k]
    if tat == nil then
        tat = tonumber(redis.call('GET', KEYS[k]) or now) or now
    end
    if tat < now then tat = now end
    local new_tat = tat + cost * interval
    local over = new_tat - now - period
    if over <= 0 then
        tats[k] = new_tat
        dirty[k] = true
        out[i] = 0
    else
        tats[k] = tat
        if cost * interval > period then over = period end
        out[i] = math.ceil(over)
    end
end
for k in pairs(dirty) do
    local tat = tats[k]
    redis.call('SET', KEYS[k], string.format('%.0f', tat), 'PX', math.floor((tat - now) / 1000) + 1)
end
return out
"""


_pack = msgspec.msgpack.Encoder().encode


class RedisRateLimiter(RateLimiter):
    """:class:`RateLimiter` on one Redis, shared by every process that uses the same ``prefix``.

    Pass ``client`` to share a connection pool (it is then the caller's to close). ``timeout`` bounds
    connecting and each reply, so a hung Redis raises (see :class:`~im.backends.rate_limit.FailOpen`).
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "im:",
        client: aioredis.Redis | None = None,
        timeout: float | None = 2.0,
        tls: ClientTls | None = None,
    ) -> None:
        self._owns_client = client is None
        if client is None:
            client = redis_client(url, timeout=timeout, tls=tls)
        self._client: aioredis.Redis = client
        self._prefix = f"{prefix}rl:"
        self._script: Any = client.register_script(_GCRA)

    @property
    def client(self) -> aioredis.Redis:
        return self._client

    async def _release(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    async def check(self, hits: Sequence[Hit]) -> list[float]:
        if not hits:
            return []
        index: dict[tuple[str, str], int] = {}
        keys: list[str] = []
        args: list[int] = []
        for hit in hits:
            rule = hit.rule
            k = index.get((rule.name, hit.key))
            if k is None:
                keys.append(f"{self._prefix}{rule.name}:{hit.key}")
                k = index[(rule.name, hit.key)] = len(keys)
            args += (k, round(rule.interval * 1e6), round(rule.period * 1e6), hit.cost)
        waits: list[int] = await self._script(keys=keys, args=[_pack(args)])
        return [w / 1e6 for w in waits]
