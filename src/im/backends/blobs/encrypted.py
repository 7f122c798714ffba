"""``EncryptedBlobStorage``: blobs sealed with AES-256-GCM at rest, each under a key of its own.

Layout under ``root`` (the root a :class:`LocalBlobStorage` used before: its blobs stay readable)::

    <root>/tmp/put-*               staging: sealed bytes only (no plaintext of an upload touches the disk)
    <root>/sealed/<n[:2]>/<n>      a sealed blob (im.backends.blobs.sealed); n = HMAC-SHA256(name key, sha)
    <root>/<sha[:2]>/<sha>         a plaintext blob from before encryption ("legacy"), read as it is

- Keys: each put makes a random 256-bit key for its blob, wrapped by the keyring (:class:`FileKeys`)
  with the blob's id as context (``b"im-file:" + sha``), and stored in the blob itself: sealed bytes put
  under another blob's name fail to unwrap. The names on disk are keyed hashes of the ids under
  ``named_key("blob-names")``: someone with the disk but not the keyring cannot test whether a known
  file is stored by computing its SHA-256.
- Dedupe works as before (the id is still the SHA-256 of the plaintext, and the keyed name of one id is
  always the same); the bytes of a blob are sealed once, by the put that published them.
- Reads authenticate every byte before returning it: a damaged, truncated, reordered or moved blob raises
  :class:`BlobCorrupt` (at ``open`` for what it checks — the format, the wrapped key, the first chunk
  read — else at the damaged chunk), never wrong bytes.
- Legacy blobs: a read finds the sealed name first, then the plaintext one; a put of bytes stored as
  plaintext seals them and drops the plaintext; :meth:`EncryptedBlobStorage.migrate` seals them all
  (streamed, fsynced, renamed, then the plaintext unlinked), online, and can run in the background from
  :meth:`start`. Sealed bytes found under a plaintext name are refused, never served as the file.

- Master key rotation: the wrapped key in a blob's trailer is rewrapped by :func:`rewrap_blob_keys`
  (``im keys rotate``), which rewrites the blob with the new trailer and renames it into place (a reader
  sees the old file or the new one; the old one stays readable while the old master key is held).

What it does not hide: the number of blobs, their sizes (to the byte: the layout is deterministic), and
when they were written. Anyone holding the keyring and the disk reads everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import io
import logging
import os
import tempfile
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol, TypeVar

from cryptography.exceptions import InvalidTag

from im.backends.blobs import (
    BlobCorrupt,
    BlobNotFound,
    BlobStorage,
    BlobTooLarge,
    BlobUnavailable,
    PutResult,
    Staged,
    is_sha256,
)
from im.backends.blobs.local import LocalBlobStorage, in_thread_closing, read_chunks
from im.backends.blobs.sealed import (
    HEAD,
    KEY_BYTES,
    MAGIC,
    MAX_CHUNK,
    MIN_CHUNK,
    TAIL,
    ChunkCipher,
    Layout,
    SealedReader,
    read_layout,
)
from im.backends.durable import fsync_dir
from im.backends.keys import KeyUnavailable

T = TypeVar("T")

log = logging.getLogger(__name__)

#: The keyring's name of the key that names blobs on disk.
NAME_KEY = "blob-names"
SEALED_DIR = "sealed"


class FileKeys(Protocol):
    """What file encryption needs from the keyring (``im.backends.keys``).

    - ``wrap``: the key encrypted under the current master key (AES-256-GCM key wrapping) with
      ``context`` as associated data; any node of the cluster can unwrap it.
    - ``unwrap``: the inverse, with the same ``context``; raises :class:`~im.backends.keys.KeyUnavailable`
      (or ``cryptography``'s ``InvalidTag``, or a ``ValueError``) when ``wrapped`` does not open under this
      context and master key. The read is then refused as damaged (``BlobCorrupt``: 503 ``unavailable``).
    - ``named_key``: a 256-bit data key for a purpose, created once for the whole cluster and the same
      ever after (it must survive master key rotation, or every blob name changes).
    """

    async def wrap(self, key: bytes, context: bytes) -> bytes: ...

    async def unwrap(self, wrapped: bytes, context: bytes) -> bytes: ...

    async def named_key(self, name: str) -> bytes: ...


def key_context(sha256: str) -> bytes:
    """The context a blob's key is wrapped with: its id."""
    return b"im-file:" + sha256.encode()


@dataclass(slots=True)
class MigrationReport:
    """What :meth:`EncryptedBlobStorage.migrate` did."""

    total: int = 0
    sealed: int = 0  # plaintext blobs sealed, then their plaintext removed
    duplicates: int = 0  # plaintext blobs already sealed: only the plaintext was removed
    gone: int = 0  # deleted while the migration ran
    bytes: int = 0
    refused: list[str] = field(default_factory=list)  # left as they are: bytes that do not match the name

    @property
    def done(self) -> int:
        return self.sealed + self.duplicates + self.gone + len(self.refused)


class _NotItsHash(Exception):
    pass


class EncryptedBlobStorage(BlobStorage):
    """:class:`BlobStorage` in a local directory, every blob sealed (see the module docstring).

    ``chunk_bytes``: plaintext bytes per sealed chunk (the unit a range read decrypts; 16 bytes of tag
    each). ``buffer_bytes``: how much of an upload is held before it is sealed and written. ``migrate``:
    seal the plaintext blobs found at :meth:`start` in a background task (stopped by :meth:`close`,
    resumed by the next start). ``fsync``: as :class:`LocalBlobStorage`.
    """

    def __init__(
        self,
        root: Path,
        keys: FileKeys,
        *,
        chunk_bytes: int = 64 * 1024,
        buffer_bytes: int = 256 * 1024,
        fsync: bool = True,
        migrate: bool = False,
    ) -> None:
        if not MIN_CHUNK <= chunk_bytes <= MAX_CHUNK:
            raise ValueError(f"chunk_bytes must be between {MIN_CHUNK} and {MAX_CHUNK}")
        self.root = Path(root)
        self._keys = keys
        self._chunk = chunk_bytes
        self._buffer_bytes = max(buffer_bytes, chunk_bytes)
        self._fsync = fsync
        self._migrate_on_start = migrate
        self._legacy = LocalBlobStorage(self.root, fsync=fsync)
        self._tmp = self.root / "tmp"
        self._sealed = self.root / SEALED_DIR
        self._name_key: bytes | None = None
        self._migration: asyncio.Task[MigrationReport] | None = None

    # --- names ---------------------------------------------------------------------------------------------

    def name(self, sha256: str) -> str:
        """The on-disk name of the blob ``sha256``: HMAC-SHA256 under the keyring's name key."""
        if self._name_key is None:
            raise RuntimeError("EncryptedBlobStorage is not started")
        return hmac.new(self._name_key, sha256.encode(), hashlib.sha256).hexdigest()

    def path(self, sha256: str) -> Path:
        """Where the sealed blob ``sha256`` lives (whether or not it exists)."""
        if not is_sha256(sha256):
            raise BlobNotFound(sha256)
        n = self.name(sha256)
        return self._sealed / n[:2] / n

    def legacy_path(self, sha256: str) -> Path:
        """Where a plaintext blob from before encryption lives."""
        return self._legacy.path(sha256)

    # --- lifecycle -----------------------------------------------------------------------------------------

    async def _acquire(self) -> None:
        self._name_key = await self._keys.named_key(NAME_KEY)
        await self._legacy.start()  # creates <root>/tmp, removes stale staging files
        await asyncio.to_thread(self._sealed.mkdir, mode=0o700, exist_ok=True)
        if self._migrate_on_start:
            self._migration = asyncio.create_task(self._migrate_in_background(), name="blob-migration")

    async def _release(self) -> None:
        task, self._migration = self._migration, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._legacy.close()

    # --- put -----------------------------------------------------------------------------------------------

    async def put(
        self, chunks: AsyncIterable[bytes], *, max_bytes: int, inspect: Callable[[Staged], T]
    ) -> tuple[PutResult, T]:
        fd, tmp_name = await asyncio.to_thread(tempfile.mkstemp, dir=self._tmp, prefix="put-")
        staging = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                staged = await stage_sealed(
                    out,
                    staging,
                    chunks,
                    self._keys,
                    max_bytes=max_bytes,
                    chunk_bytes=self._chunk,
                    buffer_bytes=self._buffer_bytes,
                    fsync=self._fsync,
                )
            sha256, size = staged.sha256, staged.size
            verdict = await asyncio.to_thread(inspect, staged)
            created = await asyncio.to_thread(self._publish, staging, sha256)
        finally:
            with contextlib.suppress(FileNotFoundError):
                staging.unlink()
        return PutResult(sha256, size, created), verdict

    def _publish(self, staging: Path, sha256: str) -> bool:
        final, legacy = self.path(sha256), self.legacy_path(sha256)
        if final.exists():
            return False
        had_plaintext = legacy.exists()
        final.parent.mkdir(mode=0o700, exist_ok=True)
        os.replace(staging, final)
        if self._fsync:
            fsync_dir(final.parent)
        if had_plaintext:  # the same bytes were stored in the clear: now they are sealed, drop those
            with contextlib.suppress(FileNotFoundError):
                legacy.unlink()
            if self._fsync:
                fsync_dir(legacy.parent)
        return not had_plaintext

    # --- read ----------------------------------------------------------------------------------------------

    async def open(
        self, sha256: str, chunk_size: int = 256 * 1024, *, offset: int = 0, length: int | None = None
    ) -> AsyncIterator[bytes]:
        if not is_sha256(sha256):
            raise BlobNotFound(sha256)
        f, sealed = await in_thread_closing(lambda: self._open_file(sha256))
        try:
            if not sealed:
                if await asyncio.to_thread(f.read, len(MAGIC)) == MAGIC:
                    raise BlobCorrupt(f"sealed bytes under the plaintext name of {sha256}")
                f.seek(offset)
                return read_chunks(f, chunk_size, length)
            reader = await self._reader(f, sha256)
            reader.seek(offset)
            left = max(0, reader.size - offset)
            if length is not None:
                left = min(left, length)
            if left:  # authenticate the first chunk now: most damage is refused before any byte
                await asyncio.to_thread(reader.chunk, offset // reader.layout.chunk_size)
        except BaseException:
            f.close()
            raise
        return _stream(reader, chunk_size, left)

    async def _reader(self, f: BinaryIO, sha256: str) -> SealedReader:
        layout, wrapped = await asyncio.to_thread(read_layout, f)
        try:
            key = await self._keys.unwrap(wrapped, key_context(sha256))
        except (InvalidTag, ValueError, KeyUnavailable):
            raise BlobCorrupt(f"the key of blob {sha256} does not unwrap (a blob moved, or another keyring)") from None
        return SealedReader(f, layout, ChunkCipher(key, layout.chunk_size))

    def _open_file(self, sha256: str) -> tuple[BinaryIO, bool]:
        """The blob's file and whether it is sealed. Sealed name, plaintext name, then the sealed name again:
        a migration renames the sealed copy into place before it unlinks the plaintext one."""
        for path, sealed in ((self.path(sha256), True), (self.legacy_path(sha256), False), (self.path(sha256), True)):
            try:
                return path.open("rb"), sealed
            except FileNotFoundError:
                continue
        raise BlobNotFound(sha256)

    async def exists(self, sha256: str) -> bool:
        if not is_sha256(sha256):
            return False

        def check() -> bool:
            return self.path(sha256).is_file() or self.legacy_path(sha256).is_file()

        return await asyncio.to_thread(check)

    async def delete(self, sha256: str) -> bool:
        if not is_sha256(sha256):
            return False

        def remove() -> bool:
            removed = False
            for path in (self.path(sha256), self.legacy_path(sha256)):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed = True
            return removed

        return await asyncio.to_thread(remove)

    # --- the wrapped keys (master key rotation) ------------------------------------------------------------

    async def wrapped_key(self, sha256: str) -> bytes | None:
        """The wrapped key in the trailer of the sealed blob ``sha256``; None when there is no sealed blob
        (a plaintext one, or none). :class:`BlobCorrupt` when its layout is damaged."""
        path = self.path(sha256)

        def read() -> bytes | None:
            try:
                with path.open("rb") as f:
                    return read_layout(f)[1]
            except FileNotFoundError:
                return None

        return await asyncio.to_thread(read)

    async def replace_wrapped_key(self, sha256: str, old: bytes, new: bytes) -> bool:
        """Rewrite the sealed blob ``sha256`` with ``new`` as its wrapped key if its trailer still holds
        ``old`` (else False, nothing written). The blob is copied to a staging file beside it with the new
        trailer, fsynced, and renamed over the old one: readers see one file or the other, whole; a crash
        leaves the old blob (and a stale ``.rewrap-*`` staging file, removed by the next rewrap of it)."""
        path = self.path(sha256)
        sync = self._fsync

        def rewrite() -> bool:
            try:
                src = path.open("rb")
            except FileNotFoundError:
                return False
            with src:
                layout, wrapped = read_layout(src)
                if wrapped != old:
                    return False
                before = os.fstat(src.fileno())
                body = layout.file_size - TAIL.size - len(old)
                tmp = path.with_name(f".rewrap-{path.name}")
                with tmp.open("wb") as out:
                    src.seek(0)
                    left = body
                    while left:
                        piece = src.read(min(left, 1 << 20))
                        if not piece:
                            raise BlobCorrupt(f"blob {sha256} ended early while being rewritten")
                        out.write(piece)
                        left -= len(piece)
                    out.write(new + TAIL.pack(len(new)))
                    out.flush()
                    if sync:
                        os.fsync(out.fileno())
                os.chmod(tmp, 0o600)
                try:
                    now = os.stat(path)
                except FileNotFoundError:  # deleted meanwhile: do not bring it back
                    tmp.unlink()
                    return False
                if (now.st_ino, now.st_size, now.st_mtime_ns) != (before.st_ino, before.st_size, before.st_mtime_ns):
                    tmp.unlink()
                    return False
                os.replace(tmp, path)
                if sync:
                    fsync_dir(path.parent)
                return True

        return await asyncio.to_thread(rewrite)

    # --- migration of plaintext blobs ----------------------------------------------------------------------

    def plaintext_blobs(self) -> list[str]:
        """The ids of the blobs still stored in the clear (blocking: lists directories)."""
        found: list[str] = []
        for folder in sorted(self.root.iterdir()):
            if len(folder.name) != 2 or not folder.is_dir() or folder.name == SEALED_DIR:
                continue
            found.extend(p.name for p in sorted(folder.iterdir()) if is_sha256(p.name) and p.name[:2] == folder.name)
        return found

    async def migrate(self, *, progress: Callable[[MigrationReport], None] | None = None) -> MigrationReport:
        """Seal every plaintext blob, one at a time, streamed: sealed to a staging file, fsynced, renamed to
        its sealed name, then the plaintext unlinked (a crash leaves the plaintext or both, never neither).
        Safe while the storage serves reads and puts. A plaintext blob whose bytes do not hash to its name
        is left alone and reported. ``progress`` is called after each blob."""
        report = MigrationReport()
        names = await asyncio.to_thread(self.plaintext_blobs)
        report.total = len(names)
        for sha256 in names:
            await self._migrate_one(sha256, report)
            if progress is not None:
                progress(report)
        return report

    async def _migrate_one(self, sha256: str, report: MigrationReport) -> None:
        legacy = self.legacy_path(sha256)
        try:
            f = await in_thread_closing(lambda: legacy.open("rb"))
        except FileNotFoundError:
            report.gone += 1
            return
        try:
            if await asyncio.to_thread(f.read, len(MAGIC)) == MAGIC:
                report.refused.append(sha256)
                log.error("blob migration: %s holds sealed bytes under a plaintext name; left as it is", legacy)
                return
            f.seek(0)

            def check(staged: Staged) -> None:
                if staged.sha256 != sha256:
                    raise _NotItsHash(staged.sha256)

            size = os.fstat(f.fileno()).st_size
            result, _ = await self.put(read_chunks(f, self._buffer_bytes), max_bytes=size, inspect=check)
        except (_NotItsHash, BlobTooLarge):  # changed under us: not a blob this storage wrote
            report.refused.append(sha256)
            log.error("blob migration: %s does not hold the bytes its name says; left as it is", legacy)
            return
        finally:
            f.close()
        if result.created:  # unreachable unless the plaintext vanished meanwhile: it was sealed all the same
            report.sealed += 1
        elif await asyncio.to_thread(legacy.exists):  # already sealed by an earlier put: drop the plaintext
            await asyncio.to_thread(legacy.unlink, missing_ok=True)
            report.duplicates += 1
        else:
            report.sealed += 1
        report.bytes += result.size

    async def _migrate_in_background(self) -> MigrationReport:
        names = await asyncio.to_thread(self.plaintext_blobs)
        if not names:
            return MigrationReport()
        log.info("blob migration: sealing %d plaintext blobs in %s", len(names), self.root)
        last = time.monotonic()

        def progress(report: MigrationReport) -> None:
            nonlocal last
            if time.monotonic() - last >= 5.0:
                last = time.monotonic()
                log.info("blob migration: %d of %d blobs, %d bytes sealed", report.done, report.total, report.bytes)

        try:
            report = await self.migrate(progress=progress)
        except Exception:
            log.exception("blob migration stopped; the next start resumes it")
            raise
        log.info(
            "blob migration done: %d sealed, %d already sealed, %d refused (%d bytes)",
            report.sealed,
            report.duplicates,
            len(report.refused),
            report.bytes,
        )
        return report


class SealedBlobs(Protocol):
    """A blob storage whose sealed blobs carry their wrapped key in a trailer (:class:`EncryptedBlobStorage`,
    and :class:`~im.backends.blobs.s3.S3BlobStorage` with keys): what a master key rotation rewrites."""

    async def wrapped_key(self, sha256: str) -> bytes | None: ...

    async def replace_wrapped_key(self, sha256: str, old: bytes, new: bytes) -> bool: ...


class Rewrapper(Protocol):
    """What :func:`rewrap_blob_keys` needs of the keyring."""

    async def rewrap(self, wrapped: bytes, context: bytes) -> bytes | None:
        """``wrapped`` rewrapped under the current master key; None when it is under it already."""
        ...


@dataclass
class RewrapBlobsReport:
    """What :func:`rewrap_blob_keys` did: blobs listed, rewritten, already current, not sealed (plaintext
    or missing), and those whose key did not unwrap or whose file changed meanwhile (left as they are)."""

    listed: int = 0
    rewritten: int = 0
    current: int = 0
    not_sealed: int = 0
    failed: int = 0


async def rewrap_blob_keys(
    storage: SealedBlobs,
    hashes: AsyncIterable[str],
    keys: Rewrapper,
    *,
    progress: Callable[[RewrapBlobsReport], None] | None = None,
) -> RewrapBlobsReport:
    """Rewrap the key in the trailer of each sealed blob among ``hashes`` under the current master key,
    one blob at a time, while the storage serves. ``progress`` is called after each blob."""
    report = RewrapBlobsReport()
    async for sha256 in hashes:
        report.listed += 1
        try:
            wrapped = await storage.wrapped_key(sha256)
            if wrapped is None:
                report.not_sealed += 1
            else:
                new = await keys.rewrap(wrapped, key_context(sha256))
                if new is None:
                    report.current += 1
                elif await storage.replace_wrapped_key(sha256, wrapped, new):
                    report.rewritten += 1
                else:
                    report.failed += 1
                    log.warning("blob %s changed while its key was rewrapped; run the rewrap again", sha256)
        except (BlobCorrupt, BlobUnavailable, KeyUnavailable, InvalidTag, ValueError) as exc:
            report.failed += 1
            log.error("the key of blob %s was not rewrapped: %s", sha256, exc)
        if progress is not None:
            progress(report)
    return report


async def stage_sealed(
    out: BinaryIO,
    staging: Path,
    chunks: AsyncIterable[bytes],
    keys: FileKeys,
    *,
    max_bytes: int,
    chunk_bytes: int,
    buffer_bytes: int,
    fsync: bool,
) -> Staged:
    """Seal ``chunks`` into ``out`` (the file at ``staging``) under a new file key, as they come, in
    worker threads every ``buffer_bytes``; :class:`BlobTooLarge` past ``max_bytes``. The key goes wrapped
    by ``keys`` in the trailer; flushed at the end (and fsync'd with ``fsync``). The :class:`Staged` it
    returns reads the plaintext back (for the type check before publishing)."""
    key = os.urandom(KEY_BYTES)
    writer = _SealWriter(out, ChunkCipher(key, chunk_bytes), chunk_bytes)
    size = 0
    buffer = bytearray()
    async for chunk in chunks:
        if not chunk:
            continue
        size += len(chunk)
        if size > max_bytes:
            raise BlobTooLarge(f"more than {max_bytes} bytes")
        buffer += chunk
        if len(buffer) >= buffer_bytes:
            whole = len(buffer) - len(buffer) % chunk_bytes
            piece = bytes(buffer[:whole])
            del buffer[:whole]
            await asyncio.to_thread(writer.write, piece)
    sha256 = await asyncio.to_thread(writer.finish, bytes(buffer))
    wrapped = await keys.wrap(key, key_context(sha256))
    await asyncio.to_thread(writer.trailer, wrapped, fsync)
    await asyncio.to_thread(out.flush)
    layout = Layout(chunk_bytes, size, len(wrapped))

    def opener() -> BinaryIO:
        raw = SealedReader(staging.open("rb"), layout, ChunkCipher(key, chunk_bytes))
        return io.BufferedReader(raw, buffer_size=chunk_bytes)

    return Staged(sha256, size, staging, opener)


class _SealWriter:
    """Seals a stream chunk by chunk into ``out``, hashing the plaintext (blocking calls)."""

    def __init__(self, out: BinaryIO, cipher: ChunkCipher, chunk_size: int) -> None:
        self._out = out
        self._cipher = cipher
        self._chunk = chunk_size
        self._index = 0
        self._hasher = hashlib.sha256()
        out.write(HEAD.pack(MAGIC, chunk_size))

    def write(self, data: bytes, *, last: bool = False) -> None:
        """Seal ``data``: whole chunks, and with ``last`` a final shorter one (possibly empty)."""
        self._hasher.update(data)
        view = memoryview(data)
        whole = len(data) - len(data) % self._chunk
        for start in range(0, whole, self._chunk):
            self._out.write(self._cipher.seal(self._index, view[start : start + self._chunk], last=False))
            self._index += 1
        if last:
            self._out.write(self._cipher.seal(self._index, view[whole:], last=True))
        elif whole != len(data):
            raise ValueError("only the last piece may end inside a chunk")

    def finish(self, rest: bytes) -> str:
        """Seal the rest and the last chunk; the SHA-256 of all the plaintext."""
        self.write(rest, last=True)
        return self._hasher.hexdigest()

    def trailer(self, wrapped: bytes, sync: bool) -> None:
        if not 0 < len(wrapped) < 1 << 16:
            raise ValueError(f"a wrapped key of {len(wrapped)} bytes does not fit a blob trailer")
        self._out.write(wrapped + TAIL.pack(len(wrapped)))
        if sync:
            self._out.flush()
            os.fsync(self._out.fileno())


async def _stream(reader: SealedReader, chunk_size: int, left: int) -> AsyncIterator[bytes]:
    try:
        while left > 0:
            piece = await asyncio.to_thread(reader.take, min(chunk_size, left))
            if not piece:
                raise BlobCorrupt("a sealed blob ended early")
            left -= len(piece)
            yield piece
    finally:
        reader.close()
