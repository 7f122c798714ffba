"""``im keys`` against a live ``im serve`` taking a steady stream of sends (the history checker runs over
everything): the plaintext migration of a database written with encryption off, a master key rotation,
rewrap and retirement, after which a server with only the new key reads every message and file, and a
conversation key rotation, after which the server seals that conversation's new messages under the new
key and a restarted one reads them all."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import sqlite3
import sys
from pathlib import Path

import httpx

from im.backends.keys.aes import master_key_id
from im.backends.keys.file import read_key_file_all
from im.model.ids import direct_conv
from tests.encryption.conftest import alice_bob_and_group
from tests.support.checker import History
from tests.support.client import Account, register
from tests.support.server import ServerProcess
from tests.support.wait import eventually


async def _im_keys(server: ServerProcess, *args: str, extra: list[str] | None = None) -> tuple[int, str]:
    """Run ``im keys ARGS`` on the server's data directory (a separate process, like an operator)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "im",
        "keys",
        *args,
        "--data-dir",
        str(server.data_dir),
        *(extra or []),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ},
    )
    out, _ = await proc.communicate()
    return int(proc.returncode or 0), out.decode()


class Traffic:
    """Two users sending direct and group messages in a loop, recorded by the history checker."""

    def __init__(self, server: ServerProcess, alice: Account, bob: Account, gid: int, marker: str) -> None:
        self.h = History(server)
        self.alice, self.bob, self.gid, self.marker = alice, bob, gid, marker
        self.sent = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Traffic:
        self.a = self.h.client(self.alice, "phone")
        self.b = self.h.client(self.bob, "laptop")
        await self.a.connect()
        await self.b.connect()
        self._task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        while not self._stop.is_set():
            n = self.sent
            assert await self.a.send({"text": f"{self.marker} live direct {n}"}, to=self.bob.uid) is not None
            assert await self.b.send({"text": f"{self.marker} live group {n}"}, conv=f"g:{self.gid}") is not None
            self.sent += 1
            await asyncio.sleep(0.005)

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task

    async def check(self) -> dict[str, int]:
        try:
            return await self.h.check()
        finally:
            await self.h.close_all()


async def _fill(server: ServerProcess, alice: Account, bob: Account, gid: int, marker: str, n: int) -> None:
    async with History(server) as h:
        a, b = h.client(alice, "phone"), h.client(bob, "laptop")
        await a.connect()
        await b.connect()
        for start in range(0, n, 50):  # a window of 50 sends in flight per device
            end = min(n, start + 50)
            for i in range(start, end):
                await a.send({"text": f"{marker} old direct {i}"}, to=bob.uid, wait=False)
                await b.send({"text": f"{marker} old group {i}"}, conv=f"g:{gid}", wait=False)
            await a.wait_for(lambda: len(a.acks) >= end, timeout=60)  # noqa: B023
            await b.wait_for(lambda: len(b.acks) >= end, timeout=60)  # noqa: B023
        assert not a.errors and not b.errors, (a.errors, b.errors)
        await h.close_all()


async def _texts(server: ServerProcess, reader: Account, conv: str) -> list[str]:
    out: list[str] = []
    after = 0
    async with httpx.AsyncClient(timeout=30) as http:
        while True:
            r = await http.get(
                f"{server.api}/conversations/{conv}/messages",
                params={"after": after, "limit": 200},
                headers=reader.auth,
            )
            assert r.status_code == 200, r.text
            page = r.json()
            for m in page["messages"]:
                assert m["type"] != "undecryptable", m
                out.append(m["body"]["text"] if isinstance(m["body"], dict) and "text" in m["body"] else "")
            if not page["has_more"] or not page["messages"]:
                return out
            after = page["messages"][-1]["seq"]


def _key_versions(data: Path, conv: str) -> list[tuple[int, int]]:
    """(seq, key version) of every stored body of ``conv``, read from the database file (sealed bodies:
    format byte 0x01, then the version in 4 bytes, docs/security.md 11.4)."""
    conn = sqlite3.connect(data / "im.sqlite3")
    try:
        rows = conn.execute("SELECT seq, body FROM messages WHERE conv = ? ORDER BY seq", (conv,)).fetchall()
    finally:
        conn.close()
    assert all(bytes(body)[0] == 0x01 for _, body in rows)
    return [(int(seq), int.from_bytes(bytes(body)[1:5], "big")) for seq, body in rows]


def _scan(data: Path, marker: str) -> list[str]:
    return [p.name for p in sorted(data.rglob("*")) if p.is_file() and marker.encode() in p.read_bytes()]


