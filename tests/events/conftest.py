"""Fixtures for the event pipeline tests: the real RabbitMQ (``IM_TEST_AMQP_URL``, default the local
broker; unreachable fails the test, never skips it), a private exchange and queue per test (deleted at
teardown), a local webhook receiver, and chat stores with the outbox on."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from im.backends.chat import ChatStore
from im.backends.chat.postgres import PostgresChatStore
from im.backends.chat.sqlite import SqliteChatStore
from im.backends.sql.sqlite_db import SqliteDatabase
from im.events.topology import connect
from tests.support.postgres import PgSchema, start

AMQP_URL = os.environ.get("IM_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


async def amqp_connect() -> aio_pika.abc.AbstractConnection:
    try:
        return await connect(AMQP_URL, timeout=5)
    except Exception as exc:
        pytest.fail(f"RabbitMQ at {AMQP_URL} is unreachable ({type(exc).__name__}: {exc}); set IM_TEST_AMQP_URL")


@dataclass(frozen=True)
class Names:
    exchange: str
    queue: str


@pytest.fixture
async def names() -> AsyncIterator[Names]:
    """A unique exchange and queue name; both are deleted at teardown (stop relays and consumers first)."""
    token = secrets.token_hex(4)
    n = Names(f"im.test.events.{token}", f"im.test.push.{token}")
    connection = await amqp_connect()  # fail early when the broker is not there
    yield n
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(n.queue)
        await channel.exchange_delete(n.exchange)


@dataclass
class WebhookReceiver:
    """A tiny HTTP/1.1 server recording POSTs; answers 500 to the next ``fail`` requests, 200 after."""

    fail: int = 0
    requests: list[tuple[dict[str, str], Any]] = field(default_factory=list)
    failed: int = 0
    url: str = ""
    _server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/push"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    @property
    def bodies(self) -> list[Any]:
        return [body for _, body in self.requests]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                if self.fail > 0:
                    self.fail -= 1
                    self.failed += 1
                    writer.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n")
                else:
                    self.requests.append((headers, json.loads(body)))
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def webhook() -> AsyncIterator[WebhookReceiver]:
    receiver = WebhookReceiver()
    await receiver.start()
    yield receiver
    await receiver.close()


@pytest.fixture(params=["sqlite", "postgres"])
async def outbox_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ChatStore]:
    """A chat store with the outbox on, on fresh storage."""
    if request.param == "sqlite":
        store: ChatStore = SqliteChatStore(SqliteDatabase(tmp_path / "im.db"), outbox=True)
        await store.start()
        yield store
        await store.close()
        return
    schema = PgSchema()
    store = PostgresChatStore(schema.database(), outbox=True)
    await start(store)
    try:
        yield store
    finally:
        try:
            await store.close()
        finally:
            await schema.drop()


def members_of(store: ChatStore) -> Any:
    async def members(conv: str) -> Sequence[int]:
        states = await store.load_conversations([conv])
        return list(states[conv].members) if conv in states else []

    return members
