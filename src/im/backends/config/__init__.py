"""The configuration centre: the dynamic settings a cluster shares, and who changed them when.

Implementations: :mod:`.memory` (one process, tests), :mod:`.etcd` (under the cluster's etcd prefix, on
the registry's etcd client). The store keeps text, never judges it: ``im config set`` checks a value
before it writes, and every node checks it again before it applies it (im.live_config), so a value
written around the CLI (etcdctl) cannot break a node.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass

from im.backends.lifecycle import Service


@dataclass(frozen=True, slots=True)
class Change:
    """One change of one setting: its text before and after (None: not set in the centre), who made it
    (``user@host`` or ``im config set --by``) and when (Unix time)."""

    key: str
    old: str | None
    new: str | None
    by: str
    at: float


#: Called with every value the centre holds (key -> text), once it has them and after every change.
Watcher = Callable[[dict[str, str]], None]


class ConfigStore(Service, abc.ABC):
    """Dynamic settings as key -> text, with a bounded history.

    Guarantees: :meth:`set` and :meth:`unset` write the value and its history entry together (both or
    neither), and concurrent writers never lose an entry; :meth:`history` returns the newest changes (at
    most the configured bound), oldest first; a watcher is called with the whole map once the store has
    read it and after every change, and, when its connection breaks, it resumes (or reads the whole map
    again) so that it always ends up with the latest values.
    """

    @abc.abstractmethod
    async def values(self) -> dict[str, str]:
        """Every value the centre holds now."""

    @abc.abstractmethod
    async def set(self, key: str, value: str, *, by: str) -> Change:
        """Store ``value`` for ``key`` and record the change."""

    @abc.abstractmethod
    async def unset(self, key: str, *, by: str) -> Change | None:
        """Remove ``key`` (nodes go back to their own configuration); None when it was not set."""

    @abc.abstractmethod
    async def history(self, key: str | None = None) -> list[Change]:
        """The changes kept, oldest first; only ``key``'s when given."""

    @abc.abstractmethod
    def watch(self, callback: Watcher) -> Callable[[], None]:
        """Call ``callback`` with the whole map now (or once read) and after every change; returns a
        function that stops the calls."""
