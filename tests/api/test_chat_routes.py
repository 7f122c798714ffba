"""/groups, /conversations (history, receipts) and /presence: statuses, membership refusals, paging."""

from __future__ import annotations

from tests.api.conftest import LIMITS, Api, User, assert_error

V1 = "/api/v1"


async def group_of(api: Api, owner: User, *members: User, name: str = "team") -> int:
    r = await api.http.post(
        f"{V1}/groups", json={"name": name, "members": [m.uid for m in members]}, headers=owner.auth
    )
    assert r.status_code == 201, r.text
    group = r.json()
    assert group["conv"] == f"g:{group['gid']}" and group["owner"] == owner.uid and group["name"] == name
    gid: int = group["gid"]
    return gid


async def test_a_group_is_created_and_read_by_members_only(api: Api) -> None:
    alice, bob, carol = await api.user("alice"), await api.user("bob"), await api.user("carol")
    gid = await group_of(api, alice, bob)
    r = await api.http.get(f"{V1}/groups/{gid}", headers=bob.auth)
    assert r.status_code == 200 and r.json()["gid"] == gid
    r = await api.http.get(f"{V1}/groups/{gid}/members", headers=bob.auth)
    assert [m["uid"] for m in r.json()] == sorted([alice.uid, bob.uid])  # by uid
    assert {m["uid"]: m["role"] for m in r.json()} == {alice.uid: "owner", bob.uid: "member"}
    assert_error(await api.http.get(f"{V1}/groups/{gid}", headers=carol.auth), 403, "not_member")
    assert_error(await api.http.get(f"{V1}/groups/{gid}/members", headers=carol.auth), 403, "not_member")
    assert_error(await api.http.get(f"{V1}/groups/{gid + 1000}", headers=alice.auth), 404, "not_found")


async def test_group_creation_limits(api: Api) -> None:
    alice = await api.user("alice")
    others = [await api.user(f"user{n}") for n in range(LIMITS.max_group_members)]
    too_many = {"name": "big", "members": [u.uid for u in others]}
    assert_error(await api.http.post(f"{V1}/groups", json=too_many, headers=alice.auth), 400, "invalid")
    for body in ({"name": " "}, {"name": "x" * 101}, {"name": "ok", "members": [0]}, {"name": "a\x00b"}):
        assert_error(await api.http.post(f"{V1}/groups", json=body, headers=alice.auth), 400, "invalid")
    assert_error(await api.http.post(f"{V1}/groups", json={"members": []}, headers=alice.auth), 422, "invalid")
    unknown = {"name": "ok", "members": [2**63 - 1]}
    assert_error(await api.http.post(f"{V1}/groups", json=unknown, headers=alice.auth), 404, "not_found")


async def test_membership_changes_and_who_may_make_them(api: Api) -> None:
    alice, bob, carol, dave = [await api.user(n) for n in ("alice", "bob", "carol", "dave")]
    gid = await group_of(api, alice, bob)
    members = f"{V1}/groups/{gid}/members"
    # A plain member may not add; the owner may.
    assert_error(await api.http.post(members, json={"uids": [carol.uid]}, headers=bob.auth), 403, "forbidden")
    assert (await api.http.post(members, json={"uids": [carol.uid]}, headers=alice.auth)).status_code == 204
    assert_error(await api.http.post(members, json={"uids": []}, headers=alice.auth), 400, "invalid")
    too_many = {"uids": list(range(1, LIMITS.max_group_members + 2))}
    assert_error(await api.http.post(members, json=too_many, headers=alice.auth), 400, "invalid")
    # Roles: owner only, and only admin or member.
    role = f"{members}/{bob.uid}/role"
    assert_error(await api.http.put(role, json={"role": "owner"}, headers=alice.auth), 422, "invalid")
    assert_error(await api.http.put(role, json={"role": "admin"}, headers=carol.auth), 403, "forbidden")
    assert (await api.http.put(role, json={"role": "admin"}, headers=alice.auth)).status_code == 204
    # The new admin adds and removes a plain member.
    assert (await api.http.post(members, json={"uids": [dave.uid]}, headers=bob.auth)).status_code == 204
    assert (await api.http.delete(f"{members}/{dave.uid}", headers=bob.auth)).status_code == 204
    assert (await api.http.post(f"{V1}/groups/{gid}/leave", headers=carol.auth)).status_code == 204
    r = await api.http.get(members, headers=alice.auth)
    assert {m["uid"]: m["role"] for m in r.json()} == {alice.uid: "owner", bob.uid: "admin"}
    assert_error(await api.http.get(members, headers=carol.auth), 403, "not_member")
    assert_error(await api.http.delete(f"{members}/0", headers=alice.auth), 400, "invalid")


