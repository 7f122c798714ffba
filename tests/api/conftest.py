"""The HTTP API in process: ``im.api.app.create_app`` over real services (SQLite in ``tmp_path``, memory
presence and routing), called through ``httpx.ASGITransport`` (no socket, no uvicorn).

:func:`build_services` is the one place that builds what ``create_app`` receives and how a test writes a
message (the chat write path): when that changes, only it changes.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from im.api.app import create_app
from im.backends.accounts.sqlite import SqliteAccountStore
from im.backends.blobs.local import LocalBlobStorage
from im.backends.chat.sqlite import SqliteChatStore
from im.backends.files.sqlite import SqliteFileStore
from im.backends.presence.memory import MemoryPresence
from im.backends.rate_limit import Rule
from im.backends.rate_limit.memory import MemoryRateLimiter
from im.backends.routing.memory import MemoryRouter
from im.backends.sql.sqlite_db import SqliteDatabase
from im.config import LimitsConfig
from im.core.accounts import AccountService
from im.core.committer import Committer, SendRequest
from im.core.consent import Consent
from im.core.groups import Groups
from im.core.passwords import LoginGuard
from im.core.reads import ChatReads
from im.core.states import ConversationStates
from im.files import FileService
from im.model.chat import StoredMessage
from im.model.cluster import DeviceLocation

PASSWORD = "correct horse battery"
#: Small limits, so the tests reach them cheaply.
LIMITS = LimitsConfig(max_group_members=5, history_page_max=4)
MAX_REQUEST_BYTES = 16 * 1024
MAX_UPLOAD_BYTES = 50_000
#: Registrations one address may make in a test built with ``limited=True``.
REGISTER_LIMIT = 3


@dataclass
class Services:
    """The services behind one app, started; ``gateway`` is what the gateway picker answers."""

    accounts: AccountService
    committer: Committer
    groups: Groups
    reads: ChatReads
    files: FileService
    presence: MemoryPresence
    close: Callable[[], Awaitable[None]]
    gateway: dict[str, str] | None = None
    _sent: int = field(default=0, init=False)

    async def pick_gateway(self) -> dict[str, str] | None:
        return self.gateway

    async def send(
        self, uid: int, body: Any, *, to: int | None = None, conv: str | None = None, type: str = "text"
    ) -> StoredMessage:
        """Commit one message from ``uid`` (device "d1") as a gateway would, through the write path."""
        self._sent += 1
        req = SendRequest(uid, "d1", f"api-test-{self._sent}", conv, to, type, json.dumps(body).encode())
        message, _dup = await self.committer.send(req)
        return message

    async def online(self, uid: int, device: str = "d1") -> None:
        await self.presence.set_online([DeviceLocation(uid, device, "gw-test")], ttl=60)


async def build_services(tmp_path: Path, *, limited: bool = False) -> Services:
    """Started services on one SQLite file; ``limited``: registrations per address are rate limited."""
    db = SqliteDatabase(tmp_path / "im.db")
    account_store, chat_store, file_store = SqliteAccountStore(db), SqliteChatStore(db), SqliteFileStore(db)
    for store in (account_store, chat_store, file_store):
        await store.start()
    guard = None
    if limited:
        lenient = Rule("login", 1000, 60.0)
        guard = LoginGuard(
            MemoryRateLimiter(),
            login_per_account_address=lenient,
            login_per_account=lenient,
            login_per_address=lenient,
            register_per_address=Rule("register", REGISTER_LIMIT, 3600.0),
        )
    accounts = AccountService(
        account_store,
        secret=b"api route tests secret",
        argon2_time_cost=1,
        argon2_memory_kib=8,
        argon2_parallelism=1,
        guard=guard,
    )
    files = FileService(LocalBlobStorage(tmp_path / "files"), file_store, max_upload_bytes=MAX_UPLOAD_BYTES)
    await files.start()
    presence = MemoryPresence()
    states, consent = ConversationStates(chat_store), Consent(account_store, chat_store)
    committer = Committer(
        chat_store,
        account_store,
        MemoryRouter(),
        presence,
        states,
        consent,
        files=files,
        max_group_members=LIMITS.max_group_members,
    )
    groups = Groups(committer, chat_store, account_store, consent, max_group_members=LIMITS.max_group_members)
    reads = ChatReads(chat_store, account_store, presence, states, consent, history_page_max=LIMITS.history_page_max)
    committer.start()

    async def close() -> None:
        await committer.stop()
        await files.close()
        for store in (file_store, chat_store, account_store):
            await store.close()

    return Services(accounts, committer, groups, reads, files, presence, close)


@dataclass
class User:
    uid: int
    username: str
    access: str
    refresh: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.access}"}


@dataclass
class Api:
    """An HTTP client on the app, and the services behind it."""

    http: httpx.AsyncClient
    services: Services

    async def user(self, username: str) -> User:
        """Register ``username`` and log in, through the routes."""
        r = await self.http.post("/api/v1/auth/register", json={"username": username, "password": PASSWORD})
        assert r.status_code == 201, r.text
        return await self.login(username)

    async def login(self, username: str, password: str = PASSWORD) -> User:
        r = await self.http.post("/api/v1/auth/login", json={"username": username, "password": password})
        assert r.status_code == 200, r.text
        tokens = r.json()
        return User(tokens["uid"], username, tokens["access_token"], tokens["refresh_token"])


def assert_error(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The documented error answer: ``status``, and a JSON body ``{code, message}`` (``retry_after`` too
    on a refusal that says when to retry)."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"] == "application/json"
    body: dict[str, Any] = r.json()
    assert body["code"] == code, body
    assert isinstance(body["message"], str) and body["message"], body
    assert set(body) <= {"code", "message", "retry_after"}, body
    return body


async def _api(tmp_path: Path, *, limited: bool) -> AsyncIterator[Api]:
    services = await build_services(tmp_path, limited=limited)
    app = create_app(
        services.accounts,
        services.groups,
        services.reads,
        services.pick_gateway,
        LIMITS,
        max_request_bytes=MAX_REQUEST_BYTES,
        files=services.files,
        refusal_delay=0.0,
    )
    transport = httpx.ASGITransport(app=app, client=("203.0.113.7", 40000))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://im.test") as http:
            yield Api(http, services)
    finally:
        await services.close()


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    async for a in _api(tmp_path, limited=False):
        yield a


@pytest.fixture
async def limited_api(tmp_path: Path) -> AsyncIterator[Api]:
    """As ``api``, with at most REGISTER_LIMIT registrations per address."""
    async for a in _api(tmp_path, limited=True):
        yield a
