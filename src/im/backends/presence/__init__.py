"""Presence: which gateway node holds which (user, device).

Implementations: :mod:`.memory` (one process), :mod:`.redis` (shared by every node)."""

from __future__ import annotations

import abc
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from im.backends.lifecycle import Service
from im.model.cluster import DeviceLocation


@dataclass(slots=True)
class Refreshed:
    """What :meth:`Presence.refresh` found: entries left out (as :meth:`Presence.set_online` returns), and
    entries that were not live before it (lost with the engine's data, or expired): a device routed to
    nowhere meanwhile, whose gateway has it check the log for what it missed."""

    left_out: list[DeviceLocation] = field(default_factory=list)
    absent: list[DeviceLocation] = field(default_factory=list)


class Presence(Service, abc.ABC):
    """Which gateway node holds which (user, device). A routing hint, never the truth: an entry may be
    stale for up to its TTL, so senders must rely on the log and cursors, not on presence, for delivery.

    One connection per device, cluster-wide: a gateway :meth:`claim`\\ s each new connection, which makes
    it its device's holder and hands back the older holder it displaced, wherever that is, so the older
    connection can be closed (``bye replaced``). Claims are linearizable: of several near-simultaneous
    claims of one device the last one applied holds it, and each earlier one is handed back by the next.
    Entries without a ``conn`` (written by :meth:`set_online` alone) take no part in claims.
    """

    @abc.abstractmethod
    async def set_online(self, entries: Sequence[DeviceLocation], ttl: float) -> list[DeviceLocation]:
        """Add or refresh entries; each expires ``ttl`` seconds after its last refresh. Returns the
        entries (with a ``conn``) left out because another node's connection claimed their device since,
        and still holds it: the caller closes those connections (a refresh also catches what a lost
        replacement request missed). An entry becomes its device's holder only when no live holder is
        elsewhere and none is on its own node (keys lost, or a holder that expired)."""

    @abc.abstractmethod
    async def refresh(self, entries: Sequence[DeviceLocation], ttl: float) -> Refreshed:
        """:meth:`set_online`, also saying which of the entries written were not live before the call."""

    @abc.abstractmethod
    async def claim(self, entries: Sequence[DeviceLocation], ttl: float) -> list[DeviceLocation]:
        """Make each entry (with its ``conn``) the holder of its (uid, device), atomically per user:
        written as :meth:`set_online` would, and the previous holder's entry removed if it is on another
        node. Returns the previous live holders (``node`` and ``conn`` set), those on this node included;
        entries of one call are applied in order."""

    @abc.abstractmethod
    async def set_offline(self, entries: Sequence[DeviceLocation]) -> None:
        """Remove entries. An entry with a ``conn`` is removed only if no other connection of its device
        on the same node holds it now (a newer connection's entry stays)."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Return once the engine answered a round trip now; raise if it cannot (readiness checks)."""

    @abc.abstractmethod
    async def locate(self, uids: Iterable[int]) -> dict[int, list[DeviceLocation]]:
        """Live entries of the given users (users with none are left out); ``conn`` is left empty."""
