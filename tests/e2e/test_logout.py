"""Logging out ends the chat connections of that login session, not the user's other sessions."""

from __future__ import annotations

import httpx

from tests.support.checker import History
from tests.support.client import register
from tests.support.server import ServerProcess


async def test_logout_closes_that_sessions_connections(server: ServerProcess, history: History) -> None:
    alice = await register(server.api, "alice")
    async with httpx.AsyncClient() as http:
        r = await http.post(f"{server.api}/auth/login", json={"username": "alice", "password": alice.password})
        other_login = r.json()["access_token"]
        phone = history.client(alice, "phone")
        laptop = history.client(alice, "laptop")
        assert (await phone.connect())["t"] == "auth_ok"
        assert (await laptop.connect(token=other_login))["t"] == "auth_ok"
        r = await http.post(f"{server.api}/auth/logout", headers=alice.auth)
        assert r.status_code == 204
    await phone.wait_for(lambda: phone.closed_reason is not None)
    assert phone.closed_reason is not None
    assert phone.closed_reason["code"] == "auth_failed" and phone.closed_reason["reconnect"] is False
    # The other login session's connection is untouched and still works.
    assert laptop.closed_reason is None
    await laptop.send_frame({"t": "ping", "id": 7})
    await laptop.wait_for(lambda: any(e.get("t") == "pong" for e in laptop.events))
