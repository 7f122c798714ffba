"""The configuration centre in one process: the same guarantees as etcd's, for tests and one node."""

from __future__ import annotations

import time
from collections.abc import Callable

from im.backends.config import Change, ConfigStore, Watcher


class MemoryConfigStore(ConfigStore):
    def __init__(self, *, history_limit: int = 200, clock: Callable[[], float] = time.time) -> None:
        self._values: dict[str, str] = {}
        self._history: list[Change] = []
        self._limit = history_limit
        self._clock = clock
        self._watchers: list[Watcher] = []

    async def values(self) -> dict[str, str]:
        return dict(self._values)

    def _record(self, key: str, new: str | None, by: str) -> Change:
        change = Change(key, self._values.get(key), new, by, self._clock())
        if new is None:
            self._values.pop(key, None)
        else:
            self._values[key] = new
        self._history = [*self._history, change][-self._limit :]
        for watcher in list(self._watchers):
            watcher(dict(self._values))
        return change

    async def set(self, key: str, value: str, *, by: str) -> Change:
        return self._record(key, value, by)

    async def unset(self, key: str, *, by: str) -> Change | None:
        if key not in self._values:
            return None
        return self._record(key, None, by)

    async def history(self, key: str | None = None) -> list[Change]:
        return [c for c in self._history if key is None or c.key == key]

    def watch(self, callback: Watcher) -> Callable[[], None]:
        def subscriber(values: dict[str, str]) -> None:  # one object per subscription
            callback(values)

        self._watchers.append(subscriber)
        subscriber(dict(self._values))

        def stop() -> None:
            if subscriber in self._watchers:
                self._watchers.remove(subscriber)

        return stop
