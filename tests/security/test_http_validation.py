"""Attack: integers and text that no store can hold, in every HTTP path, query and body (issue 9, items 1
and 8). Against a real ``im serve`` on SQLite and on PostgreSQL: each answers 400/404/422 as
docs/protocol.md section 18 says, never 500, and the server goes on serving a bystander; every response
carries the hardening headers; the API docs page loads from im alone, under a CSP."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support.postgres import DSN, connect
from tests.support.server import ServerProcess, running_server

BIG = 2**63  # one past the largest uid/gid/seq a store holds
OUT_OF_RANGE = [BIG, 2**64, 10**30, -1, 0]


def store_args(kind: str, schema: str) -> list[str]:
    if kind == "sqlite":
        return []
    return [
        "--set",
        "store.kind=postgres",
        "--set",
        f"store.postgres_dsn={DSN}",
        "--set",
        f"store.postgres_schema={schema}",
    ]


async def _drop(schema: str) -> None:
    conn = await connect()
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    schema = f"im_sec_http_{uuid.uuid4().hex[:10]}"
    try:
        with running_server(tmp_path_factory.mktemp("data"), store_args(request.param, schema)) as proc:
            yield proc
    finally:
        if request.param == "postgres":
            asyncio.run(_drop(schema))


class Users:
    def __init__(self, http: httpx.Client) -> None:
        self.http = http
        self.tokens: dict[str, dict[str, Any]] = {}

    def make(self, name: str) -> dict[str, Any]:
        name = f"{name}{uuid.uuid4().hex[:8]}"
        r = self.http.post("/auth/register", json={"username": name, "password": "correct horse battery"})
        assert r.status_code == 201, r.text
        r = self.http.post("/auth/login", json={"username": name, "password": "correct horse battery"})
        assert r.status_code == 200, r.text
        tokens: dict[str, Any] = r.json()
        tokens["auth"] = {"Authorization": f"Bearer {tokens['access_token']}"}
        return tokens


@pytest.fixture
def api(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.api, timeout=10) as http:
        yield http


def expect(r: httpx.Response, status: int, code: str = "invalid") -> None:
    assert r.status_code == status, (r.request.method, str(r.request.url)[:200], r.status_code, r.text[:300])
    assert r.json()["code"] == code, r.text[:300]


def test_integers_out_of_range_in_paths_queries_and_bodies_are_400(server: ServerProcess, api: httpx.Client) -> None:
    users = Users(api)
    owner, other = users.make("own"), users.make("oth")
    auth = owner["auth"]
    r = api.post("/groups", json={"name": "g", "members": [other["uid"]]}, headers=auth)
    assert r.status_code == 201, r.text
    gid, conv = r.json()["gid"], r.json()["conv"]
    for x in OUT_OF_RANGE:
        cases: list[tuple[str, str, dict[str, Any]]] = [
            ("GET", f"/users/{x}", {}),
            ("PUT", f"/contacts/{x}", {}),
            ("DELETE", f"/contacts/{x}", {}),
            ("GET", f"/groups/{x}", {}),
            ("GET", f"/groups/{x}/members", {}),
            ("POST", f"/groups/{x}/members", {"json": {"uids": [other["uid"]]}}),
            ("POST", f"/groups/{gid}/members", {"json": {"uids": [x]}}),
            ("DELETE", f"/groups/{x}/members/{other['uid']}", {}),
            ("DELETE", f"/groups/{gid}/members/{x}", {}),
            ("POST", f"/groups/{x}/leave", {}),
            ("PUT", f"/groups/{x}/members/{other['uid']}/role", {"json": {"role": "admin"}}),
            ("PUT", f"/groups/{gid}/members/{x}/role", {"json": {"role": "admin"}}),
            ("POST", "/groups", {"json": {"name": "h", "members": [x]}}),
            ("GET", "/users", {"params": {"q": "a", "limit": x}}),
            ("GET", "/presence", {"params": {"uids": f"{owner['uid']},{x}"}}),
        ]
        for method, path, kwargs in cases:
            expect(api.request(method, path, headers=auth, **kwargs), 400)
        if x != 0:  # after=0 is the start of the log; before and limit start at 1
            expect(api.get(f"/conversations/{conv}/messages", params={"after": x}, headers=auth), 400)
        for name in ("before", "limit"):
            expect(api.get(f"/conversations/{conv}/messages", params={name: x}, headers=auth), 400)
    huge = "9" * 5000  # more digits than Python parses by default
    expect(api.get(f"/users/{huge}", headers=auth), 400)
    expect(api.get(f"/conversations/{conv}/messages", params={"after": huge}, headers=auth), 400)
    expect(api.get("/presence", params={"uids": huge[:1900]}, headers=auth), 400)
    # Conversation ids naming ids no store can hold are values out of range: 400, as in frames.
    for bad in (f"d:1:{2**64 - 1}", f"d:1:{BIG}", f"g:{BIG}", "g:" + "9" * 5000):
        expect(api.get(f"/conversations/{bad}/messages", headers=auth), 400, "invalid")
        expect(api.get(f"/conversations/{bad}/receipts", headers=auth), 400, "invalid")
    # Malformed ones are conversations that do not exist: 404.
    for bad in ("d:2:1", "d:01:2", "x:1", "g:0"):
        expect(api.get(f"/conversations/{bad}/messages", headers=auth), 404, "not_found")
    # The largest id is in range: an unknown user, group or conversation.
    top = BIG - 1
    expect(api.get(f"/users/{top}", headers=auth), 404, "not_found")
    expect(api.get(f"/groups/{top}", headers=auth), 404, "not_found")
    expect(api.get(f"/conversations/g:{top}/messages", headers=auth), 404, "not_found")
    r = api.get(f"/conversations/{conv}/messages", params={"after": top, "limit": top}, headers=auth)
    assert r.status_code == 200 and r.json() == {"messages": [], "has_more": False}
    # Shape stays 422: a wrong JSON type, a missing field, a number that is no integer.
    expect(api.post(f"/groups/{gid}/members", json={"uids": ["x"]}, headers=auth), 422)
    expect(api.post(f"/groups/{gid}/members", json={"uids": [1.5]}, headers=auth), 422)
    expect(api.post(f"/groups/{gid}/members", json={}, headers=auth), 422)
    expect(api.get("/users/abc", headers=auth), 422)
    # The bystander: nothing of the above hurt the server.
    r = api.get(f"/groups/{gid}/members", headers=other["auth"])
    assert r.status_code == 200 and {m["uid"] for m in r.json()} == {owner["uid"], other["uid"]}
    assert "Traceback" not in server.log()


def test_nul_characters_are_refused_on_every_store(server: ServerProcess, api: httpx.Client) -> None:
    """PostgreSQL keeps no NUL in text; im refuses it at the edge on both stores alike (400)."""
    user = Users(api).make("nul")
    auth = user["auth"]
    expect(api.post("/auth/register", json={"username": "ab\x00cd", "password": "correct horse battery"}), 400)
    r = api.post(
        "/auth/register", json={"username": "nulname1", "password": "pw\x00 long enough", "display_name": "Ann"}
    )
    expect(r, 400)
    r = api.post(
        "/auth/register", json={"username": "nulname2", "password": "correct horse battery", "display_name": "A\x00nn"}
    )
    expect(r, 400)
    expect(api.post("/auth/login", json={"username": "a\x00", "password": "correct horse battery"}), 400)
    expect(api.post("/auth/refresh", json={"refresh_token": "x\x00y"}), 400)
    expect(api.post("/groups", json={"name": "g\x00"}, headers=auth), 400)
    expect(api.get("/users", params={"q": "a\x00"}, headers=auth), 400)
    expect(api.get("/users/by-name/a%00b", headers=auth), 400)
    expect(api.get("/conversations/g%3A1%00/messages", headers=auth), 400)
    expect(api.get("/files/a%00b/info", headers=auth), 400)
    assert api.get("/users/me", headers=auth).status_code == 200
    assert "Traceback" not in server.log()


def test_responses_carry_the_hardening_headers(api: httpx.Client) -> None:
    user = Users(api).make("hdr")
    auth = user["auth"]
    responses = {
        "health": api.get("/health"),
        "me": api.get("/users/me", headers=auth),
        "conversations": api.get("/conversations", headers=auth),
        "401": api.get("/users/me"),
        "404": api.get("/no/such/route", headers=auth),
        "400": api.get(f"/users/{BIG}", headers=auth),
        "422": api.post("/groups", json={}, headers=auth),
        "openapi": api.get("/openapi.json"),
    }
    for name, r in responses.items():
        assert r.headers.get("x-content-type-options") == "nosniff", name
        assert "server" not in r.headers, (name, r.headers.get("server"))
        assert r.headers.get("cache-control") == "no-store", name
    up = api.post("/files", files={"file": ("note.txt", b"hello, files\n", "text/plain")}, headers=auth)
    assert up.status_code in (200, 201), up.text
    down = api.get(f"/files/{up.json()['file_id']}", headers=auth)
    assert down.status_code == 200 and down.content == b"hello, files\n"
    assert "private" in down.headers["cache-control"] and "no-store" not in down.headers["cache-control"]
    assert down.headers["etag"] and down.headers["x-content-type-options"] == "nosniff"
    assert "server" not in down.headers


def test_api_docs_load_from_im_alone_under_a_csp(server: ServerProcess, api: httpx.Client) -> None:
    page = api.get("/docs")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert "://" not in page.text and "<script>" not in page.text  # nothing external, no inline script
    refs = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert len(refs) >= 3
    with httpx.Client(base_url=server.http, timeout=10) as root:
        for ref in refs:
            r = root.get(ref)
            assert r.status_code == 200 and r.content, ref
        init = root.get(next(ref for ref in refs if ref.endswith("init.js"))).text
        assert "/api/v1/openapi.json" in init
    assert api.get("/openapi.json").json()["info"]["title"] == "im"
