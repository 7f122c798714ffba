"""One-to-one chat over real WebSocket connections to a real ``im serve``."""

from __future__ import annotations

from tests.support.checker import History
from tests.support.client import register
from tests.support.server import ServerProcess


async def test_direct_chat_both_ways(server: ServerProcess, history: History) -> None:
    alice = await register(server.api, "alice")
    bob = await register(server.api, "bob")
    a = history.client(alice, "phone")
    b = history.client(bob, "laptop")
    assert (await a.connect())["t"] == "auth_ok"
    assert (await b.connect())["t"] == "auth_ok"
    for i in range(20):
        ack = await a.send(f"a{i}", to=bob.uid)
        assert ack is not None and ack["seq"] == 2 * i + 1
        ack = await b.send(f"b{i}", to=alice.uid)
        assert ack is not None and ack["seq"] == 2 * i + 2
    got = await b.wait_messages(20)
    assert [m["body"] for m in got] == [f"a{i}" for i in range(20)]
    got = await a.wait_messages(20)
    assert [m["body"] for m in got] == [f"b{i}" for i in range(20)]
    assert all(m["conv"] == f"d:{alice.uid}:{bob.uid}" for m in got)


async def test_first_send_by_conversation_id_creates_it(server: ServerProcess, history: History) -> None:
    alice = await register(server.api, "alice")
    bob = await register(server.api, "bob")
    a = history.client(alice, "phone")
    b = history.client(bob, "laptop")
    await a.connect()
    await b.connect()
    conv = f"d:{min(alice.uid, bob.uid)}:{max(alice.uid, bob.uid)}"
    ack = await a.send("by id", conv=conv)
    assert ack is not None and ack["seq"] == 1, a.errors
    assert [m["body"] for m in await b.wait_messages(1)] == ["by id"]
    # A direct conversation with a user who does not exist is still refused.
    assert await a.send("nobody", conv=f"d:{alice.uid}:9999") is None
    assert a.errors[-1]["code"] == "not_found"
