"""Crypto-shredding on account deletion, through a real ``im serve``: the keys of the conversations
nobody can read any more are destroyed (a group the account was the last member of, a direct
conversation whose partner was deleted before); the others' history stays readable."""

from __future__ import annotations

import secrets
import sqlite3
from pathlib import Path

import httpx

from tests.support.client import Account, ChatClient, register
from tests.support.server import running_server


def _key_names(data: Path) -> set[str]:
    conn = sqlite3.connect(data / "im.sqlite3")
    try:
        return {r[0] for r in conn.execute("SELECT name FROM data_keys")}
    finally:
        conn.close()


async def _group(http: httpx.AsyncClient, owner: Account, members: list[int]) -> str:
    r = await http.post("/groups", json={"name": "g", "members": members}, headers=owner.auth)
    assert r.status_code in (200, 201), r.text
    return f"g:{r.json()['gid']}"


async def test_account_deletion_shreds_only_the_keys_nobody_needs(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with running_server(data) as server:
        alice, bob, carol = [await register(server.api, f"{n}{secrets.token_hex(3)}") for n in ("al", "bo", "ca")]
        async with httpx.AsyncClient(base_url=server.api, timeout=10) as http:
            shared = await _group(http, alice, [carol.uid])
            solo = await _group(http, alice, [])
            a = ChatClient(server.ws, alice, "phone")
            await a.connect()
            for other in (bob, carol):
                assert await a.send({"text": "hello"}, to=other.uid) is not None
            assert await a.send({"text": "to the group"}, conv=shared) is not None
            await a.close()
            with_bob = f"d:{min(alice.uid, bob.uid)}:{max(alice.uid, bob.uid)}"
            with_carol = f"d:{min(alice.uid, carol.uid)}:{max(alice.uid, carol.uid)}"
            convs = {f"conv:{c}" for c in (shared, solo, with_bob, with_carol)}
            assert convs <= _key_names(data)
            # bob goes first: his direct conversation with alice keeps its key (alice still reads it)
            r = await http.post("/account/delete", json={"password": bob.password}, headers=bob.auth)
            assert r.status_code == 204, r.text
            assert convs <= _key_names(data)
            # then alice: her solo group is empty now, her partner bob is gone: those two are shredded
            r = await http.post("/account/delete", json={"password": alice.password}, headers=alice.auth)
            assert r.status_code == 204, r.text
            assert convs - _key_names(data) == {f"conv:{solo}", f"conv:{with_bob}"}
            # carol still reads the group and her direct conversation with the deleted alice
            for conv in (shared, with_carol):
                r = await http.get(f"/conversations/{conv}/messages", headers=carol.auth)
                assert r.status_code == 200, r.text
                messages = r.json()["messages"]
                assert messages and all(m["type"] != "undecryptable" for m in messages)
    assert "destroyed the keys of 2 conversations" in server.log()
