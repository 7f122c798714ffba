"""``GET /conversations/{conv}/receipts`` and ``GET /presence`` over real HTTP and WebSocket against a
running ``im serve`` (what the web client shows after a reload: read/delivered marks, online dots)."""

from __future__ import annotations

import httpx

from tests.support.checker import History
from tests.support.client import Account, register
from tests.support.server import ServerProcess
from tests.support.wait import eventually


def error_of(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    assert r.json()["code"] == code, r.text


async def test_receipts_report_every_members_stored_marks(server: ServerProcess, history: History) -> None:
    alice = await register(server.api, "alice")
    bob = await register(server.api, "bob")
    eve = await register(server.api, "eve")
    a = history.client(alice, "phone")
    b1 = history.client(bob, "laptop")
    await a.connect()
    await b1.connect()
    conv = f"d:{alice.uid}:{bob.uid}"
    for i in range(3):
        assert await a.send({"text": f"m{i}"}, to=bob.uid)
    await b1.wait_messages(3)

    async with httpx.AsyncClient(base_url=server.api, timeout=10) as http:

        async def marks(who: Account = alice) -> dict[int, tuple[int, int]]:
            r = await http.get(f"/conversations/{conv}/receipts", headers=who.auth)
            assert r.status_code == 200, r.text
            return {m["uid"]: (m["read_seq"], m["delivered_seq"]) for m in r.json()}

        # Sending moved Alice's read mark; Bob has reported nothing yet.
        assert await marks() == {alice.uid: (3, 3), bob.uid: (0, 0)}

        await b1.send_frame({"t": "recv", "conv": conv, "seq": 2})

        async def bob_delivered_2() -> bool:
            return (await marks())[bob.uid] == (0, 2)

        await eventually(bob_delivered_2)

        # Delivered is the best of Bob's devices: a second device holding more counts.
        b2 = history.client(bob, "tablet")
        await b2.connect(resume=False)
        await b2.wait_messages(3)
        await b2.send_frame({"t": "recv", "conv": conv, "seq": 3})

        async def bob_delivered_3() -> bool:
            return (await marks(bob))[bob.uid] == (0, 3)

        await eventually(bob_delivered_3)
        # A read mark counts as delivered too, and the first device's lower cursor does not pull it back.
        await b1.send_frame({"t": "read", "conv": conv, "seq": 3})

        async def bob_read_3() -> bool:
            return (await marks())[bob.uid] == (3, 3)

        await eventually(bob_read_3)

        # Members only; a malformed or unknown conversation is not_found.
        error_of(await http.get(f"/conversations/{conv}/receipts", headers=eve.auth), 403, "not_member")
        error_of(await http.get("/conversations/d:2:1/receipts", headers=alice.auth), 404, "not_found")
        error_of(await http.get("/conversations/g:999/receipts", headers=alice.auth), 404, "not_found")
        error_of(await http.get(f"/conversations/{conv}/receipts"), 401, "unauthenticated")


async def test_group_receipts_list_members(server: ServerProcess, history: History) -> None:
    alice = await register(server.api, "alice")
    bob = await register(server.api, "bob")
    carol = await register(server.api, "carol")
    async with httpx.AsyncClient(base_url=server.api, timeout=10) as http:
        r = await http.post("/groups", json={"name": "trip", "members": [bob.uid, carol.uid]}, headers=alice.auth)
        assert r.status_code == 201, r.text
        gid, conv = r.json()["gid"], r.json()["conv"]
        r = await http.get(f"/conversations/{conv}/receipts", headers=carol.auth)
        assert r.status_code == 200, r.text
        assert r.json() == [
            {"uid": u, "read_seq": 0, "delivered_seq": 0} for u in sorted((alice.uid, bob.uid, carol.uid))
        ]
        # A removed member is no longer listed, and can no longer ask.
        r = await http.delete(f"/groups/{gid}/members/{carol.uid}", headers=alice.auth)
        assert r.status_code == 204, r.text
        r = await http.get(f"/conversations/{conv}/receipts", headers=alice.auth)
        assert [m["uid"] for m in r.json()] == sorted((alice.uid, bob.uid))
        error_of(await http.get(f"/conversations/{conv}/receipts", headers=carol.auth), 403, "not_member")


async def test_presence_shown_to_partners_who_wrote_and_co_members(server: ServerProcess, history: History) -> None:
    alice = await register(server.api, "alice")
    bob = await register(server.api, "bob")
    carol = await register(server.api, "carol")
    stranger = await register(server.api, "stranger")
    async with httpx.AsyncClient(base_url=server.api, timeout=10) as http:

        async def online(who: Account, uids: list[int]) -> dict[int, bool]:
            r = await http.get("/presence", params={"uids": ",".join(map(str, uids))}, headers=who.auth)
            assert r.status_code == 200, r.text
            assert [p["uid"] for p in r.json()] == list(dict.fromkeys(uids)), "in the order asked, once each"
            return {p["uid"]: p["online"] for p in r.json()}

        everyone = [alice.uid, bob.uid, carol.uid, stranger.uid]
        assert await online(alice, everyone) == dict.fromkeys(everyone, False)

        # Alice and Bob share a direct conversation; Alice and Carol a group; the stranger shares nothing.
        a = history.client(alice, "phone")
        await a.connect()
        assert await a.send({"text": "hi"}, to=bob.uid)
        r = await http.post("/groups", json={"name": "g", "members": [carol.uid]}, headers=alice.auth)
        assert r.status_code == 201, r.text
        for acc, device in ((bob, "laptop"), (carol, "tablet"), (stranger, "pc")):
            await history.client(acc, device).connect()

        # Alice wrote first: Bob sees her, but she does not see Bob until he answers (the presence rule:
        # one unsolicited message tells its sender nothing).
        assert await online(alice, [bob.uid]) == {bob.uid: False}
        b = history.client(bob, "phone")
        await b.connect()
        assert await b.send({"text": "hello"}, to=alice.uid)
        assert await online(alice, [*everyone, bob.uid]) == {
            alice.uid: True,
            bob.uid: True,
            carol.uid: True,
            stranger.uid: False,
        }
        assert await online(bob, everyone) == {alice.uid: True, bob.uid: True, carol.uid: False, stranger.uid: False}
        # The stranger learns nothing about anyone but itself.
        assert await online(stranger, everyone) == {
            alice.uid: False,
            bob.uid: False,
            carol.uid: False,
            stranger.uid: True,
        }

        # Going offline shows (the gateway removes the presence entry when the connection closes).
        await a.close()

        async def alice_offline() -> bool:
            return (await online(bob, [alice.uid])) == {alice.uid: False}

        await eventually(alice_offline)

        # At most 100 uids; integers only; authentication needed.
        error_of(
            await http.get("/presence", params={"uids": ",".join(map(str, range(1, 102)))}, headers=bob.auth),
            400,
            "invalid",
        )
        error_of(await http.get("/presence", params={"uids": "1,x"}, headers=bob.auth), 400, "invalid")
        error_of(await http.get("/presence", params={"uids": "0"}, headers=bob.auth), 400, "invalid")
        error_of(await http.get("/presence", params={"uids": ""}, headers=bob.auth), 400, "invalid")
        error_of(await http.get("/presence", headers=bob.auth), 422, "invalid")
        error_of(await http.get("/presence", params={"uids": "1"}), 401, "unauthenticated")
