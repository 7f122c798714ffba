"""The configuration centre on etcd, beside the service registry and on its client.

Layout under the centre's prefix (``registry.config_root()``, by default ``/im/config/`` next to the
registry's ``/im/services/``):

- ``<prefix>values/<key>``: the text of one setting (``limits.send_rate`` -> ``500``);
- ``<prefix>history``: JSON, a list of ``{key, old, new, by, at}``, oldest first, at most
  ``history_limit`` long (etcd's own revisions would be lost to compaction; this list is not).

A change is one etcd transaction that writes the value and the history together, on the condition that
neither moved since they were read; a writer that lost the race reads again and retries, so concurrent
``im config set`` never lose an entry. Watching follows ``<prefix>values/`` through
:meth:`EtcdRegistry.follow`, which reopens the watch after an etcd restart (from the revision after the
last one seen) and lists again if that revision was compacted. The registry owns the client: this store
opens nothing and closes only its own watches.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import aetcd
import msgspec

from im.backends.config import Change, ConfigStore, Watcher
from im.backends.registry.etcd import EtcdRegistry

log = logging.getLogger(__name__)

#: Transactions tried before a set gives up because other writers keep winning.
_ATTEMPTS = 20


class _Entry(msgspec.Struct, frozen=True):
    key: str
    old: str | None
    new: str | None
    by: str
    at: float


_encode = msgspec.json.Encoder().encode
_decode_history = msgspec.json.Decoder(list[_Entry]).decode


class EtcdConfigStore(ConfigStore):
    """:class:`ConfigStore` under ``prefix`` (ending in ``/``) of the etcd that ``registry`` talks to."""

    def __init__(self, registry: EtcdRegistry, prefix: str, *, history_limit: int = 200) -> None:
        if not prefix.endswith("/"):
            raise ValueError(f"configuration prefix must end with '/': {prefix!r}")
        self._registry = registry
        self.prefix = prefix
        self._values_prefix = f"{prefix}values/".encode()
        self._history_key = f"{prefix}history".encode()
        self._limit = history_limit
        self._stops: list[Callable[[], None]] = []

    @property
    def _client(self) -> Any:
        return self._registry.client

    def _key(self, key: str) -> bytes:
        if not key or "/" in key:
            raise ValueError(f"a setting is a dotted name without '/': {key!r}")
        return self._values_prefix + key.encode()

    async def values(self) -> dict[str, str]:
        epoch = self._client.epoch
        try:
            got = await self._client.get_prefix(self._values_prefix)
        except Exception as e:
            await self._client.failed(e, epoch)
            raise
        return self._decode_values(got)

    def _decode_values(self, kvs: Sequence[Any]) -> dict[str, str]:
        out: dict[str, str] = {}
        for kv in kvs:
            try:
                out[bytes(kv.key)[len(self._values_prefix) :].decode()] = bytes(kv.value).decode()
            except UnicodeDecodeError:
                log.warning("ignoring a configuration value that is not UTF-8 text: %r", bytes(kv.key))
        return out

    async def set(self, key: str, value: str, *, by: str) -> Change:
        change = await self._change(key, value, by)
        assert change is not None
        return change

    async def unset(self, key: str, *, by: str) -> Change | None:
        return await self._change(key, None, by)

    async def _change(self, key: str, new: str | None, by: str) -> Change | None:
        value_key, client = self._key(key), self._client
        tx = client.transactions
        for _ in range(_ATTEMPTS):
            epoch = client.epoch
            try:
                current = await client.get(value_key)
                history_kv = await client.get(self._history_key)
                old = None if current is None else bytes(current.value).decode()
                if new is None and old is None:
                    return None
                change = Change(key, old, new, by, time.time())
                entries = self._entries(history_kv)
                entries.append(_Entry(key, old, new, by, change.at))
                conditions = [
                    tx.mod(value_key) == (0 if current is None else current.mod_revision),
                    tx.mod(self._history_key) == (0 if history_kv is None else history_kv.mod_revision),
                ]
                write = tx.delete(value_key) if new is None else tx.put(value_key, new.encode())
                ok, _ = await client.transaction(
                    compare=conditions,
                    success=[write, tx.put(self._history_key, _encode(entries[-self._limit :]))],
                    failure=[],
                )
            except Exception as e:
                await client.failed(e, epoch)
                raise
            if ok:
                return change
            await asyncio.sleep(0.01)  # another writer won: read again
        raise RuntimeError(f"configuration centre: {key} kept changing under {_ATTEMPTS} attempts; try again")

    def _entries(self, kv: Any) -> list[_Entry]:
        if kv is None:
            return []
        try:
            return _decode_history(bytes(kv.value))
        except msgspec.DecodeError:
            log.warning("the configuration history at %r is unreadable: starting it again", self._history_key)
            return []

    async def history(self, key: str | None = None) -> list[Change]:
        epoch = self._client.epoch
        try:
            kv = await self._client.get(self._history_key)
        except Exception as e:
            await self._client.failed(e, epoch)
            raise
        return [Change(e.key, e.old, e.new, e.by, e.at) for e in self._entries(kv) if key is None or e.key == key]

    def watch(self, callback: Watcher) -> Callable[[], None]:
        current: dict[str, str] = {}

        def reset(kvs: Sequence[Any]) -> None:
            current.clear()
            current.update(self._decode_values(kvs))
            callback(dict(current))

        def event(e: aetcd.Event) -> None:
            name = bytes(e.kv.key)[len(self._values_prefix) :].decode(errors="replace")
            if e.kind == aetcd.EventKind.DELETE:
                current.pop(name, None)
            else:
                try:
                    current[name] = bytes(e.kv.value).decode()
                except UnicodeDecodeError:
                    log.warning("ignoring a configuration value that is not UTF-8 text: %r", name)
                    return
            callback(dict(current))

        stop = self._registry.follow(self._values_prefix, reset, event, f"configuration watch of {self.prefix!r}")
        self._stops.append(stop)

        def unwatch() -> None:
            stop()
            if stop in self._stops:
                self._stops.remove(stop)

        return unwatch

    async def _release(self) -> None:
        for stop in self._stops:
            stop()
        self._stops.clear()
