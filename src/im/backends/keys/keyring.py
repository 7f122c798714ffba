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
- A process that holds none of the master keys some stored keys were wrapped with refuses to start
  (:class:`MasterKeyMismatch`): it would create new keys that other nodes cannot read and read nothing.
- A conversation's current version is re-read from the store at most ``refresh_interval`` seconds after
  it was last read, so a key rotated by another process (``im keys rotate-conversation``) is used for
  new messages everywhere within that time (at once in the process that rotated it), and a shredded key
  is dropped everywhere within that time too (reads and writes both check).

Master key rotation (:meth:`rewrap_all`): every stored key not wrapped by the current master key is
unwrapped (with the older master key the provider still holds) and wrapped again under the current one,
a compare-and-set per row, page by page, while the keyring serves. Rewrapping never changes a data key,
so nothing encrypted with it changes and no cache needs invalidating.

Conversation key rotation (:meth:`rotate`): a new random key stored as the next version; the older
versions stay, so what they encrypted stays readable. Crypto-shredding (:meth:`shred`): every version
of the named keys deleted from the store and dropped from the cache.

What the file encryption codes against (its ``FileKeys`` protocol): :meth:`wrap`, :meth:`unwrap` (the
master key, for keys it stores itself) and :meth:`named_key` (one purpose-wide data key).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

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


