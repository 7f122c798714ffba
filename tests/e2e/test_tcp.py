"""The TCP gateway: the same session core and guarantees as WebSocket, and the two talk to each other."""

from __future__ import annotations

import asyncio
import json

import httpx

from tests.support.checker import History
from tests.support.client import TcpLink, register
from tests.support.server import ServerProcess


async def test_gateway_endpoint_names_tcp(server: ServerProcess) -> None:
    alice = await register(server.api, "alice")
    async with httpx.AsyncClient() as http:
        body = (await http.get(f"{server.api}/gateway", headers=alice.auth)).json()
    assert body["tcp"] == f"tcp://127.0.0.1:{server.tcp_port}"


async def test_tcp_and_websocket_users_chat_both_ways(server: ServerProcess, history: History) -> None:
    alice, bob = await asyncio.gather(register(server.api, "alice"), register(server.api, "bob"))
    a = history.client(alice, "phone", tcp=True)
    b = history.client(bob, "browser")
    assert (await a.connect())["t"] == "auth_ok"
    assert (await b.connect())["t"] == "auth_ok"
    for i in range(10):
        assert (await a.send(f"from tcp {i}", to=bob.uid)) is not None
        assert (await b.send(f"from ws {i}", to=alice.uid)) is not None
    assert [m["body"] for m in await b.wait_messages(10)] == [f"from tcp {i}" for i in range(10)]
    assert [m["body"] for m in await a.wait_messages(10)] == [f"from ws {i}" for i in range(10)]


async def test_group_reaches_tcp_and_websocket_members(server: ServerProcess, history: History) -> None:
    users = await asyncio.gather(*(register(server.api, f"user{i}") for i in range(4)))
    async with httpx.AsyncClient() as http:
        r = await http.post(
            f"{server.api}/groups", json={"name": "mixed", "members": [u.uid for u in users[1:]]}, headers=users[0].auth
        )
        assert r.status_code == 201, r.text
        conv = r.json()["conv"]
    clients = [history.client(u, "d", tcp=i % 2 == 0) for i, u in enumerate(users)]
    for c in clients:
        assert (await c.connect())["t"] == "auth_ok"
    for i, c in enumerate(clients):
        assert (await c.send(f"hello from {i}", conv=conv)) is not None
    for i, c in enumerate(clients):
        got = await c.wait_messages(4, conv=conv)  # group_created + the three others' messages
        bodies = [m["body"] for m in got if m["type"] == "text"]
        assert bodies == [f"hello from {j}" for j in range(4) if j != i]


async def test_tcp_resume_after_drop(server: ServerProcess, history: History) -> None:
    alice, bob = await asyncio.gather(register(server.api, "alice"), register(server.api, "bob"))
    a = history.client(alice, "phone")
    b = history.client(bob, "tcp-device", tcp=True)
    await a.connect()
    await b.connect()
    for i in range(5):
        await a.send(i, to=bob.uid)
    await b.wait_messages(5)
    await b.drop()
    for i in range(5, 12):
        await a.send(i, to=bob.uid)
    await b.connect(resume=True)
    got = await b.wait_messages(12)
    assert [m["body"] for m in got] == list(range(12))


async def test_tcp_bad_framing(server: ServerProcess) -> None:
    alice = await register(server.api, "alice")
    link = await TcpLink.open(server.tcp)
    # an unknown encoding byte, then an oversized frame, then garbage JSON: errors, connection lives on
    link.writer.write((3).to_bytes(4, "big") + b"\x07{}")
    big = b"x" * (64 * 1024 + 10)
    link.writer.write((len(big) + 1).to_bytes(4, "big") + b"\x01" + big)
    await link.send("not json")
    codes = [json.loads(await asyncio.wait_for(link.recv(), 5))["code"] for _ in range(3)]
    assert codes == ["bad_frame", "too_large", "bad_frame"]
    await link.send(json.dumps({"t": "auth", "token": alice.access, "device": "x"}))
    assert json.loads(await asyncio.wait_for(link.recv(), 5))["t"] == "auth_ok"
    # A length far beyond the limit cannot be skipped safely: bye, then the server closes.
    link.writer.write((10**8).to_bytes(4, "big"))
    frames = []
    async for raw in link:
        frames.append(json.loads(raw))
    assert frames[-1]["t"] == "bye" and frames[-1]["code"] == "too_large"
    await link.close()
