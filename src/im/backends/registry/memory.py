"""In-process registry: what ``im serve`` runs on one node.

Same guarantees as the engine-backed sibling, within one process: switch to it when gateways run in more
than one process."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from im.backends.registry import Registry
from im.model.cluster import ServiceInstance


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

    async def update_load(self, node: str, load: int, *, ready: bool | None = None) -> None:
        entry = self._instances.get(node)
        if entry is not None:
            inst, ttl, _ = entry
            new = dataclasses.replace(inst, load=load, ready=inst.ready if ready is None else ready)
            self._instances[node] = (new, ttl, self._clock() + ttl)
            if new != inst:
                self._changed(inst.role)

    async def deregister(self, node: str) -> None:
        entry = self._instances.pop(node, None)
        if entry is not None:
            self._changed(entry[0].role)

    async def ping(self) -> None:
        """In this process: always answers."""

    async def instances(self, role: str) -> list[ServiceInstance]:
        return self._live(role)

    def watch(self, role: str, callback: Callable[[list[ServiceInstance]], None]) -> Callable[[], None]:
        item = (role, callback)
        self._watchers.append(item)
        callback(self._live(role))
        return lambda: self._watchers.remove(item)
