"""Crypto-shredding through a real ``im serve``: the keys of the conversations nobody can read any more
are destroyed — a group whose last member leaves, and on account deletion a group the account was the
last member of and a direct conversation whose partner was deleted before; the others' history stays
readable."""

from __future__ import annotations

import secrets
import sqlite3
from pathlib import Path

import httpx

from im.backends.chat.encrypted import UNDECRYPTABLE, EncryptedChatStore
from im.backends.chat.sqlite import SqliteChatStore, SqliteConversationKeys
from im.backends.keys.file import FileKeyProvider
from im.backends.keys.keyring import Keyring
from im.backends.sql.sqlite_db import SqliteDatabase
from im.model.chat import StoredMessage
from im.model.ids import direct_conv
from tests.support.client import Account, ChatClient, register
from tests.support.server import running_server


def _key_names(data: Path) -> set[str]:
    conn = sqlite3.connect(data / "im.sqlite3")
    try:
        return {r[0] for r in conn.execute("SELECT name FROM data_keys")}
    finally:
        conn.close()


async def _stored(data: Path, conv: str) -> list[StoredMessage]:
    """Every message of ``conv`` as a server on ``data`` (stopped) reads it from its store."""
    db = SqliteDatabase(data / "im.sqlite3")
    keyring = Keyring(FileKeyProvider(data / "master.key"), SqliteConversationKeys(db))
    async with EncryptedChatStore(SqliteChatStore(db), keyring, owns_keyring=True) as store:
        return await store.read_range(conv, 0, None, 1000)


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
            with_bob = direct_conv(alice.uid, bob.uid)
            with_carol = direct_conv(alice.uid, carol.uid)
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


async def test_the_last_member_leaving_a_group_shreds_its_keys(tmp_path: Path) -> None:
    data = tmp_path / "data"
    marker = f"LeaveMarker{secrets.token_hex(4)}"
    with running_server(data) as server:
        alice, bob = [await register(server.api, f"{n}{secrets.token_hex(3)}") for n in ("al", "bo")]
        async with httpx.AsyncClient(base_url=server.api, timeout=10) as http:
            abandoned = await _group(http, alice, [bob.uid])
            kept = await _group(http, alice, [bob.uid])
            a = ChatClient(server.ws, alice, "phone")
            await a.connect()
            for conv in (abandoned, kept):
                for i in range(3):
                    assert await a.send({"text": f"{marker} {i}"}, conv=conv) is not None
            await a.close()
            assert {f"conv:{abandoned}", f"conv:{kept}"} <= _key_names(data)
            r = await http.post(f"/groups/{abandoned[2:]}/leave", headers=bob.auth)  # alice is still in
            assert r.status_code == 204, r.text
            r = await http.post(f"/groups/{kept[2:]}/leave", headers=alice.auth)  # bob is still in
            assert r.status_code == 204, r.text
            assert {f"conv:{abandoned}", f"conv:{kept}"} <= _key_names(data)
            # alice was the last one: removing oneself is leaving
            r = await http.delete(f"/groups/{abandoned[2:]}/members/{alice.uid}", headers=alice.auth)
            assert r.status_code == 204, r.text
            assert f"conv:{abandoned}" not in _key_names(data) and f"conv:{kept}" in _key_names(data)
            r = await http.get(f"/conversations/{abandoned}/messages", headers=alice.auth)
            assert r.status_code == 403 and r.json()["code"] == "not_member", r.text
            r = await http.get(f"/conversations/{kept}/messages", headers=bob.auth)
            assert r.status_code == 200, r.text
            texts = [m["body"]["text"] for m in r.json()["messages"] if m["type"] == "text"]
            assert texts == [f"{marker} {i}" for i in range(3)]
    assert f"group {abandoned} has no member left: destroyed its keys" in server.log()
    assert f"group {kept} has no member left" not in server.log()
    gone = await _stored(data, abandoned)
    assert len(gone) == 6  # created, three texts, two leavings: the rows stay, their bodies do not open
    assert {(m.type, m.body) for m in gone} == {(UNDECRYPTABLE, b"null")}
    assert [m.type for m in await _stored(data, kept)] == ["system", "text", "text", "text", "system"]
