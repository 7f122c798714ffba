"""Implementation factories for the backend contract suites.

Each interface under ``im.backends`` has one parametrized fixture here; a new engine (PostgreSQL,
Redis, etcd, ...) joins the suite by adding one ``pytest.param(<harness class>, id="<engine>")`` to the
matching list below. A harness wraps an implementation with what the tests need around it that the
interface does not offer (creating users, reopening the storage, moving time forward), and builds
``unstarted()`` ones on the same storage for the lifecycle checks (``tests/contract/lifecycle.py``).

No engine is ever skipped: an unreachable PostgreSQL, Redis or a missing etcd fails the test.
"""

from __future__ import annotations

import abc
import asyncio
import functools
import os
import sqlite3
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import obstore
import pytest
import redis.asyncio as aioredis

from im.backends.accounts import AccountStore
from im.backends.accounts.postgres import PostgresAccountStore
from im.backends.accounts.sqlite import SqliteAccountStore
from im.backends.blobs import BlobStorage
from im.backends.blobs.encrypted import EncryptedBlobStorage
from im.backends.blobs.local import LocalBlobStorage
from im.backends.blobs.s3 import S3BlobStorage
from im.backends.chat import ChatStore, ConversationKeys
from im.backends.chat.encrypted import EncryptedChatStore
from im.backends.chat.postgres import PostgresChatStore, PostgresConversationKeys
from im.backends.chat.sqlite import SqliteChatStore, SqliteConversationKeys
from im.backends.dedupe import Dedupe
from im.backends.dedupe.memory import MemoryDedupe
from im.backends.dedupe.redis import RedisDedupe
from im.backends.files import FileStore
from im.backends.files.ids import FileIds
from im.backends.files.postgres import PostgresFileStore
from im.backends.files.sqlite import SqliteFileStore
from im.backends.keys.file import FileKeyProvider
from im.backends.keys.keyring import Keyring
from im.backends.presence import Presence
from im.backends.presence.memory import MemoryPresence
from im.backends.presence.redis import RedisPresence
from im.backends.registry import Registry
from im.backends.registry.etcd import EtcdRegistry
from im.backends.registry.memory import MemoryRegistry
from im.backends.sql.sqlite_db import SqliteDatabase
from im.backends.tls import redis_options
from tests.contract.node_ids import node_ids_harness  # noqa: F401 - the fixture, defined beside
from tests.contract.routers import router_harness  # noqa: F401 - the fixture, defined beside
from tests.support.etcd import shared_etcd
from tests.support.keys import SEALED_MAGIC, MemoryFileKeys, sealed_plaintext
from tests.support.postgres import PgSchema, start
from tests.support.postgres import connect as pg_connect
from tests.support.seaweedfs import s3_settings, shared_weed
from tests.support.tls_etcd import shared_tls_etcd, tls_client
from tests.support.tls_redis import shared_tls_redis

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
    """A :class:`ChatStore` on fresh, private storage, plus the accounts needed for titles.

    With ``encrypted``, every store it hands out is the engine's store inside an
    :class:`EncryptedChatStore` that owns its own keyring (the key file in the test's directory, the data
    keys on the same database): the same contract must hold through the encryption."""

    store: ChatStore
    encrypted: bool = False
    key_file: Path

    def wrap(self, inner: ChatStore, keys: ConversationKeys) -> ChatStore:
        if not self.encrypted:
            return inner
        return EncryptedChatStore(inner, Keyring(FileKeyProvider(self.key_file), keys), owns_keyring=True)

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

    @abc.abstractmethod
    def unstarted(self) -> ChatStore:
        """A new, not yet started store on the same storage (its own database object)."""

    @abc.abstractmethod
    def on_one_database(self) -> tuple[ChatStore, AccountStore]:
        """A new chat store and account store sharing one new database object (not started), as the
        composition root builds them."""


class SqliteChatHarness(ChatHarness):
    def __init__(self, tmp_path: Path, *, outbox: bool = False, encrypted: bool = False) -> None:
        self.path = tmp_path / "im.db"
        self.outbox = outbox
        self.encrypted = encrypted
        self.key_file = tmp_path / "master.key"
        self._accounts: SqliteAccountStore | None = None
        self._peers: list[ChatStore] = []

    async def open(self) -> None:
        db = SqliteDatabase(self.path)
        self.store = self.wrap(SqliteChatStore(db, outbox=self.outbox), SqliteConversationKeys(db))
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
        db = SqliteDatabase(self.path)
        store = self.wrap(SqliteChatStore(db), SqliteConversationKeys(db))
        await store.start()
        self._peers.append(store)
        return store

    def unstarted(self) -> ChatStore:
        db = SqliteDatabase(self.path)
        return self.wrap(SqliteChatStore(db, outbox=self.outbox), SqliteConversationKeys(db))

    def on_one_database(self) -> tuple[ChatStore, AccountStore]:
        db = SqliteDatabase(self.path)
        return self.wrap(SqliteChatStore(db, outbox=self.outbox), SqliteConversationKeys(db)), SqliteAccountStore(db)


