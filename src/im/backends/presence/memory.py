"""In-process presence: what ``im serve`` runs on one node.

Same guarantees as the engine-backed sibling, within one process: switch to it when gateways run in more
than one process."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence

from im.backends.presence import Presence
from im.model.cluster import DeviceLocation


class MemoryPresence(Presence):
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._entries: dict[int, dict[tuple[str, str], float]] = {}  # uid -> (device, node) -> expiry

    async def set_online(self, entries: Sequence[DeviceLocation], ttl: float) -> None:
        expiry = self._clock() + ttl
        for e in entries:
            self._entries.setdefault(e.uid, {})[(e.device, e.node)] = expiry

    async def ping(self) -> None:
        """In this process: always answers."""

    async def set_offline(self, entries: Sequence[DeviceLocation]) -> None:
        for e in entries:
            devices = self._entries.get(e.uid)
            if devices is not None:
                devices.pop((e.device, e.node), None)
                if not devices:
                    del self._entries[e.uid]

    async def locate(self, uids: Iterable[int]) -> dict[int, list[DeviceLocation]]:
        now = self._clock()
        out: dict[int, list[DeviceLocation]] = {}
        for uid in uids:
            devices = self._entries.get(uid)
            if not devices:
                continue
            live = [DeviceLocation(uid, d, n) for (d, n), exp in devices.items() if exp > now]
            if live:
                out[uid] = live
        return out
