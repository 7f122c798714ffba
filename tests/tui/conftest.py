"""Fixtures for the ``im chat`` tests: a real ``im serve`` subprocess, accounts, a second user driven by the
SDK (the helpers are in helpers.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from im.client import Client
from tests.support.client import Account, register
from tests.support.server import ServerProcess, running_server
from tests.tui.helpers import PASSWORD, Peer, devices


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    with running_server(tmp_path / "data") as proc:
        yield proc


@pytest.fixture
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder for every screenshot of the run (its path is printed)."""
    return tmp_path_factory.getbasetemp() / "tui-screenshots"


@pytest.fixture
async def accounts(server: ServerProcess) -> Callable[..., Any]:
    async def make(username: str) -> Account:
        return await register(server.api, username, PASSWORD)

    return make


@pytest.fixture
async def peer(server: ServerProcess) -> AsyncIterator[Callable[..., Any]]:
    """``await peer(account, device=None)`` -> a connected :class:`Peer`; closed after the test."""
    peers: list[Peer] = []

    async def make(account: Account, device: str | None = None) -> Peer:
        device = device or f"peer-{next(devices)}"
        client = await Client.login(server.http, account.username, PASSWORD, device=device)
        peers.append(Peer(account, client))
        return peers[-1]

    yield make
    for p in peers:
        await p.close()
