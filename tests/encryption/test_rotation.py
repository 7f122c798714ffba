"""Key rotation, retirement, conversation key rotation, crypto-shredding and the plaintext migration, in
process on each engine (the live-server runs are in test_keys_live.py)."""

from __future__ import annotations

import asyncio
import base64
import os
from pathlib import Path

import pytest

from im.backends.blobs.encrypted import EncryptedBlobStorage, rewrap_blob_keys
from im.backends.blobs.s3 import S3BlobStorage
from im.backends.chat import StoredBodies
from im.backends.chat.encrypted import UNDECRYPTABLE, EncryptedChatStore, PlaintextMigration, is_sealed
from im.backends.chat.postgres import PostgresStoredBodies
from im.backends.chat.sqlite import SqliteStoredBodies
from im.backends.keys import KeyUnavailable, MasterKeyMismatch
from im.backends.keys.aes import encode_master_key, master_key_id, new_master_key
from im.backends.keys.env import EnvKeyProvider
from im.backends.keys.file import (
    FileKeyProvider,
    read_key_file_all,
    replace_key_file,
    retire_from_key_file,
    rotate_key_file,
)
from im.backends.keys.keyring import Keyring, conv_key_name
from im.backends.sql.sqlite_db import SqliteDatabase
from im.model.chat import CommitBatch
from tests.encryption.conftest import Engine, PostgresEngine, SqliteEngine
from tests.encryption.test_encrypted_store import msg, write
from tests.support.seaweedfs import s3_settings, shared_weed

MARK = "RotationMarker7f3a"


async def _gen(items: list[str]):  # type: ignore[no-untyped-def]
    for item in items:
        yield item


# --- the multi-key file ---------------------------------------------------------------------------------


