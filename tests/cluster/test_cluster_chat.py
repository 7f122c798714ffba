"""Chat across real processes: users on different gateway nodes, sends through two transfer nodes."""

from __future__ import annotations

import asyncio

import httpx

from im.cluster import LocalCluster
from tests.cluster.conftest import client_on
from tests.support.checker import History
from tests.support.client import ChatClient, register


async def test_ws_on_one_gateway_tcp_on_the_other(cluster: LocalCluster, history: History) -> None:
    alice, bob = await asyncio.gather(register(cluster.api, "alice"), register(cluster.api, "bob"))
    a = client_on(history, cluster, "gw-1", alice, "phone")
    b = client_on(history, cluster, "gw-2", bob, "laptop", tcp=True)
    assert (await a.connect())["t"] == "auth_ok"
    assert (await b.connect())["t"] == "auth_ok"
    for i in range(20):
        assert await a.send(f"a{i}", to=bob.uid) is not None
        assert await b.send(f"b{i}", to=alice.uid) is not None
    conv = f"d:{min(alice.uid, bob.uid)}:{max(alice.uid, bob.uid)}"
    got_b = await b.wait_messages(20, conv=conv)
    got_a = await a.wait_messages(20, conv=conv)
    assert [m["body"] for m in got_b if m["from"] == alice.uid] == [f"a{i}" for i in range(20)]
    assert [m["body"] for m in got_a if m["from"] == bob.uid] == [f"b{i}" for i in range(20)]


async def test_group_spanning_both_gateways(cluster: LocalCluster, history: History) -> None:
    users = await asyncio.gather(*(register(cluster.api, f"member{i}") for i in range(4)))
    async with httpx.AsyncClient() as http:
        r = await http.post(
            f"{cluster.api}/groups",
            json={"name": "span", "members": [u.uid for u in users[1:]]},
            headers=users[0].auth,
        )
        assert r.status_code == 201, r.text
        conv = r.json()["conv"]
    clients = [client_on(history, cluster, f"gw-{1 + i % 2}", u, "d", tcp=i >= 2) for i, u in enumerate(users)]
    for c in clients:
        assert (await c.connect())["t"] == "auth_ok"
    for i in range(12):
        assert await clients[i % 4].send(f"g{i}", conv=conv) is not None
    for n, c in enumerate(clients):
        # each device sees seqs 1..13 once: others' messages as msg frames, its own as acks

        def has_thirteen(c: ChatClient = c) -> bool:
            return c.cursors.get(conv) == 13

        await c.wait_for(has_thirteen)
        bodies = [m["body"] for m in c.messages if m["conv"] == conv and m["type"] == "text"]
        assert bodies == [f"g{i}" for i in range(12) if i % 4 != n]
    # A member added through the API (committed by the API process, routed through a transfer node)
    # is seen live on both gateways, and the newcomer can send at once.
    late = await register(cluster.api, "late")
    async with httpx.AsyncClient() as http:
        r = await http.post(
            f"{cluster.api}/groups/{conv[2:]}/members", json={"uids": [late.uid]}, headers=users[0].auth
        )
        assert r.status_code in (200, 204), r.text
    for c in clients:

        def has_system_14(c: ChatClient = c) -> bool:
            return any(m["type"] == "system" and m["seq"] == 14 for m in c.messages)

        await c.wait_for(has_system_14)
    newcomer = client_on(history, cluster, "gw-2", late, "d")
    assert (await newcomer.connect())["t"] == "auth_ok"
    assert await newcomer.send("hello all", conv=conv) is not None
    for c in clients:

        def has_hello(c: ChatClient = c) -> bool:
            return any(m.get("body") == "hello all" for m in c.messages)

        await c.wait_for(has_hello)


async def test_typing_and_logout_reach_the_other_gateway(cluster: LocalCluster, history: History) -> None:
    alice, bob = await asyncio.gather(register(cluster.api, "alice"), register(cluster.api, "bob"))
    a = client_on(history, cluster, "gw-1", alice, "phone")
    b = client_on(history, cluster, "gw-2", bob, "laptop")
    assert (await a.connect())["t"] == "auth_ok"
    assert (await b.connect())["t"] == "auth_ok"
    assert await a.send("hi", to=bob.uid) is not None
    conv = f"d:{min(alice.uid, bob.uid)}:{max(alice.uid, bob.uid)}"
    await b.wait_messages(1, conv=conv)
    await a.send_frame({"t": "typing", "conv": conv})
    await b.wait_for(lambda: any(e["t"] == "typing" and e["uid"] == alice.uid for e in b.events))
    # bob's read mark reaches alice (gateway 2 -> a transfer node -> gateway 1) as a receipt
    await b.send_frame({"t": "read", "conv": conv, "seq": 1})
    await a.wait_for(lambda: any(e["t"] == "receipt" and e["kind"] == "read" and e["uid"] == bob.uid for e in a.events))
    # Logging out on the API closes bob's connection on gateway 2.
    async with httpx.AsyncClient() as http:
        r = await http.post(f"{cluster.api}/auth/logout", headers=bob.auth)
        assert r.status_code in (200, 204), r.text
    await b.wait_for(lambda: b.closed_reason is not None, timeout=10)
    assert b.closed_reason is not None and b.closed_reason.get("code") == "auth_failed"
