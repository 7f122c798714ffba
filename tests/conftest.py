"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from im.backends.sqlite_accounts import SqliteAccountStore
from im.backends.sqlite_db import SqliteDatabase


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteAccountStore]:
    """An account store on a fresh SQLite file."""
    s = SqliteAccountStore(SqliteDatabase(tmp_path / "im.db"))
    await s.start()
    yield s
    await s.close()
