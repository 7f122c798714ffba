"""At rest, through a real ``im serve``: after sends (direct and group), uploads (the same bytes by two
users, sent in the group as file messages), a graceful restart and a crash, nothing on disk — the data
directory, the SQLite database, its WAL, or the PostgreSQL tables — holds a message's text, an uploaded
file's content, or an uploaded file's SHA-256 (lowercase hex: what would let someone with the disk test
whether a known file is stored, who uploaded it and where it was sent); the history and the files still
read back in clear, by the same file ids; the database files are private.

The positive control runs the same scan with ``encryption.enabled=false`` and must find every marker,
hash included, so a scan that finds nothing proves something.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import signal
import stat
from pathlib import Path

import httpx

from im.model.ids import direct_conv
from tests.encryption.conftest import alice_bob_and_group
from tests.support.client import Account, ChatClient, register
from tests.support.postgres import DSN, PgSchema, connect
from tests.support.server import ServerProcess
from tests.support.wait import eventually


def _markers() -> list[str]:
    """Three message markers, then three file content markers (one per round)."""
    return [f"AtRestMarker{secrets.token_hex(8)}" for _ in range(3)] + [
        f"FileMarker{secrets.token_hex(8)}" for _ in range(3)
    ]


def _content(marker: str) -> bytes:
    return f"{marker} is in this file\n".encode() * 300  # 11 KB or so


async def _upload_round(server: ServerProcess, alice: Account, bob: Account, gid: int, marker: str) -> str:
    """Alice and Bob upload the same bytes (one file, one id), and Alice sends it in the group as a file
    message (a file ref for the group). Returns the file id: the SHA-256 of the bytes."""
    data = _content(marker)
    sha = hashlib.sha256(data).hexdigest()
    async with httpx.AsyncClient(timeout=10) as http:
        for who in (alice, bob):
            r = await http.post(f"{server.api}/files", headers=who.auth, files={"file": ("m.txt", data, "text/plain")})
            assert r.status_code == 201, r.text
            assert r.json()["file_id"] == r.json()["sha256"] == sha
    a = ChatClient(server.ws, alice, "phone")
    await a.connect()
    try:
        assert await a.send({"file_id": sha, "name": "m.txt"}, conv=f"g:{gid}", type="file") is not None, a.errors
    finally:
        await a.close()
    return sha


async def _check_files(server: ServerProcess, shas: list[str], markers: list[str], readers: list[Account]) -> None:
    """Every file reads back, by its SHA-256, with the same ETag, to its uploaders and the group's
    members; a stranger who knows the hash is told there is no such file."""
    stranger = await register(server.api, f"eve{secrets.token_hex(3)}")
    async with httpx.AsyncClient(timeout=10) as http:
        for sha, marker in zip(shas, markers, strict=True):
            for who in readers:
                r = await http.get(f"{server.api}/files/{sha}", headers=who.auth)
                assert r.status_code == 200 and r.content == _content(marker), r.text[:200]
                assert r.headers["etag"] == f'"{sha}"'
            assert (await http.get(f"{server.api}/files/{sha}", headers=stranger.auth)).status_code == 404


async def _send_round(server: ServerProcess, alice: Account, bob: Account, gid: int, marker: str, n: int) -> None:
    a = ChatClient(server.ws, alice, "phone")
    b = ChatClient(server.ws, bob, "laptop")
    await a.connect()
    await b.connect()
    try:
        for i in range(n):
            assert await a.send({"text": f"{marker} direct {i}"}, to=bob.uid) is not None
            assert await b.send({"text": f"{marker} group {i}"}, conv=f"g:{gid}") is not None
        await a.wait_messages(n, conv=f"g:{gid}")
    finally:
        await a.close()
        await b.close()


async def _history_texts(server: ServerProcess, reader: Account, conv: str) -> str:
    async with httpx.AsyncClient(timeout=10) as http:
        r = await http.get(f"{server.api}/conversations/{conv}/messages", params={"limit": 200}, headers=reader.auth)
        assert r.status_code == 200, r.text
        return r.text


def _scan_files(root: Path, markers: list[str]) -> list[str]:
    """(file: marker) for every marker found in any file under ``root``, as text or as hex, or in its
    name (a blob stored under the plain SHA-256 of its bytes)."""
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        for m in markers:
            if m.encode() in data or m.encode().hex().encode() in data or m in path.name:
                found.append(f"{path.name}: {m}")
    return found


async def _scan_schema(schema: str, markers: list[str]) -> list[str]:
    conn = await connect()
    try:
        tables = [r[0] for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = $1", schema)]
        found = []
        for table in tables:
            for (text,) in await conn.fetch(f'SELECT t::text FROM "{schema}"."{table}" t'):
                found += [f"{table}: {m}" for m in markers if m in text or m.encode().hex() in text]
        return found
    finally:
        await conn.close()


async def _run(server: ServerProcess, markers: list[str]) -> tuple[list[str], str, list[str]]:
    """Sends before and after a graceful restart and a crash; returns what the scan of the data directory
    found while the server was running (WAL present), the history as read back at the end, and the SHA-256
    of the files uploaded (which later scans look for too)."""
    alice, bob, gid = await alice_bob_and_group(server)
    carol = await register(server.api, f"carol{secrets.token_hex(3)}")
    async with httpx.AsyncClient(timeout=10) as http:
        r = await http.post(f"{server.api}/groups/{gid}/members", json={"uids": [carol.uid]}, headers=alice.auth)
        assert r.status_code in (200, 201, 204), r.text
    shas: list[str] = []
    shas.append(await _upload_round(server, alice, bob, gid, markers[3]))
    await _send_round(server, alice, bob, gid, markers[0], 40)
    found = _scan_files(server.data_dir, [*markers, *shas])  # running: the WAL holds the recent commits
    server.restart(signal.SIGTERM)
    shas.append(await _upload_round(server, alice, bob, gid, markers[4]))
    await _send_round(server, alice, bob, gid, markers[1], 40)
    server.restart(signal.SIGKILL)
    shas.append(await _upload_round(server, alice, bob, gid, markers[5]))
    await _send_round(server, alice, bob, gid, markers[2], 10)
    found += _scan_files(server.data_dir, [*markers, *shas])
    await _check_files(server, shas, markers[3:], [alice, bob, carol])
    history = await _history_texts(server, bob, direct_conv(alice.uid, bob.uid))
    history += await _history_texts(server, alice, f"g:{gid}")
    return found, history, shas


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_sqlite_data_directory_holds_no_message_text(tmp_path: Path) -> None:
    markers = _markers()
    server = ServerProcess(tmp_path / "data").start()
    try:
        found, history, shas = await _run(server, markers)
        data = server.data_dir
        wal = data / "im.sqlite3-wal"
        assert wal.exists() and wal.stat().st_size > 0  # the scan above did cover a live WAL
        modes = {p.name: _mode(p) for p in data.iterdir() if p.name.startswith(("im.sqlite3", "master.key"))}
        assert modes == {n: 0o600 for n in ("im.sqlite3", "im.sqlite3-wal", "im.sqlite3-shm", "master.key")}
        assert _mode(data) == 0o700
    finally:
        server.stop()
    found += _scan_files(server.data_dir, [*markers, *shas])  # stopped: what stays on disk
    assert found == []
    for m in markers[:3]:
        assert m in history  # and it all reads back in clear
    assert "undecryptable" not in history


async def test_positive_control_without_encryption_the_scan_finds_the_text(tmp_path: Path) -> None:
    markers = _markers()
    server = ServerProcess(tmp_path / "data", extra=["--set", "encryption.enabled=false"]).start()
    try:
        found, _, shas = await _run(server, markers)
    finally:
        server.stop()
    assert {f.split(": ")[1] for f in found} == {*markers, *shas}


async def test_postgres_tables_hold_no_message_text(tmp_path: Path) -> None:
    markers = _markers()
    schema = PgSchema()
    pg = ["--set", "store.kind=postgres", "--set", f"store.postgres_dsn={DSN}"]
    server = ServerProcess(tmp_path / "data", extra=[*pg, "--set", f"store.postgres_schema={schema.name}"]).start()
    try:
        found, history, shas = await _run(server, markers)
        found += await _scan_schema(schema.name, [*markers, *shas])
        conn = await connect()
        try:
            names = await conn.fetch(f'SELECT name FROM "{schema.name}".data_keys ORDER BY name')
        finally:
            await conn.close()
        # One key per conversation (the direct one and the group), and the keys of the file names on disk
        # and of the file ids in the tables.
        conversations = [r["name"] for r in names if not r["name"].startswith("named:")]
        assert len(conversations) == 2
        assert [r["name"] for r in names if r["name"].startswith("named:")] == ["named:blob-names", "named:file-ids"]
    finally:
        server.stop()
        await asyncio.shield(schema.drop())
    assert found == []
    for m in markers[:3]:
        assert m in history


async def test_sqlite_files_stored_in_clear_are_keyed_at_start(tmp_path: Path) -> None:
    """A data directory written with ``files.encrypt=false`` (messages sealed; blobs and file ids in
    clear: the scan finds the file markers and the hashes), then served with it on: at start the
    background migrations seal the blobs and key the file ids (then drop the old pages: VACUUM, WAL
    truncated); afterwards the scan finds nothing, and everything reads back as before."""
    markers = _markers()
    server = ServerProcess(tmp_path / "data", extra=["--set", "files.encrypt=false"]).start()
    try:
        alice, bob, gid = await alice_bob_and_group(server)
        shas = [await _upload_round(server, alice, bob, gid, m) for m in markers[3:]]
        await _send_round(server, alice, bob, gid, markers[0], 20)
    finally:
        server.stop()
    found = _scan_files(server.data_dir, [*markers, *shas])
    assert {f.split(": ")[1] for f in found} == {*markers[3:], *shas}
    (server.data_dir / "server.log").unlink()  # what the first run logged is not data at rest
    server.extra = []  # files.encrypt as encryption.enabled: on
    server.start()
    try:
        logged = ["file ids keyed", "blob migration done"]
        await eventually(
            lambda: all(line in server.log() for line in logged),
            lambda: f"not logged: {logged}\n{server.log()[-3000:]}",
            60,
        )
        await _send_round(server, alice, bob, gid, markers[1], 5)
        await _check_files(server, shas, markers[3:], [alice, bob])
        history = await _history_texts(server, alice, f"g:{gid}")
        found = _scan_files(server.data_dir, [*markers, *shas])
    finally:
        server.stop()
    found += _scan_files(server.data_dir, [*markers, *shas])
    assert found == []
    assert markers[0] in history and markers[1] in history and "undecryptable" not in history
