"""In-process presence: what ``im serve`` runs on one node.

Same guarantees as the engine-backed sibling, within one process: switch to it when gateways run in more
than one process."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence

from im.backends.presence import Presence, Refreshed
from im.model.cluster import DeviceLocation


class MemoryPresence(Presence):
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._entries: dict[int, dict[tuple[str, str], float]] = {}  # uid -> (device, node) -> expiry
        self._holders: dict[int, dict[str, tuple[str, str]]] = {}  # uid -> device -> (node, conn) that claimed it

    def _live(self, uid: int, device: str, node: str, now: float) -> bool:
        expiry = self._entries.get(uid, {}).get((device, node))
        return expiry is not None and expiry > now

    async def set_online(self, entries: Sequence[DeviceLocation], ttl: float) -> list[DeviceLocation]:
        return (await self.refresh(entries, ttl)).left_out

    async def refresh(self, entries: Sequence[DeviceLocation], ttl: float) -> Refreshed:
        now = self._clock()
        expiry = now + ttl
        left_out: list[DeviceLocation] = []
        absent: list[DeviceLocation] = []
        for e in entries:
            if e.conn:
                holder = self._holders.get(e.uid, {}).get(e.device)
                if holder is not None and holder[0] != e.node and self._live(e.uid, e.device, holder[0], now):
                    left_out.append(e)  # claimed by a connection on another node since
                    continue
                if holder is None or holder[0] != e.node:  # never over a newer claim of this same node
                    self._holders.setdefault(e.uid, {})[e.device] = (e.node, e.conn)
            if not self._live(e.uid, e.device, e.node, now):
                absent.append(e)
            self._entries.setdefault(e.uid, {})[(e.device, e.node)] = expiry
        return Refreshed(left_out, absent)

    async def claim(self, entries: Sequence[DeviceLocation], ttl: float) -> list[DeviceLocation]:
        now = self._clock()
        expiry = now + ttl
        previous: list[DeviceLocation] = []
        for e in entries:
            devices = self._entries.setdefault(e.uid, {})
            holders = self._holders.setdefault(e.uid, {})
            holder = holders.get(e.device)
            if holder is not None and holder != (e.node, e.conn) and self._live(e.uid, e.device, holder[0], now):
                previous.append(DeviceLocation(e.uid, e.device, *holder))
                if holder[0] != e.node:
                    del devices[(e.device, holder[0])]
            holders[e.device] = (e.node, e.conn)
            devices[(e.device, e.node)] = expiry
        return previous

    async def ping(self) -> None:
        """In this process: always answers."""

    async def set_offline(self, entries: Sequence[DeviceLocation]) -> None:
        for e in entries:
            holders = self._holders.get(e.uid)
            holder = holders.get(e.device) if holders is not None else None
            if e.conn and holders is not None and holder is not None:
                if holder == (e.node, e.conn):
                    del holders[e.device]
                    if not holders:
                        del self._holders[e.uid]
                elif holder[0] == e.node:
                    continue  # a newer connection of this device on the same node holds it
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
