"""PostgresDatabase on the test PostgreSQL server: versioned migrations, concurrent starters, the shared
pool. (The stores themselves run the contract suites in ``tests/contract``.)"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from im.backends.accounts.postgres import PostgresAccountStore
from im.backends.chat.postgres import PostgresChatStore
from im.backends.sql.postgres_db import MIGRATIONS, PostgresDatabase, SchemaTooNew
from im.model.errors import Conflict
from tests.support.postgres import PgSchema, connect


@pytest.fixture
async def schema() -> AsyncIterator[PgSchema]:
    s = PgSchema()
    yield s
    await s.drop()


async def versions(schema: PgSchema) -> list[int]:
    conn = await connect()
    try:
        rows = await conn.fetch(f'SELECT version FROM "{schema.name}".schema_version ORDER BY version')
        return [int(r[0]) for r in rows]
    finally:
        await conn.close()


async def tables(schema: PgSchema) -> set[str]:
    conn = await connect()
    try:
        rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = $1", schema.name)
        return {str(r[0]) for r in rows}
    finally:
        await conn.close()


async def test_fresh_schema_is_created_and_migrated(schema: PgSchema) -> None:
    db = schema.database()
    await db.open()
    try:
        assert await db.version() == len(MIGRATIONS)
    finally:
        await db.close()
    assert await versions(schema) == list(range(1, len(MIGRATIONS) + 1))
    assert await tables(schema) == {
        "schema_version",
        "users",
        "auth_sessions",
        "contacts",
        "groups",
        "conversations",
        "members",
        "messages",
        "device_cursors",
        "files",
        "file_owners",
        "file_refs",
        "outbox",
        "blocks",
        "data_keys",
        "node_fences",
    }


async def test_upgrade_applies_only_the_new_scripts_and_keeps_data(schema: PgSchema) -> None:
    old = PostgresAccountStore(PostgresDatabase(schema.database().dsn, schema=schema.name, migrations=MIGRATIONS[:1]))
    await old.start()
    user = await old.create_user("erin", "Erin", "h", 1)
    await old.close()
    assert await versions(schema) == [1]
    assert "files" not in await tables(schema)

    new = PostgresAccountStore(schema.database())
    await new.start()
    try:
        assert await versions(schema) == list(range(1, len(MIGRATIONS) + 1))
        assert "files" in await tables(schema)
        assert await new.get_user(user.uid) == user
        with pytest.raises(Conflict):
            await new.create_user("ERIN", "E", "h", 2)
        assert (await new.create_user("fred", "Fred", "h", 3)).uid > user.uid
    finally:
        await new.close()


async def test_concurrent_starters_migrate_once(schema: PgSchema) -> None:
    dbs = [schema.database(min_size=1, max_size=1) for _ in range(6)]
    await asyncio.gather(*(db.open() for db in dbs))
    try:
        assert await versions(schema) == list(range(1, len(MIGRATIONS) + 1))
    finally:
        for db in dbs:
            await db.close()


async def test_failed_migration_changes_nothing(schema: PgSchema) -> None:
    db = schema.database()
    await db.open()
    await db.close()
    broken = PostgresDatabase(
        db.dsn, schema=schema.name, migrations=[*MIGRATIONS, "CREATE TABLE extra (a INTEGER); SELECT 1/0;"]
    )
    with pytest.raises(asyncpg.DivisionByZeroError):
        await broken.open()
    assert await versions(schema) == list(range(1, len(MIGRATIONS) + 1))
    assert "extra" not in await tables(schema)


async def test_a_newer_schema_is_refused(schema: PgSchema) -> None:
    db = schema.database()
    await db.open()
    await db.close()
    with pytest.raises(SchemaTooNew):
        await PostgresDatabase(db.dsn, schema=schema.name, migrations=MIGRATIONS[:1]).open()


async def test_stores_share_one_pool_opened_counted(schema: PgSchema) -> None:
    db = schema.database()
    chat, accounts = PostgresChatStore(db), PostgresAccountStore(db)
    await chat.start()
    await accounts.start()
    pool = db.pool
    await chat.close()
    assert db.pool is pool and await accounts.get_user(1) is None  # still open for the other store
    await accounts.close()
    with pytest.raises(RuntimeError):
        _ = db.pool


def test_schema_name_is_checked() -> None:
    with pytest.raises(ValueError):
        PostgresDatabase("postgresql://x", schema='x"; DROP TABLE users; --')
