"""What only the encrypted blob storage promises (the shared contract is tests/contract/test_blob_storage.py):
nothing plain on disk, damage refused rather than served, ranges that decrypt only their chunks, plaintext
blobs from before readable and migrated."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from im.backends.blobs import BlobCorrupt, BlobNotFound, Staged
from im.backends.blobs.encrypted import EncryptedBlobStorage, MigrationReport
from im.backends.blobs.local import LocalBlobStorage
from im.backends.blobs.sealed import HEAD, TAG, TAIL
from tests.support.keys import MemoryFileKeys

CHUNK = 4096
MARKER = b"PLAINTEXT-MARKER-7f3a"


async def chunks_of(data: bytes, piece: int = 10_000) -> AsyncIterator[bytes]:
    for i in range(0, len(data), piece):
        await asyncio.sleep(0)
        yield data[i : i + piece]


def accept(staged: Staged) -> None:
    return None


def marked(size: int) -> bytes:
    """``size`` bytes with the marker repeated all through them (so any plaintext chunk would show it)."""
    return (MARKER + os.urandom(40)) * (size // (len(MARKER) + 40)) + b"x" * (size % (len(MARKER) + 40))


@pytest.fixture
def keys() -> MemoryFileKeys:
    return MemoryFileKeys()


@pytest.fixture
async def storage(tmp_path: Path, keys: MemoryFileKeys) -> AsyncIterator[EncryptedBlobStorage]:
    s = EncryptedBlobStorage(tmp_path / "files", keys, chunk_bytes=CHUNK, buffer_bytes=3 * CHUNK)
    async with s:
        yield s


async def put(storage: EncryptedBlobStorage, data: bytes) -> str:
    result, _ = await storage.put(chunks_of(data), max_bytes=10**8, inspect=accept)
    return result.sha256


async def read(storage: EncryptedBlobStorage, sha256: str, offset: int = 0, length: int | None = None) -> bytes:
    return b"".join([c async for c in await storage.open(sha256, chunk_size=3000, offset=offset, length=length)])


async def read_until_refused(storage: EncryptedBlobStorage, sha256: str) -> bytes:
    """Read until the storage refuses; return what came before the refusal (it must raise)."""
    got = bytearray()
    with pytest.raises(BlobCorrupt):
        async for chunk in await storage.open(sha256, chunk_size=1000):
            got += chunk
    return bytes(got)


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


async def test_nothing_on_disk_shows_the_plaintext_or_its_hash(storage: EncryptedBlobStorage, tmp_path: Path) -> None:
    """Staging included: the scan runs while an upload is half way through, and again at the end."""
    data = marked(200_000)
    sha = hashlib.sha256(data).hexdigest()
    seen_staging: list[list[Path]] = []

    async def slow() -> AsyncIterator[bytes]:
        for i in range(0, len(data), 50_000):
            yield data[i : i + 50_000]
            await asyncio.sleep(0.01)
            seen_staging.append(files_under(tmp_path / "files" / "tmp"))
            for p in files_under(tmp_path):
                assert MARKER not in p.read_bytes()

    result, _ = await storage.put(slow(), max_bytes=10**6, inspect=accept)
    assert result.sha256 == sha and any(seen_staging)
    small = await put(storage, MARKER)  # one partial chunk only
    everything = files_under(tmp_path)
    assert len(everything) == 2
    for p in everything:
        content = p.read_bytes()
        assert MARKER not in content
        for h in (sha, small):
            assert h not in str(p) and h.encode() not in content and bytes.fromhex(h) not in content
        assert (p.stat().st_mode & 0o777) == 0o600
    assert (tmp_path / "files" / "sealed").stat().st_mode & 0o777 == 0o700
    assert await read(storage, sha) == data and await read(storage, small) == MARKER


@pytest.mark.parametrize("size", [1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK + 17])
async def test_sizes_around_chunk_boundaries(storage: EncryptedBlobStorage, size: int) -> None:
    data = os.urandom(size)
    sha = await put(storage, data)
    path = storage.path(sha)
    chunks = size // CHUNK + 1  # a multiple of the chunk size ends with an empty chunk
    wrapped = 12 + 32 + 16  # the test keyring's wrapping
    assert path.stat().st_size == HEAD.size + size + TAG * chunks + wrapped + TAIL.size
    assert await read(storage, sha) == data
    for offset in {0, CHUNK - 1, CHUNK, CHUNK + 1, size - 1, size}:
        for length in (1, CHUNK, CHUNK + 2, None):
            end = None if length is None else offset + length
            assert await read(storage, sha, offset, length) == data[offset:end], (offset, length)


async def test_an_empty_blob(storage: EncryptedBlobStorage) -> None:
    sha = await put(storage, b"")
    assert sha == hashlib.sha256(b"").hexdigest()
    assert await read(storage, sha) == b""
    assert await read(storage, sha, 0, 10) == b""


async def test_a_range_decrypts_only_its_chunks(storage: EncryptedBlobStorage) -> None:
    """Chunks outside the range are never read: damage there does not disturb it."""
    data = os.urandom(10 * CHUNK + 100)
    sha = await put(storage, data)
    path = storage.path(sha)
    raw = bytearray(path.read_bytes())
    for index in (0, 1, 7, 8, 9, 10):  # damage every chunk but 2..6
        raw[HEAD.size + index * (CHUNK + TAG) + 5] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert await read(storage, sha, 2 * CHUNK, 5 * CHUNK) == data[2 * CHUNK : 7 * CHUNK]
    assert await read(storage, sha, 3 * CHUNK + 10, 100) == data[3 * CHUNK + 10 : 3 * CHUNK + 110]
    with pytest.raises(BlobCorrupt):
        await read(storage, sha, 2 * CHUNK, 5 * CHUNK + 1)


async def test_a_blob_moved_to_another_blobs_name_is_refused(storage: EncryptedBlobStorage) -> None:
    a, b = os.urandom(20_000), os.urandom(30_000)
    sha_a, sha_b = await put(storage, a), await put(storage, b)
    shutil.copyfile(storage.path(sha_a), storage.path(sha_b))
    with pytest.raises(BlobCorrupt, match="does not unwrap"):
        await storage.open(sha_b)  # before any byte
    assert await read(storage, sha_a) == a


async def test_sealed_bytes_under_a_plaintext_name_are_refused(storage: EncryptedBlobStorage) -> None:
    """Someone copies a sealed blob to where an old plaintext blob of another id would be: refused, never
    served as that file's bytes."""
    data = os.urandom(5000)
    sha = await put(storage, data)
    other = hashlib.sha256(b"some other file").hexdigest()
    legacy = storage.legacy_path(other)
    legacy.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(storage.path(sha), legacy)
    with pytest.raises(BlobCorrupt):
        await storage.open(other)


