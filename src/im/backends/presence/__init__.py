"""Presence: which gateway node holds which (user, device).

Implementations: :mod:`.memory` (one process), :mod:`.redis` (shared by every node)."""

from __future__ import annotations

import abc
from collections.abc import Iterable, Sequence

from im.backends.lifecycle import Service
from im.model.cluster import DeviceLocation


class Presence(Service, abc.ABC):
    """Which gateway node holds which (user, device). A routing hint, never the truth: an entry may be
    stale for up to its TTL, so senders must rely on the log and cursors, not on presence, for delivery."""

    @abc.abstractmethod
    async def set_online(self, entries: Sequence[DeviceLocation], ttl: float) -> None:
        """Add or refresh entries; each expires ``ttl`` seconds after its last refresh."""

    @abc.abstractmethod
    async def set_offline(self, entries: Sequence[DeviceLocation]) -> None: ...

    @abc.abstractmethod
    async def ping(self) -> None:
        """Return once the engine answered a round trip now; raise if it cannot (readiness checks)."""

    @abc.abstractmethod
    async def locate(self, uids: Iterable[int]) -> dict[int, list[DeviceLocation]]:
        """Live entries of the given users (users with none are left out)."""
