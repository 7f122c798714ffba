"""The one lifecycle every backend interface shares: ``await start()``, ``await close()``, ``async with``.

    Service ── ChatStore, AccountStore, FileStore, BlobStorage, Presence, Router, Registry,
               RateLimiter, Dedupe (every interface under im.backends derives from it)

Implementations that own resources (SQL databases, Redis clients, etcd, directories) override the two
hooks :meth:`Service._acquire` and :meth:`Service._release`; in-process ones inherit the no-ops. The
rules of the public methods live here, once, so a caller never needs to know which kind it holds.
"""

from __future__ import annotations

import asyncio
from typing import Self


class Service:
    """Something that may hold resources between :meth:`start` and :meth:`close`.

    Guarantees (for every implementation, enforced here rather than by each one):

    - :meth:`start` is idempotent: once it succeeded, calling it again does nothing. A start that raised
      may be retried (an engine that was not up yet).
    - :meth:`close` is idempotent and safe in every state: never started, after a failed start, started,
      already closed. The first call releases; later calls do nothing.
    - A closed service stays closed: :meth:`start` after :meth:`close` raises :class:`RuntimeError`.
    - Calls are serialised: a :meth:`close` that arrives during a :meth:`start` waits for it to end.
    - ``async with service:`` starts it and closes it on the way out, also on error.

    No ``__init__`` is needed from subclasses: the state lives in class-level defaults until first used.
    """

    _service_started: bool = False
    _service_closed: bool = False
    _service_lock: asyncio.Lock | None = None

    @property
    def started(self) -> bool:
        """True between a successful :meth:`start` and :meth:`close`."""
        return self._service_started and not self._service_closed

    @property
    def closed(self) -> bool:
        return self._service_closed

    def _lock(self) -> asyncio.Lock:
        if self._service_lock is None:
            self._service_lock = asyncio.Lock()
        return self._service_lock

    async def start(self) -> None:
        """Acquire what the service needs (connect, migrate, create directories); once."""
        async with self._lock():
            if self._service_closed:
                raise RuntimeError(f"{type(self).__name__} is closed; build a new one")
            if self._service_started:
                return
            await self._acquire()
            self._service_started = True

    async def close(self) -> None:
        """Release everything the service holds (and what its constructor made); once."""
        async with self._lock():
            if self._service_closed:
                return
            self._service_closed = True
            await self._release()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- the hooks implementations override --------------------------------------------------------------

    async def _acquire(self) -> None:
        """Acquire resources. On failure, undo what this call did before raising (a retry may follow)."""

    async def _release(self) -> None:
        """Release resources. Called once, whatever came before: no start, a failed one, a successful one;
        so it releases only what is actually held."""