@pytest.mark.parametrize(
    "cut",
    [
        1,  # the trailer loses a byte
        TAIL.size + 60,  # the whole trailer
        TAIL.size + 60 + TAG,  # and the last chunk's tag
        TAIL.size + 60 + 100,  # into the last chunk
    ],
)
async def test_a_truncated_blob_is_refused(storage: EncryptedBlobStorage, cut: int) -> None:
    data = os.urandom(3 * CHUNK + 100)
    sha = await put(storage, data)
    path = storage.path(sha)
    raw = path.read_bytes()
    path.write_bytes(raw[:-cut])
    with pytest.raises(BlobCorrupt):
        await read(storage, sha)


async def test_whole_chunks_cut_from_the_end_with_the_trailer_kept_are_refused(storage: EncryptedBlobStorage) -> None:
    """The hardest truncation: the trailer put back after dropping the last chunk(s), so the file length
    is a valid layout. The last-chunk flag catches it; the bytes before it were genuine."""
    data = os.urandom(3 * CHUNK)  # chunks 0, 1, 2 full, chunk 3 empty
    sha = await put(storage, data)
    path = storage.path(sha)
    raw = path.read_bytes()
    trailer = raw[-(TAIL.size + 60) :]
    body = raw[: -(TAIL.size + 60)]
    for drop in (TAG, TAG + CHUNK + TAG):  # the empty last chunk; and the full one before it as well
        path.write_bytes(body[: len(body) - drop] + trailer)
        got = await read_until_refused(storage, sha)
        assert data.startswith(got)


