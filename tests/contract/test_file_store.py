"""The :class:`FileStore` contract, run against every implementation (see ``conftest.FILE_STORES``)."""

from __future__ import annotations

import asyncio
import hashlib

from im.backends.files import FileStore
from im.model.chat import CommitBatch, ConversationState, MemberChange, StoredMessage
from im.model.files import FileMeta
from tests.contract.conftest import FileHarness
from tests.contract.lifecycle import check_lifecycle

ALICE, BOB, CAROL = 1, 2, 3
G = "g:7"


def meta(data: bytes, *, created_at: int = 100, width: int | None = None) -> FileMeta:
    digest = hashlib.sha256(data).hexdigest()
    return FileMeta(digest, digest, len(data), "application/octet-stream", width, width, created_at)


async def send_file(h: FileHarness, conv: str, file_id: str, members: dict[int, str] | None = None) -> None:
    """Commit a file message as the chat core does: message and ``file_refs`` row in one batch."""
    head = (await h.chat.load_conversations([conv])).get(conv)
    seq = (head.last_seq if head else 0) + 1
    m = StoredMessage(conv, seq, seq, ALICE, "d", f"{conv}-{seq}", 1, "file", b"{}")
    await h.chat.commit(
        CommitBatch(
            messages=[m],
            heads={conv: (seq - 1, seq, 1)},
            new_conversations=[ConversationState(conv, "group", 0, members)] if members else [],
            file_refs=[(file_id, conv)],
        )
    )


async def test_add_upload_first_metadata_and_names_kept(file_harness: FileHarness) -> None:
    files = file_harness.files
    first = meta(b"one", created_at=100, width=4)
    stored, name, new = await files.add_upload(first, ALICE, "a.bin", 1_000)
    assert (stored, name, new) == (first, "a.bin", True)
    # Same uploader again: nothing new, first name kept.
    assert await files.add_upload(first, ALICE, "renamed.bin", 2_000) == (first, "a.bin", False)
    # Another uploader of the same bytes: the file row is the first upload's, the name is theirs.
    later = meta(b"one", created_at=999, width=4)
    assert await files.add_upload(later, BOB, "b.bin", 3_000) == (first, "b.bin", True)
    assert await files.lookup(ALICE, first.file_id) == (first, "a.bin")
    assert await files.lookup(BOB, first.file_id) == (first, "b.bin")


async def test_concurrent_uploads_of_the_same_bytes(file_harness: FileHarness) -> None:
    m = meta(b"race")
    results = await asyncio.gather(*(file_harness.files.add_upload(m, uid, f"{uid}.bin", 5) for uid in range(1, 9)))
    assert [r[0] for r in results] == [m] * 8
    assert all(new for _, _, new in results)
    assert await file_harness.files.readable([(uid, m.file_id) for uid in range(1, 9)]) == {
        (uid, m.file_id) for uid in range(1, 9)
    }


async def test_read_rule_uploader_member_stranger(file_harness: FileHarness) -> None:
    h = file_harness
    m = meta(b"shared")
    await h.files.add_upload(m, ALICE, "s.bin", 1)
    assert await h.files.lookup(BOB, m.file_id) is None
    assert await h.files.lookup(ALICE, "0" * 64) is None

    await send_file(h, G, m.file_id, {ALICE: "owner", BOB: "member"})
    assert await h.files.lookup(BOB, m.file_id) == (m, None)
    assert await h.files.lookup(CAROL, m.file_id) is None
    pairs = [(ALICE, m.file_id), (BOB, m.file_id), (CAROL, m.file_id), (ALICE, "0" * 64), (BOB, m.file_id)]
    assert await h.files.readable(pairs) == {(ALICE, m.file_id), (BOB, m.file_id)}
    assert await h.files.readable([]) == set()

    # Leaving takes the right away; uploading the same bytes gives it back.
    await h.chat.commit(
        CommitBatch(
            messages=[StoredMessage(G, 2, 2, ALICE, "", "leave", 2, "system", b"{}")],
            heads={G: (1, 2, 2)},
            member_changes=[MemberChange(G, BOB, None)],
        )
    )
    assert await h.files.lookup(BOB, m.file_id) is None
    await h.files.add_upload(m, BOB, "mine.bin", 3)
    assert await h.files.lookup(BOB, m.file_id) == (m, "mine.bin")


