"""Which message ids were already pushed, so a redelivered event never pushes twice.

Protocol: :meth:`Dedupe.seen` before the webhook, :meth:`Dedupe.record` only after it succeeded. A
crash between the two pushes again on redelivery with the same ``Idempotency-Key: <mid>``, which the
push provider deduplicates; nothing is ever recorded for a push that did not happen.

Choose :class:`MemoryDedupe` for one consumer process (records are lost on restart: only the
Idempotency-Key protects events redelivered after a restart), :class:`RedisDedupe` when consumers restart
or several run (a key ``<prefix><mid>`` set with ``SET NX EX ttl``)."""

from __future__ import annotations

import abc

from im.backends.lifecycle import Service


class Dedupe(Service, abc.ABC):
    """A set of keys with a time to live. Guarantee: a key recorded stays seen for at least ``ttl``
    seconds (the in-memory one: unless more than ``max_keys`` newer keys pushed it out)."""

    @abc.abstractmethod
    async def seen(self, key: str) -> bool: ...

    @abc.abstractmethod
    async def record(self, key: str) -> None: ...
