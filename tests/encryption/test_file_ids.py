"""Keyed file ids (im.backends.files.ids) on each engine: a database whose file tables were written in
clear is converted online — lookups, uploads and file messages during the conversion see every file and
the same read rule — and resumably; afterwards no table holds a file's SHA-256. Encryption turned off
again keeps the keyed rows readable."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import pytest

from im.backends.chat.encrypted import EncryptedChatStore
from im.backends.files import FileStore
from im.backends.files.ids import FileIdConversion, FileIds
from im.backends.files.postgres import PostgresFileStore
from im.backends.files.sqlite import SqliteFileStore
from im.model.chat import CommitBatch, ConversationState
from im.model.files import FileMeta
from tests.encryption.conftest import Engine

ALICE, BOB, CAROL, DAVE = 1, 2, 3, 4
G = "g:1"
TABLES = ("files", "file_owners", "file_refs")


def meta(data: bytes, created_at: int = 100) -> FileMeta:
    digest = hashlib.sha256(data).hexdigest()
    return FileMeta(digest, digest, len(data), "application/octet-stream", None, None, created_at)


FILES = [meta(f"file content {i}".encode(), created_at=100 + i) for i in range(6)]
#: The file whose rows a conversion in hash order reaches last (only the ghost ref may come after it).
LAST = max(range(len(FILES)), key=lambda i: FILES[i].sha256)
GHOST = "e" * 64  # a ref to a file never stored: grants nothing, converted all the same


async def commit_refs(chat: Any, seq: int, refs: list[tuple[str, str]], *, new: bool = False) -> None:
    """A commit carrying file refs, as the committer's for a file message (the message itself elided)."""
    await chat.commit(
        CommitBatch(
            heads={G: (seq - 1, seq, seq)},
            new_conversations=[ConversationState(G, "group", 0, {ALICE: "owner", BOB: "member"})] if new else [],
            file_refs=refs,
        )
    )


async def table_dump(engine: Engine) -> str:
    rows: list[Any] = []
    for table in TABLES:
        rows += await engine.sql(f"SELECT * FROM {table}")
    return repr(rows)


async def row_counts(engine: Engine) -> list[int]:
    return [(await engine.sql(f"SELECT count(*) FROM {t}"))[0][0] for t in TABLES]


async def expect_read_rule(files: FileStore, sent: int = 4) -> None:
    """ALICE uploaded every file; CAROL uploaded FILES[0] too; FILES[:sent] were sent to G (ALICE, BOB);
    DAVE, a stranger who knows every hash, reads nothing."""
    for i, m in enumerate(FILES):
        assert await files.lookup(ALICE, m.file_id) == (m, f"a{i}.bin")
        assert await files.lookup(BOB, m.file_id) == ((m, None) if i < sent else None)
        assert await files.lookup(DAVE, m.file_id) is None
    assert await files.lookup(CAROL, FILES[0].file_id) == (FILES[0], "c0.bin")
    assert await files.lookup(BOB, GHOST) is None
    pairs = [(uid, m.file_id) for uid in (ALICE, BOB, CAROL, DAVE) for m in FILES]
    assert await files.readable(pairs) == (
        {(ALICE, m.file_id) for m in FILES} | {(BOB, m.file_id) for m in FILES[:sent]} | {(CAROL, FILES[0].file_id)}
    )


async def write_in_clear(engine: Engine) -> None:
    """The file tables as a server with keyed ids off wrote them: FILES[3] is sent later, keyed."""
    plain = engine.file_store(FileIds(None, keyed=False))
    await plain.start()
    try:
        for i, m in enumerate(FILES):
            await plain.add_upload(m, ALICE, f"a{i}.bin", 10 + i)
        await plain.add_upload(FILES[0], CAROL, "c0.bin", 20)
        await commit_refs(engine.inner, 1, [(m.file_id, G) for m in FILES[:3]] + [(GHOST, G)], new=True)
    finally:
        await plain.close()


class Watched:
    """The store under conversion, checking the read rule before every page, and after the second one
    making an upload of a file whose rows are still in clear; ``fail_after`` pages, a crash."""

    def __init__(self, store: Any, *, fail_after: int | None = None) -> None:
        self.store = store
        self.ids = store.ids
        self.pages = 0
        self.fail_after = fail_after

    async def count_unconverted(self) -> int:
        return int(await self.store.count_unconverted())

    async def unconverted(self, after: str | None, limit: int) -> list[str]:
        return list(await self.store.unconverted(after, limit))

    async def convert(self, ids: Sequence[str]) -> int:
        if self.pages == self.fail_after:
            raise RuntimeError("crash")
        await expect_read_rule(self.store)
        if self.pages == 2:
            # With batches of 2, the file that sorts last is still in clear: its second upload by ALICE
            # is no new upload and keeps her first name, and the first upload's metadata stays.
            last = FILES[LAST]
            assert last.sha256 >= ids[0]
            assert await self.store.add_upload(meta(b"file content %d" % LAST, 999), ALICE, "again.bin", 99) == (
                last,
                f"a{LAST}.bin",
                False,
            )
        self.pages += 1
        return int(await self.store.convert(ids))

    async def converted(self) -> bool:
        return bool(await self.store.converted())


