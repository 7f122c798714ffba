"""The file service: upload (stream -> blob + metadata), the read rule, downloads.

Order of writes: the blob is published first, the metadata row second. A crash in between leaves an
orphan blob that the next upload of the same bytes reuses; metadata never points at a missing blob.
"""

from __future__ import annotations

import logging
import math
import time
import unicodedata
from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from PIL import Image

from im.backends.blobs import (
    BlobCorrupt,
    BlobNotFound,
    BlobStorage,
    BlobTooLarge,
    BlobUnavailable,
    Staged,
    is_sha256,
)
from im.backends.files import FileStore
from im.backends.rate_limit import Hit, RateLimiter, Rule
from im.files.sniff import sniff
from im.model.errors import ErrorCode, ImError
from im.model.files import FileMeta
from im.observability.metrics import METRICS
from im.throttled_log import ThrottledLog

MAX_NAME_LENGTH = 255

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FileInfo:
    """A file as one user sees it: the metadata, and the name they uploaded it under (None if they did not)."""

    meta: FileMeta
    name: str | None


def clean_name(name: str | None) -> str:
    """A display file name: the last path component, without control characters, at most 255 characters."""
    base = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    kept = "".join(ch for ch in base if unicodedata.category(ch)[0] != "C").strip()
    if kept in ("", ".", ".."):
        return "file"
    return kept[:MAX_NAME_LENGTH]


def _over_quota(message: str, wait: float) -> ImError:
    seconds = math.ceil(wait)
    return ImError(ErrorCode.RATE_LIMITED, f"{message}; retry in {seconds} s", retry_after=seconds)


def _not_found(file_id: str) -> ImError:
    # The same answer for "no such file" and "not yours to read": knowing an id or a hash grants nothing.
    return ImError(ErrorCode.NOT_FOUND, f"no file {file_id[:80]!r}")


