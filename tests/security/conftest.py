"""Fixtures of the attack tests: a real ``im serve`` (relaxed registration and login limits, see
tests/support/server.py; files that attack those limits start their own), an HTTP client on its API,
and a local cluster for the attacks that cross nodes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from im.cluster import LocalCluster
from tests.cluster.conftest import make_cluster, stop_checked
from tests.support.server import ServerProcess, running_server


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    with running_server(tmp_path / "data") as proc:
        yield proc


@pytest.fixture
async def http(server: ServerProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.api, timeout=10) as client:
        yield client


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    c = make_cluster(tmp_path / "cluster").start()
    yield c
    stop_checked(c)