async def test_refs_without_a_file_and_add_refs(file_harness: FileHarness) -> None:
    h = file_harness
    ghost = "f" * 64
    await send_file(h, G, ghost, {ALICE: "owner", BOB: "member"})
    assert await h.files.lookup(BOB, ghost) is None  # a ref grants nothing without the file

    m = meta(b"via add_refs")
    await h.files.add_upload(m, CAROL, "c.bin", 1)
    assert await h.files.lookup(BOB, m.file_id) is None
    await h.files.add_refs([(m.file_id, G), (m.file_id, G)])
    await h.files.add_refs([(m.file_id, G)])
    await h.files.add_refs([])
    assert await h.files.lookup(BOB, m.file_id) == (m, None)


async def test_lifecycle(file_harness: FileHarness) -> None:
    async def probe(store: FileStore) -> None:
        assert await store.lookup(ALICE, "0" * 64) is None

    await check_lifecycle(file_harness.unstarted, probe)


async def test_hashes_pages_through_every_file(file_harness: FileHarness) -> None:
    files = file_harness.files
    assert await files.hashes(None, 10) == ([], None)
    metas = [meta(f"file {i}".encode()) for i in range(7)]
    for i, m in enumerate(metas):
        await files.add_upload(m, ALICE if i % 2 else BOB, f"{i}.bin", 1_000)
    await files.add_upload(metas[0], ALICE, "again.bin", 1_000)  # a second uploader: still one row
    got: list[str] = []
    after = None
    pages = 0
    while True:
        page, after = await files.hashes(after, 3)
        got += page
        pages += 1
        if after is None:
            break
    assert sorted(got) == sorted(m.sha256 for m in metas)  # each once
    assert pages == 3  # 3 + 3 + 1 rows


async def test_what_the_tables_hold(file_harness: FileHarness) -> None:
    """Keyed: no table holds a file's SHA-256 (hex, or its raw bytes in any column), yet dedupe keeps one
    row per file and everything reads back by the hash. In clear: the hash is the id, as before."""
    h = file_harness
    m = meta(b"tables")
    await h.files.add_upload(m, ALICE, "a.bin", 1)
    await h.files.add_upload(meta(b"tables", created_at=5), BOB, "b.bin", 2)
    await send_file(h, G, m.file_id, {ALICE: "owner", CAROL: "member"})
    await h.files.add_refs([(m.file_id, "g:8")])
    assert await h.files.lookup(CAROL, m.file_id) == (m, None)
    assert await h.files.readable([(CAROL, m.file_id), (BOB, m.file_id)]) == {(CAROL, m.file_id), (BOB, m.file_id)}
    files = await h.sql("SELECT file_id, sha256 FROM files")
    owners = await h.sql("SELECT file_id, uid FROM file_owners ORDER BY uid")
    refs = await h.sql("SELECT file_id, conv FROM file_refs ORDER BY conv")
    assert len(files) == 1 and [u for _, u in owners] == [ALICE, BOB] and [c for _, c in refs] == [G, "g:8"]
    ids = {files[0][0]} | {f for f, _ in owners} | {f for f, _ in refs}
    assert len(ids) == 1  # one id for the file in every table
    dump = repr((files, owners, refs))
    if h.keyed:
        (fid,) = ids
        assert fid.startswith("k") and len(fid) == 65
        assert m.sha256 not in dump
        raw = bytes.fromhex(m.sha256)  # nor the hash's 32 bytes, in a text or a binary column
        assert not any(
            raw in (v.encode() if isinstance(v, str) else bytes(v))
            for row in (*files, *owners, *refs)
            for v in row
            if isinstance(v, (str, bytes, memoryview))
        )
    else:
        assert ids == {m.sha256} and files[0][1] == m.sha256