async def test_two_chunks_swapped_are_refused_never_served(storage: EncryptedBlobStorage) -> None:
    data = os.urandom(6 * CHUNK + 10)
    sha = await put(storage, data)
    path = storage.path(sha)
    raw = bytearray(path.read_bytes())
    span = CHUNK + TAG
    one, two = HEAD.size + 2 * span, HEAD.size + 4 * span
    raw[one : one + span], raw[two : two + span] = raw[two : two + span], raw[one : one + span]
    path.write_bytes(bytes(raw))
    got = await read_until_refused(storage, sha)
    assert got == data[: len(got)] and len(got) <= 2 * CHUNK  # only the genuine bytes before the swap
    with pytest.raises(BlobCorrupt):  # a range starting at a swapped chunk: refused at open
        await storage.open(sha, offset=2 * CHUNK)


async def test_a_flipped_bit_anywhere_is_refused(storage: EncryptedBlobStorage) -> None:
    data = os.urandom(2 * CHUNK + 50)
    sha = await put(storage, data)
    path = storage.path(sha)
    raw = path.read_bytes()
    for position in range(0, len(raw), 97):
        damaged = bytearray(raw)
        damaged[position] ^= 0x01
        path.write_bytes(bytes(damaged))
        try:
            got = await read(storage, sha)
        except BlobCorrupt:
            continue
        pytest.fail(f"a flipped bit at {position} was not noticed ({len(got)} bytes read)")


async def test_the_same_bytes_twice_are_sealed_once_and_read_after_a_restart(
    tmp_path: Path, keys: MemoryFileKeys
) -> None:
    data = marked(50_000)
    async with EncryptedBlobStorage(tmp_path / "files", keys) as first:
        r1, _ = await first.put(chunks_of(data), max_bytes=10**6, inspect=accept)
        r2, _ = await first.put(chunks_of(data, 777), max_bytes=10**6, inspect=accept)
    assert (r1.created, r2.created, r1.sha256) == (True, False, r2.sha256)
    assert len(files_under(tmp_path / "files" / "sealed")) == 1
    async with EncryptedBlobStorage(tmp_path / "files", keys) as restarted:  # another node, same keyring
        assert await read(restarted, r1.sha256) == data
        r3, _ = await restarted.put(chunks_of(data), max_bytes=10**6, inspect=accept)
        assert not r3.created
    async with EncryptedBlobStorage(tmp_path / "files", MemoryFileKeys()) as stranger:  # another keyring
        assert not await stranger.exists(r1.sha256)
        with pytest.raises(BlobNotFound):
            await stranger.open(r1.sha256)


async def test_inspect_reads_the_plaintext_seekably(storage: EncryptedBlobStorage) -> None:
    data = os.urandom(5 * CHUNK + 3)

    def look(staged: Staged) -> bytes:
        assert MARKER not in staged.path.read_bytes()
        with staged.open() as f:
            f.seek(2 * CHUNK - 5)
            middle = f.read(10)
            f.seek(-3, os.SEEK_END)
            tail = f.read()
            f.seek(0)
            return middle + tail + f.read()

    _, seen = await storage.put(chunks_of(data), max_bytes=10**6, inspect=look)
    assert seen == data[2 * CHUNK - 5 : 2 * CHUNK + 5] + data[-3:] + data


# --- plaintext blobs from before ------------------------------------------------------------------------


