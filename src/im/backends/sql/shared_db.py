"""What every SQL store shares: it lives on a database other stores use too (chat, accounts, files).

The database counts its users (``SqliteDatabase``, ``PostgresDatabase``): each store opens it in
``start`` and closes it in ``close``, and the connections live while any store is open.
"""

from __future__ import annotations

from typing import Generic, Protocol, TypeVar


class CountedDatabase(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...


DB = TypeVar("DB", bound=CountedDatabase)


class OnSharedDatabase(Generic[DB]):
    """Mixed in before the store interface, so its ``start``/``close`` are the ones that run."""

    def __init__(self, db: DB) -> None:
        self.db = db

    async def start(self) -> None:
        await self.db.open()

    async def close(self) -> None:
        await self.db.close()
