"""An encrypted chat store on each engine, with raw SQL access to what it stored underneath."""

from __future__ import annotations

import abc
import re
import secrets
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from im.backends.accounts import AccountStore
from im.backends.accounts.postgres import PostgresAccountStore
from im.backends.accounts.sqlite import SqliteAccountStore
from im.backends.chat import ChatStore, ConversationKeys
from im.backends.chat.encrypted import EncryptedChatStore
from im.backends.chat.postgres import PostgresChatStore, PostgresConversationKeys
from im.backends.chat.sqlite import SqliteChatStore, SqliteConversationKeys
from im.backends.files.ids import FileIds
from im.backends.files.postgres import PostgresFileStore
from im.backends.files.sqlite import SqliteFileStore
from im.backends.keys.file import FileKeyProvider
from im.backends.keys.keyring import Keyring
from im.backends.sql.postgres_db import PostgresDatabase
from im.backends.sql.sqlite_db import SqliteDatabase
from tests.support.client import Account, register
from tests.support.postgres import PgSchema, connect, start
from tests.support.server import ServerProcess


class Engine(abc.ABC):
    """The plain store, its key store and accounts on one fresh database; ``encrypted`` wraps them."""

    inner: ChatStore
    keys: ConversationKeys
    accounts: AccountStore
    key_file: Path

    def keyring(self, keys: ConversationKeys | None = None, **kw: Any) -> Keyring:
        """A keyring on the key file; its own key store on the same storage unless ``keys`` is given
        (the keyring owns its store and closes it)."""
        return Keyring(FileKeyProvider(self.key_file), keys or self.second()[1], **kw)

    @abc.abstractmethod
    async def open(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    def second(self) -> tuple[ChatStore, ConversationKeys]:
        """Another (unstarted) plain store and key store on the same storage, as another process."""

    @abc.abstractmethod
    def file_store(self, ids: FileIds, *, recheck: float = 60.0) -> SqliteFileStore | PostgresFileStore:
        """A new (unstarted) file store on the same storage, naming files as ``ids`` says."""

    @abc.abstractmethod
    async def sql(self, query: str, *args: Any) -> list[tuple[Any, ...]]:
        """Run raw SQL with positional ``?`` placeholders (what an attacker with database access does)."""


class SqliteEngine(Engine):
    def __init__(self, tmp_path: Path) -> None:
        self.path = tmp_path / "im.db"
        self.key_file = tmp_path / "master.key"
        db = SqliteDatabase(self.path)
        self.inner, self.keys, self.accounts = SqliteChatStore(db), SqliteConversationKeys(db), SqliteAccountStore(db)

    async def open(self) -> None:
        for s in (self.inner, self.keys, self.accounts):
            await s.start()

    async def close(self) -> None:
        for s in (self.accounts, self.keys, self.inner):
            await s.close()

    def second(self) -> tuple[ChatStore, ConversationKeys]:
        db = SqliteDatabase(self.path)
        return SqliteChatStore(db), SqliteConversationKeys(db)

    def file_store(self, ids: FileIds, *, recheck: float = 60.0) -> SqliteFileStore | PostgresFileStore:
        return SqliteFileStore(SqliteDatabase(self.path), ids=ids, recheck=recheck)

    async def sql(self, query: str, *args: Any) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(self.path, isolation_level=None)
        try:
            return conn.execute(query, args).fetchall()
        finally:
            conn.close()


class PostgresEngine(Engine):
    def __init__(self, tmp_path: Path) -> None:
        self.schema = PgSchema()
        self.key_file = tmp_path / "master.key"
        db = self.schema.database()
        self.inner, self.keys, self.accounts = (
            PostgresChatStore(db),
            PostgresConversationKeys(db),
            PostgresAccountStore(db),
        )

    async def open(self) -> None:
        await start(self.inner, self.keys, self.accounts)

    async def close(self) -> None:
        try:
            for s in (self.accounts, self.keys, self.inner):
                await s.close()
        finally:
            await self.schema.drop()

    def database(self) -> PostgresDatabase:
        return self.schema.database()

    def second(self) -> tuple[ChatStore, ConversationKeys]:
        db = self.schema.database()
        return PostgresChatStore(db), PostgresConversationKeys(db)

    def file_store(self, ids: FileIds, *, recheck: float = 60.0) -> SqliteFileStore | PostgresFileStore:
        return PostgresFileStore(self.schema.database(), ids=ids, recheck=recheck)

    async def sql(self, query: str, *args: Any) -> list[tuple[Any, ...]]:
        n = 0

        def number(_: object) -> str:
            nonlocal n
            n += 1
            return f"${n}"

        conn = await connect()
        try:
            await conn.execute(f'SET search_path TO "{self.schema.name}"')
            rows = await conn.fetch(re.sub(r"\?", number, query), *args)
            return [tuple(r) for r in rows]
        finally:
            await conn.close()


ENGINES = [pytest.param(SqliteEngine, id="sqlite"), pytest.param(PostgresEngine, id="postgres")]


@pytest.fixture(params=ENGINES)
async def engine(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Engine]:
    e: Engine = request.param(tmp_path)
    await e.open()
    yield e
    await e.close()


@pytest.fixture
async def store(engine: Engine) -> AsyncIterator[EncryptedChatStore]:
    s = EncryptedChatStore(engine.inner, engine.keyring(), owns_keyring=True)
    await s.start()
    yield s
    await s.close()


async def alice_bob_and_group(server: ServerProcess) -> tuple[Account, Account, int]:
    """Two new users of a running server, and a group of theirs that Alice made (its gid)."""
    alice = await register(server.api, f"alice{secrets.token_hex(3)}")
    bob = await register(server.api, f"bob{secrets.token_hex(3)}")
    async with httpx.AsyncClient(timeout=10) as http:
        r = await http.post(f"{server.api}/groups", json={"name": "team", "members": [bob.uid]}, headers=alice.auth)
    assert r.status_code in (200, 201), r.text
    return alice, bob, int(r.json()["gid"])
