"""Implementation factories for the backend contract suites.

Each interface under ``im.backends`` has one parametrized fixture here; a new engine (PostgreSQL,
Redis, etcd, ...) joins the suite by adding one ``pytest.param(<harness class>, id="<engine>")`` to the
matching list below. A harness wraps an implementation with what the tests need around it that the
interface does not offer (creating users, reopening the storage, moving time forward).
"""

from __future__ import annotations

import abc
import asyncio
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from im.backends.accounts.postgres import PostgresAccountStore
from im.backends.accounts.sqlite import SqliteAccountStore
from im.backends.chat import ChatStore
from im.backends.chat.postgres import PostgresChatStore
from im.backends.chat.sqlite import SqliteChatStore
from im.backends.files import FileStore
from im.backends.files.postgres import PostgresFileStore
from im.backends.files.sqlite import SqliteFileStore
from im.backends.presence import Presence
from im.backends.presence.memory import MemoryPresence
from im.backends.presence.redis import RedisPresence
from im.backends.registry import Registry
from im.backends.registry.etcd import EtcdRegistry
from im.backends.registry.memory import MemoryRegistry
from im.backends.routing import Router
from im.backends.routing.memory import MemoryRouter
from im.backends.sql.sqlite_db import SqliteDatabase
from tests.support.etcd import shared_etcd
from tests.support.postgres import PgSchema, start

# --- helpers --------------------------------------------------------------------------------------------


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


REDIS_URL = os.environ.get("REDIS_TEST_URL", "redis://127.0.0.1:6379/0")


