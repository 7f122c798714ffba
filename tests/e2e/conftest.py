"""Fixtures: a real ``im serve`` subprocess per test, and the history checker run on every test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.support.checker import History
from tests.support.server import ServerProcess, running_server


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    with running_server(tmp_path / "data") as proc:
        yield proc


@pytest.fixture(autouse=True)
async def history(server: ServerProcess) -> AsyncIterator[History]:
    """On every end-to-end test: each client made through ``history`` records what it sent, got acked
    and received; after the test the checker verifies C1-C6 against the server's stored log."""
    h = History(server)
    yield h
    await h.close_all()
    await h.check()
