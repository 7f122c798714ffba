"""A real transfer node for the link tests: a Committer over SQLite on a tmp file, MemoryPresence, and
the Transfer service on a grpc.aio server bound to a free loopback port."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from im.backends.accounts.sqlite import SqliteAccountStore
from im.backends.chat.sqlite import SqliteChatStore
from im.backends.presence import Presence
from im.backends.presence.memory import MemoryPresence
from im.backends.routing import DeliverySink
from im.backends.sql.sqlite_db import SqliteDatabase
from im.core.committer import Committer, SendRequest
from im.core.consent import Consent
from im.core.states import ConversationStates
from im.model.chat import CommitBatch, StoredMessage
from im.model.cluster import DeviceLocation
from im.model.errors import ImError
from im.transfer import GrpcRouter, LinkTls, TransferLink, TransferServicer, serve_transfer


class RecordingSink(DeliverySink):
    """A gateway node's Hub stand-in: records what arrives, in order."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[StoredMessage, list[int]]]] = []
        self.events: list[tuple[object, list[int], tuple[int, str] | None]] = []
        self.replaced: list[DeviceLocation] = []
        self.catch_ups = 0  # how often a link told it to catch up (it came up, or its node dropped some)

    @property
    def messages(self) -> list[tuple[StoredMessage, list[int]]]:
        return [pair for batch in self.batches for pair in batch]

    def deliver(self, messages: Sequence[StoredMessage], recipients: Sequence[Sequence[int]]) -> None:
        self.batches.append([(m, list(r)) for m, r in zip(messages, recipients, strict=True)])

    def deliver_event(self, frame: object, uids: Iterable[int], skip: tuple[int, str] | None) -> None:
        self.events.append((frame, list(uids), skip))

    def close_replaced(self, connections: Sequence[DeviceLocation]) -> None:
        self.replaced.extend(connections)

    def catch_up(self) -> None:
        self.catch_ups += 1


class GatedChatStore(SqliteChatStore):
    """Commits wait for ``gate``: sends stay in the core, unanswered, until the test opens it."""

    def __init__(self, db: SqliteDatabase) -> None:
        super().__init__(db)
        self.gate = asyncio.Event()
        self.gate.set()

    async def commit(self, batch: CommitBatch) -> None:
        await self.gate.wait()
        await super().commit(batch)


@dataclass
class Results:
    """Collects ``done`` callbacks in arrival order."""

    got: list[tuple[SendRequest, StoredMessage | None, bool, ImError | None]] = field(default_factory=list)

    def done(self, req: SendRequest, m: StoredMessage | None, dup: bool, err: ImError | None) -> None:
        self.got.append((req, m, dup, err))


@dataclass
class Core:
    store: GatedChatStore
    accounts: SqliteAccountStore
    presence: Presence
    router: GrpcRouter
    committer: Committer
    servicer: TransferServicer
    server: Any
    port: int
    links: list[TransferLink] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def user(self, name: str, node: str) -> int:
        uid = (await self.accounts.create_user(name, name.title(), "hash", 1)).uid
        await self.presence.set_online([DeviceLocation(uid, "d1", node)], ttl=600)
        return uid

    async def link(self, node: str, sink: DeliverySink, kind: type[TransferLink] = TransferLink) -> TransferLink:
        link = kind(self.address, node, sink, backoff_initial=0.02, backoff_max=0.2)
        self.links.append(link)
        link.start()
        await asyncio.wait_for(link.wait_connected(), 10)
        return link

    async def restart_server(self) -> None:
        self.server, _ = await serve_transfer(self.servicer, self.address)


async def open_core(
    tmp_path: Path,
    *,
    node: str = "tr-1",
    tls: LinkTls | None = None,
    max_pending: int = 100_000,
    presence: Presence | None = None,
    answer_wait: float = 0.0,
    answer_wait_max_batch: int = 64,
) -> Core:
    """A transfer node on a free loopback port (over mutual TLS when ``tls`` is given); close it with
    :func:`close_core`. ``presence``: a started one (default: a new :class:`MemoryPresence`)."""
    db = SqliteDatabase(tmp_path / "im.db")
    store, accounts = GatedChatStore(db), SqliteAccountStore(db)
    await store.start()
    await accounts.start()
    router = GrpcRouter()
    presence = MemoryPresence() if presence is None else presence
    states, consent = ConversationStates(store), Consent(accounts, store)
    committer = Committer(
        store,
        accounts,
        router,
        presence,
        states,
        consent,
        answer_wait=answer_wait,
        answer_wait_max_batch=answer_wait_max_batch,
    )
    committer.start()
    servicer = TransferServicer(committer, router, node=node, tls=tls, max_pending=max_pending)
    server, port = await serve_transfer(servicer)
    return Core(store, accounts, presence, router, committer, servicer, server, port)


async def close_core(c: Core) -> None:
    for link in c.links:
        await link.close()
    await c.server.stop(None)
    c.store.gate.set()
    await c.committer.stop()
    await c.accounts.close()
    await c.store.close()


@pytest.fixture
async def core(tmp_path: Path) -> AsyncIterator[Core]:
    c = await open_core(tmp_path)
    yield c
    await close_core(c)
