"""/auth, the gateway and health routes, and what every route shares: the error body, validation
statuses, the body limit, unknown paths (docs/protocol.md, HTTP API)."""

from __future__ import annotations

from typing import Any

from tests.api.conftest import MAX_REQUEST_BYTES, PASSWORD, REGISTER_LIMIT, Api, assert_error

AUTH = "/api/v1/auth"


async def test_register_answers_the_user_and_a_taken_name_is_a_conflict_ignoring_case(api: Api) -> None:
    r = await api.http.post(f"{AUTH}/register", json={"username": "alice", "password": PASSWORD, "display_name": "Al"})
    assert r.status_code == 201, r.text
    user = r.json()
    assert (user["username"], user["display_name"]) == ("alice", "Al") and user["uid"] >= 1
    assert set(user) == {"uid", "username", "display_name", "created_at"}
    r = await api.http.post(f"{AUTH}/register", json={"username": "ALICE", "password": PASSWORD})
    assert_error(r, 409, "conflict")


async def test_register_refuses_values_out_of_range_400_and_wrong_shapes_422(api: Api) -> None:
    out_of_range: list[dict[str, Any]] = [
        {"username": "al", "password": PASSWORD},  # too short a name
        {"username": "al ice", "password": PASSWORD},
        {"username": "alice", "password": "short"},
        {"username": "alice", "password": PASSWORD + "\x00"},  # no store keeps a NUL
        {"username": "alice", "password": PASSWORD, "display_name": " "},
    ]
    for body in out_of_range:
        assert_error(await api.http.post(f"{AUTH}/register", json=body), 400, "invalid")
    wrong_shape: list[dict[str, Any]] = [
        {"username": "alice"},
        {"username": 5, "password": PASSWORD},
        {"user": "alice"},
    ]
    for body in wrong_shape:
        assert_error(await api.http.post(f"{AUTH}/register", json=body), 422, "invalid")
    r = await api.http.post(f"{AUTH}/register", content=b"{not json", headers={"content-type": "application/json"})
    assert_error(r, 422, "invalid")
    # Nothing was created by the refusals.
    assert (
        await api.http.post(f"{AUTH}/register", json={"username": "alice", "password": PASSWORD})
    ).status_code == 201


async def test_login_with_a_wrong_password_or_an_unknown_name_is_the_same_401(api: Api) -> None:
    await api.user("alice")
    wrong = await api.http.post(f"{AUTH}/login", json={"username": "alice", "password": "not the password"})
    unknown = await api.http.post(f"{AUTH}/login", json={"username": "nobody", "password": PASSWORD})
    for r in (wrong, unknown):
        assert_error(r, 401, "bad_credentials")
        assert r.headers["www-authenticate"] == "Bearer"
    assert wrong.json()["message"] == unknown.json()["message"]


async def test_tokens_work_and_refresh_rotates_the_refresh_token(api: Api) -> None:
    alice = await api.user("alice")
    me = await api.http.get("/api/v1/users/me", headers=alice.auth)
    assert me.status_code == 200 and me.json()["uid"] == alice.uid
    r = await api.http.post(f"{AUTH}/refresh", json={"refresh_token": alice.refresh})
    assert r.status_code == 200, r.text
    tokens = r.json()
    assert tokens["uid"] == alice.uid and tokens["token_type"] == "bearer" and tokens["expires_in"] > 0
    assert tokens["refresh_token"] != alice.refresh
    # The used refresh token is spent; presenting it again ends the whole session.
    assert_error(await api.http.post(f"{AUTH}/refresh", json={"refresh_token": alice.refresh}), 401, "auth_failed")
    r = await api.http.post(f"{AUTH}/refresh", json={"refresh_token": tokens["refresh_token"]})
    assert_error(r, 401, "auth_failed")


async def test_logout_ends_the_session(api: Api) -> None:
    alice = await api.user("alice")
    r = await api.http.post(f"{AUTH}/logout", headers=alice.auth)
    assert r.status_code == 204 and r.content == b""
    assert_error(await api.http.get("/api/v1/users/me", headers=alice.auth), 401, "auth_failed")
    assert_error(await api.http.post(f"{AUTH}/refresh", json={"refresh_token": alice.refresh}), 401, "auth_failed")


async def test_a_route_without_a_bearer_token_is_401_unauthenticated(api: Api) -> None:
    for method, path in (
        ("GET", "/users/me"),
        ("POST", "/auth/logout"),
        ("GET", "/conversations"),
        ("GET", "/gateway"),
    ):
        r = await api.http.request(method, f"/api/v1{path}")
        assert_error(r, 401, "unauthenticated")
        assert r.headers["www-authenticate"] == "Bearer"
    r = await api.http.get("/api/v1/users/me", headers={"Authorization": "Bearer not-a-token"})
    assert_error(r, 401, "auth_failed")


async def test_registrations_past_the_address_budget_are_429_with_retry_after(limited_api: Api) -> None:
    api = limited_api
    for n in range(REGISTER_LIMIT):
        r = await api.http.post(f"{AUTH}/register", json={"username": f"user{n}", "password": PASSWORD})
        assert r.status_code == 201, r.text
    r = await api.http.post(f"{AUTH}/register", json={"username": "one-more", "password": PASSWORD})
    body = assert_error(r, 429, "rate_limited")
    assert body["retry_after"] > 0 and int(r.headers["retry-after"]) >= 1
    # Logins are under other budgets.
    assert (await api.login("user0")).uid >= 1


async def test_bodies_over_the_limit_are_413_too_large(api: Api) -> None:
    big = {"username": "alice", "password": "x" * MAX_REQUEST_BYTES}
    assert_error(await api.http.post(f"{AUTH}/register", json=big), 413, "too_large")


async def test_unknown_paths_and_methods(api: Api) -> None:
    assert_error(await api.http.get("/api/v1/no-such-thing"), 404, "not_found")
    assert_error(await api.http.get(f"{AUTH}/login"), 405, "invalid")
    assert_error(await api.http.get("/api/v1/users/me%00"), 400, "invalid")


async def test_gateway_answers_the_picked_gateway_or_503(api: Api) -> None:
    alice = await api.user("alice")
    assert_error(await api.http.get("/api/v1/gateway", headers=alice.auth), 503, "unavailable")
    api.services.gateway = {"ws": "ws://127.0.0.1:9/ws", "node": "gw-1"}
    r = await api.http.get("/api/v1/gateway", headers=alice.auth)
    assert r.status_code == 200 and r.json() == {"ws": "ws://127.0.0.1:9/ws", "tcp": None, "node": "gw-1"}


async def test_health_and_the_hardening_headers(api: Api) -> None:
    r = await api.http.get("/api/v1/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    assert r.headers["cache-control"] == "no-store" and r.headers["x-content-type-options"] == "nosniff"
    assert "server" not in r.headers
