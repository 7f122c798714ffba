"""Before the suite (scripts/test.sh): the engines the tests use answer, and PostgreSQL has their database.

Reads the same overrides as the tests (README, "Run the tests"): IM_TEST_POSTGRES_DSN, REDIS_TEST_URL,
IM_TEST_AMQP_URL. A missing database is created (connected to the server's ``postgres`` database as the
DSN's user). Prints one line per engine; exits 1 with what to do when one does not answer, so a machine
without Redis fails here in seconds rather than through hundreds of tests.
"""

from __future__ import annotations

import asyncio
import os
import sys
from urllib.parse import urlsplit

import aio_pika
import asyncpg
import redis.asyncio as redis

POSTGRES = os.environ.get("IM_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
REDIS = os.environ.get("REDIS_TEST_URL", "redis://127.0.0.1:6379/0")
AMQP = os.environ.get("IM_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
TIMEOUT = 10.0


async def postgres() -> str:
    dsn = urlsplit(POSTGRES)
    database = dsn.path.lstrip("/") or "postgres"
    try:
        conn = await asyncpg.connect(POSTGRES, timeout=TIMEOUT)
    except asyncpg.InvalidCatalogNameError:
        admin = await asyncpg.connect(dsn._replace(path="/postgres").geturl(), timeout=TIMEOUT)
        try:
            await admin.execute(f'CREATE DATABASE "{database}"')
        finally:
            await admin.close()
        return f"PostgreSQL {dsn.hostname}:{dsn.port or 5432}: created database {database!r}"
    await conn.close()
    return f"PostgreSQL {dsn.hostname}:{dsn.port or 5432}: database {database!r} is there"


async def redis_ping() -> str:
    client = redis.Redis.from_url(REDIS, socket_connect_timeout=TIMEOUT)
    try:
        await client.ping()
    finally:
        await client.aclose()
    return f"Redis {urlsplit(REDIS).hostname}:{urlsplit(REDIS).port or 6379}: answers"


async def rabbitmq() -> str:
    conn = await aio_pika.connect(AMQP, timeout=TIMEOUT)
    await conn.close()
    return f"RabbitMQ {urlsplit(AMQP).hostname}:{urlsplit(AMQP).port or 5672}: answers"


HINTS = {
    "PostgreSQL": "run PostgreSQL with user postgres allowed without a password from 127.0.0.1 (pg_hba.conf: "
    "host all postgres 127.0.0.1/32 trust), or set IM_TEST_POSTGRES_DSN",
    "Redis": "start Redis (Debian: apt-get install redis-server), or set REDIS_TEST_URL",
    "RabbitMQ": "start RabbitMQ (Debian: apt-get install rabbitmq-server; user guest/guest), or set IM_TEST_AMQP_URL",
}


async def main() -> int:
    checks = {"PostgreSQL": postgres(), "Redis": redis_ping(), "RabbitMQ": rabbitmq()}
    results = await asyncio.gather(*checks.values(), return_exceptions=True)
    failed = 0
    for name, result in zip(checks, results, strict=True):
        if isinstance(result, BaseException):
            failed += 1
            reason = f"{type(result).__name__}: {result}".splitlines()[0]
            print(f"scripts/test.sh: {name} does not answer ({reason}): {HINTS[name]}", file=sys.stderr)
        else:
            print(f"scripts/test.sh: {result}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
