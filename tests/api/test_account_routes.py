"""Account controls and consent: password, sessions, devices, deletion, blocks, settings."""

from __future__ import annotations

from tests.api.conftest import PASSWORD, Api, assert_error

V1 = "/api/v1"
ACCOUNT = f"{V1}/account"
NEW_PASSWORD = "a brand new passphrase"


async def test_changing_the_password_ends_the_other_sessions_only(api: Api) -> None:
    here = await api.user("alice")
    other = await api.login("alice")
    wrong = {"current_password": "not it at all", "new_password": NEW_PASSWORD}
    assert_error(await api.http.post(f"{ACCOUNT}/password", json=wrong, headers=here.auth), 403, "forbidden")
    short = {"current_password": PASSWORD, "new_password": "short"}
    assert_error(await api.http.post(f"{ACCOUNT}/password", json=short, headers=here.auth), 400, "invalid")
    huge = {"current_password": PASSWORD, "new_password": "x" * 1025}
    assert_error(await api.http.post(f"{ACCOUNT}/password", json=huge, headers=here.auth), 400, "invalid")
    change = {"current_password": PASSWORD, "new_password": NEW_PASSWORD}
    assert (await api.http.post(f"{ACCOUNT}/password", json=change, headers=here.auth)).status_code == 204
    assert (await api.http.get(f"{V1}/users/me", headers=here.auth)).status_code == 200
    assert_error(await api.http.get(f"{V1}/users/me", headers=other.auth), 401, "auth_failed")
    assert_error(await api.http.post(f"{V1}/auth/refresh", json={"refresh_token": other.refresh}), 401, "auth_failed")
    assert (await api.login("alice", NEW_PASSWORD)).uid == here.uid


async def test_sessions_list_and_revoke(api: Api) -> None:
    first = await api.user("alice")
    second = await api.login("alice")
    r = await api.http.get(f"{ACCOUNT}/sessions", headers=second.auth)
    sessions = r.json()
    assert r.status_code == 200 and len(sessions) == 2
    assert [s["current"] for s in sessions].count(True) == 1
    assert [s["created_at"] for s in sessions] == sorted(s["created_at"] for s in sessions)  # oldest first
    (other,) = (s for s in sessions if not s["current"])
    assert_error(await api.http.delete(f"{ACCOUNT}/sessions/no-such-sid", headers=second.auth), 404, "not_found")
    assert_error(await api.http.delete(f"{ACCOUNT}/sessions/{'x' * 65}", headers=second.auth), 400, "invalid")
    r = await api.http.delete(f"{ACCOUNT}/sessions/{other['sid']}", headers=second.auth)
    assert r.status_code == 204
    assert_error(await api.http.get(f"{V1}/users/me", headers=first.auth), 401, "auth_failed")
    assert len((await api.http.get(f"{ACCOUNT}/sessions", headers=second.auth)).json()) == 1


async def test_logout_all_ends_every_session_this_one_included(api: Api) -> None:
    first = await api.user("alice")
    second = await api.login("alice")
    assert (await api.http.post(f"{ACCOUNT}/logout-all", headers=second.auth)).status_code == 204
    for user in (first, second):
        assert_error(await api.http.get(f"{V1}/users/me", headers=user.auth), 401, "auth_failed")


async def test_devices_lists_the_online_ones(api: Api) -> None:
    alice = await api.user("alice")
    assert (await api.http.get(f"{ACCOUNT}/devices", headers=alice.auth)).json() == []
    await api.services.online(alice.uid, "phone")
    r = await api.http.get(f"{ACCOUNT}/devices", headers=alice.auth)
    assert [(d["device"], d["online"]) for d in r.json()] == [("phone", True)]


async def test_deleting_the_account_needs_its_password(api: Api) -> None:
    alice = await api.user("alice")
    wrong = {"password": "not it at all"}
    assert_error(await api.http.post(f"{ACCOUNT}/delete", json=wrong, headers=alice.auth), 403, "forbidden")
    assert_error(await api.http.post(f"{ACCOUNT}/delete", json={}, headers=alice.auth), 422, "invalid")
    r = await api.http.post(f"{ACCOUNT}/delete", json={"password": PASSWORD}, headers=alice.auth)
    assert r.status_code == 204
    assert_error(await api.http.get(f"{V1}/users/me", headers=alice.auth), 401, "auth_failed")
    bad = await api.http.post(f"{V1}/auth/login", json={"username": "alice", "password": PASSWORD})
    assert_error(bad, 401, "bad_credentials")


async def test_blocks(api: Api) -> None:
    alice, bob = await api.user("alice"), await api.user("bob")
    for _ in range(2):  # idempotent
        assert (await api.http.put(f"{V1}/blocks/{bob.uid}", headers=alice.auth)).status_code == 204
    assert [u["uid"] for u in (await api.http.get(f"{V1}/blocks", headers=alice.auth)).json()] == [bob.uid]
    assert_error(await api.http.put(f"{V1}/blocks/{alice.uid}", headers=alice.auth), 400, "invalid")
    assert_error(await api.http.put(f"{V1}/blocks/{2**63 - 1}", headers=alice.auth), 404, "not_found")
    assert_error(await api.http.put(f"{V1}/blocks/0", headers=alice.auth), 400, "invalid")
    assert (await api.http.delete(f"{V1}/blocks/{bob.uid}", headers=alice.auth)).status_code == 204
    assert_error(await api.http.delete(f"{V1}/blocks/{bob.uid}", headers=alice.auth), 404, "not_found")
    assert (await api.http.get(f"{V1}/blocks", headers=alice.auth)).json() == []


async def test_settings(api: Api) -> None:
    alice = await api.user("alice")
    settings = f"{V1}/users/me/settings"
    assert (await api.http.get(settings, headers=alice.auth)).json() == {"contacts_only": False}
    r = await api.http.put(settings, json={"contacts_only": True}, headers=alice.auth)
    assert r.status_code == 200 and r.json() == {"contacts_only": True}
    assert (await api.http.get(settings, headers=alice.auth)).json() == {"contacts_only": True}
    assert_error(await api.http.put(settings, json={}, headers=alice.auth), 422, "invalid")
    assert_error(await api.http.put(settings, json={"contacts_only": "maybe"}, headers=alice.auth), 422, "invalid")
