"""Implementation factories for the backend contract suites.

Each interface of ``im.backends.base`` has one parametrized fixture here; a new engine (PostgreSQL,
Redis, etcd, ...) joins the suite by adding one ``pytest.param(<harness class>, id="<engine>")`` to the
matching list below. A harness wraps an implementation with what the tests need around it that the
interface does not offer (creating users, reopening the storage, moving time forward).
"""

from __future__ import annotations

import abc
import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from im.backends.base import ChatStore, Presence, Registry, Router
from im.backends.memory import MemoryPresence, MemoryRegistry, MemoryRouter
from im.backends.sqlite_accounts import SqliteAccountStore
from im.backends.sqlite_chat import SqliteChatStore
from im.backends.sqlite_db import SqliteDatabase

# --- helpers --------------------------------------------------------------------------------------------


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def eventually(check: Callable[[], bool], timeout: float = 2.0) -> None:
    """Wait until ``check()`` holds (at once for in-process engines; networked ones deliver later)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached within the timeout")
        await asyncio.sleep(0.005)


# --- ChatStore ------------------------------------------------------------------------------------------


class ChatHarness(abc.ABC):
    """A :class:`ChatStore` on fresh, private storage, plus the accounts needed for titles."""

    store: ChatStore

    @abc.abstractmethod
    async def open(self) -> None:
        """Create and start ``self.store`` (and whatever holds the users)."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def add_user(self, username: str, display_name: str) -> int:
        """Create a user the store's ``list_conversations`` can name; returns the uid."""

    async def reopen(self) -> ChatStore:
        """Close everything and open a new store on the same storage."""
        await self.close()
        await self.open()
        return self.store


class SqliteChatHarness(ChatHarness):
    def __init__(self, tmp_path: Path) -> None:
        self.path = tmp_path / "im.db"
        self._accounts: SqliteAccountStore | None = None

    async def open(self) -> None:
        db = SqliteDatabase(self.path)
        self.store = SqliteChatStore(db)
        self._accounts = SqliteAccountStore(db)
        await self.store.start()
        await self._accounts.start()

    async def close(self) -> None:
        assert self._accounts is not None
        await self._accounts.close()
        await self.store.close()

    async def add_user(self, username: str, display_name: str) -> int:
        assert self._accounts is not None
        return (await self._accounts.create_user(username, display_name, "hash", 1)).uid


CHAT_STORES = [pytest.param(SqliteChatHarness, id="sqlite")]


@pytest.fixture(params=CHAT_STORES)
async def chat(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ChatHarness]:
    harness: ChatHarness = request.param(tmp_path)
    await harness.open()
    yield harness
    await harness.close()


# --- Presence -------------------------------------------------------------------------------------------


class PresenceHarness(abc.ABC):
    presence: Presence
    #: A TTL that ``advance`` can outlive quickly (seconds).
    ttl: float

    @abc.abstractmethod
    async def advance(self, seconds: float) -> None:
        """Let ``seconds`` pass for the engine (a fake clock, or a real sleep)."""

    async def close(self) -> None:  # noqa: B027 - optional
        pass


class MemoryPresenceHarness(PresenceHarness):
    ttl = 30.0

    def __init__(self) -> None:
        self.clock = FakeClock()
        self.presence = MemoryPresence(clock=self.clock)

    async def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)


class RealTimePresenceHarness(PresenceHarness):
    """Base for engines without an injectable clock (Redis, ...): a short TTL and real sleeps."""

    ttl = 0.3

    async def advance(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


PRESENCES = [pytest.param(MemoryPresenceHarness, id="memory")]


@pytest.fixture(params=PRESENCES)
async def presence_harness(request: pytest.FixtureRequest) -> AsyncIterator[PresenceHarness]:
    harness: PresenceHarness = request.param()
    yield harness
    await harness.close()


# --- Router ---------------------------------------------------------------------------------------------


class RouterHarness:
    """A router, and how long it may take to deliver (a "nothing arrives" check waits that long)."""

    quiet: float = 0.0

    def __init__(self) -> None:
        self.router: Router = MemoryRouter()

    async def close(self) -> None:
        pass


ROUTERS = [pytest.param(RouterHarness, id="memory")]


@pytest.fixture(params=ROUTERS)
async def router_harness(request: pytest.FixtureRequest) -> AsyncIterator[RouterHarness]:
    harness: RouterHarness = request.param()
    yield harness
    await harness.close()


# --- Registry -------------------------------------------------------------------------------------------


class RegistryHarness(abc.ABC):
    registry: Registry
    ttl: float
    #: How long a watch notification may take to arrive (a "no more callbacks" check waits that long).
    quiet: float = 0.0

    @abc.abstractmethod
    async def advance(self, seconds: float) -> None: ...

    async def close(self) -> None:  # noqa: B027 - optional
        pass


class MemoryRegistryHarness(RegistryHarness):
    ttl = 30.0

    def __init__(self) -> None:
        self.clock = FakeClock()
        self.registry = MemoryRegistry(clock=self.clock)

    async def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)


REGISTRIES = [pytest.param(MemoryRegistryHarness, id="memory")]


@pytest.fixture(params=REGISTRIES)
async def registry_harness(request: pytest.FixtureRequest) -> AsyncIterator[RegistryHarness]:
    harness: RegistryHarness = request.param()
    yield harness
    await harness.close()
