"""Consent against a real ``im serve``: blocking, the contacts-only setting and the presence rule.

Each attack is made by ``mallory`` (or a stranger) and must fail, while a bystander (``carol``) keeps
chatting with the victim undisturbed. docs/protocol.md section 18, "Blocking and consent".
"""

from __future__ import annotations

import time
from typing import Any

import httpx

from im.cluster import LocalCluster
from tests.cluster.conftest import client_on
from tests.support.checker import History
from tests.support.client import Account, ChatClient, register
from tests.support.server import ServerProcess
from tests.support.wait import eventually

REFUSED = "does not accept your messages"


async def connect(server: ServerProcess, account: Account, device: str, clients: list[ChatClient]) -> ChatClient:
    c = ChatClient(server.ws, account, device)
    assert (await c.connect())["t"] == "auth_ok"
    clients.append(c)
    return c


async def online(http: httpx.AsyncClient, who: Account, uid: int) -> bool:
    r = await http.get("/presence", params={"uids": str(uid)}, headers=who.auth)
    assert r.status_code == 200, r.text
    return bool(r.json()[0]["online"])


async def round_trip(c: ChatClient) -> None:
    """Every frame the server queued for ``c`` before now has been read (a ping's pong comes after)."""
    n = sum(1 for e in c.events if e["t"] == "pong")
    await c.send_frame({"t": "ping"})
    await c.wait_for(lambda: sum(1 for e in c.events if e["t"] == "pong") > n)


def last_error(c: ChatClient) -> dict[str, Any]:
    return c.errors[-1]


def dconv(a: int, b: int) -> str:
    return f"d:{min(a, b)}:{max(a, b)}"


async def test_block_stops_sends_group_adds_presence_and_typing(server: ServerProcess, http: httpx.AsyncClient) -> None:
    alice, mallory, carol = [await register(server.api, n) for n in ("alice", "mallory", "carol")]
    clients: list[ChatClient] = []
    try:
        a = await connect(server, alice, "phone", clients)
        m = await connect(server, mallory, "pc", clients)
        c = await connect(server, carol, "tablet", clients)
        # Before the block: they talk, and share a group with the bystander.
        assert await m.send("hi alice", to=alice.uid)
        assert await a.send("hi mallory", to=mallory.uid)
        assert await c.send("hi alice", to=alice.uid)
        assert await a.send("hi carol", to=carol.uid)
        r = await http.post("/groups", json={"name": "g", "members": [mallory.uid, carol.uid]}, headers=alice.auth)
        assert r.status_code == 201, r.text
        group = r.json()["conv"]
        assert await online(http, mallory, alice.uid)

        r = await http.put(f"/blocks/{mallory.uid}", headers=alice.auth)
        assert r.status_code == 204, r.text
        assert (await http.put(f"/blocks/{mallory.uid}", headers=alice.auth)).status_code == 204  # idempotent
        r = await http.get("/blocks", headers=alice.auth)
        assert [u["uid"] for u in r.json()] == [mallory.uid]
        assert (await http.put(f"/blocks/{alice.uid}", headers=alice.auth)).status_code == 400
        assert (await http.put("/blocks/999999", headers=alice.auth)).status_code == 404
        assert (await http.put(f"/blocks/{2**63}", headers=alice.auth)).status_code in (400, 422)

        # Mallory can no longer write to Alice, by uid or by conversation id, and is told no more than
        # "does not accept your messages" (the same as the contacts-only refusal).
        received = len(a.messages)
        assert await m.send("let me in", to=alice.uid) is None
        assert last_error(m)["code"] == "forbidden" and REFUSED in last_error(m)["message"]
        assert await m.send("let me in", conv=dconv(alice.uid, mallory.uid)) is None
        assert last_error(m)["code"] == "forbidden"
        # Alice, while blocking, cannot write to Mallory either.
        assert await a.send("psst", to=mallory.uid) is None
        assert last_error(a)["code"] == "forbidden" and "unblock" in last_error(a)["message"]
        # The bystander is unaffected; Alice got nothing from Mallory.
        assert await c.send("still here", to=alice.uid)
        await a.wait_messages(received + 1)
        assert [x["body"] for x in a.messages[received:]] == ["still here"]

        # Mallory cannot put Alice into a group, neither at creation nor by adding her.
        r = await http.post("/groups", json={"name": "trap", "members": [alice.uid]}, headers=mallory.auth)
        assert r.status_code == 403 and r.json()["code"] == "forbidden", r.text
        r = await http.post("/groups", json={"name": "trap2", "members": [carol.uid]}, headers=mallory.auth)
        assert r.status_code == 201
        gid = r.json()["gid"]
        r = await http.post(f"/groups/{gid}/members", json={"uids": [alice.uid]}, headers=mallory.auth)
        assert r.status_code == 403 and r.json()["code"] == "forbidden", r.text

        # Presence: hidden from Mallory (both ways), still shown to the bystander.
        assert not await online(http, mallory, alice.uid)
        assert not await online(http, alice, mallory.uid)
        assert await online(http, carol, alice.uid)

        # Typing: Alice's typing in the shared group reaches Carol, not Mallory; Mallory's not Alice.
        await a.send_frame({"t": "typing", "conv": group})
        await c.wait_for(lambda: any(e["t"] == "typing" and e["uid"] == alice.uid for e in c.events))
        await m.send_frame({"t": "typing", "conv": group})
        await c.wait_for(lambda: any(e["t"] == "typing" and e["uid"] == mallory.uid for e in c.events))
        await round_trip(m)
        await round_trip(a)
        assert not any(e["t"] == "typing" and e["uid"] == alice.uid for e in m.events)
        assert not any(e["t"] == "typing" and e["uid"] == mallory.uid for e in a.events)
        # Group messages are not filtered by blocks.
        assert await m.send("group talk", conv=group)
        await a.wait_for(lambda: any(x["body"] == "group talk" for x in a.messages))

        # Unblocking restores the direct conversation.
        assert (await http.delete(f"/blocks/{mallory.uid}", headers=alice.auth)).status_code == 204
        assert (await http.delete(f"/blocks/{mallory.uid}", headers=alice.auth)).status_code == 404
        assert await m.send("sorry", to=alice.uid)
        await a.wait_for(lambda: any(x["body"] == "sorry" for x in a.messages))
    finally:
        for client in clients:
            await client.close()


