"""A private schema on the test PostgreSQL server, for tests of the PostgreSQL stores.

The server is ``IM_TEST_POSTGRES_DSN`` (default: the local server, user ``postgres``, database ``test``).
Each :class:`PgSchema` is a fresh ``im_test_<random>`` schema, dropped with everything in it by
:meth:`PgSchema.drop`, so tests are isolated and may run in parallel. An unreachable server fails the
test: it is never skipped (in CI a missing service is a failure).
"""

from __future__ import annotations

import os
import secrets
from typing import Protocol

import asyncpg
import pytest

from im.backends.sql.postgres_db import PostgresDatabase


class Startable(Protocol):
    async def start(self) -> None: ...


DSN = os.environ.get("IM_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")


class PgSchema:
    """A schema name that no other test uses; databases opened on it see only its tables."""

    def __init__(self) -> None:
        self.name = f"im_test_{secrets.token_hex(6)}"

    def database(self, *, min_size: int = 1, max_size: int = 4) -> PostgresDatabase:
        """A (not yet opened) database on this schema; opening it creates the schema and migrates it."""
        return PostgresDatabase(DSN, schema=self.name, min_size=min_size, max_size=max_size, connect_timeout=5.0)

    async def drop(self) -> None:
        conn = await connect()
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{self.name}" CASCADE')
        finally:
            await conn.close()


async def connect() -> asyncpg.Connection:
    """A plain connection to the test server (fails the test, with the DSN, when it is unreachable)."""
    try:
        return await asyncpg.connect(DSN, timeout=5.0)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        pytest.fail(f"PostgreSQL at {DSN} is unreachable ({type(exc).__name__}: {exc}); set IM_TEST_POSTGRES_DSN")


async def start(*services: Startable) -> None:
    """Start stores on the test server, failing the test with the DSN when it cannot be reached."""
    try:
        for service in services:
            await service.start()
    except (OSError, TimeoutError) as exc:
        pytest.fail(f"PostgreSQL at {DSN} is unreachable ({type(exc).__name__}: {exc}); set IM_TEST_POSTGRES_DSN")