class PostgresChatHarness(ChatHarness):
    """The PostgreSQL stores on a fresh schema of the test server (``tests/support/postgres.py``), dropped
    at close; ``reopen`` keeps it. No skip when the server is down: the suite fails."""

    def __init__(self, tmp_path: Path, *, outbox: bool = False, encrypted: bool = False) -> None:
        self.schema = PgSchema()
        self.outbox = outbox
        self.encrypted = encrypted
        self.key_file = tmp_path / "master.key"
        self._accounts: PostgresAccountStore | None = None
        self._peers: list[ChatStore] = []

    async def open(self) -> None:
        db = self.schema.database()
        self.store = self.wrap(PostgresChatStore(db, outbox=self.outbox), PostgresConversationKeys(db))
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
        db = self.schema.database()  # its own pool
        store = self.wrap(PostgresChatStore(db), PostgresConversationKeys(db))
        await start(store)
        self._peers.append(store)
        return store

    def unstarted(self) -> ChatStore:
        db = self.schema.database()
        return self.wrap(PostgresChatStore(db, outbox=self.outbox), PostgresConversationKeys(db))

    def on_one_database(self) -> tuple[ChatStore, AccountStore]:
        db = self.schema.database()
        return (
            self.wrap(PostgresChatStore(db, outbox=self.outbox), PostgresConversationKeys(db)),
            PostgresAccountStore(db),
        )


