"""Fixtures for the SDK tests: a real ``im serve`` subprocess and SDK clients that record their events."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from im.client import Ack, ApiClient, ApiError, Client, ClientEvent, Message
from tests.support.server import ServerProcess, running_server

PASSWORD = "correct horse battery"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    with running_server(tmp_path / "data") as proc:
        yield proc


class Recorder:
    """Consumes a client's ``events()`` in a background task, the way an application would."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.events: list[ClientEvent] = []
        self._changed = asyncio.Event()
        self.task = asyncio.create_task(self._consume())

    async def _consume(self) -> None:
        async for event in self.client.events():
            self.events.append(event)
            self._changed.set()

    def of(self, kind: type[Any]) -> list[Any]:
        return [e for e in self.events if type(e) is kind]

    @property
    def messages(self) -> list[Message]:
        return self.of(Message)

    @property
    def acks(self) -> list[Ack]:
        return self.of(Ack)

    def seqs(self, conv: str) -> list[int]:
        """Seqs of ``conv`` as the application saw them: received messages and own acked sends."""
        return [e.seq for e in self.events if type(e) in (Message, Ack) and e.conv == conv]  # type: ignore[union-attr]

    async def wait(self, predicate: Callable[[], bool], timeout: float = 30.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()


_names = itertools.count(1)
ClientFactory = Callable[..., Awaitable[tuple[Client, Recorder | None]]]


@pytest.fixture
async def make_client(server: ServerProcess) -> AsyncIterator[ClientFactory]:
    """``await make_client("alice", device="phone", transport="ws", **options)`` -> (client, recorder).
    Registers the user on first use; every client is closed at the end of the test."""
    clients: list[Client] = []
    registered: set[str] = set()

    async def make(username: str, *, device: str = "dev", **options: Any) -> tuple[Client, Recorder | None]:
        if username not in registered:
            async with ApiClient(server.http) as api:
                with contextlib.suppress(ApiError):  # registered by the test itself
                    await api.register(username, PASSWORD)
            registered.add(username)
        options.setdefault("backoff_max", 0.5)
        client = await Client.login(server.http, username, PASSWORD, device=device, **options)
        clients.append(client)
        # With on_event the application takes events itself; otherwise a Recorder drains events().
        return client, None if "on_event" in options else Recorder(client)

    yield make
    for c in clients:
        await c.close()
