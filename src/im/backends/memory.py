"""In-process presence, router and registry: what ``im serve`` runs on one node.

They keep the same guarantees as their Redis, gRPC and etcd siblings, within one process: switch to
those when gateways run in more than one process.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence

from im.backends.base import (
    DeliverySink,
    DeviceLocation,
    Presence,
    Registry,
    Router,
    ServiceInstance,
    StoredMessage,
)


class MemoryPresence(Presence):
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._entries: dict[int, dict[tuple[str, str], float]] = {}  # uid -> (device, node) -> expiry

    async def set_online(self, entries: Sequence[DeviceLocation], ttl: float) -> None:
        expiry = self._clock() + ttl
        for e in entries:
            self._entries.setdefault(e.uid, {})[(e.device, e.node)] = expiry

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


class MemoryRouter(Router):
    """Calls the local sinks directly: in order, and never blocking the publisher for long. A node with
    no local sink goes to :meth:`elsewhere` / :meth:`event_elsewhere` (dropped here; a subclass may
    carry it to another process)."""

    def __init__(self) -> None:
        self._sinks: dict[str, DeliverySink] = {}

    def attach(self, node: str, sink: DeliverySink) -> None:
        self._sinks[node] = sink

    def detach(self, node: str) -> None:
        self._sinks.pop(node, None)

    def publish(self, node: str, messages: Sequence[StoredMessage], recipients: Sequence[Sequence[int]]) -> None:
        sink = self._sinks.get(node)
        if sink is not None:
            sink.deliver(messages, recipients)
        else:
            self.elsewhere(node, messages, recipients)

    def publish_event(self, node: str, frame: object, uids: Sequence[int], skip: tuple[int, str] | None) -> None:
        sink = self._sinks.get(node)
        if sink is not None:
            sink.deliver_event(frame, uids, skip)
        else:
            self.event_elsewhere(node, frame, uids, skip)

    def elsewhere(self, node: str, messages: Sequence[StoredMessage], recipients: Sequence[Sequence[int]]) -> None:
        """Messages for a node with no sink in this process (at most once: nothing is kept)."""

    def event_elsewhere(self, node: str, frame: object, uids: Sequence[int], skip: tuple[int, str] | None) -> None:
        """An event for a node with no sink in this process."""


class MemoryRegistry(Registry):
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._instances: dict[str, tuple[ServiceInstance, float, float]] = {}  # node -> (inst, ttl, expiry)
        self._watchers: list[tuple[str, Callable[[list[ServiceInstance]], None]]] = []

    def _live(self, role: str) -> list[ServiceInstance]:
        now = self._clock()
        return [i for i, _ttl, exp in self._instances.values() if i.role == role and exp > now]

    def _changed(self, role: str) -> None:
        live = self._live(role)
        for r, callback in list(self._watchers):
            if r == role:
                callback(live)

    async def register(self, instance: ServiceInstance, ttl: float) -> None:
        self._instances[instance.node] = (instance, ttl, self._clock() + ttl)
        self._changed(instance.role)

    async def update_load(self, node: str, load: int) -> None:
        entry = self._instances.get(node)
        if entry is not None:
            inst, ttl, _ = entry
            self._instances[node] = (
                ServiceInstance(inst.role, inst.node, inst.addresses, load),
                ttl,
                self._clock() + ttl,
            )

    async def deregister(self, node: str) -> None:
        entry = self._instances.pop(node, None)
        if entry is not None:
            self._changed(entry[0].role)

    async def instances(self, role: str) -> list[ServiceInstance]:
        return self._live(role)

    def watch(self, role: str, callback: Callable[[list[ServiceInstance]], None]) -> Callable[[], None]:
        item = (role, callback)
        self._watchers.append(item)
        callback(self._live(role))
        return lambda: self._watchers.remove(item)