async def test_conversion_online_with_lookups_during_it(engine: Engine) -> None:
    await write_in_clear(engine)
    before = await row_counts(engine)
    assert FILES[1].sha256 in await table_dump(engine)  # the scan below can see a hash
    async with engine.keyring() as keyring:
        ids = FileIds(keyring, keyed=True)
        async with (
            engine.file_store(ids) as store,
            EncryptedChatStore(engine.second()[0], None, seal=False, file_ids=ids) as chat,
        ):
            await _convert_online(engine, store, chat, before)
    # A restart finds nothing in clear: one form per lookup again.
    async with engine.keyring() as keyring, engine.file_store(FileIds(keyring, keyed=True)) as restarted:
        assert not restarted.forms.mixed
        await expect_read_rule(restarted)


async def _convert_online(
    engine: Engine, store: SqliteFileStore | PostgresFileStore, chat: EncryptedChatStore, before: list[int]
) -> None:
    assert store.forms.mixed
    # Before the conversion: a file message sent now writes a keyed ref to a file still in clear.
    await commit_refs(chat, 2, [(FILES[3].file_id, G)])
    await expect_read_rule(store)
    watched = Watched(store)
    report = await FileIdConversion(watched, batch=2).run()
    assert watched.pages >= 4
    assert report.finished and report.complete and report.total == sum(before)
    assert report.files == len(FILES) + 1  # and the ghost
    assert not store.forms.mixed
    await expect_read_rule(store)
    assert await row_counts(engine) == [before[0], before[1], before[2] + 1]  # nothing lost
    dump = await table_dump(engine)
    for sha in [m.sha256 for m in FILES] + [GHOST]:
        assert sha not in dump
    listed, after = await store.hashes(None, 100)
    assert after is None
    assert sorted(listed) == sorted(m.sha256 for m in FILES)
    again = await FileIdConversion(store).run()
    assert (again.total, again.rows, again.complete) == (0, 0, True)


async def test_conversion_resumes_after_a_crash(engine: Engine) -> None:
    await write_in_clear(engine)
    before = await row_counts(engine)
    async with engine.keyring() as keyring:
        ids = FileIds(keyring, keyed=True)
        async with engine.file_store(ids) as store:
            await commit_refs(
                EncryptedChatStore(engine.inner, None, seal=False, file_ids=ids), 2, [(FILES[3].file_id, G)]
            )
            before[2] += 1
            with pytest.raises(RuntimeError, match="crash"):
                await FileIdConversion(Watched(store, fail_after=2), batch=2).run()
            assert store.forms.mixed
            await expect_read_rule(store)  # half converted: every file still found
            report = await FileIdConversion(store, batch=2).run()
            assert report.complete and 0 < report.rows < sum(before)  # only what was left
            assert await row_counts(engine) == before
            await expect_read_rule(store)
            assert FILES[0].sha256 not in await table_dump(engine)


async def test_turned_off_again_keyed_rows_stay_readable(engine: Engine) -> None:
    async with engine.keyring() as keyring:
        async with engine.file_store(FileIds(keyring, keyed=True)) as keyed:
            for i, m in enumerate(FILES):
                await keyed.add_upload(m, ALICE, f"a{i}.bin", 10 + i)
            await keyed.add_upload(FILES[0], CAROL, "c0.bin", 20)
            await commit_refs(
                EncryptedChatStore(engine.inner, None, seal=False, file_ids=FileIds(keyring, keyed=True)),
                1,
                [(m.file_id, G) for m in FILES[:4]],
                new=True,
            )
        async with engine.file_store(FileIds(keyring, keyed=False)) as plain:
            assert plain.forms.mixed
            await expect_read_rule(plain)
            # A new upload of a keyed file moves its rows to the clear form: still one row per file.
            assert await plain.add_upload(FILES[1], BOB, "b1.bin", 30) == (FILES[1], "b1.bin", True)
            assert await plain.lookup(ALICE, FILES[1].file_id) == (FILES[1], "a1.bin")
            assert len(await engine.sql("SELECT * FROM files")) == len(FILES)
            listed, _ = await plain.hashes(None, 100)
            assert sorted(listed) == sorted(m.sha256 for m in FILES)


async def test_sealed_hashes_swapped_between_rows_are_not_listed(engine: Engine) -> None:
    async with engine.keyring() as keyring, engine.file_store(FileIds(keyring, keyed=True)) as store:
        for m in FILES[:2]:
            await store.add_upload(m, ALICE, "x", 1)
        (a, va), (b, vb) = await engine.sql("SELECT file_id, sha256 FROM files ORDER BY file_id")
        listed, _ = await store.hashes(None, 10)
        assert sorted(listed) == sorted(m.sha256 for m in FILES[:2])
        for fid, value in ((b, "-"), (a, vb), (b, va)):  # the sealed hashes swapped between the rows
            await engine.sql("UPDATE files SET sha256 = ? WHERE file_id = ?", value, fid)
        assert await store.hashes(None, 10) == ([], None)  # neither opens (both logged)
        assert await store.lookup(ALICE, FILES[0].sha256) is not None  # lookups never need them


async def test_a_node_that_does_not_convert_learns_that_another_one_finished(engine: Engine) -> None:
    await write_in_clear(engine)
    async with (
        engine.keyring() as keyring,
        engine.file_store(FileIds(keyring, keyed=True)) as converting,
        engine.file_store(FileIds(keyring, keyed=True), recheck=0.0) as other,
    ):
        assert converting.forms.mixed and other.forms.mixed
        await expect_read_rule(other, sent=3)
        await FileIdConversion(converting).run()
        assert not converting.forms.mixed
        assert other.forms.mixed  # until it probes again: its next lookup (recheck 0 s)
        assert await other.lookup(ALICE, FILES[0].file_id) == (FILES[0], "a0.bin")
        assert not other.forms.mixed
        assert other.forms.forms(FILES[0].sha256) == (other.ids.keyed_id(FILES[0].sha256),)
