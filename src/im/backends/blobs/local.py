"""``LocalBlobStorage``: blobs as files in a directory, ``<root>/<sha[:2]>/<sha>``, published by rename."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import tempfile
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from im.backends.blobs import BlobNotFound, BlobStorage, BlobTooLarge, PutResult, Staged, is_sha256
from im.backends.durable import fsync_dir

T = TypeVar("T")


class LocalBlobStorage(BlobStorage):
    """:class:`BlobStorage` in a local directory.

    A put writes ``<root>/tmp/<random>`` while hashing (flushing every ``buffer_bytes``), fsyncs it,
    runs ``inspect``, then renames it to ``<root>/<sha[:2]>/<sha>`` (``os.replace``: atomic on POSIX, and
    a concurrent put of the same bytes renames identical contents) and fsyncs the directory. The staging
    directory sits under the root so that the rename never crosses file systems.
    """

    def __init__(self, root: Path, *, buffer_bytes: int = 256 * 1024, fsync: bool = True) -> None:
        self.root = Path(root)
        self._tmp = self.root / "tmp"
        self._buffer_bytes = buffer_bytes
        self._fsync = fsync

    def path(self, sha256: str) -> Path:
        if not is_sha256(sha256):
            raise BlobNotFound(sha256)
        return self.root / sha256[:2] / sha256

    async def _acquire(self) -> None:
        await asyncio.to_thread(self._prepare)

    def _prepare(self, stale_after: float = 3600.0) -> None:
        self._tmp.mkdir(parents=True, exist_ok=True)
        # Staging files of puts cut short by a crash; an hour old, so never one still being written.
        cutoff = time.time() - stale_after
        for entry in self._tmp.iterdir():
            with contextlib.suppress(OSError):
                if entry.stat().st_mtime < cutoff:
                    entry.unlink()

    async def put(
        self, chunks: AsyncIterable[bytes], *, max_bytes: int, inspect: Callable[[Staged], T]
    ) -> tuple[PutResult, T]:
        fd, name = await asyncio.to_thread(tempfile.mkstemp, dir=self._tmp, prefix="put-")
        staging = Path(name)
        try:
            with os.fdopen(fd, "wb") as out:
                sha256, size = await stage_plain(
                    out, chunks, max_bytes=max_bytes, buffer_bytes=self._buffer_bytes, fsync=self._fsync
                )
            staged = Staged(sha256, size, staging)
            verdict = await asyncio.to_thread(inspect, staged)
            created = await asyncio.to_thread(self._publish, staged)
        finally:
            # Published blobs were renamed away; anything still here was refused or cut short.
            with contextlib.suppress(FileNotFoundError):
                staging.unlink()
        return PutResult(staged.sha256, staged.size, created), verdict

    def _publish(self, staged: Staged) -> bool:
        final = self.path(staged.sha256)
        if final.exists():
            return False
        final.parent.mkdir(exist_ok=True)
        os.replace(staged.path, final)
        if self._fsync:
            fsync_dir(final.parent)
        return True

    async def open(
        self, sha256: str, chunk_size: int = 256 * 1024, *, offset: int = 0, length: int | None = None
    ) -> AsyncIterator[bytes]:
        path = self.path(sha256)
        try:
            f = await in_thread_closing(lambda: path.open("rb"))
        except FileNotFoundError:
            raise BlobNotFound(sha256) from None
        if offset:
            f.seek(offset)
        return read_chunks(f, chunk_size, length)

    async def exists(self, sha256: str) -> bool:
        return is_sha256(sha256) and await asyncio.to_thread(self.path(sha256).is_file)

    async def delete(self, sha256: str) -> bool:
        if not is_sha256(sha256):
            return False
        try:
            await asyncio.to_thread(self.path(sha256).unlink)
        except FileNotFoundError:
            return False
        return True


async def stage_plain(
    out: BinaryIO, chunks: AsyncIterable[bytes], *, max_bytes: int, buffer_bytes: int, fsync: bool
) -> tuple[str, int]:
    """Write ``chunks`` to ``out`` as they come, hashing them (SHA-256), in a worker thread every
    ``buffer_bytes``; :class:`BlobTooLarge` past ``max_bytes``. Flushed at the end (and fsync'd with
    ``fsync``). Returns the hash and the size: what every storage stages before it publishes."""
    hasher = hashlib.sha256()
    size = 0
    pending: list[bytes] = []
    pending_bytes = 0
    async for chunk in chunks:
        if not chunk:
            continue
        size += len(chunk)
        if size > max_bytes:
            raise BlobTooLarge(f"more than {max_bytes} bytes")
        pending.append(chunk)
        pending_bytes += len(chunk)
        if pending_bytes >= buffer_bytes:
            await asyncio.to_thread(_write, out, hasher, pending)
            pending, pending_bytes = [], 0
    await asyncio.to_thread(_write, out, hasher, pending, True, fsync)
    return hasher.hexdigest(), size


def _write(out: BinaryIO, hasher: hashlib._Hash, pieces: list[bytes], flush: bool = False, sync: bool = False) -> None:
    for piece in pieces:
        hasher.update(piece)
        out.write(piece)
    if flush or sync:
        out.flush()
    if sync:
        os.fsync(out.fileno())


async def in_thread_closing(open_file: Callable[[], T]) -> T:
    """``open_file()`` in a worker thread, returning what it opened (something with ``close``); if the
    caller is cancelled meanwhile, what the thread opens is closed when it is done, not leaked."""
    job = asyncio.ensure_future(asyncio.to_thread(open_file))
    try:
        return await asyncio.shield(job)
    except asyncio.CancelledError:
        job.add_done_callback(_close_result)
        raise


def _close_result(job: asyncio.Future[Any]) -> None:
    if not job.cancelled() and job.exception() is None:
        result = job.result()
        (result[0] if isinstance(result, tuple) else result).close()


async def read_chunks(f: BinaryIO, chunk_size: int, length: int | None = None) -> AsyncIterator[bytes]:
    """``f`` from where it stands, at most ``length`` bytes (None: to the end), in chunks; closes ``f``."""
    left = -1 if length is None else length
    try:
        while left:
            chunk = await asyncio.to_thread(f.read, chunk_size if left < 0 else min(chunk_size, left))
            if not chunk:
                break
            left -= len(chunk) if left > 0 else 0
            yield chunk
    finally:
        f.close()