async def test_a_rotated_key_file_keeps_the_old_key_and_running_providers_pick_it_up(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    async with FileKeyProvider(path) as running:
        old_id = running.key_id
        wrapped_old = await running.wrap(b"k" * 32, b"ctx")
        new_id, kept = rotate_key_file(path)
        assert kept == [old_id] and new_id != old_id
        assert os.stat(path).st_mode & 0o777 == 0o600
        assert "im keys retire" in path.read_text()
        async with FileKeyProvider(path) as fresh:  # a process started now: new current, old still unwraps
            assert fresh.key_ids == (new_id, old_id)
            wrapped_new = await fresh.wrap(b"n" * 32, b"ctx")
            assert fresh.master_of(wrapped_new) == new_id
            assert await fresh.unwrap(wrapped_old, b"ctx") == b"k" * 32
        # the running one has not re-read yet: a key wrapped by the new master makes it re-read the file
        assert running.key_id == old_id
        assert await running.unwrap(wrapped_new, b"ctx") == b"n" * 32
        assert running.key_id == new_id
        assert await running.reload() is False  # unchanged since
        with pytest.raises(ValueError, match="current one"):
            retire_from_key_file(path, {new_id})
        assert retire_from_key_file(path, {old_id}) == [old_id]
        assert [master_key_id(k) for k in read_key_file_all(path)] == [new_id]
        assert await running.reload() is True
        with pytest.raises(KeyUnavailable, match=f"master key {old_id}"):
            await running.unwrap(wrapped_old, b"ctx")


async def test_a_key_file_that_does_not_load_keeps_the_keys_held(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    async with FileKeyProvider(path) as p:
        key_id = p.key_id
        tmp = path.with_name("x")
        tmp.write_text("garbage\n")
        tmp.chmod(0o600)
        tmp.replace(path)
        with pytest.raises(ValueError):
            await p.reload()
        assert p.key_ids == (key_id,)
        assert await p.unwrap(await p.wrap(b"a" * 32, b"c"), b"c") == b"a" * 32


async def test_the_environment_holds_old_and_new_keys_current_first() -> None:
    old, new = new_master_key(), new_master_key()
    async with EnvKeyProvider(encode_master_key(old)) as before:
        wrapped = await before.wrap(b"x" * 32, b"c")
    text = f"{encode_master_key(new)},{encode_master_key(old)}"
    async with EnvKeyProvider(text) as both:
        assert both.key_id == master_key_id(new) and both.key_ids[1] == master_key_id(old)
        assert await both.unwrap(wrapped, b"c") == b"x" * 32
    with pytest.raises(ValueError, match="twice"):
        EnvKeyProvider(f"{encode_master_key(new)},{encode_master_key(new)}")


# --- master key rotation of the data keys ---------------------------------------------------------------


async def test_rewrap_moves_every_data_key_to_the_new_master_and_the_old_one_can_go(engine: Engine) -> None:
    store = EncryptedChatStore(engine.inner, engine.keyring(), owns_keyring=True)
    convs = [f"d:1:{i}" for i in range(2, 40)]
    async with store:
        sent = {c: await write(store, c, [f"{MARK} {c} {i}" for i in range(3)]) for c in convs}
        assert store.keyring is not None
        await store.keyring.named_key("blob-names")
        old_id = store.keyring.provider.key_id
    new_id, _ = rotate_key_file(engine.key_file)
    ring = engine.keyring()
    async with ring:
        assert await ring.store.masters() == {old_id: len(convs) + 1}
        report = await ring.rewrap_all(page=7)
        assert (report.total, report.checked, report.rewrapped, report.failed) == (39, 39, 39, 0)
        assert await ring.store.masters() == {new_id: 39}
        assert (await ring.rewrap_all()).rewrapped == 0  # idempotent
    # an older node without the new key now refuses to start, naming both
    replace_key_file(engine.key_file, [k for k in read_key_file_all(engine.key_file) if master_key_id(k) == old_id])
    with pytest.raises(MasterKeyMismatch, match=new_id):
        await engine.keyring().start()
    assert sent  # read back with only the new key in the next test


async def test_after_retiring_the_old_key_a_node_with_only_the_new_one_reads_everything(engine: Engine) -> None:
    store = EncryptedChatStore(engine.inner, engine.keyring(), owns_keyring=True)
    async with store:
        sent = await write(store, "d:1:2", [f"{MARK} {i}" for i in range(5)])
    new_id, (old_id,) = rotate_key_file(engine.key_file)
    async with engine.keyring() as ring:
        await ring.rewrap_all()
    assert retire_from_key_file(engine.key_file, {old_id}) == [old_id]
    second_inner, second_keys = engine.second()
    async with EncryptedChatStore(second_inner, engine.keyring(second_keys), owns_keyring=True) as fresh:
        assert fresh.keyring is not None and fresh.keyring.provider.key_ids == (new_id,)
        assert await fresh.read_range("d:1:2", 0, None, 10) == sent


async def test_a_rewrap_racing_a_concurrent_change_retries_and_skips_shredded_keys(engine: Engine) -> None:
    async with engine.keyring() as ring:
        await ring.current([conv_key_name(f"d:1:{i}") for i in range(2, 12)])
    rotate_key_file(engine.key_file)
    async with engine.keyring() as a, engine.keyring() as b:
        first, second = await asyncio.gather(a.rewrap_all(page=3), b.rewrap_all(page=2))
        assert first.rewrapped + second.rewrapped == 10 and first.failed == second.failed == 0
        assert set(await a.store.masters()) == {a.provider.key_id}


# --- conversation key rotation and shredding --------------------------------------------------------------


async def test_a_rotated_conversation_key_encrypts_new_messages_and_old_ones_stay_readable(engine: Engine) -> None:
    writer = EncryptedChatStore(engine.inner, engine.keyring(refresh_interval=0), owns_keyring=True)
    async with writer:
        old = await write(writer, "d:1:2", [f"{MARK} old {i}" for i in range(3)])
        # another process (an `im keys rotate-conversation`) makes version 2
        async with engine.keyring() as admin:
            assert await admin.rotate(conv_key_name("d:1:2")) == 2
            assert await admin.rotate(conv_key_name("d:1:2")) == 3
        new = await write(writer, "d:1:2", [f"{MARK} new {i}" for i in range(2)], first_seq=4)
        rows = await engine.sql("SELECT seq, body FROM messages WHERE conv = ? ORDER BY seq", "d:1:2")
        versions = [int.from_bytes(bytes(body)[1:5], "big") for _, body in rows]
        assert versions == [1, 1, 1, 3, 3]  # the writer followed the rotation (refresh 0: on every commit)
        assert await writer.read_range("d:1:2", 0, None, 10) == old + new
    second_inner, second_keys = engine.second()
    async with EncryptedChatStore(second_inner, engine.keyring(second_keys), owns_keyring=True) as reader:
        assert await reader.read_range("d:1:2", 0, None, 10) == old + new


async def test_a_keyring_follows_a_rotation_only_after_its_refresh_interval(engine: Engine) -> None:
    async with engine.keyring(refresh_interval=3600) as ring, engine.keyring() as admin:
        name = conv_key_name("d:5:6")
        assert (await ring.current([name]))[name][0] == 1
        await admin.rotate(name)
        assert (await ring.current([name]))[name][0] == 1  # cached, not stale yet
        ring.refresh_interval = 0
        assert (await ring.current([name]))[name][0] == 2


async def test_a_writers_cached_sealers_follow_its_keyrings_refresh_and_its_own_rotations(engine: Engine) -> None:
    ring = engine.keyring(refresh_interval=3600)
    writer = EncryptedChatStore(engine.inner, ring, owns_keyring=True)
    name = conv_key_name("d:1:2")

    async def versions() -> list[int]:
        rows = await engine.sql("SELECT body FROM messages WHERE conv = ? ORDER BY seq", "d:1:2")
        return [int.from_bytes(bytes(body)[1:5], "big") for (body,) in rows]

    async with writer:
        await write(writer, "d:1:2", [f"{MARK} 1"])
        async with engine.keyring() as admin:
            await admin.rotate(name)  # another process: version 2
        await write(writer, "d:1:2", [f"{MARK} 2"], first_seq=2)
        assert await versions() == [1, 1]  # the keyring's entry is not stale yet: neither are the sealers
        assert await ring.rotate(name) == 3  # this process rotates: its next commit uses the new key at once
        await write(writer, "d:1:2", [f"{MARK} 3"], first_seq=3)
        assert await versions() == [1, 1, 3]
        async with engine.keyring() as admin:
            await admin.rotate(name)  # version 4, elsewhere again
        ring.refresh_interval = 0  # the entry is stale now: the next commit reads the versions again
        await write(writer, "d:1:2", [f"{MARK} 4"], first_seq=4)
        assert await versions() == [1, 1, 3, 4]


async def test_shredding_makes_every_version_unreadable_and_is_followed_by_other_keyrings(engine: Engine) -> None:
    store = EncryptedChatStore(engine.inner, engine.keyring(refresh_interval=0), owns_keyring=True)
    async with store:
        await write(store, "d:1:2", [f"{MARK} a"])
        kept = await write(store, "d:1:3", [f"{MARK} b"])
        async with engine.keyring() as admin:
            await admin.rotate(conv_key_name("d:1:2"))
            assert await admin.shred([conv_key_name("d:1:2")]) == 2
        gone = await store.read_range("d:1:2", 0, None, 10)
        assert [(m.type, m.body) for m in gone] == [(UNDECRYPTABLE, b"null")]
        assert await store.read_range("d:1:3", 0, None, 10) == kept
        # the writer's cache dropped the shredded key at its refresh: a new message gets a new key
        await store.commit(CommitBatch(messages=[msg("d:1:2", 2, "after")], heads={"d:1:2": (1, 2, 1)}))
        (after,) = await store.read_range("d:1:2", 1, None, 10)
        assert after.body == b'{"text":"after"}'


# --- the plaintext migration ------------------------------------------------------------------------------


def _bodies(engine: Engine) -> StoredBodies:
    if isinstance(engine, SqliteEngine):
        return SqliteStoredBodies(SqliteDatabase(engine.path))
    assert isinstance(engine, PostgresEngine)
    return PostgresStoredBodies(engine.database())


async def test_the_migration_seals_every_plaintext_body_while_commits_go_on(engine: Engine) -> None:
    plain = EncryptedChatStore(engine.inner, None, seal=False)
    convs = [f"d:1:{i}" for i in range(2, 22)]
    async with plain:
        before = {c: await write(plain, c, [f"{MARK} {c} {i}" for i in range(30)]) for c in convs}
    second_inner, second_keys = engine.second()
    store = EncryptedChatStore(second_inner, engine.keyring(second_keys), owns_keyring=True)
    bodies = _bodies(engine)
    async with store, bodies:
        assert await bodies.count_plaintext() == (600, 600)
        lines: list[str] = []
        migration = PlaintextMigration(store, bodies, batch=37, report_interval=0)

        async def sends() -> None:
            for n in range(31, 61):
                for c in convs[:5]:
                    await store.commit(CommitBatch(messages=[msg(c, n, f"{MARK} live {n}")], heads={c: (n - 1, n, 1)}))
                await asyncio.sleep(0)

        done, _ = await asyncio.gather(migration.run(lambda p: lines.append(p.line())), sends())
        assert done.finished and done.total == 600 and done.sealed == 600 and done.skipped == 0
        assert lines[-1].startswith("600/600") and len(lines) > 5
        assert await bodies.count_plaintext() == (0, 750)
        for c in convs:
            got = await store.read_range(c, 0, 31, 100)
            assert got == before[c]
        again = await PlaintextMigration(store, bodies).run()  # resumable / idempotent: nothing left
        assert (again.total, again.sealed) == (0, 0)
    rows = await engine.sql("SELECT body FROM messages")
    assert all(is_sealed(bytes(b)) and MARK.encode() not in bytes(b) for (b,) in rows)
    if isinstance(engine, SqliteEngine):
        for path in (engine.path, Path(f"{engine.path}-wal")):
            if path.exists():
                assert MARK.encode() not in path.read_bytes(), path


async def test_the_migration_leaves_a_row_changed_meanwhile(engine: Engine) -> None:
    plain = EncryptedChatStore(engine.inner, None, seal=False)
    async with plain:
        (m,) = await write(plain, "d:1:2", ["x"])
    bodies = _bodies(engine)
    async with bodies:
        (read,) = await bodies.plaintext_page(None, 10)
        await engine.sql("UPDATE messages SET body = ? WHERE seq = 1", b'{"text":"changed"}')
        assert await bodies.replace_bodies([(read, b"\x01sealed")]) == 0
        (now,) = await bodies.plaintext_page(None, 10)
        assert now.body == b'{"text":"changed"}' and m.body == b'{"text":"x"}'


@pytest.mark.parametrize("engine", [SqliteEngine], indirect=True)
async def test_no_plaintext_copy_survives_in_sqlite_free_space_after_the_migration(engine: Engine) -> None:
    """Rows written in clear into the middle of the table split pages; with ``secure_delete`` off, a split
    leaves old copies of cells in the pages' unallocated space and on the free list, which no rewrite of
    the rows reaches: the migration's end must rebuild the file (VACUUM) before truncating the WAL."""
    assert isinstance(engine, SqliteEngine)
    plain = EncryptedChatStore(engine.inner, None, seal=False)
    convs = [f"d:1:{i}" for i in range(2, 42)]
    async with plain:
        for c in convs:
            await write(plain, c, [f"{MARK} {c} first"])
        for n in range(2, 40):  # round-robin: every commit lands in the middle of the B-tree
            for c in convs:
                text = f"{MARK} {c} {n} " + "x" * (n * 7 % 300)
                await plain.commit(CommitBatch(messages=[msg(c, n, text)], heads={c: (n - 1, n, 1)}))
    assert MARK.encode() in engine.path.read_bytes()
    second_inner, second_keys = engine.second()
    store = EncryptedChatStore(second_inner, engine.keyring(second_keys), owns_keyring=True)
    bodies = _bodies(engine)
    async with store, bodies:
        done = await PlaintextMigration(store, bodies, batch=100).run()
        assert done.sealed == len(convs) * 39 and done.scrubbed
        for path in (engine.path, Path(f"{engine.path}-wal")):
            if path.exists():
                assert MARK.encode() not in path.read_bytes(), path


# --- file keys in the blobs -------------------------------------------------------------------------------


@pytest.mark.parametrize("store", ["local", "s3"])
@pytest.mark.parametrize("engine", [SqliteEngine], indirect=True)  # the blobs are on disk: one engine is enough
async def test_file_keys_in_blob_trailers_are_rewrapped_and_read_with_only_the_new_key(
    engine: Engine, tmp_path: Path, store: str
) -> None:
    """On the local directory (renamed into place) and on S3 (the object PUT again with If-Match)."""
    root = tmp_path / "files"
    settings = s3_settings(shared_weed()) if store == "s3" else None

    def storage(ring: Keyring, chunk_bytes: int = 64 * 1024) -> EncryptedBlobStorage | S3BlobStorage:
        if settings is None:
            return EncryptedBlobStorage(root, ring, chunk_bytes=chunk_bytes)
        return S3BlobStorage(settings, tmp_path / "staging", keys=ring, chunk_bytes=chunk_bytes)

    data = {f"file {i}".encode() * (1000 * i + 1) for i in range(1, 5)}
    hashes = []
    async with engine.keyring() as ring:
        blobs = storage(ring, 4096)
        async with blobs:
            for content in sorted(data):
                result, _ = await blobs.put(_gen_bytes(content), max_bytes=1 << 20, inspect=lambda s: None)
                hashes.append(result.sha256)
            old_id = ring.provider.key_id
    new_id, _ = rotate_key_file(engine.key_file)
    async with engine.keyring() as ring:
        await ring.rewrap_all()
        blobs = storage(ring, 4096)
        async with blobs:
            masters = {ring.master_of(await blobs.wrapped_key(h) or b"") for h in hashes}
            assert masters == {old_id}
            missing = "0" * 64
            report = await rewrap_blob_keys(blobs, _gen([*hashes, missing]), ring)
            assert (report.listed, report.rewritten, report.not_sealed, report.failed) == (5, 4, 1, 0)
            assert {ring.master_of(await blobs.wrapped_key(h) or b"") for h in hashes} == {new_id}
            assert (await rewrap_blob_keys(blobs, _gen(hashes), ring)).current == 4
            assert not list(root.rglob(".rewrap-*")) and not list(tmp_path.glob("staging/*"))
    retire_from_key_file(engine.key_file, {old_id})
    async with engine.keyring() as ring:
        assert ring.provider.key_ids == (new_id,)
        async with storage(ring) as blobs:
            for h, content in zip(hashes, sorted(data), strict=True):
                assert b"".join([c async for c in await blobs.open(h)]) == content
                assert b"".join([c async for c in await blobs.open(h, offset=5000, length=100)]) == content[5000:5100]


async def _gen_bytes(content: bytes):  # type: ignore[no-untyped-def]
    for i in range(0, len(content), 3000):
        yield content[i : i + 3000]


def test_master_keys_are_base64_of_32_bytes() -> None:
    assert len(base64.b64decode(encode_master_key(new_master_key()))) == 32
