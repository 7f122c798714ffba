"""One connection per device across gateway nodes (im.gateway.replacement), without sockets: two hubs,
``gw-1`` and ``gw-2``, on one presence, one router and one core, as two gateway nodes of a cluster see
them (the cluster test, tests/cluster/test_cluster_replacement.py, runs the same over the transfer link).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from im.backends.accounts.sqlite import SqliteAccountStore
from im.backends.chat.sqlite import SqliteChatStore
from im.backends.presence.memory import MemoryPresence
from im.backends.routing.memory import MemoryRouter
from im.backends.sql.sqlite_db import SqliteDatabase
from im.core.accounts import AccountService
from im.gateway.hub import Hub
from im.model.cluster import DeviceLocation
from im.model.errors import ErrorCode
from im.protocol.session import Limits
from tests.support.chat import ChatCore, chat_core
from tests.support.wait import eventually
from tests.test_hub import FakeConnection


@dataclass
class TwoGateways:
    hubs: dict[str, Hub]
    presence: MemoryPresence
    router: MemoryRouter
    accounts: AccountService
    core: ChatCore

    async def user(self, name: str) -> tuple[int, str]:
        uid = (await self.accounts.register(name, "password123")).uid
        return uid, (await self.accounts.login(name, "password123")).access_token

    def start(self, node: str, token: str, device: str = "phone") -> FakeConnection:
        conn = FakeConnection(self.hubs[node])
        self.hubs[node].add(conn)
        conn.send(t="auth", token=token, device=device)
        return conn

    async def connect(self, node: str, token: str, device: str = "phone") -> FakeConnection:
        conn = self.start(node, token, device)
        await eventually(lambda: conn.of_type("synced") or conn.closed_with, lambda: str(conn.frames))
        return conn


@pytest.fixture
async def two(tmp_path: Path) -> AsyncIterator[TwoGateways]:
    db = SqliteDatabase(tmp_path / "im.db")
    store, account_store = SqliteChatStore(db), SqliteAccountStore(db)
    await store.start()
    await account_store.start()
    accounts = AccountService(
        account_store, secret=b"s" * 32, argon2_time_cost=1, argon2_memory_kib=8, argon2_parallelism=1
    )
    presence, router = MemoryPresence(), MemoryRouter()
    core = chat_core(store, account_store, router, presence)
    hubs = {
        node: Hub(
            node,
            reads=core.reads,
            cursor_store=store,
            presence=presence,
            router=router,
            accounts=accounts,
            submit=core.committer.submit,
            limits=Limits(),
        )
        for node in ("gw-1", "gw-2")
    }
    core.committer.start()
    for hub in hubs.values():
        hub.start()
    try:
        yield TwoGateways(hubs, presence, router, accounts, core)
    finally:
        for hub in hubs.values():
            hub.pause_all()
        await core.committer.stop()
        for hub in hubs.values():
            await hub.drain_and_close()
        await account_store.close()
        await store.close()


def replaced(conn: FakeConnection) -> bool:
    return conn.closed_with is ErrorCode.REPLACED


async def test_a_connection_on_another_gateway_replaces_the_older_one(two: TwoGateways) -> None:
    alice, alice_token = await two.user("alice")
    _, bob_token = await two.user("bob")
    b = await two.connect("gw-2", bob_token, "laptop")
    old = await two.connect("gw-1", alice_token)
    other_device = await two.connect("gw-1", alice_token, "tablet")
    new = await two.connect("gw-2", alice_token)
    await eventually(lambda: replaced(old), lambda: str(old.frames))
    assert old.frames[-1] == {
        "t": "bye",
        "code": "replaced",
        "message": "the same device connected again",
        "reconnect": False,
    }
    assert new.closed_with is None and other_device.closed_with is None  # only that device's older one
    assert two.hubs["gw-2"].claims.replaced_elsewhere == 1
    located = {(e.device, e.node) for e in (await two.presence.locate([alice]))[alice]}
    assert located == {("phone", "gw-2"), ("tablet", "gw-1")}

    b.send(t="send", cmid="c1", to=alice, body="after")
    await eventually(lambda: new.of_type("msg") and other_device.of_type("msg"), lambda: str(new.frames))
    assert old.of_type("msg") == []  # nothing reaches the replaced connection


async def test_a_late_request_never_closes_a_newer_connection(two: TwoGateways) -> None:
    alice, token = await two.user("alice")
    first = await two.connect("gw-1", token)
    first_id = first.conn_id
    second = await two.connect("gw-1", token)  # on the same node: the hub replaced the first itself
    assert replaced(first) and second.conn_id != first_id
    two.hubs["gw-1"].close_replaced([DeviceLocation(alice, "phone", "gw-1", first_id)])  # late, for the first
    assert second.closed_with is None
    two.hubs["gw-1"].close_replaced([DeviceLocation(alice, "phone", "gw-1", second.conn_id)])
    assert replaced(second)


async def test_a_lost_request_is_made_good_by_the_next_presence_refresh(two: TwoGateways) -> None:
    alice, token = await two.user("alice")
    conn = await two.connect("gw-1", token)
    # A connection on a node whose request to close never arrives (no link): presence holds the claim.
    displaced = await two.presence.claim([DeviceLocation(alice, "phone", "gw-9", "x.1")], 60)
    assert displaced == [DeviceLocation(alice, "phone", "gw-1", conn.conn_id)]
    assert conn.closed_with is None
    await two.hubs["gw-1"].refresh_presence()  # what the timer loop does every max(1 s, ttl/3)
    assert replaced(conn)


async def test_simultaneous_connections_on_both_gateways_leave_exactly_one(two: TwoGateways) -> None:
    alice, token = await two.user("alice")
    conns = [two.start(f"gw-{1 + i % 2}", token) for i in range(10)]
    await eventually(
        lambda: (
            all(c.of_type("synced") or c.closed_with for c in conns) and sum(c.closed_with is None for c in conns) == 1
        ),
        lambda: str([(c.node, c.closed_with) for c in conns]),
    )
    (survivor,) = [c for c in conns if c.closed_with is None]
    assert all(replaced(c) for c in conns if c is not survivor)
    located = (await two.presence.locate([alice]))[alice]
    assert located == [DeviceLocation(alice, "phone", survivor.node)]
    await asyncio.gather(*(hub.refresh_presence() for hub in two.hubs.values()))
    assert survivor.closed_with is None  # its own node's refresh keeps it