async def delete_redis_prefix(client: aioredis.Redis, prefix: str) -> int:
    """SCAN + UNLINK every key under ``prefix`` (never FLUSHALL: the Redis is shared); returns the count."""
    deleted = 0
    batch: list[bytes] = []
    async for key in client.scan_iter(match=f"{prefix}*", count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            deleted += await client.unlink(*batch)
            batch.clear()
    if batch:
        deleted += await client.unlink(*batch)
    return deleted


# --- ChatStore ------------------------------------------------------------------------------------------


class ChatHarness(abc.ABC):
    """A :class:`ChatStore` on fresh, private storage, plus the accounts needed for titles."""

    store: ChatStore

    @abc.abstractmethod
    async def open(self) -> None:
        """Create and start ``self.store`` (and whatever holds the users)."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def add_user(self, username: str, display_name: str) -> int:
        """Create a user the store's ``list_conversations`` can name; returns the uid."""

    async def reopen(self) -> ChatStore:
        """Close everything and open a new store on the same storage."""
        await self.close()
        await self.open()
        return self.store

    async def peer(self) -> ChatStore:
        """Another started store on the same storage, as another server process would open it (closed
        with the harness)."""
        raise NotImplementedError


class SqliteChatHarness(ChatHarness):
    def __init__(self, tmp_path: Path, *, outbox: bool = False) -> None:
        self.path = tmp_path / "im.db"
        self.outbox = outbox
        self._accounts: SqliteAccountStore | None = None
        self._peers: list[ChatStore] = []

    async def open(self) -> None:
        db = SqliteDatabase(self.path)
        self.store = SqliteChatStore(db, outbox=self.outbox)
        self._accounts = SqliteAccountStore(db)
        await self.store.start()
        await self._accounts.start()

    async def close(self) -> None:
        assert self._accounts is not None
        while self._peers:
            await self._peers.pop().close()
        await self._accounts.close()
        await self.store.close()

    async def add_user(self, username: str, display_name: str) -> int:
        assert self._accounts is not None
        return (await self._accounts.create_user(username, display_name, "hash", 1)).uid

    async def peer(self) -> ChatStore:
        store = SqliteChatStore(SqliteDatabase(self.path))
        await store.start()
        self._peers.append(store)
        return store


class PostgresChatHarness(ChatHarness):
    """The PostgreSQL stores on a fresh schema of the test server (``tests/support/postgres.py``), dropped
    at close; ``reopen`` keeps it. No skip when the server is down: the suite fails."""

    def __init__(self, tmp_path: Path, *, outbox: bool = False) -> None:
        self.schema = PgSchema()
        self.outbox = outbox
        self._accounts: PostgresAccountStore | None = None
        self._peers: list[ChatStore] = []

    async def open(self) -> None:
        db = self.schema.database()
        self.store = PostgresChatStore(db, outbox=self.outbox)
        self._accounts = PostgresAccountStore(db)
        await start(self.store, self._accounts)

    async def _close_stores(self) -> None:
        assert self._accounts is not None
        while self._peers:
            await self._peers.pop().close()
        await self._accounts.close()
        await self.store.close()

    async def close(self) -> None:
        try:
            await self._close_stores()
        finally:
            await self.schema.drop()

    async def reopen(self) -> ChatStore:
        await self._close_stores()
        await self.open()
        return self.store

    async def add_user(self, username: str, display_name: str) -> int:
        assert self._accounts is not None
        return (await self._accounts.create_user(username, display_name, "hash", 1)).uid

    async def peer(self) -> ChatStore:
        store = PostgresChatStore(self.schema.database())  # its own pool
        await start(store)
        self._peers.append(store)
        return store


CHAT_STORES = [
    pytest.param(SqliteChatHarness, id="sqlite"),
    pytest.param(PostgresChatHarness, id="postgres"),
]


@pytest.fixture(params=CHAT_STORES)
async def chat(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ChatHarness]:
    harness: ChatHarness = request.param(tmp_path)
    await harness.open()
    yield harness
    await harness.close()


@pytest.fixture(params=CHAT_STORES)
async def outbox_chat(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ChatHarness]:
    """Like ``chat``, with the store built with ``outbox=True``."""
    harness: ChatHarness = request.param(tmp_path, outbox=True)
    await harness.open()
    yield harness
    await harness.close()


# --- FileStore ------------------------------------------------------------------------------------------


class FileHarness(abc.ABC):
    """A :class:`FileStore` and a :class:`ChatStore` on the same fresh storage: the read rule follows the
    membership and the ``file_refs`` rows that chat commits write."""

    files: FileStore
    chat: ChatStore

    @abc.abstractmethod
    async def open(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...


class SqliteFileHarness(FileHarness):
    def __init__(self, tmp_path: Path) -> None:
        db = SqliteDatabase(tmp_path / "im.db")
        self.files = SqliteFileStore(db)
        self.chat = SqliteChatStore(db)

    async def open(self) -> None:
        await self.chat.start()
        await self.files.start()

    async def close(self) -> None:
        await self.files.close()
        await self.chat.close()


class PostgresFileHarness(FileHarness):
    def __init__(self, tmp_path: Path) -> None:
        self.schema = PgSchema()
        db = self.schema.database()
        self.files = PostgresFileStore(db)
        self.chat = PostgresChatStore(db)

    async def open(self) -> None:
        await start(self.chat, self.files)

    async def close(self) -> None:
        try:
            await self.files.close()
            await self.chat.close()
        finally:
            await self.schema.drop()


FILE_STORES = [
    pytest.param(SqliteFileHarness, id="sqlite"),
    pytest.param(PostgresFileHarness, id="postgres"),
]


@pytest.fixture(params=FILE_STORES)
async def file_harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[FileHarness]:
    harness: FileHarness = request.param(tmp_path)
    await harness.open()
    yield harness
    await harness.close()


# --- Presence -------------------------------------------------------------------------------------------


class PresenceHarness(abc.ABC):
    presence: Presence
    #: A TTL that ``advance`` can outlive quickly (seconds).
    ttl: float

    @abc.abstractmethod
    async def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass for the engine (a fake clock, or a real sleep)."""

    async def close(self) -> None:  # noqa: B027 - optional
        pass


class MemoryPresenceHarness(PresenceHarness):
    ttl = 30.0

    def __init__(self) -> None:
        self.clock = FakeClock()
        self.presence = MemoryPresence(clock=self.clock)

    async def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)


class RealTimePresenceHarness(PresenceHarness):
    """Base for engines without an injectable clock (Redis, ...): a short TTL and real sleeps."""

    ttl = 0.3

    async def advance(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class RedisPresenceHarness(RealTimePresenceHarness):
    """:class:`RedisPresence` on the Redis at ``REDIS_URL`` under a private key prefix, deleted at close.

    No skip when Redis is down: the suite fails, as it does for any engine it was asked to run.
    """

    ttl = 0.5  # real sleeps: a margin for a busy 2-core machine

    def __init__(self) -> None:
        self.prefix = f"im-test-{uuid.uuid4().hex[:12]}:"
        self.redis = RedisPresence(REDIS_URL, prefix=self.prefix)
        self.presence = self.redis

    async def close(self) -> None:
        try:
            await delete_redis_prefix(self.redis.client, self.prefix)
        finally:
            await self.redis.close()


PRESENCES = [
    pytest.param(MemoryPresenceHarness, id="memory"),
    pytest.param(RedisPresenceHarness, id="redis"),
]


@pytest.fixture(params=PRESENCES)
async def presence_harness(request: pytest.FixtureRequest) -> AsyncIterator[PresenceHarness]:
    harness: PresenceHarness = request.param()
    yield harness
    await harness.close()


# --- Router ---------------------------------------------------------------------------------------------


class RouterHarness:
    """A router, and how long it may take to deliver (a "nothing arrives" check waits that long)."""

    quiet: float = 0.0

    def __init__(self) -> None:
        self.router: Router = MemoryRouter()

    async def close(self) -> None:
        pass


ROUTERS = [pytest.param(RouterHarness, id="memory")]


@pytest.fixture(params=ROUTERS)
async def router_harness(request: pytest.FixtureRequest) -> AsyncIterator[RouterHarness]:
    harness: RouterHarness = request.param()
    yield harness
    await harness.close()


# --- Registry -------------------------------------------------------------------------------------------


class RegistryHarness(abc.ABC):
    registry: Registry
    ttl: float
    #: How long a watch notification may take to arrive (a "no more callbacks" check waits that long).
    quiet: float = 0.0

    @abc.abstractmethod
    async def advance(self, seconds: float) -> None: ...

    async def close(self) -> None:  # noqa: B027 - optional
        pass


class MemoryRegistryHarness(RegistryHarness):
    ttl = 30.0

    def __init__(self) -> None:
        self.clock = FakeClock()
        self.registry = MemoryRegistry(clock=self.clock)

    async def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)


class EtcdRegistryHarness(RegistryHarness):
    """:class:`EtcdRegistry` on the test session's private etcd (``tests/support/etcd.py``), under a
    private prefix deleted at close. Without background keepalives: as in the contract, only
    ``register`` and ``update_load`` renew, so ``advance`` (a real sleep) lets registrations expire.
    etcd TTLs are whole seconds and etcd removes expired leases up to 0.5 s late, hence a TTL of 4 s.
    No skip when the ``etcd`` binary is missing: the suite fails, saying how to install it.
    """

    ttl = 4.0
    quiet = 0.3

    def __init__(self) -> None:
        self.prefix = f"/im-test/{uuid.uuid4().hex[:12]}/"
        self.etcd = EtcdRegistry(shared_etcd().endpoint, prefix=self.prefix, keepalive=False)
        self.registry = self.etcd

    async def advance(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def close(self) -> None:
        try:
            await self.etcd.client.delete_prefix(self.prefix.encode())
        finally:
            await self.etcd.close()


REGISTRIES = [
    pytest.param(MemoryRegistryHarness, id="memory"),
    pytest.param(EtcdRegistryHarness, id="etcd"),
]


@pytest.fixture(params=REGISTRIES)
async def registry_harness(request: pytest.FixtureRequest) -> AsyncIterator[RegistryHarness]:
    harness: RegistryHarness = request.param()
    yield harness
    await harness.close()
