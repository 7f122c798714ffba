"""What every SQL store shares: it lives on a database other stores use too (chat, accounts, files).

The database counts its users (``SqliteDatabase``, ``PostgresDatabase``): each store opens it when it
starts and closes it when it closes, and the connections live while any store is open. The store's
:class:`~im.backends.lifecycle.Service` lifecycle makes each store count once, however often it is
started or closed.
"""

from __future__ import annotations

from typing import Generic, Protocol, TypeVar


class CountedDatabase(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...


DB = TypeVar("DB", bound=CountedDatabase)


class OnSharedDatabase(Generic[DB]):
    """Mixed in before the store interface, so its lifecycle hooks are the ones that run: starting opens
    the database (one count), closing gives that count back, only if it was taken."""

    def __init__(self, db: DB) -> None:
        self.db = db
        self._holds_db = False

    async def _acquire(self) -> None:
        await self.db.open()
        self._holds_db = True

    async def _release(self) -> None:
        if self._holds_db:
            self._holds_db = False
            await self.db.close()