async def test_a_plaintext_database_is_migrated_online_under_live_sends(tmp_path: Path) -> None:
    marker = f"MigrateMarker{secrets.token_hex(6)}"
    data = tmp_path / "data"
    # 1. a database written with encryption off: every body in clear
    server = ServerProcess(data, extra=["--set", "encryption.enabled=false"]).start()
    try:
        alice, bob, gid = await alice_bob_and_group(server)
        await _fill(server, alice, bob, gid, marker, 1500)
    finally:
        assert server.stop() == 0
    assert "im.sqlite3" in _scan(data, marker)
    direct = direct_conv(alice.uid, bob.uid)
    # 2. encryption on, the automatic run off: `im keys migrate` seals them while sends go on
    server = ServerProcess(data, extra=["--set", "encryption.migrate_plaintext=false"]).start()
    try:
        before = await _texts(server, bob, direct)
        async with Traffic(server, alice, bob, gid, marker) as traffic:
            code, out = await _im_keys(server, "migrate", "--batch", "200")
            assert code == 0, out
            sent_during = traffic.sent
        assert "3001/3001 plaintext message bodies done" in out, out  # 1500 + 1500 + the group creation
        assert "done: 3001 sealed, 0 changed meanwhile" in out, out
        assert "file ids: 0 table rows keyed" in out, out  # no upload here: tests/encryption/test_file_ids.py
        assert sent_during > 0
        stats = await traffic.check()
        assert stats["messages"] >= 2 * traffic.sent
        after = await _texts(server, bob, direct)
        assert after[: len(before)] == before  # every old message reads back identical
        code, out = await _im_keys(server, "status")
        assert code == 0 and ", 0 in clear" in out, out
        assert _scan(data, marker) == []  # database, WAL, everything: while the server runs
    finally:
        assert server.stop() == 0
    assert _scan(data, marker) == []
    # 3. the automatic run at start: nothing left, says nothing; a rerun of the command finds nothing
    server = ServerProcess(data).start()
    try:
        code, out = await _im_keys(server, "migrate")
        assert code == 0 and "done: 0 sealed" in out, out
        code, out = await _im_keys(server, "scrub")
        assert code == 0 and "scrubbed" in out, out
    finally:
        assert server.stop() == 0


async def test_the_automatic_migration_at_start_seals_a_plaintext_database(tmp_path: Path) -> None:
    marker = f"AutoMarker{secrets.token_hex(6)}"
    data = tmp_path / "data"
    server = ServerProcess(data, extra=["--set", "encryption.enabled=false"]).start()
    try:
        alice, bob, gid = await alice_bob_and_group(server)
        await _fill(server, alice, bob, gid, marker, 200)
    finally:
        assert server.stop() == 0
    server = ServerProcess(data).start()
    try:
        for _ in range(200):
            if "plaintext message bodies sealed" in server.log():
                break
            await asyncio.sleep(0.05)
        assert "plaintext message bodies sealed: 401/401" in server.log(), server.log()[-3000:]
        assert _scan(data, marker) == []
        assert len(await _texts(server, alice, f"g:{gid}")) == 201
    finally:
        assert server.stop() == 0


async def test_master_key_rotation_under_live_sends_then_retire_and_restart_with_the_new_key_only(
    tmp_path: Path,
) -> None:
    marker = f"RotateMarker{secrets.token_hex(6)}"
    data = tmp_path / "data"
    server = ServerProcess(data).start()
    try:
        alice, bob, gid = await alice_bob_and_group(server)
        await _fill(server, alice, bob, gid, marker, 300)
        files: dict[str, bytes] = {}
        async with httpx.AsyncClient(base_url=server.api, timeout=30) as api:
            for i in range(3):
                content = secrets.token_bytes(70_000 + i)
                r = await api.post("/files", headers=alice.auth, files={"file": (f"{i}.bin", content, "x/y")})
                assert r.status_code in (200, 201), r.text
                files[r.json()["file_id"]] = content
        old_id = master_key_id(read_key_file_all(data / "master.key")[0])
        async with Traffic(server, alice, bob, gid, marker) as traffic:
            code, out = await _im_keys(server, "rotate", "--batch", "2")
            assert code == 0, out
            # Two conversations, the blob names' and the file ids' keys; the files listed from their
            # keyed rows (the sealed hashes opened).
            assert "data keys: 4 rewrapped" in out and "file keys: 3 rewritten" in out, out
            new_id = master_key_id(read_key_file_all(data / "master.key")[0])
            assert new_id != old_id
            # too early: a server may not have re-read the file yet
            code, out = await _im_keys(server, "retire")
            assert code == 1 and "changed" in out, out
            assert server.proc is not None
            server.proc.send_signal(signal.SIGHUP)  # re-read the key file now
            for _ in range(100):
                if f"current master key {new_id}" in server.log():
                    break
                await asyncio.sleep(0.05)
            assert f"current master key {new_id}" in server.log()
            # a new conversation after the reload: its key is wrapped by the new master key
            carol = await register(server.api, f"carol{secrets.token_hex(3)}")
            assert await traffic.a.send({"text": f"{marker} to carol"}, to=carol.uid) is not None
            code, out = await _im_keys(server, "rewrap")
            assert code == 0 and "data keys: 0 rewrapped" in out, out
            code, out = await _im_keys(server, "retire", "--force")
            assert code == 0 and f"retired {old_id}" in out, out
        stats = await traffic.check()
        assert stats["messages"] > 600
        code, out = await _im_keys(server, "status")
        assert code == 0 and f"current: {new_id}; also held: none" in out and old_id not in out, out
    finally:
        assert server.stop() == 0
    assert [master_key_id(k) for k in read_key_file_all(data / "master.key")] == [new_id]
    # a server started with only the new key reads every message and every file
    server = ServerProcess(data).start()
    try:
        direct = direct_conv(alice.uid, bob.uid)
        texts = await _texts(server, bob, direct)
        assert len(texts) == 300 + traffic.sent + 1 - 1 and all(marker in t for t in texts)
        assert len(await _texts(server, alice, f"g:{gid}")) == 1 + 300 + traffic.sent
        async with httpx.AsyncClient(base_url=server.api, timeout=30) as api:
            for file_id, content in files.items():
                r = await api.get(f"/files/{file_id}", headers=alice.auth)
                assert r.status_code == 200 and r.content == content
                r = await api.get(f"/files/{file_id}", headers={**alice.auth, "Range": "bytes=65530-65600"})
                assert r.status_code == 206 and r.content == content[65530:65601]
    finally:
        assert server.stop() == 0
    assert "undecryptable" not in server.log() and "does not unwrap" not in server.log()


