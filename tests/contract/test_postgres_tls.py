"""PostgreSQL over TLS: the ``store.postgres_ssl*`` settings against a private server that accepts only
TLS connections with a client certificate of its CA (tests/support/postgres.py ``TlsPostgres``)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from im.backends.chat.encrypted import EncryptedChatStore
from im.backends.chat.postgres import PostgresChatStore
from im.backends.sql.postgres_db import PostgresDatabase, postgres_ssl
from im.compose import build_backends
from im.config import load_config
from tests.support.pki import EnginePki
from tests.support.postgres import TlsPostgres
from tests.support.wait import eventually


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsPostgres]:
    pg = TlsPostgres(EnginePki.create(tmp_path_factory.mktemp("pg-pki"))).start()
    yield pg
    pg.stop()


@pytest.fixture
async def opened() -> AsyncIterator[list[PostgresDatabase]]:
    dbs: list[PostgresDatabase] = []
    yield dbs
    for db in dbs:
        await db.close()


def full(pki: EnginePki, mode: str = "verify-full") -> object:
    return postgres_ssl(mode, rootcert=pki.ca.cert, cert=pki.client.cert, key=pki.client.key)  # type: ignore[arg-type]


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_verify_full_with_a_client_certificate_connects_over_tls(
    server: TlsPostgres, opened: list[PostgresDatabase], host: str
) -> None:
    db = PostgresDatabase(server.dsn(host), schema="im_tls", min_size=1, max_size=2, ssl=full(server.pki))  # type: ignore[arg-type]
    await db.open()
    opened.append(db)
    assert await db.pool.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()") is True
    assert await db.version() > 0  # migrated over TLS


@pytest.mark.parametrize("mode", ["verify-ca", "require"])
async def test_weaker_modes_still_present_the_client_certificate(server: TlsPostgres, mode: str) -> None:
    conn = await asyncpg.connect(server.dsn(), ssl=full(server.pki, mode), timeout=5)
    try:
        assert await conn.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()") is True
    finally:
        await conn.close()


@pytest.mark.parametrize(
    "ssl_setting",
    ["disable", "no client certificate", "server of an untrusted CA", "host name not in the certificate"],
)
async def test_refused(server: TlsPostgres, ssl_setting: str) -> None:
    pki = server.pki
    dsn = server.dsn()
    if ssl_setting == "disable":
        ssl = postgres_ssl("disable")
    elif ssl_setting == "no client certificate":
        ssl = postgres_ssl("verify-full", rootcert=pki.ca.cert)
    elif ssl_setting == "server of an untrusted CA":
        ssl = postgres_ssl("verify-ca", rootcert=pki.dir / "other" / "ca.crt", cert=pki.client.cert, key=pki.client.key)
    else:
        ssl = full(pki)  # type: ignore[assignment]
        dsn = server.dsn("127.0.0.2")  # the server listens there too; its certificate does not name it
    why = {
        "disable": "no encryption",  # pg_hba: hostnossl ... reject
        "no client certificate": "certificate",  # clientcert=verify-ca
        "server of an untrusted CA": "certificate verify failed",
        "host name not in the certificate": "certificate verify failed",
    }[ssl_setting]
    before = open_sockets()
    with pytest.raises((asyncpg.PostgresError, OSError)) as refused:
        conn = await asyncpg.connect(dsn, ssl=ssl, timeout=5)
        await conn.close()
    assert why in str(refused.value)
    # A refusal after the TLS handshake closes with a TLS shutdown that takes a few loop turns; a test
    # that ended first would close its loop on a live socket, and the next test would be blamed for it.
    await eventually(lambda: not open_sockets() - before, "the refused connection's socket closed", 5)


def open_sockets() -> set[str]:
    """This process's open sockets, by inode: a refused connection must leave none behind."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:
            continue
        if target.startswith("socket:"):
            found.add(target)
    return found


async def test_compose_builds_the_tls_store_from_settings(server: TlsPostgres, tmp_path: Path) -> None:
    pki = server.pki
    config = load_config(
        overrides={
            "data_dir": str(tmp_path),
            "store": {
                "kind": "postgres",
                "postgres_dsn": server.dsn(),
                "postgres_schema": "im_compose",
                "postgres_sslmode": "verify-full",
                "postgres_sslrootcert": str(pki.ca.cert),
                "postgres_sslcert": str(pki.client.cert),
                "postgres_sslkey": str(pki.client.key),
            },
        }
    )
    b = build_backends(config)
    assert isinstance(b.chat_store, EncryptedChatStore) and isinstance(b.chat_store.inner, PostgresChatStore)
    await b.start()
    try:
        assert await b.account_store.create_user("tls", "TLS", "hash", 1) is not None
    finally:
        await b.close()
