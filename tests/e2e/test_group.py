"""Group chat over real WebSocket connections: fan-out order, membership and the system messages."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from tests.support.checker import History
from tests.support.client import Account, ChatClient, register
from tests.support.server import ServerProcess


async def create_group(api: str, owner: Account, members: list[Account], name: str = "team") -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=10) as http:
        r = await http.post(
            f"{api}/groups", json={"name": name, "members": [m.uid for m in members]}, headers=owner.auth
        )
    assert r.status_code == 201, r.text
    group: dict[str, Any] = r.json()
    assert group["conv"] == f"g:{group['gid']}"
    return group


async def read_log(api: str, reader: Account, conv: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    after = 0
    async with httpx.AsyncClient(timeout=10) as http:
        while True:
            r = await http.get(
                f"{api}/conversations/{conv}/messages", params={"after": after, "limit": 200}, headers=reader.auth
            )
            assert r.status_code == 200, r.text
            page = r.json()
            out.extend(page["messages"])
            if not page["has_more"]:
                return out
            after = out[-1]["seq"]


def seqs_of(c: ChatClient, conv: str) -> list[int]:
    """Every seq the device got for ``conv``: msg frames and its own (first) acks, sorted."""
    got = [m["seq"] for m in c.messages if m["conv"] == conv]
    got += [a["seq"] for a in c.acks.values() if a["conv"] == conv and not a.get("dup")]
    return sorted(got)


def system_events(c: ChatClient, conv: str) -> list[dict[str, Any]]:
    return [{"seq": m["seq"], **m["body"]} for m in c.messages if m["conv"] == conv and m["type"] == "system"]


async def test_fifty_members_see_the_same_order(server: ServerProcess, history: History) -> None:
    accounts = await asyncio.gather(*(register(server.api, f"user{i:02d}") for i in range(50)))
    owner, rest = accounts[0], list(accounts[1:])
    clients = [history.client(a, "dev") for a in accounts]
    hellos = await asyncio.gather(*(c.connect() for c in clients))
    assert all(h["t"] == "auth_ok" for h in hellos)

    group = await create_group(server.api, owner, rest)
    conv = group["conv"]
    # Every connected member learns of the new group live, starting at its first message.
    for c in clients:

        def has_first(c: ChatClient = c) -> bool:
            return c.cursors.get(conv, 0) >= 1

        await c.wait_for(has_first)
        first = next(m for m in c.messages if m["conv"] == conv)
        assert first["seq"] == 1 and first["type"] == "system"
        assert first["body"]["event"] == "group_created"
        assert sorted(first["body"]["uids"]) == sorted(a.uid for a in accounts)

    senders = clients[:6]
    per_sender = 15

    async def burst(c: ChatClient, who: int) -> None:
        for i in range(per_sender):
            await c.send({"n": i, "by": who}, conv=conv, wait=False)
            await asyncio.sleep(0)  # interleave the senders

    await asyncio.gather(*(burst(c, i) for i, c in enumerate(senders)))
    for c in senders:

        def all_acked(c: ChatClient = c) -> bool:
            return len(c.acks) == per_sender

        await c.wait_for(all_acked)
        assert not c.errors, c.errors
    total = 1 + len(senders) * per_sender
    for c in clients:

        def has_all(c: ChatClient = c) -> bool:
            return c.cursors.get(conv, 0) >= total

        await c.wait_for(has_all)

    log = await read_log(server.api, owner, conv)
    assert [e["seq"] for e in log] == list(range(1, total + 1))
    by_seq = {e["seq"]: e for e in log}
    for c in clients:
        assert seqs_of(c, conv) == list(range(1, total + 1)), c.account.username
        got = [m for m in c.messages if m["conv"] == conv]
        assert [m["seq"] for m in got] == sorted(m["seq"] for m in got)  # in order, as received
        assert all(
            (m["mid"], m["from"], m["body"])
            == (by_seq[m["seq"]]["mid"], by_seq[m["seq"]]["from"], by_seq[m["seq"]]["body"])
            for m in got
        )
        # Own messages arrive as acks, never also as msg frames
        mine = {a["cmid"] for a in c.acks.values()}
        assert not [m for m in got if m["cmid"] in mine and m["from"] == c.account.uid]
    # Each sender's messages are in the log in the order it sent them
    for i, c in enumerate(senders):
        own = [e["body"]["n"] for e in log if e["type"] != "system" and e["body"]["by"] == i]
        assert own == list(range(per_sender))
        assert all(e["from"] == c.account.uid for e in log if e["type"] != "system" and e["body"]["by"] == i)


async def test_non_member_cannot_send_or_read(server: ServerProcess, history: History) -> None:
    owner, member, stranger = await asyncio.gather(
        register(server.api, "owner"), register(server.api, "member"), register(server.api, "stranger")
    )
    group = await create_group(server.api, owner, [member])
    conv = group["conv"]
    o = history.client(owner, "dev")
    m = history.client(member, "dev")
    s = history.client(stranger, "dev")
    for c in (o, m, s):
        assert (await c.connect())["t"] == "auth_ok"
    assert await o.send("secret", conv=conv) is not None

    ack = await s.send("let me in", conv=conv, cmid="intruder-1")
    assert ack is None
    assert [(e["code"], e["ref"]) for e in s.errors] == [("not_member", "intruder-1")]
    # The stranger's connection is still good for other things
    assert await s.send("hi", to=owner.uid) is not None

    async with httpx.AsyncClient(timeout=10) as http:
        r = await http.get(f"{server.api}/conversations/{conv}/messages", params={"after": 0}, headers=stranger.auth)
        assert r.status_code == 403, r.text
        assert r.json()["code"] == "not_member"
        r = await http.get(f"{server.api}/groups/{group['gid']}/members", headers=stranger.auth)
        assert r.status_code == 403, r.text
        # A stranger cannot add themselves either
        r = await http.post(
            f"{server.api}/groups/{group['gid']}/members", json={"uids": [stranger.uid]}, headers=stranger.auth
        )
        assert r.status_code == 403, r.text

    await m.wait_for(lambda: m.cursors.get(conv, 0) >= 2)
    log = await read_log(server.api, owner, conv)
    assert [e["body"] for e in log if e["type"] != "system"] == ["secret"]
    assert stranger.uid not in {e["from"] for e in log}
    assert not [x for x in s.messages if x["conv"] == conv]


async def test_removed_member_stops_receiving(server: ServerProcess, history: History) -> None:
    owner, alice, bob = await asyncio.gather(
        register(server.api, "owner"), register(server.api, "alice"), register(server.api, "bob")
    )
    group = await create_group(server.api, owner, [alice, bob])
    conv, gid = group["conv"], group["gid"]
    o, a, b = (history.client(x, "dev") for x in (owner, alice, bob))
    for c in (o, a, b):
        assert (await c.connect())["t"] == "auth_ok"
    for i in range(3):
        await o.send(f"before{i}", conv=conv)
    await b.wait_for(lambda: b.cursors.get(conv, 0) == 4)

    async with httpx.AsyncClient(timeout=10) as http:
        r = await http.delete(f"{server.api}/groups/{gid}/members/{bob.uid}", headers=owner.auth)
    assert r.status_code == 204, r.text

    # Bob gets the system message that removes him, and so do the others
    for c in (o, a, b):

        def has_removal(c: ChatClient = c) -> bool:
            return c.cursors.get(conv, 0) >= 5

        await c.wait_for(has_removal)
        removal = [e for e in system_events(c, conv) if e["event"] == "member_removed"]
        assert removal == [{"seq": 5, "event": "member_removed", "uid": bob.uid, "by": owner.uid}]

    for i in range(3):
        await o.send(f"after{i}", conv=conv)
    await a.wait_for(lambda: a.cursors.get(conv, 0) == 8)
    # A direct message committed after the group messages: once Bob has it, he would have had them too.
    await o.send("sentinel", to=bob.uid)
    await b.wait_for(lambda: any(m["body"] == "sentinel" for m in b.messages))
    assert b.cursors[conv] == 5
    assert [m["body"] for m in b.messages if m["conv"] == conv and m["type"] == "text"] == [
        "before0",
        "before1",
        "before2",
    ]

    # Bob can no longer send there, and a reconnect does not replay what followed his removal
    assert await b.send("still here?", conv=conv, cmid="bob-late") is None
    assert [(e["code"], e["ref"]) for e in b.errors] == [("not_member", "bob-late")]
    await b.close()
    assert (await b.connect())["t"] == "auth_ok"
    await b.wait_for(lambda: b.synced)
    await o.send("sentinel2", to=bob.uid)
    await b.wait_for(lambda: any(m["body"] == "sentinel2" for m in b.messages))
    assert b.cursors[conv] == 5
    assert max(m["seq"] for m in b.messages if m["conv"] == conv) == 5


async def test_added_member_starts_at_members_added(server: ServerProcess, history: History) -> None:
    names = ("owner", "alice", "carol", "dave")
    owner, alice, carol, dave = await asyncio.gather(*(register(server.api, n) for n in names))
    group = await create_group(server.api, owner, [alice])
    conv, gid = group["conv"], group["gid"]
    o, a, c = (history.client(x, "dev") for x in (owner, alice, carol))
    for x in (o, a, c):
        assert (await x.connect())["t"] == "auth_ok"
    for i in range(5):
        await a.send(f"old{i}", conv=conv)

    # Carol is online when added; Dave is offline and connects afterwards.
    async with httpx.AsyncClient(timeout=10) as http:
        r = await http.post(
            f"{server.api}/groups/{gid}/members", json={"uids": [carol.uid, dave.uid]}, headers=owner.auth
        )
    assert r.status_code == 204, r.text
    added_seq = 7
    for i in range(3):
        await a.send(f"new{i}", conv=conv)
    last = added_seq + 3

    await c.wait_for(lambda: c.cursors.get(conv, 0) >= last)
    got = [m for m in c.messages if m["conv"] == conv]
    assert [m["seq"] for m in got] == list(range(added_seq, last + 1))
    assert got[0]["type"] == "system"
    assert got[0]["body"] == {"event": "members_added", "uids": [carol.uid, dave.uid], "by": owner.uid}
    assert [m["body"] for m in got[1:]] == ["new0", "new1", "new2"]

    d = history.client(dave, "dev")
    assert (await d.connect())["t"] == "auth_ok"
    await d.wait_for(lambda: d.synced)
    got = [m for m in d.messages if m["conv"] == conv]
    assert [m["seq"] for m in got] == list(range(added_seq, last + 1))
    assert got[0]["body"]["event"] == "members_added"

    # Both can now write, and the old members see it
    assert await c.send("hello from carol", conv=conv) is not None
    assert await d.send("hello from dave", conv=conv) is not None
    await a.wait_for(lambda: a.cursors.get(conv, 0) >= last + 2)
    assert [m["body"] for m in a.messages if m["conv"] == conv][-2:] == ["hello from carol", "hello from dave"]
