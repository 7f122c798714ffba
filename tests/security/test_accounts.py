"""Account controls against a real ``im serve``: password change, sessions, log out everywhere, account
deletion, and the refresh-token fix (a forged ``<sid>.<anything>`` revokes nothing).

Each attack must fail and each bystander (another session, another user) stay unaffected.
docs/protocol.md section 18, "Account controls".
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from im.client.api import ApiClient, ApiError
from im.cluster import LocalCluster
from tests.cluster.conftest import client_on
from tests.support.checker import History
from tests.support.client import Account, ChatClient, http_from, register
from tests.support.server import FAST_ARGON2, ServerProcess, running_server

PASSWORD = "correct horse battery"


async def login(http: httpx.AsyncClient, account: Account, password: str = PASSWORD) -> Account:
    """Another login session of ``account``."""
    r = await http.post("/auth/login", json={"username": account.username, "password": password})
    assert r.status_code == 200, r.text
    t = r.json()
    return Account(account.uid, account.username, password, t["access_token"], t["refresh_token"])


async def refresh(http: httpx.AsyncClient, token: str) -> httpx.Response:
    return await http.post("/auth/refresh", json={"refresh_token": token})


async def still_works(c: ChatClient) -> None:
    n = sum(1 for e in c.events if e["t"] == "pong")
    await c.send_frame({"t": "ping"})
    await c.wait_for(lambda: sum(1 for e in c.events if e["t"] == "pong") > n)
    assert c.closed_reason is None


async def closed_revoked(c: ChatClient) -> None:
    await c.wait_for(lambda: c.closed_reason is not None, timeout=5)
    assert c.closed_reason is not None and c.closed_reason["code"] == "auth_failed"
    assert c.closed_reason["reconnect"] is False


async def test_change_password_ends_the_other_sessions_at_once(server: ServerProcess, http: httpx.AsyncClient) -> None:
    phone_login = await register(server.api, "alice")
    laptop_login = await login(http, phone_login)
    bob = await register(server.api, "bob")
    phone = ChatClient(server.ws, phone_login, "phone")
    laptop = ChatClient(server.ws, laptop_login, "laptop")
    bystander = ChatClient(server.ws, bob, "pc")
    for c in (phone, laptop, bystander):
        assert (await c.connect())["t"] == "auth_ok"
    try:
        body = {"current_password": "wrong password", "new_password": "new secret words"}
        r = await http.post("/account/password", json=body, headers=phone_login.auth)
        assert r.status_code == 403 and r.json()["code"] == "forbidden"
        body = {"current_password": PASSWORD, "new_password": "short"}
        assert (await http.post("/account/password", json=body, headers=phone_login.auth)).status_code == 400
        await still_works(laptop)  # refused changes change nothing

        body = {"current_password": PASSWORD, "new_password": "new secret words"}
        assert (await http.post("/account/password", json=body, headers=phone_login.auth)).status_code == 204
        await closed_revoked(laptop)  # the other session's socket closes at once ...
        assert (await refresh(http, laptop_login.refresh)).status_code == 401  # ... and its tokens die
        assert (await http.get("/users/me", headers=laptop_login.auth)).status_code == 401
        # This session goes on; the bystander is untouched.
        await still_works(phone)
        await still_works(bystander)
        assert (await refresh(http, phone_login.refresh)).status_code == 200
        # Only the new password logs in.
        r = await http.post("/auth/login", json={"username": "alice", "password": PASSWORD})
        assert r.status_code == 401
        await login(http, phone_login, "new secret words")
    finally:
        for c in (phone, laptop, bystander):
            await c.close()


async def test_sessions_list_revoke_and_logout_everywhere(server: ServerProcess, http: httpx.AsyncClient) -> None:
    first = await register(server.api, "alice")
    second, third = await login(http, first), await login(http, first)
    bob = await register(server.api, "bob")
    clients = [ChatClient(server.ws, acc, dev) for acc, dev in ((first, "a"), (second, "b"), (third, "c"), (bob, "x"))]
    for c in clients:
        assert (await c.connect())["t"] == "auth_ok"
    a, b, c3, bystander = clients
    try:
        r = await http.get("/account/sessions", headers=second.auth)
        sessions = r.json()
        sid_of = {acc.refresh.split(".")[0]: acc for acc in (first, second, third)}
        assert {s["sid"]: s["current"] for s in sessions} == {sid: acc is second for sid, acc in sid_of.items()}
        assert all(s["created_at"] > 0 and s["expires_at"] > s["created_at"] for s in sessions)
        third_sid = third.refresh.split(".")[0]

        # Another user's session cannot be revoked (nor even told apart from a missing one).
        assert (await http.delete(f"/account/sessions/{third_sid}", headers=bob.auth)).status_code == 404
        await still_works(c3)
        assert (await http.delete(f"/account/sessions/{third_sid}", headers=first.auth)).status_code == 204
        await closed_revoked(c3)
        assert len((await http.get("/account/sessions", headers=first.auth)).json()) == 2
        assert (await http.delete(f"/account/sessions/{third_sid}", headers=first.auth)).status_code == 404

        r = await http.get("/account/devices", headers=first.auth)
        assert {d["device"]: d["online"] for d in r.json()} == {"a": True, "b": True}
        assert all(d["last_active"] >= 0 for d in r.json())

        assert (await http.post("/account/logout-all", headers=second.auth)).status_code == 204
        await closed_revoked(a)
        await closed_revoked(b)
        assert (await http.get("/users/me", headers=first.auth)).status_code == 401
        assert (await refresh(http, first.refresh)).status_code == 401
        await still_works(bystander)
    finally:
        for c in clients:
            await c.close()


async def test_forged_refresh_token_revokes_nothing_but_a_reused_one_does(
    server: ServerProcess, http: httpx.AsyncClient
) -> None:
    alice = await register(server.api, "alice")
    phone = ChatClient(server.ws, alice, "phone")
    assert (await phone.connect())["t"] == "auth_ok"
    try:
        sid = alice.refresh.split(".")[0]  # readable by anyone holding an access token, even an expired one
        gen, _, mac = alice.refresh.split(".", 1)[1].partition(".")
        for forged in (
            f"{sid}.x",
            f"{sid}.",
            f"{sid}.0.{'A' * 43}",
            f"{sid}.1.{mac}",
            f"{sid}.{gen}.{mac[:-1]}B",
            f"{sid}.99999999999999999999.x",
            sid,
        ):
            r = await refresh(http, forged)
            assert r.status_code == 401 and r.json()["code"] == "auth_failed", forged
        await still_works(phone)  # nothing was revoked
        r = await refresh(http, alice.refresh)
        assert r.status_code == 200, r.text
        rotated = r.json()["refresh_token"]
        # A genuine, previously issued token used again: reuse detection revokes the session.
        r = await refresh(http, alice.refresh)
        assert r.status_code == 401 and "reused" in r.json()["message"]
        assert (await refresh(http, rotated)).status_code == 401
        await closed_revoked(phone)
    finally:
        await phone.close()


async def test_delete_account(server: ServerProcess, http: httpx.AsyncClient) -> None:
    alice, bob, carol = [await register(server.api, n) for n in ("alice", "bob", "carol")]
    async with ApiClient(server.http) as sdk:
        await sdk.login("alice", PASSWORD)
        a = ChatClient(server.ws, alice, "phone")
        b = ChatClient(server.ws, bob, "pc")
        for c in (a, b):
            assert (await c.connect())["t"] == "auth_ok"
        try:
            group = await sdk.create_group("alice's", members=[bob.uid, carol.uid])
            await sdk.set_role(group.gid, carol.uid, "admin")
            assert await a.send("hello bob", to=bob.uid)
            sent = await sdk.upload(b"shared bytes alice sent to bob", "shared.txt", "text/plain")
            assert await a.send({"file_id": sent.file_id}, to=bob.uid, type="file")
            unsent = await sdk.upload(b"private bytes only alice had", "private.txt", "text/plain")
            await sdk.add_contact(bob.uid)
            await sdk.block(carol.uid)
            r = await http.put(f"/contacts/{alice.uid}", headers=bob.auth)
            assert r.status_code == 204

            with pytest.raises(ApiError) as refused:
                await sdk.delete_account("not my password")
            assert refused.value.status == 403
            await sdk.delete_account(PASSWORD)
            assert sdk.tokens is None

            await closed_revoked(a)  # her sockets close, her tokens die, her password no longer logs in
            assert (await http.get("/users/me", headers=alice.auth)).status_code == 401
            r = await http.post("/auth/login", json={"username": "alice", "password": PASSWORD})
            assert r.status_code == 401
            # Her messages stay, from a user shown as deleted; nobody can write to her any more.
            r = await http.get(f"/conversations/d:{alice.uid}:{bob.uid}/messages", headers=bob.auth)
            assert [m["from"] for m in r.json()["messages"]] == [alice.uid, alice.uid]
            r = await http.get(f"/users/{alice.uid}", headers=bob.auth)
            assert r.json()["display_name"] == "Deleted user"
            assert await b.send("are you there?", to=alice.uid) is None
            assert b.errors[-1]["code"] == "not_found"
            # Her group: she left, the admin owns it now; the others stay.
            r = await http.get(f"/groups/{group.gid}/members", headers=bob.auth)
            assert {m["uid"]: m["role"] for m in r.json()} == {bob.uid: "member", carol.uid: "owner"}
            # Contacts and blocks are gone; the file she sent stays readable to Bob, the other to nobody.
            assert (await http.get("/contacts", headers=bob.auth)).json() == []
            assert (await http.get(f"/files/{sent.file_id}", headers=bob.auth)).status_code == 200
            assert (await http.get(f"/files/{unsent.file_id}", headers=bob.auth)).status_code == 404
            # The name is free again, for a new account with a new uid.
            again = await register(server.api, "alice", "another password")
            assert again.uid != alice.uid
            await b.send_frame({"t": "ping"})
            await b.wait_for(lambda: any(e["t"] == "pong" for e in b.events))
        finally:
            for c in (a, b):
                await c.close()


async def test_password_change_closes_the_other_session_on_another_gateway(cluster: LocalCluster) -> None:
    async with History(cluster) as history:  # type: ignore[arg-type]  # the checker needs only .api
        async with httpx.AsyncClient(base_url=cluster.api, timeout=10) as http:
            mine = await register(cluster.api, "alice")
            other = await login(http, mine)
            bob = await register(cluster.api, "bob")
            phone = client_on(history, cluster, "gw-1", mine, "phone")
            laptop = client_on(history, cluster, "gw-2", other, "laptop")
            bystander = client_on(history, cluster, "gw-2", bob, "pc")
            for c in (phone, laptop, bystander):
                assert (await c.connect())["t"] == "auth_ok"
            body = {"current_password": PASSWORD, "new_password": "new secret words"}
            assert (await http.post("/account/password", json=body, headers=mine.auth)).status_code == 204
            await closed_revoked(laptop)  # on gateway 2, through a transfer node, at once
            assert (await refresh(http, other.refresh)).status_code == 401
            await still_works(phone)
            await still_works(bystander)
            assert await phone.send("still here", to=bob.uid)
            await bystander.wait_messages(1)
        await history.close_all()
        await history.check()


async def test_password_checks_of_account_controls_are_throttled_as_logins(tmp_path: Path) -> None:
    """A stolen access token cannot guess the password through /account/password faster than a login
    could: each check takes a login attempt of (account, address); past the budget, 429 with a retry
    time, while the owner still logs in from another address."""
    with running_server(tmp_path / "data", FAST_ARGON2, relaxed=False) as server:
        owner = await register(server.api, "victim")
        wrong = {"current_password": "not the password", "new_password": "a brand new password"}
        async with httpx.AsyncClient(base_url=server.api, timeout=10) as http:
            # register() logged in once: 9 of the 10 attempts per (account, address) remain.
            for _ in range(9):
                r = await http.post("/account/password", json=wrong, headers=owner.auth)
                assert r.status_code == 403 and r.json()["code"] == "forbidden", r.text
            r = await http.post("/account/password", json=wrong, headers=owner.auth)
            assert r.status_code == 429 and r.json()["code"] == "rate_limited", r.text
            assert int(r.headers["Retry-After"]) > 0 and r.json()["retry_after"] > 0
            r = await http.post("/account/delete", json={"password": "not the password"}, headers=owner.auth)
            assert r.status_code == 429, r.text
        async with http_from("127.0.0.2", server.api) as elsewhere:
            r = await elsewhere.post("/auth/login", json={"username": "victim", "password": owner.password})
            assert r.status_code == 200, r.text
