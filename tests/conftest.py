"""Fixtures shared by the unit tests, and the pytest-xdist groups and port windows of the whole suite
(tests/support/workers.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from im.backends.accounts import AccountStore
from im.backends.accounts.postgres import PostgresAccountStore
from im.backends.accounts.sqlite import SqliteAccountStore
from im.backends.sql.sqlite_db import SqliteDatabase
from im.grpc_runtime import use_grpc_defaults
from tests.support.postgres import PgSchema, start
from tests.support.workers import confine_this_worker, group_of, make_scheduler
from tests.support.zygote import ZYGOTE

# On a pytest-xdist worker, free ports come from this worker's own window (tests/support/workers.py).
confine_this_worker()


def pytest_configure(config: pytest.Config) -> None:
    # gRPC as im's command line runs it (the test modules, which import grpc, are collected after this)
    use_grpc_defaults()
    # pytest-xdist registers the mark too; this is for a run without it (-p no:xdist)
    config.addinivalue_line("markers", "xdist_group(name): the tests of one group run on one xdist worker")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups into the test ids
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test gets its xdist group (``--dist loadgroup``): its module's, or the one shared by the tests
    that must not overlap (tests/support/workers.py, whose scheduler applies the same groups)."""
    for item in items:
        path = item.path
        module = (path.relative_to(config.rootpath) if path.is_relative_to(config.rootpath) else path).as_posix()
        item.add_marker(pytest.mark.xdist_group(group_of(module)))


@pytest.hookimpl(tryfirst=True, optionalhook=True)  # before xdist's own; optional: -p no:xdist
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """``--dist loadgroup`` with the groups above, whatever pytest does to the test ids."""
    return make_scheduler(config, log)


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