async def plaintext_blobs(root: Path, contents: list[bytes]) -> list[str]:
    async with LocalBlobStorage(root) as local:
        shas = []
        for data in contents:
            result, _ = await local.put(chunks_of(data), max_bytes=10**8, inspect=accept)
            shas.append(result.sha256)
    return shas


async def test_plaintext_blobs_stay_readable_then_migrate(tmp_path: Path, keys: MemoryFileKeys) -> None:
    root = tmp_path / "files"
    contents = [marked(n) for n in (100, CHUNK, 70_000, 300_000)]
    shas = await plaintext_blobs(root, contents)
    async with EncryptedBlobStorage(root, keys, chunk_bytes=CHUNK) as storage:
        assert sorted(storage.plaintext_blobs()) == sorted(shas)
        for sha, data in zip(shas, contents, strict=True):
            assert await storage.exists(sha)
            assert await read(storage, sha) == data
            assert await read(storage, sha, CHUNK - 3, 10) == data[CHUNK - 3 : CHUNK + 7]
        # a put of bytes stored in the clear seals them and drops the plaintext; nobody new stored them
        again, _ = await storage.put(chunks_of(contents[0]), max_bytes=10**6, inspect=accept)
        assert not again.created and not storage.legacy_path(shas[0]).exists()
        # one plaintext blob whose bytes are not what its name says: left alone, reported
        liar = hashlib.sha256(b"something else").hexdigest()
        storage.legacy_path(liar).parent.mkdir(exist_ok=True)
        storage.legacy_path(liar).write_bytes(b"not those bytes")
        reports: list[int] = []
        report = await storage.migrate(progress=lambda r: reports.append(r.done))
        assert (report.total, report.sealed, report.refused) == (4, 3, [liar])
        assert report.bytes == sum(map(len, contents[1:]))
        assert reports == [1, 2, 3, 4]
        assert storage.plaintext_blobs() == [liar]
        for sha, data in zip(shas, contents, strict=True):
            assert await read(storage, sha) == data
    for p in files_under(root):
        if p.name != liar:
            assert MARKER not in p.read_bytes() and p.name not in shas


async def test_migration_runs_in_the_background_from_start(tmp_path: Path, keys: MemoryFileKeys) -> None:
    root = tmp_path / "files"
    contents = [os.urandom(n) for n in (10, 20_000, 50_000)]
    shas = await plaintext_blobs(root, contents)
    storage = EncryptedBlobStorage(root, keys, chunk_bytes=CHUNK, migrate=True)
    async with storage:
        for _ in range(500):
            if not storage.plaintext_blobs():
                break
            # reads keep working while it runs
            for sha, data in zip(shas, contents, strict=True):
                assert await read(storage, sha) == data
            await asyncio.sleep(0.01)
        assert storage.plaintext_blobs() == []
    async with EncryptedBlobStorage(root, keys, migrate=True) as again:  # nothing left: nothing to do
        assert again.plaintext_blobs() == []
        for sha, data in zip(shas, contents, strict=True):
            assert await read(again, sha) == data


async def test_a_migration_cut_short_resumes(tmp_path: Path, keys: MemoryFileKeys) -> None:
    """Close during the migration: every blob is readable (sealed or still plain), the next run ends it."""
    root = tmp_path / "files"
    contents = [os.urandom(200_000) for _ in range(6)]
    shas = await plaintext_blobs(root, contents)
    storage = EncryptedBlobStorage(root, keys, chunk_bytes=CHUNK)
    await storage.start()
    progressed = asyncio.Event()
    task = asyncio.create_task(storage.migrate(progress=lambda r: progressed.set()))
    await progressed.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    left = storage.plaintext_blobs()
    assert 0 < len(left) < len(shas)
    assert list((root / "tmp").iterdir()) == []  # the cancelled put left nothing behind
    for sha, data in zip(shas, contents, strict=True):
        assert await read(storage, sha) == data
    report: MigrationReport = await storage.migrate()
    assert report.total == len(left) and report.sealed == len(left)
    await storage.close()