@dataclass
class RewrapReport:
    """What :meth:`Keyring.rewrap_all` did: rows seen, rewrapped, left because they did not unwrap."""

    total: int = 0
    checked: int = 0
    rewrapped: int = 0
    failed: int = 0


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
        refresh_interval: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if cache_size < 1:
            raise ValueError("cache_size must be at least 1")
        self.provider = provider
        self.store = store
        self.cache_size = cache_size
        self.refresh_interval = refresh_interval
        self._clock = clock
        self._loaded_at: dict[str, float] = {}
        self._cache: OrderedDict[str, DataKeys] = OrderedDict()
        #: Bumped whenever a cached name gains or loses a version or is dropped: what a caller derived from
        #: :meth:`current` (the encrypted store's per-conversation sealers) is stale once this changes.
        self.epoch = 0
        self.unwraps = 0  # keys unwrapped since start (cache misses that found a key)
        self.created = 0  # keys this process created and stored

    async def _acquire(self) -> None:
        await self.provider.start()
        try:
            await self.store.start()
            held = set(self.provider.key_ids)
            others = sorted(set(await self.store.masters()) - held)
            if others:
                raise MasterKeyMismatch(
                    f"the stored data keys were wrapped by master key {', '.join(others)}, and this process has "
                    f"master key {', '.join(self.provider.key_ids)}: start it with the master key the cluster uses "
                    "(the same key file or "
                    "key environment variable value as the other nodes, or the backup of it); a key file that was "
                    "just created here is a new, unrelated key"
                )
        except BaseException:
            await self.store.close()
            await self.provider.close()
            raise

    async def _release(self) -> None:
        self.epoch += 1
        self._cache.clear()
        self._loaded_at.clear()
        try:
            await self.store.close()
        finally:
            await self.provider.close()

    # --- what the encrypted stores use -------------------------------------------------------------------

    async def current(self, names: Iterable[str]) -> dict[str, tuple[int, AESGCM]]:
        """(version, cipher) of the newest key of each name, created when a name has none yet; a name
        whose versions were read more than ``refresh_interval`` seconds ago is read again (one round trip
        for all of them), so a rotation elsewhere is followed."""
        names = list(names)
        await self._refresh_stale(names)
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
        names = {n for n, _ in pairs}
        await self._refresh_stale(names)
        found = await self._get(names, create=False)
        stale = {n for n, v in pairs if n in found and v not in found[n].ciphers}
        if stale:
            self.epoch += 1
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

    # --- administration: rotation, rewrap, shredding ------------------------------------------------------

    async def reload(self) -> bool:
        """Re-read the master key source (a rotated key file); True when the keys held changed."""
        return await self.provider.reload()

    async def rotate(self, name: str) -> int:
        """A new random data key for ``name``, stored as the next version (the older ones stay and still
        decrypt); this process encrypts with it from now on, the others within ``refresh_interval``.
        Returns the new version."""
        while True:
            rows = (await self.store.load_keys([name])).get(name, [])
            version = (rows[-1].version if rows else 0) + 1
            key = AESGCM.generate_key(bit_length=DATA_KEY_BYTES * 8)
            row = WrappedKey(
                name,
                version,
                self.provider.key_id,
                await self.provider.wrap(key, wrap_context(name, version)),
                int(self._clock()),
            )
            stored = await self.store.add_key(row)
            if stored.wrapped == row.wrapped:
                self.epoch += 1
                self._cache.pop(name, None)  # loaded again with every version on next use
                self._loaded_at.pop(name, None)
                self.created += 1
                return version
            # another rotation took that version a moment before: go again past it

    async def shred(self, names: Sequence[str]) -> int:
        """Crypto-shredding: delete every version of ``names`` from the store and forget them here; what
        they encrypted is unreadable from then on (other processes drop them from their caches within
        ``refresh_interval`` when they next use them, or at restart). Returns the rows deleted."""
        deleted = await self.store.delete_keys(names)
        self.epoch += 1
        for name in names:
            self._cache.pop(name, None)
            self._loaded_at.pop(name, None)
        return deleted

    async def rewrap_all(
        self, *, page: int = 500, progress: Callable[[RewrapReport], None] | None = None
    ) -> RewrapReport:
        """Rewrap every stored key not wrapped by the current master key under it (compare-and-set per
        row; a row changed meanwhile is read again and retried). ``progress`` is called after each page."""
        current = self.provider.key_id
        report = RewrapReport(total=sum((await self.store.masters()).values()))
        after: tuple[str, int] | None = None
        while True:
            rows = await self.store.list_keys(after, page)
            if not rows:
                break
            after = (rows[-1].name, rows[-1].version)
            for row in rows:
                report.checked += 1
                while row.master_id != current:
                    context = wrap_context(row.name, row.version)
                    try:
                        key = await self.provider.unwrap(row.wrapped, context)
                    except KeyUnavailable as exc:
                        report.failed += 1
                        log.error(
                            "data key %s version %d does not unwrap, left as it is: %s", row.name, row.version, exc
                        )
                        break
                    new = WrappedKey(
                        row.name, row.version, current, await self.provider.wrap(key, context), row.created_at
                    )
                    if await self.store.rewrap(row, new):
                        report.rewrapped += 1
                        break
                    again = [
                        r
                        for r in (await self.store.load_keys([row.name])).get(row.name, [])
                        if r.version == row.version
                    ]
                    if not again:
                        break  # deleted meanwhile (shredded)
                    row = again[0]
            if progress is not None:
                progress(report)
        return report

    async def rewrap(self, wrapped: bytes, context: bytes) -> bytes | None:
        """A key the caller keeps itself (a blob's) rewrapped under the current master key; None when it
        is under it already (or its format does not say)."""
        master = self.provider.master_of(wrapped)
        if master is None or master == self.provider.key_id:
            return None
        return await self.provider.wrap(await self.provider.unwrap(wrapped, context), context)

    def master_of(self, wrapped: bytes) -> str | None:
        """The master key id that wrapped ``wrapped`` (see :meth:`KeyProvider.master_of`)."""
        return self.provider.master_of(wrapped)

    def loaded_at(self, name: str) -> float:
        """When (:func:`time.monotonic`) ``name``'s versions were last read: :meth:`current` reads them
        again ``refresh_interval`` seconds later."""
        return self._loaded_at.get(name, 0.0)

    async def _refresh_stale(self, names: Iterable[str]) -> None:
        limit = time.monotonic() - self.refresh_interval
        loaded, cache = self._loaded_at, self._cache
        stale = [n for n in names if n in cache and loaded.get(n, 0.0) <= limit]
        if stale:
            await self._refresh(stale)

    async def _refresh(self, names: list[str]) -> None:
        """Read the stored versions of cached ``names`` again, unwrapping only versions not held; a name
        gone from the store (shredded) is dropped."""
        stored = await self.store.load_keys(names)
        now = time.monotonic()
        for name in names:
            rows = stored.get(name)
            have = self._cache.get(name)
            if not rows:
                self.epoch += 1
                self._cache.pop(name, None)
                self._loaded_at.pop(name, None)
                continue
            if have is not None:
                for row in rows:
                    if row.version not in have.ciphers:
                        self.epoch += 1
                        try:
                            have.add(
                                row.version, await self.provider.unwrap(row.wrapped, wrap_context(name, row.version))
                            )
                            self.unwraps += 1
                        except KeyUnavailable as exc:
                            log.error("data key %s version %d does not unwrap: %s", name, row.version, exc)
            self._loaded_at[name] = now

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
                    self.epoch += 1
                    have.add(version, key)
            cache.move_to_end(name)
            return have
        cache[name] = keys
        self._loaded_at[name] = time.monotonic()
        while len(cache) > self.cache_size:
            dropped, _ = cache.popitem(last=False)
            self._loaded_at.pop(dropped, None)
        return keys