CHAT_STORES = [
    pytest.param(SqliteChatHarness, id="sqlite"),
    pytest.param(PostgresChatHarness, id="postgres"),
    pytest.param(functools.partial(SqliteChatHarness, encrypted=True), id="sqlite-encrypted"),
    pytest.param(functools.partial(PostgresChatHarness, encrypted=True), id="postgres-encrypted"),
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

    def __init__(self, *, keyed: bool) -> None:
        #: The tables hold keyed ids (im.backends.files.ids), not the hashes; the chat store keys its file
        #: refs as ``im serve``'s does.
        self.keyed = keyed
        self.keys = MemoryFileKeys() if keyed else None

    def _ids(self) -> FileIds:
        return FileIds(self.keys, keyed=self.keyed)

    def _chat(self, inner: ChatStore) -> ChatStore:
        return EncryptedChatStore(inner, None, seal=False, file_ids=self._ids()) if self.keyed else inner

    @abc.abstractmethod
    async def open(self) -> None: ...

    @abc.abstractmethod
    async def sql(self, query: str) -> list[tuple[Any, ...]]:
        """Raw SQL on the storage underneath (what someone with the database file or tables sees)."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    def unstarted(self) -> FileStore:
        """A new, not yet started file store on the same storage."""


class SqliteFileHarness(FileHarness):
    def __init__(self, tmp_path: Path, *, keyed: bool = False) -> None:
        super().__init__(keyed=keyed)
        self.path = tmp_path / "im.db"
        db = SqliteDatabase(self.path)
        self.files = SqliteFileStore(db, ids=self._ids())
        self.chat = self._chat(SqliteChatStore(db))

    async def sql(self, query: str) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(self.path)
        try:
            return conn.execute(query).fetchall()
        finally:
            conn.close()

    async def open(self) -> None:
        await self.chat.start()
        await self.files.start()

    async def close(self) -> None:
        await self.files.close()
        await self.chat.close()

    def unstarted(self) -> FileStore:
        return SqliteFileStore(SqliteDatabase(self.path), ids=self._ids())


class PostgresFileHarness(FileHarness):
    def __init__(self, tmp_path: Path, *, keyed: bool = False) -> None:
        super().__init__(keyed=keyed)
        self.schema = PgSchema()
        db = self.schema.database()
        self.files = PostgresFileStore(db, ids=self._ids())
        self.chat = self._chat(PostgresChatStore(db))

    async def open(self) -> None:
        await start(self.chat, self.files)

    def unstarted(self) -> FileStore:
        return PostgresFileStore(self.schema.database(), ids=self._ids())

    async def sql(self, query: str) -> list[tuple[Any, ...]]:
        conn = await pg_connect()
        try:
            await conn.execute(f'SET search_path TO "{self.schema.name}"')
            return [tuple(r) for r in await conn.fetch(query)]
        finally:
            await conn.close()

    async def close(self) -> None:
        try:
            await self.files.close()
            await self.chat.close()
        finally:
            await self.schema.drop()


FILE_STORES = [
    pytest.param(SqliteFileHarness, id="sqlite"),
    pytest.param(PostgresFileHarness, id="postgres"),
    pytest.param(functools.partial(SqliteFileHarness, keyed=True), id="sqlite-keyed"),
    pytest.param(functools.partial(PostgresFileHarness, keyed=True), id="postgres-keyed"),
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

    @abc.abstractmethod
    def unstarted(self) -> Presence:
        """A new, not yet started presence on the same storage."""

    async def close(self) -> None:  # noqa: B027 - optional
        pass


class MemoryPresenceHarness(PresenceHarness):
    ttl = 30.0

    def __init__(self) -> None:
        self.clock = FakeClock()
        self.presence = MemoryPresence(clock=self.clock)

    def unstarted(self) -> Presence:
        return MemoryPresence(clock=self.clock)

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

    def unstarted(self) -> Presence:
        return RedisPresence(REDIS_URL, prefix=self.prefix)  # its own connection pool, closed by close()

    async def close(self) -> None:
        try:
            await delete_redis_prefix(self.redis.client, self.prefix)
        finally:
            await self.redis.close()


class RedisTlsPresenceHarness(RedisPresenceHarness):
    """The same on a private Redis that speaks only TLS and requires a client certificate
    (``tests/support/tls_redis.py``): ``rediss://`` with the CA and a client certificate."""

    def __init__(self) -> None:
        self.prefix = f"im-test-{uuid.uuid4().hex[:12]}:"
        self.redis = self.unstarted()
        self.presence = self.redis

    def unstarted(self) -> RedisPresence:
        r = shared_tls_redis()
        return RedisPresence(r.url, prefix=self.prefix, tls=r.client_tls())


PRESENCES = [
    pytest.param(MemoryPresenceHarness, id="memory"),
    pytest.param(RedisPresenceHarness, id="redis"),
    pytest.param(RedisTlsPresenceHarness, id="redis-tls"),
]


@pytest.fixture(params=PRESENCES)
async def presence_harness(request: pytest.FixtureRequest) -> AsyncIterator[PresenceHarness]:
    harness: PresenceHarness = request.param()
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

    @abc.abstractmethod
    def unstarted(self) -> Registry:
        """A new, not yet started registry on the same storage."""

    async def close(self) -> None:  # noqa: B027 - optional
        pass


class MemoryRegistryHarness(RegistryHarness):
    ttl = 30.0

    def __init__(self) -> None:
        self.clock = FakeClock()
        self.registry = MemoryRegistry(clock=self.clock)

    def unstarted(self) -> Registry:
        return MemoryRegistry(clock=self.clock)

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

    def unstarted(self) -> Registry:
        return EtcdRegistry(shared_etcd().endpoint, prefix=self.prefix, keepalive=False)

    async def advance(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def close(self) -> None:
        try:
            await self.etcd.client.delete_prefix(self.prefix.encode())
        finally:
            await self.etcd.close()


class EtcdTlsRegistryHarness(EtcdRegistryHarness):
    """The same on a private etcd that speaks only TLS and requires a client certificate
    (``--client-cert-auth``): the whole contract over mutual TLS."""

    def __init__(self) -> None:
        self.prefix = f"/im-test/{uuid.uuid4().hex[:12]}/"
        self.etcd = self.unstarted()
        self.registry = self.etcd

    def unstarted(self) -> EtcdRegistry:
        etcd = shared_tls_etcd()
        return EtcdRegistry(etcd.endpoint, tls=tls_client(etcd.pki), prefix=self.prefix, keepalive=False)


REGISTRIES = [
    pytest.param(MemoryRegistryHarness, id="memory"),
    pytest.param(EtcdRegistryHarness, id="etcd"),
    pytest.param(EtcdTlsRegistryHarness, id="etcd-tls"),
]


@pytest.fixture(params=REGISTRIES)
async def registry_harness(request: pytest.FixtureRequest) -> AsyncIterator[RegistryHarness]:
    harness: RegistryHarness = request.param()
    yield harness
    await harness.close()


# --- AccountStore ---------------------------------------------------------------------------------------


class AccountHarness(abc.ABC):
    """An :class:`AccountStore` on fresh, private storage."""

    store: AccountStore

    @abc.abstractmethod
    async def open(self) -> None:
        """Create and start ``self.store``."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    async def reopen(self) -> AccountStore:
        """Close the store and start a new one (a new database object) on the same storage."""
        await self.store.close()
        await self.open()
        return self.store

    @abc.abstractmethod
    def unstarted(self) -> AccountStore:
        """A new, not yet started store on the same storage."""


class SqliteAccountHarness(AccountHarness):
    def __init__(self, tmp_path: Path) -> None:
        self.path = tmp_path / "im.db"

    async def open(self) -> None:
        self.store = SqliteAccountStore(SqliteDatabase(self.path))
        await self.store.start()

    async def close(self) -> None:
        await self.store.close()

    def unstarted(self) -> AccountStore:
        return SqliteAccountStore(SqliteDatabase(self.path))


class PostgresAccountHarness(AccountHarness):
    """On a fresh schema of the test server, dropped at close (``reopen`` keeps it)."""

    def __init__(self, tmp_path: Path) -> None:
        self.schema = PgSchema()

    async def open(self) -> None:
        self.store = PostgresAccountStore(self.schema.database())
        await start(self.store)

    async def close(self) -> None:
        try:
            await self.store.close()
        finally:
            await self.schema.drop()

    def unstarted(self) -> AccountStore:
        return PostgresAccountStore(self.schema.database())


ACCOUNT_STORES = [
    pytest.param(SqliteAccountHarness, id="sqlite"),
    pytest.param(PostgresAccountHarness, id="postgres"),
]


@pytest.fixture(params=ACCOUNT_STORES)
async def account_harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AccountHarness]:
    harness: AccountHarness = request.param(tmp_path)
    await harness.open()
    yield harness
    await harness.close()


# --- Dedupe ---------------------------------------------------------------------------------------------


class DedupeHarness(abc.ABC):
    dedupe: Dedupe

    async def open(self) -> None:  # noqa: B027 - optional
        pass

    @abc.abstractmethod
    def unstarted(self) -> Dedupe:
        """A new, not yet started dedupe on the same storage."""

    async def close(self) -> None:  # noqa: B027 - optional
        pass


class MemoryDedupeHarness(DedupeHarness):
    def __init__(self) -> None:
        self.dedupe = MemoryDedupe(ttl=60)

    def unstarted(self) -> Dedupe:
        return MemoryDedupe(ttl=60)


class RedisDedupeHarness(DedupeHarness):
    """:class:`RedisDedupe` on the Redis at ``REDIS_URL`` under a private prefix, deleted at close. The
    client is the harness's (the dedupe does not own it). No skip when Redis is down: the test fails."""

    def __init__(self) -> None:
        self.client = aioredis.Redis.from_url(REDIS_URL)
        self.prefix = f"im:test:push:{uuid.uuid4().hex[:8]}:"
        self.dedupe = RedisDedupe(self.client, prefix=self.prefix, ttl=60)

    async def open(self) -> None:
        try:
            await self.client.ping()
        except Exception as exc:
            pytest.fail(f"Redis at {REDIS_URL} is unreachable ({type(exc).__name__}: {exc})")

    def unstarted(self) -> Dedupe:
        return RedisDedupe(self.client, prefix=self.prefix, ttl=60)

    async def close(self) -> None:
        try:
            await delete_redis_prefix(self.client, self.prefix)
        finally:
            await self.client.aclose()


class RedisTlsDedupeHarness(RedisDedupeHarness):
    """The same on the private TLS Redis, with the client the composition root builds for the push
    consumer's dedupe (``rediss://`` plus ``redis_options``)."""

    def __init__(self) -> None:
        r = shared_tls_redis()
        self.client = aioredis.Redis.from_url(r.url, **redis_options(r.url, r.client_tls()))
        self.prefix = f"im:test:push:{uuid.uuid4().hex[:8]}:"
        self.dedupe = RedisDedupe(self.client, prefix=self.prefix, ttl=60)


DEDUPES = [
    pytest.param(MemoryDedupeHarness, id="memory"),
    pytest.param(RedisDedupeHarness, id="redis"),
    pytest.param(RedisTlsDedupeHarness, id="redis-tls"),
]


@pytest.fixture(params=DEDUPES)
async def dedupe_harness(request: pytest.FixtureRequest) -> AsyncIterator[DedupeHarness]:
    harness: DedupeHarness = request.param()
    try:
        await harness.open()
        yield harness
    finally:
        await harness.close()


# --- BlobStorage ----------------------------------------------------------------------------------------


class BlobHarness(abc.ABC):
    """A :class:`BlobStorage` on fresh storage, and a look behind it: what is published, what is staged."""

    storage: BlobStorage

    @abc.abstractmethod
    def stored(self) -> list[str]:
        """The keys of the blobs published, sorted (read from the storage itself, not through the API)."""

    @abc.abstractmethod
    def staged(self) -> list[int]:
        """The sizes of the puts staged and not published (in progress, or left behind)."""

    @abc.abstractmethod
    def raw(self, sha256: str) -> bytes:
        """A published blob's bytes, read from the storage itself."""

    @abc.abstractmethod
    def version(self, sha256: str) -> object:
        """Something that changes when a published blob is written again."""

    @abc.abstractmethod
    def unstarted(self) -> BlobStorage:
        """A new, not yet started storage on the same place."""


class LocalBlobHarness(BlobHarness):
    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path / "files"
        self.storage = LocalBlobStorage(self.root, buffer_bytes=64 * 1024)

    def _path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    def stored(self) -> list[str]:
        return sorted(p.name for p in self.root.rglob("*") if p.is_file() and p.parent.name != "tmp")

    def staged(self) -> list[int]:
        return [p.stat().st_size for p in sorted((self.root / "tmp").iterdir())]

    def raw(self, sha256: str) -> bytes:
        return self._path(sha256).read_bytes()

    def version(self, sha256: str) -> object:
        return self._path(sha256).stat().st_mtime_ns

    def unstarted(self) -> BlobStorage:
        return LocalBlobStorage(self.root)


class EncryptedBlobHarness(BlobHarness):
    """The encrypted storage; ``stored`` and ``raw`` undo its keyed names and sealing with the same keys
    (``raw`` through a second storage on the same directory, as a restarted node would)."""

    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path / "files"
        self.keys = MemoryFileKeys()
        self.storage = EncryptedBlobStorage(self.root, self.keys, chunk_bytes=16 * 1024, buffer_bytes=64 * 1024)
        self._known: dict[str, str] = {}  # on-disk name -> sha256, for every hash the tests ask about

    def _files(self) -> list[Path]:
        return sorted(p for p in (self.root / "sealed").rglob("*") if p.is_file())

    def _path(self, sha256: str) -> Path:
        assert isinstance(self.storage, EncryptedBlobStorage)
        name = self.storage.name(sha256)
        self._known[name] = sha256
        return self.storage.path(sha256)

    def stored(self) -> list[str]:
        # Names are keyed hashes: map back those of blobs the tests put (found by a read through the API).
        names = [p.name for p in self._files()]
        return sorted(self._known.get(n, n) for n in names)

    def staged(self) -> list[int]:
        return [p.stat().st_size for p in sorted((self.root / "tmp").iterdir())]

    def raw(self, sha256: str) -> bytes:
        path = self._path(sha256)
        assert path.read_bytes()[:8] == SEALED_MAGIC  # sealed on disk
        return sealed_plaintext(path, self.keys, sha256)

    def version(self, sha256: str) -> object:
        return self._path(sha256).stat().st_mtime_ns

    def unstarted(self) -> BlobStorage:
        return EncryptedBlobStorage(self.root, self.keys)


class S3BlobHarness(BlobHarness):
    """The S3 storage on the shared SeaweedFS, under a key prefix of its own; ``sealed``: with keys.
    ``stored``/``raw`` list and read the bucket directly; ``version`` is the filer's record of the object's
    data (its chunk ids and their write times), which a rewrite of the same bytes changes."""

    sealed = False

    def __init__(self, tmp_path: Path) -> None:
        self.weed = shared_weed()
        self.settings = s3_settings(self.weed)
        self.staging = tmp_path / "staging"
        self.tmp_path = tmp_path
        self.keys = MemoryFileKeys()
        self.storage = self._make(chunk_bytes=16 * 1024, buffer_bytes=64 * 1024)
        self.client = self.settings.client()
        self._known: dict[str, str] = {}  # object key -> sha256, for every hash the tests ask about

    def _make(self, **kwargs: int) -> S3BlobStorage:
        return S3BlobStorage(self.settings, self.staging, keys=self.keys if self.sealed else None, **kwargs)

    def _key(self, sha256: str) -> str:
        assert isinstance(self.storage, S3BlobStorage)
        key = self.storage.key(sha256)
        self._known[key] = sha256
        return key

    def stored(self) -> list[str]:
        keys = [meta["path"] for page in obstore.list(self.client, prefix=self.settings.prefix) for meta in page]
        return sorted(self._known.get(k, k.rsplit("/", 1)[-1]) for k in keys)

    def staged(self) -> list[int]:
        return [p.stat().st_size for p in sorted(self.staging.iterdir())]

    def raw(self, sha256: str) -> bytes:
        data = bytes(obstore.get(self.client, self._key(sha256)).bytes())
        if not self.sealed:
            return data
        assert data[:8] == SEALED_MAGIC  # sealed in the bucket
        copy = self.tmp_path / f"raw-{sha256}"
        copy.write_bytes(data)
        return sealed_plaintext(copy, self.keys, sha256)

    def version(self, sha256: str) -> object:
        url = f"http://127.0.0.1:{self.weed.filer_port}/buckets/{self.weed.bucket}/{self._key(sha256)}"
        entry = httpx.get(url, params={"metadata": "true"}, timeout=5).json()
        return [(c["file_id"], c["modified_ts_ns"]) for c in entry["chunks"]]

    def unstarted(self) -> BlobStorage:
        return self._make()


class SealedS3BlobHarness(S3BlobHarness):
    sealed = True


BLOB_STORAGES = [
    pytest.param(LocalBlobHarness, id="local"),
    pytest.param(EncryptedBlobHarness, id="encrypted"),
    pytest.param(S3BlobHarness, id="s3"),
    pytest.param(SealedS3BlobHarness, id="s3-sealed"),
]


@pytest.fixture(params=BLOB_STORAGES)
async def blob_harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BlobHarness]:
    harness: BlobHarness = request.param(tmp_path)
    await harness.storage.start()
    yield harness
    await harness.storage.close()


# --- ConversationKeys (the wrapped data keys) and KeyProvider (the master key) ---------------------------


class KeyStoreHarness(abc.ABC):
    """A :class:`ConversationKeys` on fresh storage; ``peer`` opens another on the same storage, as
    another process would (its own database object)."""

    store: ConversationKeys

    @abc.abstractmethod
    async def open(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def peer(self) -> ConversationKeys:
        """Another started store on the same storage (closed with the harness)."""

    @abc.abstractmethod
    def unstarted(self) -> ConversationKeys: ...


class SqliteKeyStoreHarness(KeyStoreHarness):
    def __init__(self, tmp_path: Path) -> None:
        self.path = tmp_path / "im.db"
        self._peers: list[ConversationKeys] = []

    async def open(self) -> None:
        self.store = SqliteConversationKeys(SqliteDatabase(self.path))
        await self.store.start()

    async def close(self) -> None:
        while self._peers:
            await self._peers.pop().close()
        await self.store.close()

    async def peer(self) -> ConversationKeys:
        store = SqliteConversationKeys(SqliteDatabase(self.path))
        await store.start()
        self._peers.append(store)
        return store

    def unstarted(self) -> ConversationKeys:
        return SqliteConversationKeys(SqliteDatabase(self.path))


class PostgresKeyStoreHarness(KeyStoreHarness):
    def __init__(self, tmp_path: Path) -> None:
        self.schema = PgSchema()
        self._peers: list[ConversationKeys] = []

    async def open(self) -> None:
        self.store = PostgresConversationKeys(self.schema.database())
        await start(self.store)

    async def close(self) -> None:
        try:
            while self._peers:
                await self._peers.pop().close()
            await self.store.close()
        finally:
            await self.schema.drop()

    async def peer(self) -> ConversationKeys:
        store = PostgresConversationKeys(self.schema.database())
        await start(store)
        self._peers.append(store)
        return store

    def unstarted(self) -> ConversationKeys:
        return PostgresConversationKeys(self.schema.database())


KEY_STORES = [
    pytest.param(SqliteKeyStoreHarness, id="sqlite"),
    pytest.param(PostgresKeyStoreHarness, id="postgres"),
]


@pytest.fixture(params=KEY_STORES)
async def key_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[KeyStoreHarness]:
    harness: KeyStoreHarness = request.param(tmp_path)
    await harness.open()
    yield harness
    await harness.close()
