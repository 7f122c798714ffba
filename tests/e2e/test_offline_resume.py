"""Offline delivery, resume after a dropped connection, several devices, and idempotent retries."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from tests.support.checker import History
from tests.support.client import Account, ChatClient, register
from tests.support.server import ServerProcess


async def create_group(api: str, owner: Account, members: list[Account]) -> str:
    async with httpx.AsyncClient(timeout=10) as http:
        r = await http.post(
            f"{api}/groups", json={"name": "g", "members": [m.uid for m in members]}, headers=owner.auth
        )
    assert r.status_code == 201, r.text
    return str(r.json()["conv"])


async def read_log(api: str, reader: Account, conv: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(timeout=10) as http:
        r = await http.get(
            f"{api}/conversations/{conv}/messages", params={"after": 0, "limit": 200}, headers=reader.auth
        )
    assert r.status_code == 200, r.text
    page = r.json()
    assert not page["has_more"]
    return list(page["messages"])


class _Tap(list):  # type: ignore[type-arg]
    """A list that also appends to a shared timeline (to see msg, ack and event frames in one order)."""

    def __init__(self, timeline: list[dict[str, Any]]) -> None:
        super().__init__()
        self._timeline = timeline

    def append(self, item: Any) -> None:
        super().append(item)
        self._timeline.append(item)


class _TapDict(dict):  # type: ignore[type-arg]
    def __init__(self, timeline: list[dict[str, Any]]) -> None:
        super().__init__()
        self._timeline = timeline

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)
        self._timeline.append(value)


def timeline(c: ChatClient) -> list[dict[str, Any]]:
    """Every msg, ack and other non-error frame ``c`` receives from now on, in arrival order."""
    out: list[dict[str, Any]] = []
    c.messages = _Tap(out)
    c.events = _Tap(out)
    c.acks = _TapDict(out)
    return out


async def test_offline_user_gets_everything_in_order_then_synced(server: ServerProcess, history: History) -> None:
    alice, bob, carol = await asyncio.gather(*(register(server.api, n) for n in ("alice", "bob", "carol")))
    group = await create_group(server.api, carol, [alice, bob])
    direct = f"d:{min(alice.uid, bob.uid)}:{max(alice.uid, bob.uid)}"
    a = history.client(alice, "phone")
    c = history.client(carol, "phone")
    assert (await a.connect())["t"] == "auth_ok"
    assert (await c.connect())["t"] == "auth_ok"
    n = 40
    for i in range(n):  # bob is offline (never connected)
        await a.send(f"dm{i}", to=bob.uid, wait=False)
        await c.send(f"g{i}", conv=group, wait=False)
    await a.wait_for(lambda: len(a.acks) == n)
    await c.wait_for(lambda: len(c.acks) == n)
    assert not a.errors and not c.errors

    b = history.client(bob, "laptop")
    frames = timeline(b)
    assert (await b.connect())["t"] == "auth_ok"
    await b.wait_for(lambda: b.synced)
    kinds = [f["t"] for f in frames]
    assert kinds == ["msg"] * (2 * n + 1) + ["synced"], kinds  # everything, then synced
    dms = [f for f in frames if f["t"] == "msg" and f["conv"] == direct]
    assert [m["seq"] for m in dms] == list(range(1, n + 1))
    assert [m["body"] for m in dms] == [f"dm{i}" for i in range(n)]
    assert all(m["from"] == alice.uid for m in dms)
    gms = [f for f in frames if f["t"] == "msg" and f["conv"] == group]
    assert [m["seq"] for m in gms] == list(range(1, n + 2))
    assert gms[0]["type"] == "system"
    assert [m["body"] for m in gms[1:]] == [f"g{i}" for i in range(n)]
    assert frames[-1]["convs"] == 2

    # Live again: a new message comes after synced, and nothing is replayed twice
    await a.send("live", to=bob.uid)
    await b.wait_for(lambda: b.cursors[direct] == n + 1)
    assert [f.get("body") for f in frames[-1:]] == ["live"]


async def test_drop_mid_stream_and_resume_without_gap_or_duplicate(server: ServerProcess, history: History) -> None:
    alice, bob, carol = await asyncio.gather(*(register(server.api, n) for n in ("alice", "bob", "carol")))
    group = await create_group(server.api, carol, [alice, bob])
    direct = f"d:{min(alice.uid, bob.uid)}:{max(alice.uid, bob.uid)}"
    a = history.client(alice, "phone")
    c = history.client(carol, "phone")
    b = history.client(bob, "phone")
    for x in (a, b, c):
        assert (await x.connect())["t"] == "auth_ok"
    n = 150

    async def keep_sending() -> None:
        for i in range(n):
            await a.send(f"dm{i}", to=bob.uid, wait=False)
            await c.send(f"g{i}", conv=group, wait=False)
            await asyncio.sleep(0.002)  # pacing only: the stream must still be flowing at the drop

    sender = asyncio.create_task(keep_sending())
    await b.wait_for(lambda: len(b.messages) >= 30)
    await b.drop()
    assert not sender.done(), "the senders finished before the drop; the test did not test a drop mid-stream"
    held = dict(b.cursors)
    # Missed while away
    await c.wait_for(lambda: len(c.acks) >= held.get(group, 0) + 20, timeout=15)
    assert (await b.connect(resume=True))["t"] == "auth_ok"
    await sender
    await a.wait_for(lambda: len(a.acks) == n)
    await c.wait_for(lambda: len(c.acks) == n)
    await b.wait_for(lambda: b.cursors.get(direct) == n and b.cursors.get(group) == n + 1)

    dms = [m for m in b.messages if m["conv"] == direct]
    gms = [m for m in b.messages if m["conv"] == group]
    assert [m["seq"] for m in dms] == list(range(1, n + 1))
    assert [m["seq"] for m in gms] == list(range(1, n + 2))
    assert [m["body"] for m in dms] == [f"dm{i}" for i in range(n)]
    assert [m["body"] for m in gms[1:]] == [f"g{i}" for i in range(n)]
    assert not b.errors


async def test_two_devices_of_one_user(server: ServerProcess, history: History) -> None:
    alice, bob = await asyncio.gather(register(server.api, "alice"), register(server.api, "bob"))
    group = await create_group(server.api, alice, [bob])
    direct = f"d:{min(alice.uid, bob.uid)}:{max(alice.uid, bob.uid)}"
    phone = history.client(alice, "phone")
    laptop = history.client(alice, "laptop")
    b = history.client(bob, "phone")
    for x in (phone, laptop, b):
        assert (await x.connect())["t"] == "auth_ok"

    ack = await phone.send({"text": "from my phone"}, to=bob.uid, cmid="p-1")
    assert ack is not None and ack["seq"] == 1 and ack["conv"] == direct and ack["dup"] is False
    ack2 = await phone.send("to the group", conv=group, cmid="p-2")
    assert ack2 is not None and ack2["seq"] == 2

    for dev in (laptop, b):

        def caught_up(dev: ChatClient = dev) -> bool:
            return dev.cursors.get(direct) == 1 and dev.cursors.get(group) == 2

        await dev.wait_for(caught_up)
        got = next(m for m in dev.messages if m["conv"] == direct)
        expected = (alice.uid, "phone", "p-1", {"text": "from my phone"})
        assert (got["from"], got["dev"], got["cmid"], got["body"]) == expected
        assert got["mid"] == ack["mid"] and got["ts"] == ack["ts"]
        got = next(m for m in dev.messages if m["conv"] == group and m["type"] == "text")
        assert (got["from"], got["dev"], got["cmid"], got["seq"]) == (alice.uid, "phone", "p-2", 2)
    assert not laptop.acks
    # The sending device gets its own messages as acks only, never as msg frames
    assert not [m for m in phone.messages if m["type"] != "system"]

    # The laptop answers; the phone gets that as a msg, the laptop the ack
    ack3 = await laptop.send("from my laptop", to=bob.uid)
    assert ack3 is not None and ack3["seq"] == 2
    await phone.wait_for(lambda: phone.cursors.get(direct) == 2)
    assert [(m["dev"], m["body"]) for m in phone.messages if m["conv"] == direct] == [("laptop", "from my laptop")]
    await b.wait_for(lambda: b.cursors.get(direct) == 2)


async def test_send_retried_after_lost_ack_is_stored_once(server: ServerProcess, history: History) -> None:
    alice, bob = await asyncio.gather(register(server.api, "alice"), register(server.api, "bob"))
    direct = f"d:{min(alice.uid, bob.uid)}:{max(alice.uid, bob.uid)}"
    a = history.client(alice, "phone")
    b = history.client(bob, "phone")
    assert (await a.connect())["t"] == "auth_ok"
    assert (await b.connect())["t"] == "auth_ok"
    assert await a.send("first", to=bob.uid) is not None

    # Stop reading (the harness' reader task), so the coming ack is certainly lost with the connection.
    assert a._reader is not None
    a._reader.cancel()
    await a.send("lost ack", to=bob.uid, cmid="retry-me", wait=False)
    await b.wait_for(lambda: b.cursors.get(direct) == 2)  # stored and routed
    await a.drop()
    assert "retry-me" not in a.acks
    assert a.cursors[direct] == 1

    assert (await a.connect(resume=True))["t"] == "auth_ok"
    ack = await a.send("lost ack", to=bob.uid, cmid="retry-me")
    assert ack is not None, a.errors
    assert ack["seq"] == 2
    # Either the replay gave the message back first (then the ack is a dup), or the ack took its place.
    replayed = [m for m in a.messages if m["cmid"] == "retry-me"]
    assert ack["dup"] is bool(replayed)
    if replayed:
        assert replayed[0]["mid"] == ack["mid"]

    # A second retry of the now acked cmid: a dup ack, same seq and mid
    again = await a.send("lost ack", to=bob.uid, cmid="retry-me")
    assert again is not None and again["dup"] is True
    assert (again["seq"], again["mid"]) == (ack["seq"], ack["mid"])

    # The conversation goes on at seq 3, and the log holds the retried send once
    after = await a.send("next", to=bob.uid)
    assert after is not None and after["seq"] == 3
    await b.wait_for(lambda: b.cursors.get(direct) == 3)
    log = await read_log(server.api, alice, direct)
    assert [(e["seq"], e["cmid"]) for e in log].count((2, "retry-me")) == 1
    assert [e["body"] for e in log] == ["first", "lost ack", "next"]
    assert [m["body"] for m in b.messages] == ["first", "lost ack", "next"]


async def test_retry_of_acked_cmid_is_a_dup(server: ServerProcess, history: History) -> None:
    alice, bob = await asyncio.gather(register(server.api, "alice"), register(server.api, "bob"))
    group = await create_group(server.api, alice, [bob])
    a = history.client(alice, "phone")
    b = history.client(bob, "phone")
    assert (await a.connect())["t"] == "auth_ok"
    assert (await b.connect())["t"] == "auth_ok"
    first = await a.send("once", conv=group, cmid="c-1")
    assert first is not None and first["dup"] is False and first["seq"] == 2
    for _ in range(3):
        again = await a.send("once (retry)", conv=group, cmid="c-1")
        assert again is not None and again["dup"] is True
        assert (again["seq"], again["mid"], again["ts"]) == (first["seq"], first["mid"], first["ts"])
    # A retry after reconnecting is still recognised
    await a.close()
    assert (await a.connect(resume=True))["t"] == "auth_ok"
    again = await a.send("once (after reconnect)", conv=group, cmid="c-1")
    assert again is not None and again["dup"] is True and again["seq"] == first["seq"]
    # Reusing the cmid for another conversation is refused, not silently acked
    other = await a.send("elsewhere", to=bob.uid, cmid="c-1")
    assert other is None
    assert [(e["code"], e["ref"]) for e in a.errors] == [("invalid", "c-1")]

    nxt = await a.send("twice", conv=group)
    assert nxt is not None and nxt["seq"] == 3
    await b.wait_for(lambda: b.cursors.get(group) == 3)
    assert [m["body"] for m in b.messages if m["type"] == "text"] == ["once", "twice"]
    log = await read_log(server.api, bob, group)
    assert [e["body"] for e in log if e["type"] == "text"] == ["once", "twice"]
