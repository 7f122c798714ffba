"""The keyring: data keys (AES-256) per conversation and per named purpose, created on first use, kept
wrapped by the master key in a :class:`ConversationKeys` store, cached unwrapped in memory.

    EncryptedChatStore ─┐                       ┌─ KeyProvider (master key: file, env, KMS)
    file encryption  ───┼── Keyring ────────────┤
    (FileKeys)          ┘   (bounded LRU cache) └─ ConversationKeys (data_keys table, wrapped keys)

Rules it keeps:

- A data key is stored (durably, insert-if-absent) before it is used, so every ciphertext has its key
  in the database. Two processes creating the first key of a conversation at once agree: both use the
  row stored first.
- Each wrapped key is bound to its row: the wrap context is ``im-data-key/<name>/<version>``, so a
  wrapped key copied to another conversation's row does not unwrap.
- Key work is batched: :meth:`current` and :meth:`versions` take every name of a batch and make at most
  one store round trip for those not cached, whatever the batch size.
- The cache holds at most ``cache_size`` names (least recently used dropped first); a dropped key is
  loaded and unwrapped again when next needed.
- A process whose master key is not the one the stored keys were wrapped with refuses to start
  (:class:`MasterKeyMismatch`): it would create new keys that other nodes cannot read and read nothing.

What the file encryption codes against (its ``FileKeys`` protocol): :meth:`wrap`, :meth:`unwrap` (the
master key, for keys it stores itself) and :meth:`named_key` (one purpose-wide data key).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from im.backends.chat import ConversationKeys
from im.backends.keys import KeyProvider, KeyUnavailable, MasterKeyMismatch
from im.backends.lifecycle import Service
from im.model.keys import WrappedKey

log = logging.getLogger("im.keys")

DATA_KEY_BYTES = 32


def conv_key_name(conv: str) -> str:
    return "conv:" + conv


def named_key_name(name: str) -> str:
    return "named:" + name


def wrap_context(name: str, version: int) -> bytes:
    return f"im-data-key/{name}/{version}".encode()


class DataKeys:
    """The unwrapped versions of one named data key: ``current`` encrypts, any version decrypts."""

    __slots__ = ("ciphers", "current", "keys")

    def __init__(self) -> None:
        self.ciphers: dict[int, AESGCM] = {}
        self.keys: dict[int, bytes] = {}
        self.current = 0

    def add(self, version: int, key: bytes) -> None:
        self.keys[version] = key
        self.ciphers[version] = AESGCM(key)
        self.current = max(self.current, version)


class Keyring(Service):
    """Data keys by name, wrapped by ``provider`` and kept in ``store``; owns and starts both."""

    def __init__(
        self,
        provider: KeyProvider,
        store: ConversationKeys,
        *,
        cache_size: int = 100_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if cache_size < 1:
            raise ValueError("cache_size must be at least 1")
        self.provider = provider
        self.store = store
        self.cache_size = cache_size
        self._clock = clock
        self._cache: OrderedDict[str, DataKeys] = OrderedDict()
        self.unwraps = 0  # keys unwrapped since start (cache misses that found a key)
        self.created = 0  # keys this process created and stored

    async def _acquire(self) -> None:
        await self.provider.start()
        try:
            await self.store.start()
            other = await self.store.other_master(self.provider.key_id)
            if other is not None:
                raise MasterKeyMismatch(
                    f"the stored data keys were wrapped by master key {other}, and this process has master key "
                    f"{self.provider.key_id}: start it with the master key the cluster uses (the same key file or "
                    "key environment variable value as the other nodes, or the backup of it); a key file that was "
                    "just created here is a new, unrelated key"
                )
        except BaseException:
            await self.store.close()
            await self.provider.close()
            raise

    async def _release(self) -> None:
        self._cache.clear()
        try:
            await self.store.close()
        finally:
            await self.provider.close()

    # --- what the encrypted stores use -------------------------------------------------------------------

    async def current(self, names: Iterable[str]) -> dict[str, tuple[int, AESGCM]]:
        """(version, cipher) of the newest key of each name, created when a name has none yet."""
        found = await self._get(names, create=True)
        out = {}
        for name, keys in found.items():
            out[name] = (keys.current, keys.ciphers[keys.current])
        return out

    async def versions(self, wanted: Iterable[tuple[str, int]]) -> dict[tuple[str, int], AESGCM]:
        """The cipher of each (name, version) that exists and unwraps; missing ones are left out (their
        ciphertexts cannot be read). A version newer than the cached ones (rotated by another process)
        is looked up in the store."""
        pairs = set(wanted)
        found = await self._get({n for n, _ in pairs}, create=False)
        stale = {n for n, v in pairs if n in found and v not in found[n].ciphers}
        if stale:
            for n in stale:
                self._cache.pop(n, None)
            found.update(await self._get(stale, create=False))
        return {(n, v): found[n].ciphers[v] for n, v in pairs if n in found and v in found[n].ciphers}

    # --- FileKeys: what the file encryption codes against ------------------------------------------------

    async def wrap(self, key: bytes, context: bytes) -> bytes:
        """``key`` wrapped by the master key, bound to ``context`` (for keys the caller stores itself)."""
        return await self.provider.wrap(key, context)

    async def unwrap(self, wrapped: bytes, context: bytes) -> bytes:
        """What :meth:`wrap` wrapped with the same ``context``; :class:`KeyUnavailable` if it does not open."""
        return await self.provider.unwrap(wrapped, context)

    async def named_key(self, name: str) -> bytes:
        """The current data key for a purpose (``"blob-names"``, ...): created once, stored wrapped like a
        conversation key, the same in every process sharing the store."""
        key_name = named_key_name(name)
        keys = (await self._get([key_name], create=True))[key_name]
        return keys.keys[keys.current]

    # --- the cache and the store -------------------------------------------------------------------------

    async def _get(self, names: Iterable[str], *, create: bool) -> dict[str, DataKeys]:
        out: dict[str, DataKeys] = {}
        missing: list[str] = []
        cache = self._cache
        for name in names:
            keys = cache.get(name)
            if keys is None:
                missing.append(name)
            else:
                cache.move_to_end(name)
                out[name] = keys
        if not missing:
            return out
        stored = await self.store.load_keys(missing)
        loaded = await asyncio.gather(*(self._unwrap_all(stored[n]) for n in missing if n in stored))
        for keys_of in loaded:
            if keys_of is not None:
                name, keys = keys_of
                out[name] = self._remember(name, keys)
        if create:
            absent = [n for n in missing if n not in out and n not in stored]
            made = await asyncio.gather(*(self._create(n) for n in absent))
            for name, keys in zip(absent, made, strict=True):
                out[name] = self._remember(name, keys)
        return out

    async def _unwrap_all(self, rows: Sequence[WrappedKey]) -> tuple[str, DataKeys] | None:
        keys = DataKeys()
        for row in rows:
            try:
                keys.add(row.version, await self.provider.unwrap(row.wrapped, wrap_context(row.name, row.version)))
                self.unwraps += 1
            except KeyUnavailable as exc:
                log.error("data key %s version %d does not unwrap: %s", row.name, row.version, exc)
        return (rows[0].name, keys) if keys.ciphers else None

    async def _create(self, name: str) -> DataKeys:
        key = AESGCM.generate_key(bit_length=DATA_KEY_BYTES * 8)
        row = WrappedKey(
            name, 1, self.provider.key_id, await self.provider.wrap(key, wrap_context(name, 1)), int(self._clock())
        )
        stored = await self.store.add_key(row)
        keys = DataKeys()
        if stored.wrapped == row.wrapped:
            keys.add(1, key)
            self.created += 1
        else:  # another process stored the first key a moment before: use that one
            keys.add(1, await self.provider.unwrap(stored.wrapped, wrap_context(name, 1)))
        return keys

    def _remember(self, name: str, keys: DataKeys) -> DataKeys:
        cache = self._cache
        have = cache.get(name)
        if have is not None:  # a concurrent load got there first: merge (versions never change)
            for version, key in keys.keys.items():
                if version not in have.ciphers:
                    have.add(version, key)
            cache.move_to_end(name)
            return have
        cache[name] = keys
        while len(cache) > self.cache_size:
            cache.popitem(last=False)
        return keys
