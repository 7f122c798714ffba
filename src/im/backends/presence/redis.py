"""Presence in Redis: which gateway node holds which (user, device), shared by every node of a cluster.

Data model: one sorted set per user, ``<prefix>p:<uid>``; each member is ``<device>|<node>`` and its
score is the entry's expiry in milliseconds of the **Redis server's clock** (``TIME`` inside a Lua
script), so gateways on machines with skewed clocks still agree on what is live. The key itself expires
with its last entry (``PEXPIREAT`` to the highest score), so a user whose gateways all died leaves
nothing behind. Expired members are skipped on read (``ZRANGE ... BYSCORE`` from now) and pruned on the
next write to that user (``ZREMRANGEBYSCORE``).

Round trips: each call is **one** round trip whatever its size. ``set_online``, ``set_offline`` and
``locate`` send one Lua script per chunk of ``chunk`` users, all chunks in one pipeline (a chunk bounds how
long one script holds Redis, which serves other clients in between: about 4 ms for 1,000 users in
``set_online``).
Scripts go as ``EVAL`` rather than ``EVALSHA``: Redis caches the compiled script anyway, and a restarted
or ``SCRIPT FLUSH``-ed server never answers ``NOSCRIPT``.

Losing Redis: nothing here is durable, and nothing needs to be. Every gateway re-announces all of its
sessions every ``max(1 s, ttl/3)`` (``Hub._tick``), so after a Redis restart or a flush of these keys,
lookups are complete again within that period once Redis answers. Until then ``locate`` misses users,
which the :class:`~im.backends.presence.Presence` contract allows: delivery relies on the log and cursors.

Limits: a script names many users' keys, so this needs one Redis (or a primary with replicas), not Redis
Cluster. A node name must not contain ``|`` (a device name may).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import redis.asyncio as aioredis

from im.backends.presence import Presence
from im.backends.tls import ClientTls, redis_client
from im.model.cluster import DeviceLocation

# KEYS: one per user. ARGV: ttl_ms, then per key: n, member_1 .. member_n.
# Prunes expired members, adds or refreshes the given ones, and lets the key live as long as its
# longest-lived member.
_SET_ONLINE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expiry = now + tonumber(ARGV[1])
local a = 2
for i, key in ipairs(KEYS) do
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    local n = tonumber(ARGV[a])
    for j = a + 1, a + n do
        redis.call('ZADD', key, expiry, ARGV[j])
    end
    a = a + n + 1
    local top = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
    if top[2] then
        redis.call('PEXPIREAT', key, top[2])
    end
end
return 0
"""

# KEYS: one per user. ARGV: per key: n, member_1 .. member_n. Removes those members; Redis deletes a key
# left empty. The key's expiry stays at its longest-lived entry's, which may be one just removed: harmless,
# members are read by score.
_SET_OFFLINE = """
local a = 1
for i, key in ipairs(KEYS) do
    local n = tonumber(ARGV[a])
    for j = a + 1, a + n do
        redis.call('ZREM', key, ARGV[j])
    end
    a = a + n + 1
end
return 0
"""

# KEYS: one per user. Returns, per key, the members whose expiry is still ahead (read-only).
_LOCATE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i, key in ipairs(KEYS) do
    out[i] = redis.call('ZRANGE', key, '(' .. now, '+inf', 'BYSCORE')
end
return out
"""

_SEP = "|"


class RedisPresence(Presence):
    """:class:`Presence` on one Redis server, shared by every gateway and core of a cluster.

    ``prefix`` namespaces the keys, so several clusters (or test runs) can share a Redis. Pass
    ``client`` to share a connection pool; it is then the caller's to close (``url`` and ``timeout`` are
    then unused). ``timeout`` bounds connecting and each reply, so a hung Redis raises instead of stalling
    the gateway's refresh loop. ``chunk`` is how many users one Lua script handles at most.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "im:",
        client: aioredis.Redis | None = None,
        timeout: float | None = 5.0,
        tls: ClientTls | None = None,
        chunk: int = 1000,
    ) -> None:
        self._owns_client = client is None
        if client is None:
            client = redis_client(url, timeout=timeout, tls=tls)
        self._client: aioredis.Redis = client
        self._key_prefix = f"{prefix}p:"
        self._chunk = chunk

    @property
    def client(self) -> aioredis.Redis:
        return self._client

    def key(self, uid: int) -> str:
        """The Redis key that holds ``uid``'s entries."""
        return f"{self._key_prefix}{uid}"

    async def _release(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    async def ping(self) -> None:
        """Redis ``PING`` (bounded by the client's timeout)."""
        await self._client.ping()

    async def set_online(self, entries: Sequence[DeviceLocation], ttl: float) -> None:
        for e in entries:
            if _SEP in e.node:
                raise ValueError(f"node name {e.node!r} contains {_SEP!r}")
        await self._write(_SET_ONLINE, [round(ttl * 1000)], entries)

    async def set_offline(self, entries: Sequence[DeviceLocation]) -> None:
        await self._write(_SET_OFFLINE, [], entries)

    async def _write(self, script: str, head: list[int], entries: Sequence[DeviceLocation]) -> None:
        """Run ``script`` over the entries grouped by user: ``head`` then, per user, n and n members."""
        by_user: dict[int, list[str]] = {}
        for e in entries:
            by_user.setdefault(e.uid, []).append(f"{e.device}{_SEP}{e.node}")
        if not by_user:
            return
        users = list(by_user.items())
        pipe = self._client.pipeline(transaction=False)
        for start in range(0, len(users), self._chunk):
            keys: list[str] = []
            args: list[str | int] = [*head]
            for uid, members in users[start : start + self._chunk]:
                keys.append(self.key(uid))
                args.append(len(members))
                args.extend(members)
            pipe.eval(script, len(keys), *keys, *args)
        await pipe.execute()

    async def locate(self, uids: Iterable[int]) -> dict[int, list[DeviceLocation]]:
        wanted = list(dict.fromkeys(uids))
        if not wanted:
            return {}
        pipe = self._client.pipeline(transaction=False)
        for start in range(0, len(wanted), self._chunk):
            keys = [self.key(uid) for uid in wanted[start : start + self._chunk]]
            pipe.eval_ro(_LOCATE, len(keys), *keys)
        chunks: list[list[list[Any]]] = await pipe.execute()
        out: dict[int, list[DeviceLocation]] = {}
        for uid, members in zip(wanted, (m for chunk in chunks for m in chunk), strict=True):
            if members:
                out[uid] = [_parse(uid, m) for m in members]
        return out


def _parse(uid: int, member: bytes | str) -> DeviceLocation:
    text = member.decode() if isinstance(member, bytes) else member
    device, _, node = text.rpartition(_SEP)
    return DeviceLocation(uid, device, node)
