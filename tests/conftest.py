"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from im.backends.accounts import AccountStore
from im.backends.accounts.postgres import PostgresAccountStore
from im.backends.accounts.sqlite import SqliteAccountStore
from im.backends.sql.sqlite_db import SqliteDatabase
from tests.support.postgres import PgSchema, start
from tests.support.zygote import ZYGOTE


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Stop the process the suite forks its servers from (its children are stopped by their tests)."""
    ZYGOTE.close()


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AccountStore]:
    """An account store on fresh storage: a new SQLite file, or a new schema on the test PostgreSQL
    (``tests/support/postgres.py``; an unreachable server fails the test, never skips it)."""
    if request.param == "sqlite":
        s: AccountStore = SqliteAccountStore(SqliteDatabase(tmp_path / "im.db"))
        await s.start()
        yield s
        await s.close()
        return
    schema = PgSchema()
    s = PostgresAccountStore(schema.database())
    await start(s)
    try:
        yield s
    finally:
        try:
            await s.close()
        finally:
            await schema.drop()