class FileService:
    """Uploads and reads, enforcing the read rule of :class:`FileStore` (uploader, or member of a
    conversation the file was sent to). Raises ImError to refuse."""

    def __init__(
        self,
        blobs: BlobStorage,
        store: FileStore,
        *,
        max_upload_bytes: int = 20 * 1024 * 1024,
        allowed_types: Sequence[str] = (),
        max_image_pixels: int = 50_000_000,
        clock: Callable[[], float] = time.time,
        limiter: RateLimiter | None = None,
        upload_bytes_per_day: int = 1024**3,
        upload_files_per_day: int = 1000,
    ) -> None:
        self.blobs = blobs
        self.store = store
        self.max_upload_bytes = max_upload_bytes
        self._allowed = tuple(allowed_types)
        self._max_pixels = max_image_pixels
        self._clock = clock
        #: The daily upload quota per user (None: none), a sliding day: a GCRA budget refilling over 24 h.
        self._limiter = limiter
        self._quota_bytes = Rule("upload-bytes", upload_bytes_per_day, 86400.0)
        self._quota_files = Rule("upload-files", upload_files_per_day, 86400.0)
        #: Reads refused or cut short because the stored bytes are missing or damaged (one line per window).
        self._damaged = ThrottledLog(log, "damaged file reads", level=logging.ERROR)
        #: Uploads and reads refused or cut short because the blob storage could not be reached.
        self._unavailable = ThrottledLog(log, "file storage unavailable", level=logging.ERROR)
        # Pillow's own bomb guard (process-wide) follows ours: it refuses at twice this in Image.open.
        Image.MAX_IMAGE_PIXELS = max_image_pixels

    async def start(self) -> None:
        await self.store.start()
        await self.blobs.start()

    async def close(self) -> None:
        await self.blobs.close()
        await self.store.close()

    async def upload(
        self, uid: int, chunks: AsyncIterable[bytes], *, name: str | None, declared_type: str | None
    ) -> tuple[FileInfo, bool]:
        """Store an upload; returns the file as ``uid`` sees it and whether ``uid`` is a new uploader of
        it (False: they had uploaded the same bytes before). Whether someone else had is not revealed.

        Quota (``rate_limited`` with a retry time): every attempt takes one of the user's files per day,
        before any byte is read (a user with no byte left is refused then too); a stored upload takes its
        size from the bytes per day, and one that does not fit is refused without being recorded.
        """
        if self._limiter is not None:
            waits = await self._limiter.check([Hit(self._quota_files, str(uid)), Hit(self._quota_bytes, str(uid))])
            if max(waits):
                what = "files" if waits[0] else "bytes"
                METRICS.rate_refused(f"upload-{what}")
                raise _over_quota(f"daily upload quota of {what} reached", max(waits))

        def inspect(staged: Staged) -> FileMeta:
            if staged.size == 0:
                raise ImError(ErrorCode.INVALID, "the file is empty")
            with staged.open() as f:
                found = sniff(f, declared=declared_type, allowed=self._allowed, max_pixels=self._max_pixels)
            return FileMeta(
                file_id=staged.sha256,
                sha256=staged.sha256,
                size=staged.size,
                content_type=found.content_type,
                width=found.width,
                height=found.height,
                created_at=now_ms,
            )

        now_ms = int(self._clock() * 1000)
        try:
            _, meta = await self.blobs.put(chunks, max_bytes=self.max_upload_bytes, inspect=inspect)
        except BlobTooLarge:
            raise ImError(ErrorCode.TOO_LARGE, f"files are limited to {self.max_upload_bytes} bytes") from None
        except BlobUnavailable as e:
            self._unavailable.hit(f"upload refused: {e}")
            raise ImError(ErrorCode.UNAVAILABLE, "file storage is unavailable, retry later") from None
        if self._limiter is not None and meta.size > 1:  # one byte was taken above
            [wait] = await self._limiter.check([Hit(self._quota_bytes, str(uid), meta.size - 1)])
            if wait:  # the blob stays unreferenced, like an upload cut short; the same bytes reuse it
                METRICS.rate_refused("upload-bytes")
                raise _over_quota("this file does not fit in the daily upload quota of bytes", wait)
        stored, stored_name, new = await self.store.add_upload(meta, uid, clean_name(name), now_ms)
        return FileInfo(stored, stored_name), new

    async def info(self, uid: int, file_id: str) -> FileInfo:
        """The file, if ``uid`` may read it; else ``not_found`` (also for unknown ids)."""
        found = await self.store.lookup(uid, file_id) if is_sha256(file_id) else None
        if found is None:
            raise _not_found(file_id)
        return FileInfo(*found)

    async def by_hash(self, uid: int, sha256: str) -> FileInfo:
        """The file with these bytes, only if ``uid`` may already read it. To gain access by the hash, a
        client must upload the bytes (which proves it has them)."""
        return await self.info(uid, sha256.lower())  # the file id is the hash

    async def read(self, info: FileInfo, *, offset: int = 0, length: int | None = None) -> AsyncIterator[bytes]:
        """The bytes of a file found by :meth:`info` (which checked access), from ``offset``, at most
        ``length`` of them (None: to the end).

        Refused before any byte (``unavailable``) when the bytes are missing or fail the storage's
        integrity check where it checks at open; damage found later ends the stream with an error (the
        reader sees a short body, never wrong bytes). Both are logged."""
        try:
            chunks = await self.blobs.open(info.meta.sha256, offset=offset, length=length)
        except BlobNotFound:
            self._damaged.hit(f"file {info.meta.file_id}: its bytes are missing from storage")
            raise ImError(ErrorCode.UNAVAILABLE, "the file's bytes are missing from storage") from None
        except BlobCorrupt as e:
            self._damaged.hit(f"file {info.meta.file_id}: {e}")
            raise ImError(ErrorCode.UNAVAILABLE, "the file's stored bytes fail the integrity check") from None
        except BlobUnavailable as e:
            self._unavailable.hit(f"file {info.meta.file_id}: {e}")
            raise ImError(ErrorCode.UNAVAILABLE, "file storage is unavailable, retry later") from None
        return self._watched(chunks, info.meta.file_id)

    async def _watched(self, chunks: AsyncIterator[bytes], file_id: str) -> AsyncIterator[bytes]:
        try:
            async for chunk in chunks:
                yield chunk
        except BlobCorrupt as e:
            self._damaged.hit(f"file {file_id}: download cut short: {e}")
            raise
        except BlobUnavailable as e:
            self._unavailable.hit(f"file {file_id}: download cut short: {e}")
            raise
        finally:
            close = getattr(chunks, "aclose", None)
            if close is not None:
                await close()

    async def can_read(self, uid: int, file_id: str) -> bool:
        """The file exists and ``uid`` uploaded it or is a member of a conversation it was sent to."""
        return is_sha256(file_id) and await self.store.lookup(uid, file_id) is not None

    async def can_attach(self, uid: int, file_id: str) -> bool:
        """``uid`` may send a message with this file: it exists and they may read it."""
        return await self.can_read(uid, file_id)

    async def attachable(self, pairs: Sequence[tuple[int, str]]) -> set[tuple[int, str]]:
        """Batch :meth:`can_attach` for the send path (``im.core.committer.FileAccess``)."""
        return await self.store.readable([(uid, fid) for uid, fid in pairs if is_sha256(fid)])