async def test_history_pages_with_the_server_cap(api: Api) -> None:
    alice, bob = await api.user("alice"), await api.user("bob")
    first = await api.services.send(alice.uid, {"text": "m1"}, to=bob.uid)
    conv = first.conv
    for n in range(2, 8):
        await api.services.send(bob.uid if n % 2 else alice.uid, {"text": f"m{n}"}, conv=conv)
    url = f"{V1}/conversations/{conv}/messages"

    async def page(**params: int) -> tuple[list[int], bool]:
        r = await api.http.get(url, params=params, headers=bob.auth)
        assert r.status_code == 200, r.text
        body = r.json()
        return [m["seq"] for m in body["messages"]], body["has_more"]

    cap = LIMITS.history_page_max
    assert await page() == (list(range(8 - cap, 8)), True)  # the newest page, capped
    assert await page(limit=100) == (list(range(8 - cap, 8)), True)
    assert await page(after=0, limit=2) == ([1, 2], True)
    assert await page(after=5) == ([6, 7], False)
    assert await page(before=3) == ([1, 2], False)
    r = await api.http.get(url, params={"after": 0, "limit": 1}, headers=alice.auth)
    (message,) = r.json()["messages"]
    assert message == {
        "t": "msg",
        "conv": conv,
        "seq": 1,
        "mid": str(first.mid),
        "from": alice.uid,
        "dev": "d1",
        "cmid": first.cmid,
        "ts": first.ts,
        "type": "text",
        "body": {"text": "m1"},
    }
    for params in ({"limit": 0}, {"after": -1}, {"before": 0}, {"after": 2**63}):
        assert_error(await api.http.get(url, params=params, headers=bob.auth), 400, "invalid")
    carol = await api.user("carol")
    assert_error(await api.http.get(url, headers=carol.auth), 403, "not_member")
    assert_error(await api.http.get(f"{V1}/conversations/nonsense/messages", headers=bob.auth), 404, "not_found")


async def test_conversations_and_receipts(api: Api) -> None:
    alice, bob, carol = await api.user("alice"), await api.user("bob"), await api.user("carol")
    assert (await api.http.get(f"{V1}/conversations", headers=alice.auth)).json() == []
    sent = await api.services.send(alice.uid, {"text": "hi"}, to=bob.uid)
    r = await api.http.get(f"{V1}/conversations", headers=bob.auth)
    (conv,) = r.json()
    assert (conv["conv"], conv["kind"], conv["peer"], conv["last_seq"]) == (sent.conv, "direct", alice.uid, 1)
    assert conv["unread"] == 1 and conv["read_seq"] == 0
    assert conv["last_message"]["body"] == {"text": "hi"} and conv["last_message"]["from"] == alice.uid
    r = await api.http.get(f"{V1}/conversations/{sent.conv}/receipts", headers=bob.auth)
    assert r.status_code == 200
    assert {x["uid"] for x in r.json()} <= {alice.uid, bob.uid}
    assert all(x["delivered_seq"] >= x["read_seq"] for x in r.json())
    assert_error(await api.http.get(f"{V1}/conversations/{sent.conv}/receipts", headers=carol.auth), 403, "not_member")


async def test_presence_follows_the_consent_rule(api: Api) -> None:
    alice, bob, carol = await api.user("alice"), await api.user("bob"), await api.user("carol")
    for user in (alice, bob, carol):
        await api.services.online(user.uid)

    async def seen_by(viewer: User, *users: User) -> list[tuple[int, bool]]:
        ids = ",".join(str(u.uid) for u in users)
        r = await api.http.get(f"{V1}/presence", params={"uids": ids}, headers=viewer.auth)
        assert r.status_code == 200, r.text
        return [(p["uid"], p["online"]) for p in r.json()]

    sent = await api.services.send(alice.uid, {"text": "hi"}, to=bob.uid)
    # In the order asked, duplicates dropped; an unsolicited message tells its sender nothing.
    assert await seen_by(alice, bob, carol, bob, alice) == [(bob.uid, False), (carol.uid, False), (alice.uid, True)]
    assert await seen_by(bob, alice) == [(alice.uid, True)]  # alice wrote to bob
    await api.services.send(bob.uid, {"text": "hello"}, conv=sent.conv)
    assert await seen_by(alice, bob, carol) == [(bob.uid, True), (carol.uid, False)]
    for uids in ("", "a,b", "0", str(2**63), ",".join(str(n) for n in range(1, 102)), "1" * 2001):
        assert_error(await api.http.get(f"{V1}/presence", params={"uids": uids}, headers=alice.auth), 400, "invalid")
