"""The HTTP API over real HTTP against a running ``im serve`` (the ``server`` fixture of conftest.py).

Every test makes its own users (unique names), so the tests share one server safely.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import websockets

from tests.support.client import Account

PASSWORD = "correct horse battery"


@pytest.fixture
async def api(server: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=f"{server.http}/api/v1", timeout=10) as client:
        yield client


def unique(prefix: str = "u") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


async def signup(api: httpx.AsyncClient, prefix: str = "u", display_name: str | None = None) -> Account:
    username = unique(prefix)
    body: dict[str, Any] = {"username": username, "password": PASSWORD}
    if display_name is not None:
        body["display_name"] = display_name
    r = await api.post("/auth/register", json=body)
    assert r.status_code == 201, r.text
    r = await api.post("/auth/login", json={"username": username, "password": PASSWORD})
    assert r.status_code == 200, r.text
    tokens = r.json()
    return Account(tokens["uid"], username, PASSWORD, tokens["access_token"], tokens["refresh_token"])


def assert_error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body["code"] == code, body
    assert isinstance(body["message"], str) and body["message"]
    assert "Traceback" not in r.text


# --- service ------------------------------------------------------------------------------------------


async def test_health_and_openapi(api: httpx.AsyncClient) -> None:
    r = await api.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    r = await api.get("/openapi.json")
    assert r.status_code == 200
    paths = r.json()["paths"]
    for path in (
        "/api/v1/auth/login",
        "/api/v1/conversations/{conv}/messages",
        "/api/v1/groups/{gid}/members",
    ):
        assert path in paths
    r = await api.get("/docs")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]


async def test_unknown_route_and_method_are_json(api: httpx.AsyncClient) -> None:
    assert_error(await api.get("/no/such/thing"), 404, "not_found")
    assert_error(await api.delete("/health"), 405, "invalid")


async def test_gateway_needs_auth_and_names_a_websocket(api: httpx.AsyncClient) -> None:
    assert_error(await api.get("/gateway"), 401, "unauthenticated")
    me = await signup(api)
    r = await api.get("/gateway", headers=me.auth)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["ws"].startswith(("ws://", "wss://")) and isinstance(body["node"], str)


# --- auth ---------------------------------------------------------------------------------------------


async def test_register(api: httpx.AsyncClient) -> None:
    name = unique("Reg")
    r = await api.post("/auth/register", json={"username": name, "password": PASSWORD, "display_name": "Reggie"})
    assert r.status_code == 201, r.text
    user = r.json()
    assert user["username"] == name and user["display_name"] == "Reggie" and user["uid"] > 0
    assert "password" not in r.text and "hash" not in r.text
    # Taken, ignoring case.
    r = await api.post("/auth/register", json={"username": name.upper(), "password": PASSWORD})
    assert_error(r, 409, "conflict")
    # Meaningless values: 400; malformed bodies: 422.
    assert_error(await api.post("/auth/register", json={"username": "a b", "password": PASSWORD}), 400, "invalid")
    assert_error(await api.post("/auth/register", json={"username": unique(), "password": "short"}), 400, "invalid")
    assert_error(await api.post("/auth/register", json={"username": unique()}), 422, "invalid")
    assert_error(await api.post("/auth/register", json={"username": 5, "password": []}), 422, "invalid")
    r = await api.post("/auth/register", content=b"{not json", headers={"content-type": "application/json"})
    assert_error(r, 422, "invalid")


async def test_login(api: httpx.AsyncClient) -> None:
    me = await signup(api)
    r = await api.post("/auth/login", json={"username": me.username.upper(), "password": PASSWORD})
    assert r.status_code == 200, r.text
    tokens = r.json()
    assert tokens["token_type"] == "bearer" and tokens["uid"] == me.uid and tokens["expires_in"] > 0
    assert tokens["access_token"] and tokens["refresh_token"]
    wrong = await api.post("/auth/login", json={"username": me.username, "password": PASSWORD + "x"})
    assert_error(wrong, 401, "bad_credentials")
    unknown = await api.post("/auth/login", json={"username": unique(), "password": PASSWORD})
    assert_error(unknown, 401, "bad_credentials")
    assert wrong.json()["message"] == unknown.json()["message"]


async def test_bad_tokens_are_refused(api: httpx.AsyncClient) -> None:
    me = await signup(api)
    assert_error(await api.get("/users/me"), 401, "unauthenticated")
    r = await api.get("/users/me", headers={"Authorization": "Bearer not.a.token"})
    assert_error(r, 401, "auth_failed")
    assert r.headers.get("www-authenticate", "").lower().startswith("bearer")
    assert_error(await api.get("/users/me", headers={"Authorization": f"Bearer {me.access}x"}), 401, "auth_failed")
    # A refresh token is not an access token.
    assert_error(await api.get("/users/me", headers={"Authorization": f"Bearer {me.refresh}"}), 401, "auth_failed")
    assert_error(await api.get("/users/me", headers={"Authorization": f"Basic {me.access}"}), 401, "unauthenticated")


async def test_refresh_rotates_and_reuse_revokes(api: httpx.AsyncClient) -> None:
    me = await signup(api)
    r = await api.post("/auth/refresh", json={"refresh_token": me.refresh})
    assert r.status_code == 200, r.text
    second = r.json()
    assert second["refresh_token"] != me.refresh and second["uid"] == me.uid
    r = await api.get("/users/me", headers={"Authorization": f"Bearer {second['access_token']}"})
    assert r.status_code == 200
    # Reusing the first refresh token revokes the session: the newer tokens die with it.
    assert_error(await api.post("/auth/refresh", json={"refresh_token": me.refresh}), 401, "auth_failed")
    r = await api.post("/auth/refresh", json={"refresh_token": second["refresh_token"]})
    assert_error(r, 401, "auth_failed")
    assert_error(await api.post("/auth/refresh", json={"refresh_token": "junk"}), 401, "auth_failed")
    assert_error(await api.post("/auth/refresh", json={}), 422, "invalid")


async def test_logout(api: httpx.AsyncClient) -> None:
    me = await signup(api)
    other_session = await api.post("/auth/login", json={"username": me.username, "password": PASSWORD})
    other = other_session.json()
    assert_error(await api.post("/auth/logout"), 401, "unauthenticated")
    r = await api.post("/auth/logout", headers=me.auth)
    assert r.status_code == 204 and r.content == b""
    assert_error(await api.get("/users/me", headers=me.auth), 401, "auth_failed")
    assert_error(await api.post("/auth/refresh", json={"refresh_token": me.refresh}), 401, "auth_failed")
    # Only that session ended.
    r = await api.get("/users/me", headers={"Authorization": f"Bearer {other['access_token']}"})
    assert r.status_code == 200


# --- users and contacts -------------------------------------------------------------------------------


async def test_users(api: httpx.AsyncClient) -> None:
    me = await signup(api, "Zed", display_name="Zed Zulu")
    peer = await signup(api, "yan")
    r = await api.get("/users/me", headers=me.auth)
    assert r.status_code == 200
    assert r.json() == {**r.json(), "uid": me.uid, "username": me.username, "display_name": "Zed Zulu"}
    r = await api.get(f"/users/{peer.uid}", headers=me.auth)
    assert r.status_code == 200 and r.json()["username"] == peer.username
    assert_error(await api.get("/users/999999999", headers=me.auth), 404, "not_found")
    assert_error(await api.get("/users/abc", headers=me.auth), 422, "invalid")
    r = await api.get(f"/users/by-name/{peer.username.upper()}", headers=me.auth)
    assert r.status_code == 200 and r.json()["uid"] == peer.uid
    assert_error(await api.get(f"/users/by-name/{unique()}", headers=me.auth), 404, "not_found")
    assert_error(await api.get(f"/users/{peer.uid}"), 401, "unauthenticated")


async def test_search_users(api: httpx.AsyncClient) -> None:
    tag = uuid.uuid4().hex[:8]
    me = await signup(api)
    r = await api.post("/auth/register", json={"username": f"srch{tag}_a", "password": PASSWORD})
    assert r.status_code == 201
    r = await api.post(
        "/auth/register", json={"username": unique(), "password": PASSWORD, "display_name": f"SRCH{tag} b"}
    )
    assert r.status_code == 201
    r = await api.get("/users", params={"q": f"Srch{tag}"}, headers=me.auth)
    assert r.status_code == 200, r.text
    assert len(r.json()) == 2
    r = await api.get("/users", params={"q": f"srch{tag}", "limit": 1}, headers=me.auth)
    assert len(r.json()) == 1
    assert (await api.get("/users", params={"q": f"zz{tag}"}, headers=me.auth)).json() == []
    assert_error(await api.get("/users", headers=me.auth), 422, "invalid")
    assert_error(await api.get("/users", params={"q": "a", "limit": 0}, headers=me.auth), 400, "invalid")


async def test_contacts(api: httpx.AsyncClient) -> None:
    me = await signup(api)
    a = await signup(api)
    b = await signup(api)
    assert (await api.get("/contacts", headers=me.auth)).json() == []
    for peer in (a, b, a):
        r = await api.put(f"/contacts/{peer.uid}", headers=me.auth)
        assert r.status_code == 204, r.text
    r = await api.get("/contacts", headers=me.auth)
    assert sorted(u["uid"] for u in r.json()) == sorted([a.uid, b.uid])
    assert (await api.get("/contacts", headers=a.auth)).json() == []  # one-way
    assert_error(await api.put(f"/contacts/{me.uid}", headers=me.auth), 400, "invalid")
    assert_error(await api.put("/contacts/999999999", headers=me.auth), 404, "not_found")
    assert (await api.delete(f"/contacts/{a.uid}", headers=me.auth)).status_code == 204
    assert_error(await api.delete(f"/contacts/{a.uid}", headers=me.auth), 404, "not_found")
    assert [u["uid"] for u in (await api.get("/contacts", headers=me.auth)).json()] == [b.uid]
    assert_error(await api.get("/contacts"), 401, "unauthenticated")


# --- groups -------------------------------------------------------------------------------------------


async def members(api: httpx.AsyncClient, who: Account, gid: int) -> dict[int, str]:
    r = await api.get(f"/groups/{gid}/members", headers=who.auth)
    assert r.status_code == 200, r.text
    return {m["uid"]: m["role"] for m in r.json()}


async def test_group_lifecycle_and_roles(api: httpx.AsyncClient) -> None:
    owner, admin, alice, bob, outsider = [await signup(api) for _ in range(5)]
    r = await api.post("/groups", json={"name": "Team", "members": [admin.uid, alice.uid]}, headers=owner.auth)
    assert r.status_code == 201, r.text
    group = r.json()
    gid = group["gid"]
    assert group["conv"] == f"g:{gid}" and group["name"] == "Team" and group["owner"] == owner.uid
    r = await api.get(f"/groups/{gid}", headers=alice.auth)
    assert r.status_code == 200 and r.json()["gid"] == gid
    assert await members(api, owner, gid) == {owner.uid: "owner", admin.uid: "member", alice.uid: "member"}

    # Outsiders see nothing.
    assert_error(await api.get(f"/groups/{gid}", headers=outsider.auth), 403, "not_member")
    assert_error(await api.get(f"/groups/{gid}/members", headers=outsider.auth), 403, "not_member")
    assert_error(await api.get("/groups/999999999", headers=owner.auth), 404, "not_found")

    # Plain members neither add nor remove nor change roles.
    assert_error(
        await api.post(f"/groups/{gid}/members", json={"uids": [bob.uid]}, headers=alice.auth),
        403,
        "forbidden",
    )
    assert_error(await api.delete(f"/groups/{gid}/members/{admin.uid}", headers=alice.auth), 403, "forbidden")
    r = await api.put(f"/groups/{gid}/members/{admin.uid}/role", json={"role": "admin"}, headers=alice.auth)
    assert_error(r, 403, "forbidden")

    # The owner makes an admin; an admin adds and removes plain members but cannot change roles.
    r = await api.put(f"/groups/{gid}/members/{admin.uid}/role", json={"role": "admin"}, headers=owner.auth)
    assert r.status_code == 204, r.text
    r = await api.post(f"/groups/{gid}/members", json={"uids": [bob.uid]}, headers=admin.auth)
    assert r.status_code == 204, r.text
    assert (await members(api, bob, gid))[bob.uid] == "member"
    r = await api.put(f"/groups/{gid}/members/{bob.uid}/role", json={"role": "admin"}, headers=admin.auth)
    assert_error(r, 403, "forbidden")
    assert (await api.delete(f"/groups/{gid}/members/{bob.uid}", headers=admin.auth)).status_code == 204
    assert_error(await api.delete(f"/groups/{gid}/members/{owner.uid}", headers=admin.auth), 403, "forbidden")
    assert bob.uid not in await members(api, owner, gid)

    # Bad values.
    r = await api.put(f"/groups/{gid}/members/{alice.uid}/role", json={"role": "owner"}, headers=owner.auth)
    assert_error(r, 422, "invalid")
    r = await api.post(f"/groups/{gid}/members", json={"uids": [999999999]}, headers=owner.auth)
    assert_error(r, 404, "not_found")
    assert_error(await api.post(f"/groups/{gid}/members", json={"uids": []}, headers=owner.auth), 400, "invalid")
    assert_error(await api.post("/groups", json={"name": "  ", "members": []}, headers=owner.auth), 400, "invalid")
    assert_error(await api.post("/groups", json={"members": []}, headers=owner.auth), 422, "invalid")

    # The owner removes; a member leaves and then reads nothing.
    assert (await api.delete(f"/groups/{gid}/members/{admin.uid}", headers=owner.auth)).status_code == 204
    assert (await api.post(f"/groups/{gid}/leave", headers=alice.auth)).status_code == 204
    assert_error(await api.get(f"/groups/{gid}", headers=alice.auth), 403, "not_member")
    assert_error(await api.get(f"/conversations/g:{gid}/messages", headers=alice.auth), 403, "not_member")
    assert await members(api, owner, gid) == {owner.uid: "owner"}


# --- conversations and history ------------------------------------------------------------------------


async def test_conversations_and_history_paging(api: httpx.AsyncClient) -> None:
    owner, peer, outsider = [await signup(api) for _ in range(3)]
    r = await api.post("/groups", json={"name": "Log", "members": [peer.uid]}, headers=owner.auth)
    gid = r.json()["gid"]
    conv = f"g:{gid}"
    # Every membership change is logged: 1 (created) + 10 role changes = 11 messages.
    for i in range(10):
        role = "admin" if i % 2 == 0 else "member"
        r = await api.put(f"/groups/{gid}/members/{peer.uid}/role", json={"role": role}, headers=owner.auth)
        assert r.status_code == 204, r.text

    r = await api.get("/conversations", headers=peer.auth)
    assert r.status_code == 200, r.text
    [summary] = [c for c in r.json() if c["conv"] == conv]
    assert summary["kind"] == "group" and summary["title"] == "Log" and summary["last_seq"] == 11
    assert summary["peer"] is None and isinstance(summary["unread"], int) and "read_seq" in summary
    last = summary["last_message"]
    assert last["conv"] == conv and last["seq"] == 11 and last["type"] == "system"
    assert isinstance(last["mid"], str) and last["from"] == owner.uid and isinstance(last["body"], dict)

    async def page(**params: int) -> tuple[list[int], bool]:
        r = await api.get(f"/conversations/{conv}/messages", params=params, headers=peer.auth)
        assert r.status_code == 200, r.text
        body = r.json()
        return [m["seq"] for m in body["messages"]], body["has_more"]

    assert await page() == (list(range(1, 12)), False)
    assert await page(limit=4) == ([8, 9, 10, 11], True)
    assert await page(before=8, limit=4) == ([4, 5, 6, 7], True)
    assert await page(before=4, limit=4) == ([1, 2, 3], False)
    assert await page(after=0, limit=4) == ([1, 2, 3, 4], True)
    assert await page(after=8, limit=4) == ([9, 10, 11], False)
    assert await page(after=11) == ([], False)
    # ':' may be sent percent-encoded.
    r = await api.get(f"/conversations/g%3A{gid}/messages", params={"limit": 1}, headers=peer.auth)
    assert [m["seq"] for m in r.json()["messages"]] == [11]

    assert_error(await api.get(f"/conversations/{conv}/messages", headers=outsider.auth), 403, "not_member")
    assert not [c for c in (await api.get("/conversations", headers=outsider.auth)).json() if c["conv"] == conv]
    assert_error(await api.get("/conversations/g:999999999/messages", headers=owner.auth), 404, "not_found")
    assert_error(await api.get("/conversations/nonsense/messages", headers=owner.auth), 404, "not_found")
    r = await api.get(f"/conversations/{conv}/messages", params={"limit": 0}, headers=owner.auth)
    assert_error(r, 400, "invalid")  # out of range (1..2^63-1): 400; a wrong type would be 422
    assert_error(await api.get(f"/conversations/{conv}/messages"), 401, "unauthenticated")


async def test_direct_conversation_via_websocket(server: Any, api: httpx.AsyncClient) -> None:
    alice, bob = await signup(api), await signup(api)
    async with websockets.connect(server.ws) as ws:
        await ws.send(json.dumps({"t": "auth", "token": alice.access, "device": "phone"}))
        await _expect(ws, lambda f: f.get("t") == "auth_ok")
        for i in range(3):
            await ws.send(json.dumps({"t": "send", "cmid": f"c{i}", "to": bob.uid, "body": {"text": f"hi {i}"}}))
            await _expect(ws, lambda f, i=i: f.get("t") == "ack" and f.get("cmid") == f"c{i}")
    conv = f"d:{min(alice.uid, bob.uid)}:{max(alice.uid, bob.uid)}"
    r = await api.get("/conversations", headers=bob.auth)
    [summary] = [c for c in r.json() if c["conv"] == conv]
    assert summary["kind"] == "direct" and summary["peer"] == alice.uid and summary["last_seq"] == 3
    assert summary["unread"] == 3 and summary["last_message"]["body"] == {"text": "hi 2"}
    r = await api.get(f"/conversations/{conv}/messages", params={"before": 3}, headers=bob.auth)
    body = r.json()
    assert [m["body"]["text"] for m in body["messages"]] == ["hi 0", "hi 1"] and body["has_more"] is False
    assert body["messages"][0]["from"] == alice.uid and body["messages"][0]["dev"] == "phone"


async def _expect(ws: Any, match: Any) -> dict[str, Any]:
    async with asyncio.timeout(5):
        while True:
            frame = json.loads(await ws.recv())
            assert frame.get("t") != "error", frame
            if match(frame):
                return dict(frame)