async def test_contacts_only_and_the_presence_rule(server: ServerProcess, http: httpx.AsyncClient) -> None:
    bob, stranger, friend, carol = [await register(server.api, n) for n in ("bob", "stranger", "friend", "carol")]
    clients: list[ChatClient] = []
    try:
        b = await connect(server, bob, "phone", clients)
        s = await connect(server, stranger, "pc", clients)
        f = await connect(server, friend, "laptop", clients)
        c = await connect(server, carol, "tablet", clients)
        # Carol started a conversation before the setting: it goes on afterwards.
        assert await c.send("before", to=bob.uid)

        # One unsolicited message tells its sender nothing about Bob's presence ...
        assert await s.send("hello?", to=bob.uid)
        assert not await online(http, stranger, bob.uid)
        # ... until Bob answers in that conversation.
        assert await b.send("who are you?", to=stranger.uid)
        await eventually(lambda: online(http, stranger, bob.uid), "bob visible once he wrote")
        # Bob sees the stranger (who wrote to him), and nobody sees a user who shares nothing with them.
        assert await online(http, bob, stranger.uid)
        assert not await online(http, friend, bob.uid)

        r = await http.put("/users/me/settings", json={"contacts_only": True}, headers=bob.auth)
        assert r.status_code == 200 and r.json() == {"contacts_only": True}
        assert (await http.get("/users/me/settings", headers=bob.auth)).json() == {"contacts_only": True}
        assert (await http.put(f"/contacts/{friend.uid}", headers=bob.auth)).status_code == 204

        received = len(b.messages)
        # A non-contact cannot start a conversation; the refusal reads as a block's would.
        assert await s.send("existing conversation", to=bob.uid)  # already started: goes on
        r2 = await register(server.api, "newcomer")
        n = await connect(server, r2, "pc", clients)
        assert await n.send("hi bob", to=bob.uid) is None
        assert last_error(n)["code"] == "forbidden" and REFUSED in last_error(n)["message"]
        # A contact can; the earlier conversation goes on.
        assert await f.send("hi bob", to=bob.uid)
        assert await c.send("after", to=bob.uid)
        await b.wait_messages(received + 3)
        assert sorted(x["body"] for x in b.messages[received:]) == ["after", "existing conversation", "hi bob"]
        # The newcomer learns nothing of Bob's presence.
        assert not await online(http, r2, bob.uid)
    finally:
        for client in clients:
            await client.close()


async def test_block_reaches_every_node_within_the_cache_time(cluster: LocalCluster) -> None:
    """Blocked on the API process; Mallory writes through the other gateway and a transfer node: refused
    within SHARED_STATE_TTL (2 s), and Alice's typing stops reaching her there too."""
    async with History(cluster) as history:  # type: ignore[arg-type]  # the checker needs only .api
        alice, mallory, carol = [await register(cluster.api, n) for n in ("alice", "mallory", "carol")]
        a = client_on(history, cluster, "gw-1", alice, "phone")
        m = client_on(history, cluster, "gw-2", mallory, "pc")
        c = client_on(history, cluster, "gw-2", carol, "tablet")
        for client in (a, m, c):
            assert (await client.connect())["t"] == "auth_ok"
        assert await m.send("hi", to=alice.uid)
        assert await a.send("hi", to=mallory.uid)
        async with httpx.AsyncClient(base_url=cluster.api, timeout=10) as http:
            r = await http.post("/groups", json={"name": "g", "members": [mallory.uid, carol.uid]}, headers=alice.auth)
            group = r.json()["conv"]
            assert (await http.put(f"/blocks/{mallory.uid}", headers=alice.auth)).status_code == 204
        blocked_at = time.monotonic()
        while await m.send("still there?", to=alice.uid) is not None:  # accepted until the caches expire
            assert time.monotonic() - blocked_at < 6.0, "the block did not reach the transfer node in time"
        assert m.errors[-1]["code"] == "forbidden" and REFUSED in m.errors[-1]["message"]
        assert time.monotonic() - blocked_at < 6.0
        # Once refused, refused for good; the bystander on the same gateway still writes to Alice.
        assert await m.send("again", to=alice.uid) is None
        assert await c.send("hello alice", to=alice.uid)
        await a.wait_for(lambda: any(x["body"] == "hello alice" for x in a.messages))
        # Typing across gateways: Carol gets Alice's, Mallory does not (gateway 2's cache expired too).
        await a.send_frame({"t": "typing", "conv": group})
        await c.wait_for(lambda: any(e["t"] == "typing" and e["uid"] == alice.uid for e in c.events))
        await round_trip(m)
        assert not any(e["t"] == "typing" and e["uid"] == alice.uid for e in m.events)
        await history.close_all()
        await history.check()
