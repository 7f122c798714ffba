"""The service registry: live gateway, transfer and API instances.

Implementations: :mod:`.memory` (one process), :mod:`.etcd` (leases, watched views)."""

from __future__ import annotations

import abc
from collections.abc import Callable

from im.backends.lifecycle import Service
from im.model.cluster import ServiceInstance


class Registry(Service, abc.ABC):
    """Live service instances. Guarantee: an instance is listed only while its registration is alive
    (kept alive by its owner; gone after a clean stop at once, after a crash within its TTL)."""

    @abc.abstractmethod
    async def register(self, instance: ServiceInstance, ttl: float) -> None: ...

    @abc.abstractmethod
    async def update_load(self, node: str, load: int, *, ready: bool | None = None) -> None:
        """Publish the node's load (and its readiness, unless None: unchanged); also renews its
        registration (a keepalive). Watchers see the new values."""

    @abc.abstractmethod
    async def deregister(self, node: str) -> None: ...

    @abc.abstractmethod
    async def ping(self) -> None:
        """Return once the registry answered a round trip now; raise if it cannot (readiness checks)."""

    @abc.abstractmethod
    async def instances(self, role: str) -> list[ServiceInstance]: ...

    @abc.abstractmethod
    def watch(self, role: str, callback: Callable[[list[ServiceInstance]], None]) -> Callable[[], None]:
        """Call ``callback`` with the full live list now and on every change; returns an unsubscribe."""

    def on_lost(self, callback: Callable[[str], None]) -> None:
        """Call ``callback(node)`` when a registration of this process is found lost: its lease ended
        while this process did not renew it (paused, cut off past its TTL), so others may have seen it
        gone and acted on that. Called before the registration is made again (under a new lease).
        Registries without leases never call it."""
        self.__dict__.setdefault("_lost_callbacks", []).append(callback)

    def _registration_lost(self, node: str) -> None:
        for callback in self.__dict__.get("_lost_callbacks", ()):
            callback(node)