async def test_a_conversation_key_rotation_under_live_sends_then_a_restart_reads_both_keys(tmp_path: Path) -> None:
    marker = f"ConvRotateMarker{secrets.token_hex(6)}"
    data = tmp_path / "data"
    # the server re-reads a conversation's key versions every 0.5 s (default 60 s): it follows the rotation soon
    server = ServerProcess(data, extra=["--set", "encryption.key_refresh=0.5"]).start()
    try:
        alice, bob, gid = await alice_bob_and_group(server)
        group, direct = f"g:{gid}", direct_conv(alice.uid, bob.uid)
        await _fill(server, alice, bob, gid, marker, 200)
        assert {v for _, v in _key_versions(data, group)} == {1}
        async with Traffic(server, alice, bob, gid, marker) as traffic:
            await eventually(lambda: traffic.sent >= 20, "sends flowing before the rotation", 30)
            code, out = await _im_keys(server, "rotate-conversation", group)
            assert code == 0 and f"conversation {group} now encrypts with key version 2" in out, out
            rotated_at = traffic.sent
            await eventually(
                lambda: _key_versions(data, group)[-1][1] == 2, "the group's new messages sealed under version 2", 30
            )
            switched_at = traffic.sent
            await eventually(lambda: traffic.sent >= switched_at + 20, "sends going on under the new key", 30)
        stats = await traffic.check()
        assert rotated_at >= 20 and traffic.sent >= switched_at + 20
        assert stats["messages"] >= 2 * (200 + traffic.sent)
        versions = _key_versions(data, group)
        assert [seq for seq, _ in versions] == list(range(1, 2 + 200 + traffic.sent))
        assert versions[-1][1] == 2, "the server never sealed the group's messages under the new key"
        first_v2 = next(i for i, (_, v) in enumerate(versions) if v == 2)
        # before the rotation version 1, after the switch version 2 only (one writer: never back to 1)
        assert {v for _, v in versions[:first_v2]} == {1} and {v for _, v in versions[first_v2:]} == {2}
        assert first_v2 > 1 + 200 + 20 - 1 and len(versions) - first_v2 >= 20
        assert {v for _, v in _key_versions(data, direct)} == {1}  # the other conversation keeps its key
        code, out = await _im_keys(server, "rotate-conversation", "g:999999")
        assert code == 1 and "has no key" in out, out
    finally:
        assert server.stop() == 0
    # a restarted server reads every message of the group, under either key, and of the direct conversation
    server = ServerProcess(data).start()
    try:
        texts = await _texts(server, bob, group)
        assert texts[1:] == [f"{marker} old group {i}" for i in range(200)] + [
            f"{marker} live group {n}" for n in range(traffic.sent)
        ]
        direct_texts = await _texts(server, alice, direct)
        assert direct_texts == [f"{marker} old direct {i}" for i in range(200)] + [
            f"{marker} live direct {n}" for n in range(traffic.sent)
        ]
    finally:
        assert server.stop() == 0
    assert "undecryptable" not in server.log() and "does not unwrap" not in server.log()
