"""``im serve`` on the real engines: PostgreSQL store, Redis presence, etcd registry.

The same guarantees as on the embedded defaults, checked by the history checker: chat, a group, and a
SIGKILL restart with clients resending until acked. Each test gets its own PostgreSQL schema, Redis key
prefix and etcd key prefix, so tests never see each other's data.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.checker import History
from tests.support.client import register
from tests.support.etcd import shared_etcd
from tests.support.postgres import DSN, PgSchema
from tests.support.server import ServerProcess, running_server


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    """Overrides conftest's embedded server: the same ``im serve`` on PostgreSQL, Redis and etcd (its
    schema dropped afterwards)."""
    tag = uuid.uuid4().hex[:10]
    schema = PgSchema()
    etcd = shared_etcd()
    extra = [
        "--set",
        "store.kind=postgres",
        "--set",
        f"store.postgres_dsn={DSN}",
        "--set",
        f"store.postgres_schema={schema.name}",
        "--set",
        "presence.kind=redis",
        "--set",
        f"presence.redis_prefix=im-e2e-{tag}:",
        "--set",
        "registry.kind=etcd",
        "--set",
        f"registry.etcd_endpoint={etcd.endpoint}",
        "--set",
        f"registry.prefix=/im-e2e-{tag}/",
    ]
    try:
        with running_server(tmp_path / "data", extra) as proc:
            yield proc
    finally:
        asyncio.run(schema.drop())


async def test_chat_and_group_on_engines(server: ServerProcess, history: History) -> None:
    users = await asyncio.gather(*(register(server.api, f"user{i}") for i in range(3)))
    async with httpx.AsyncClient() as http:
        gw = (await http.get(f"{server.api}/gateway", headers=users[0].auth)).json()
        assert gw["ws"].endswith("/ws") and gw["tcp"].startswith("tcp://")  # read back from etcd
        r = await http.post(
            f"{server.api}/groups",
            json={"name": "engines", "members": [u.uid for u in users[1:]]},
            headers=users[0].auth,
        )
        assert r.status_code == 201, r.text
        conv = r.json()["conv"]
    clients = [history.client(u, "d", tcp=i == 1) for i, u in enumerate(users)]
    for c in clients:
        assert (await c.connect())["t"] == "auth_ok"
    for i in range(10):
        assert await clients[0].send(f"direct {i}", to=users[1].uid) is not None
        assert await clients[i % 3].send(f"group {i}", conv=conv) is not None
    direct = f"d:{min(users[0].uid, users[1].uid)}:{max(users[0].uid, users[1].uid)}"
    got = await clients[1].wait_messages(10, conv=direct)
    assert [m["body"] for m in got] == [f"direct {i}" for i in range(10)]
    got = await clients[2].wait_messages(1 + 7, conv=conv)  # group_created + the 7 not sent by user2
    assert [m["body"] for m in got if m["type"] == "text"] == [f"group {i}" for i in range(10) if i % 3 != 2]


async def test_restart_loses_no_acked_message(server: ServerProcess, history: History) -> None:
    alice, bob = await asyncio.gather(register(server.api, "alice"), register(server.api, "bob"))
    a, b = history.client(alice, "a"), history.client(bob, "b")
    await a.connect()
    await b.connect()
    for i in range(30):
        await a.send(i, to=bob.uid)
    await asyncio.to_thread(server.restart, signal.SIGKILL)
    await a.connect(resume=True)
    await b.connect(resume=True)
    for i in range(30, 40):
        assert await a.send(i, to=bob.uid) is not None, a.errors
    got = await b.wait_messages(40)
    assert [m["body"] for m in got] == list(range(40))
