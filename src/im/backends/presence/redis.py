"""Presence in Redis: which gateway node holds which (user, device), shared by every node of a cluster.

Data model: one sorted set per user, ``<prefix>p:<uid>``; each member is ``<device>|<node>`` and its
score is the entry's expiry in milliseconds of the **Redis server's clock** (``TIME`` inside a Lua
script), so gateways on machines with skewed clocks still agree on what is live. The key itself expires
with its last entry (``PEXPIREAT`` to the highest score), so a user whose gateways all died leaves
nothing behind. Expired members are skipped on read (``ZRANGE ... BYSCORE`` from now) and pruned on the
next write to that user (``ZREMRANGEBYSCORE``).

Holders (one connection per device): beside it, one hash per user, ``<prefix>h:<uid>``, maps a device to
``<node>|<conn>``, the connection that claimed it last (``claim``). A holder counts only while its node's
member is live. ``claim`` reads and replaces the holder and removes the previous holder's member (when it
is on another node) in the same script, so claims of one device are applied one after the other and
each hands back the one before it. A refresh (``set_online``) of an entry whose device a live connection
on another node holds is left out and handed back; ``set_offline`` leaves a member that another
connection of the same node holds. The hash expires with the sorted set. Entries written without a
connection id (older nodes) never touch it.

Round trips: each call is **one** round trip whatever its size. ``set_online``, ``claim``,
``set_offline`` and ``locate`` send one Lua script per chunk of ``chunk`` users, all chunks in one
pipeline (a chunk bounds how long one script holds Redis, which serves other clients in between: about
4 ms for 1,000 users in ``set_online``).
Scripts go as ``EVAL`` rather than ``EVALSHA``: Redis caches the compiled script anyway, and a restarted
or ``SCRIPT FLUSH``-ed server never answers ``NOSCRIPT``.

Losing Redis: nothing here is durable, and nothing needs to be. Every gateway re-announces all of its
sessions every ``max(1 s, ttl/3)`` (``Hub._tick``), so after a Redis restart or a flush of these keys,
lookups are complete again within that period once Redis answers. Until then ``locate`` misses users,
which the :class:`~im.backends.presence.Presence` contract allows: delivery relies on the log and cursors.

Limits: a script names many users' keys, so this needs one Redis (or a primary with replicas), not Redis
Cluster. A node name and a connection id must not contain ``|`` (a device name may).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import redis.asyncio as aioredis

from im.backends.presence import Presence, Refreshed
from im.backends.tls import ClientTls, redis_client
from im.model.cluster import DeviceLocation

# Shared by the writing scripts: let both keys of a user live as long as its longest-lived member.
_EXPIRE = """
local function expire(zkey, hkey)
    local top = redis.call('ZRANGE', zkey, -1, -1, 'WITHSCORES')
    if top[2] then
        redis.call('PEXPIREAT', zkey, top[2])
        redis.call('PEXPIREAT', hkey, top[2])
    end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: two per user (its entries, its holders). ARGV: ttl_ms, then per user: n, then n triples (device,
# node, conn). Prunes expired members, adds or refreshes the given ones, except an entry with a conn
# whose device a live connection on another node holds (claimed since). Returns, per user, the 0-based
# positions of those left out and of those written that were not there (ZADD added them anew). An entry
# with a conn becomes its device's holder when none is live elsewhere (lost keys, an expired holder),
# but never takes over from another connection of its own node (that one claimed after it: the node's
# own order rules).
_SET_ONLINE = (
    _EXPIRE
    + """
local expiry = now + tonumber(ARGV[1])
local a = 2
local out = {}
for i = 1, #KEYS, 2 do
    local zkey, hkey = KEYS[i], KEYS[i + 1]
    redis.call('ZREMRANGEBYSCORE', zkey, '-inf', now)
    local n = tonumber(ARGV[a])
    local left = {}
    local absent = {}
    for k = 0, n - 1 do
        local j = a + 1 + 3 * k
        local device, node, conn = ARGV[j], ARGV[j + 1], ARGV[j + 2]
        local keep = true
        if conn ~= '' then
            local holder = redis.call('HGET', hkey, device)
            local hnode = holder and string.match(holder, '^([^|]*)|')
            if hnode and hnode ~= node and redis.call('ZSCORE', zkey, device .. '|' .. hnode) then
                keep = false
            elseif hnode ~= node then
                redis.call('HSET', hkey, device, node .. '|' .. conn)
            end
        end
        if keep then
            if redis.call('ZADD', zkey, expiry, device .. '|' .. node) == 1 then
                absent[#absent + 1] = k
            end
        else
            left[#left + 1] = k
        end
    end
    a = a + 3 * n + 1
    out[#out + 1] = {left, absent}
    expire(zkey, hkey)
end
return out
"""
)

# KEYS and ARGV as _SET_ONLINE. Makes each (device, node, conn) its device's holder and writes its entry;
# a previous live holder's entry is removed when it is on another node. Returns, per user, the previous
# holders as a flat list: device, "node|conn", device, "node|conn", ...
_CLAIM = (
    _EXPIRE
    + """
local expiry = now + tonumber(ARGV[1])
local a = 2
local out = {}
for i = 1, #KEYS, 2 do
    local zkey, hkey = KEYS[i], KEYS[i + 1]
    redis.call('ZREMRANGEBYSCORE', zkey, '-inf', now)
    local n = tonumber(ARGV[a])
    local gone = {}
    for k = 0, n - 1 do
        local j = a + 1 + 3 * k
        local device, node, conn = ARGV[j], ARGV[j + 1], ARGV[j + 2]
        local mine = node .. '|' .. conn
        local holder = redis.call('HGET', hkey, device)
        if holder and holder ~= mine then
            local hnode = string.match(holder, '^([^|]*)|')
            local member = device .. '|' .. hnode
            if redis.call('ZSCORE', zkey, member) then
                gone[#gone + 1] = device
                gone[#gone + 1] = holder
                if hnode ~= node then
                    redis.call('ZREM', zkey, member)
                end
            end
        end
        redis.call('HSET', hkey, device, mine)
        redis.call('ZADD', zkey, expiry, device .. '|' .. node)
    end
    a = a + 3 * n + 1
    out[#out + 1] = gone
    expire(zkey, hkey)
end
return out
"""
)

# KEYS as _SET_ONLINE. ARGV: per user: n, then n triples. Removes those members, except one whose device
# another connection on the same node holds; forgets the holder when it is the entry's connection. Redis
# deletes a key left empty. The key's expiry stays at its longest-lived entry's, which may be one just
# removed: harmless, members are read by score.
_SET_OFFLINE = """
local a = 1
for i = 1, #KEYS, 2 do
    local zkey, hkey = KEYS[i], KEYS[i + 1]
    local n = tonumber(ARGV[a])
    for k = 0, n - 1 do
        local j = a + 1 + 3 * k
        local device, node, conn = ARGV[j], ARGV[j + 1], ARGV[j + 2]
        local remove = true
        if conn ~= '' then
            local holder = redis.call('HGET', hkey, device)
            if holder == node .. '|' .. conn then
                redis.call('HDEL', hkey, device)
            elseif holder and string.match(holder, '^([^|]*)|') == node then
                remove = false
            end
        end
        if remove then
            redis.call('ZREM', zkey, device .. '|' .. node)
        end
    end
    a = a + 3 * n + 1
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
        self._holders_prefix = f"{prefix}h:"
        self._chunk = chunk

    @property
    def client(self) -> aioredis.Redis:
        return self._client

    def key(self, uid: int) -> str:
        """The Redis key that holds ``uid``'s entries."""
        return f"{self._key_prefix}{uid}"

    def holders_key(self, uid: int) -> str:
        """The Redis key that holds which connection claimed each of ``uid``'s devices."""
        return f"{self._holders_prefix}{uid}"

    async def _release(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    async def ping(self) -> None:
        """Redis ``PING`` (bounded by the client's timeout)."""
        await self._client.ping()

    async def set_online(self, entries: Sequence[DeviceLocation], ttl: float) -> list[DeviceLocation]:
        return (await self.refresh(entries, ttl)).left_out

    async def refresh(self, entries: Sequence[DeviceLocation], ttl: float) -> Refreshed:
        by_user = self._by_user(entries)
        results = await self._write(_SET_ONLINE, [round(ttl * 1000)], by_user)
        return Refreshed(
            [by_user[uid][k] for uid, (left, _) in results for k in left],
            [by_user[uid][k] for uid, (_, absent) in results for k in absent],
        )

    async def claim(self, entries: Sequence[DeviceLocation], ttl: float) -> list[DeviceLocation]:
        for e in entries:
            if not e.conn or _SEP in e.conn:
                raise ValueError(f"a claim needs a connection id without {_SEP!r}, not {e.conn!r}")
        results = await self._write(_CLAIM, [round(ttl * 1000)], self._by_user(entries))
        previous: list[DeviceLocation] = []
        for uid, flat in results:
            for device, holder in zip(flat[::2], flat[1::2], strict=True):
                node, _, conn = _text(holder).partition(_SEP)
                previous.append(DeviceLocation(uid, _text(device), node, conn))
        return previous

    async def set_offline(self, entries: Sequence[DeviceLocation]) -> None:
        await self._write(_SET_OFFLINE, [], self._by_user(entries))

    @staticmethod
    def _by_user(entries: Sequence[DeviceLocation]) -> dict[int, list[DeviceLocation]]:
        by_user: dict[int, list[DeviceLocation]] = {}
        for e in entries:
            if _SEP in e.node:
                raise ValueError(f"node name {e.node!r} contains {_SEP!r}")
            by_user.setdefault(e.uid, []).append(e)
        return by_user

    async def _write(
        self, script: str, head: list[int], by_user: dict[int, list[DeviceLocation]]
    ) -> list[tuple[int, Any]]:
        """Run ``script`` over the entries grouped by user (two keys each): ``head`` then, per user, n and
        n (device, node, conn) triples. Returns (uid, the script's answer for that user) in order."""
        if not by_user:
            return []
        users = list(by_user.items())
        pipe = self._client.pipeline(transaction=False)
        for start in range(0, len(users), self._chunk):
            keys: list[str] = []
            args: list[str | int] = [*head]
            for uid, locations in users[start : start + self._chunk]:
                keys += (self.key(uid), self.holders_key(uid))
                args.append(len(locations))
                for e in locations:
                    args += (e.device, e.node, e.conn)
            pipe.eval(script, len(keys), *keys, *args)
        answers = await pipe.execute()
        if not isinstance(answers[0], list):  # set_offline answers 0 per chunk
            return []
        return list(zip((uid for uid, _ in users), (a for chunk in answers for a in chunk), strict=True))

    async def locate(self, uids: Iterable[int]) -> dict[int, list[DeviceLocation]]:
        wanted = list(dict.fromkeys(uids))
        if not wanted:
            return {}
        chunks: list[list[list[Any]]]
        if len(wanted) <= self._chunk:  # a commit's recipients, most often: no pipeline (about 25 µs less)
            keys = [self.key(uid) for uid in wanted]
            chunks = [await self._client.eval_ro(_LOCATE, len(keys), *keys)]
        else:
            pipe = self._client.pipeline(transaction=False)
            for start in range(0, len(wanted), self._chunk):
                keys = [self.key(uid) for uid in wanted[start : start + self._chunk]]
                pipe.eval_ro(_LOCATE, len(keys), *keys)
            chunks = await pipe.execute()
        out: dict[int, list[DeviceLocation]] = {}
        for uid, members in zip(wanted, (m for chunk in chunks for m in chunk), strict=True):
            if members:
                out[uid] = [_parse(uid, m) for m in members]
        return out


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _parse(uid: int, member: bytes | str) -> DeviceLocation:
    device, _, node = _text(member).rpartition(_SEP)
    return DeviceLocation(uid, device, node)
