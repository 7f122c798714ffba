"""The :class:`BlobStorage` contract (streamed, hashed, atomic, content-addressed, idempotent puts), run
against every implementation (see ``conftest.BLOB_STORAGES``); then what only the local one does."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import pytest

from im.backends.blobs import BlobNotFound, BlobStorage, BlobTooLarge, Staged, is_sha256
from im.backends.blobs.local import LocalBlobStorage
from tests.contract.conftest import BlobHarness
from tests.contract.lifecycle import check_lifecycle


async def chunks_of(pieces: Iterable[bytes]) -> AsyncIterator[bytes]:
    for piece in pieces:
        await asyncio.sleep(0)
        yield piece


def accept(staged: Staged) -> None:
    return None


def staging_files(root: Path) -> list[Path]:
    return sorted((root / "tmp").iterdir())


@pytest.fixture
def h(blob_harness: BlobHarness) -> BlobHarness:
    return blob_harness


async def test_put_stores_under_the_sha256(h: BlobHarness) -> None:
    storage = h.storage
    data = os.urandom(300_000)
    result, _ = await storage.put(
        chunks_of([data[:1000], data[1000:200_000], data[200_000:]]), max_bytes=10**6, inspect=accept
    )
    sha = hashlib.sha256(data).hexdigest()
    assert (result.sha256, result.size, result.created) == (sha, len(data), True)
    assert h.raw(sha) == data
    assert h.stored() == [sha]
    assert h.staged() == []
    assert await storage.exists(sha)
    got = b"".join([chunk async for chunk in await storage.open(sha, chunk_size=4096)])
    assert got == data


async def test_same_bytes_twice_are_stored_once(h: BlobHarness) -> None:
    storage = h.storage
    data = b"the same bytes" * 1000
    first, _ = await storage.put(chunks_of([data]), max_bytes=10**6, inspect=accept)
    version = h.version(first.sha256)
    # different chunking, same bytes
    second, _ = await storage.put(chunks_of([data[:7], data[7:]]), max_bytes=10**6, inspect=accept)
    assert second.sha256 == first.sha256 and not second.created
    assert len(h.stored()) == 1
    assert h.version(first.sha256) == version  # not rewritten
    assert h.staged() == []


async def test_concurrent_puts_of_the_same_bytes(h: BlobHarness) -> None:
    storage = h.storage
    data = os.urandom(500_000)
    pieces = [data[i : i + 50_000] for i in range(0, len(data), 50_000)]
    results = await asyncio.gather(*(storage.put(chunks_of(pieces), max_bytes=10**6, inspect=accept) for _ in range(5)))
    assert {r.sha256 for r, _ in results} == {hashlib.sha256(data).hexdigest()}
    assert len(h.stored()) == 1
    assert h.staged() == []


async def test_put_streams_to_disk_and_publishes_only_at_the_end(h: BlobHarness) -> None:
    """Bytes reach the staging file while the stream is still running (never all held in memory), and
    nothing is visible under a blob name before the put completes."""
    storage = h.storage
    chunk = os.urandom(128 * 1024)
    observed: list[int] = []

    async def source() -> AsyncIterator[bytes]:
        for _ in range(16):
            yield chunk
            await asyncio.sleep(0.01)  # let the buffered write reach the disk
            staged = h.staged()
            assert len(staged) == 1
            observed.append(staged[0])
            assert h.stored() == []

    result, _ = await storage.put(source(), max_bytes=10**7, inspect=accept)
    assert result.size == 16 * len(chunk)
    assert result.sha256 == hashlib.sha256(chunk * 16).hexdigest()
    # the staging file grew along with the stream, at most one buffer behind it
    assert observed == sorted(observed) and observed[-1] >= 15 * len(chunk)
    assert observed[3] >= 3 * len(chunk)


async def test_too_large_stops_the_stream_and_leaves_nothing(h: BlobHarness) -> None:
    storage = h.storage
    pulled = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal pulled
        while True:
            pulled += 1
            yield b"x" * 10_000

    with pytest.raises(BlobTooLarge):
        await storage.put(endless(), max_bytes=95_000, inspect=accept)
    assert pulled == 10
    assert h.stored() == [] and h.staged() == []


async def test_exactly_max_bytes_is_accepted(h: BlobHarness) -> None:
    result, _ = await h.storage.put(chunks_of([b"y" * 1000]), max_bytes=1000, inspect=accept)
    assert result.size == 1000


async def test_inspect_sees_the_whole_blob_and_can_refuse_it(h: BlobHarness) -> None:
    storage = h.storage
    data = b"\x89PNG-ish" + os.urandom(100_000)
    seen: list[tuple[str, int, bytes]] = []

    def refuse(staged: Staged) -> None:
        with staged.open() as f:
            seen.append((staged.sha256, staged.size, f.read()))
        raise ValueError("not wanted")

    with pytest.raises(ValueError, match="not wanted"):
        await storage.put(chunks_of([data[:10], data[10:]]), max_bytes=10**6, inspect=refuse)
    assert seen == [(hashlib.sha256(data).hexdigest(), len(data), data)]
    assert h.stored() == [] and h.staged() == []

    def verdict(staged: Staged) -> str:
        return f"ok {staged.size}"

    result, answer = await storage.put(chunks_of([data]), max_bytes=10**6, inspect=verdict)
    assert answer == f"ok {len(data)}" and result.created


async def test_a_failing_stream_leaves_nothing(h: BlobHarness) -> None:
    storage = h.storage

    async def broken() -> AsyncIterator[bytes]:
        yield b"a" * 100_000
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        await storage.put(broken(), max_bytes=10**6, inspect=accept)
    assert h.stored() == [] and h.staged() == []


async def test_a_cancelled_put_leaves_nothing(h: BlobHarness) -> None:
    storage = h.storage
    started = asyncio.Event()

    async def slow() -> AsyncIterator[bytes]:
        yield b"a" * 100_000
        started.set()
        await asyncio.sleep(3600)
        yield b"never"

    task = asyncio.create_task(storage.put(slow(), max_bytes=10**6, inspect=accept))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert h.stored() == [] and h.staged() == []


async def test_open_exists_delete(h: BlobHarness) -> None:
    storage = h.storage
    missing = "0" * 64
    assert not await storage.exists(missing)
    assert not await storage.exists("../etc/passwd")
    with pytest.raises(BlobNotFound):
        await storage.open(missing)
    with pytest.raises(BlobNotFound):
        await storage.open("not-a-hash")
    result, _ = await storage.put(chunks_of([b"bye"]), max_bytes=10, inspect=accept)
    assert await storage.delete(result.sha256)
    assert not await storage.delete(result.sha256)
    assert not await storage.exists(result.sha256)


async def test_range_reads(h: BlobHarness) -> None:
    """``offset``/``length`` read exactly that slice, in chunks no larger than asked, at and around every
    chunk boundary an implementation may have (16 KiB for the encrypted harness)."""
    storage = h.storage
    data = os.urandom(100_000)
    result, _ = await storage.put(chunks_of([data]), max_bytes=10**6, inspect=accept)
    k = 16 * 1024
    cases = [(0, None), (0, 1), (k - 1, 2), (k, k), (k - 1, k + 2), (3 * k + 5, None), (len(data) - 1, 10)]
    cases += [(len(data), None), (len(data) + 5, 3), (10, 0), (0, len(data) + 100), (5 * k, 4 * k + 3)]
    for offset, length in cases:
        pieces = [c async for c in await storage.open(result.sha256, chunk_size=5000, offset=offset, length=length)]
        end = None if length is None else offset + length
        assert b"".join(pieces) == data[offset:end], (offset, length)
        assert all(0 < len(c) <= 5000 for c in pieces)


async def test_lifecycle(h: BlobHarness) -> None:
    async def probe(storage: BlobStorage) -> None:
        assert not await storage.exists("0" * 64)

    await check_lifecycle(h.unstarted, probe)


# --- LocalBlobStorage only ------------------------------------------------------------------------------


async def test_start_removes_stale_staging_files_only(tmp_path: Path) -> None:
    root = tmp_path / "files"
    (root / "tmp").mkdir(parents=True)
    stale, fresh = root / "tmp" / "put-stale", root / "tmp" / "put-fresh"
    stale.write_bytes(b"left by a crash")
    fresh.write_bytes(b"being written by another process")
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    await LocalBlobStorage(root).start()
    assert staging_files(root) == [fresh]


def test_is_sha256() -> None:
    assert is_sha256(hashlib.sha256(b"").hexdigest())
    assert not is_sha256(hashlib.sha256(b"").hexdigest().upper())
    assert not is_sha256("abc")
    assert not is_sha256("g" * 64)
