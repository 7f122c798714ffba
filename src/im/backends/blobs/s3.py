"""``S3BlobStorage``: blobs in a bucket of an S3-compatible object store (AWS S3, SeaweedFS, MinIO, ...), so
that API nodes on several machines serve the same files. One kept asyncio client (``obstore``) per storage.

Keys in the bucket::

    <prefix><sha[:2]>/<sha>          a blob as it was uploaded
    <prefix>sealed/<n[:2]>/<n>       a sealed blob (with ``keys``; format in im.backends.blobs.sealed),
                                     n = HMAC-SHA256 of the id under the keyring's "blob-names" key

- Put: the upload streams to a local staging file (``<staging_dir>/put-*``) while it is hashed (sealed
  chunk by chunk first when the storage has keys: no plaintext of an upload touches the disk), and stops
  at ``max_bytes``. ``inspect`` reads that file; then the blob is published. A HEAD finds bytes already
  stored: nothing is uploaded (``created`` False). Else, up to ``single_put_bytes``, one PUT with
  ``If-None-Match: *`` (a conditional create: of two concurrent puts of the same bytes one creates the
  object, the other gets 412 and reports ``created`` False); the request body is held in memory for the
  PUT. Larger blobs go up as a multipart upload streamed from the staging file in parts of ``part_bytes``,
  which S3 cannot make conditional: two concurrent first puts of the same large bytes both upload and
  the last to complete stays (the same bytes; when sealed, another valid sealing of them).
- Why a local staging file rather than a temporary key in the bucket: ``inspect`` needs a seekable read of
  the whole upload before anything is visible, and S3 has no rename (a copy doubles the traffic, and a
  crash would leave orphans in the bucket). The file is bounded by ``files.max_upload_bytes`` and removed
  whatever happens; files left by a crash are removed at the next start (an hour old).
- Read: a HEAD (size, ETag), then ranged GETs of at most ``read_window_bytes``, each read whole before its
  bytes are returned: a download holds one window in memory, and a request's time does not depend on the
  client's speed. Every GET carries ``If-Match`` with the ETag of the HEAD: a blob replaced while it is
  read (the multipart race above) ends the stream with :class:`BlobUnavailable`, never mixed bytes.
- Errors of the store (unreachable, credentials refused, 5xx after the retries, timeouts) raise
  :class:`BlobUnavailable` with the store's first line of explanation; a missing object is
  :class:`BlobNotFound`. :meth:`start` lists one key of the bucket: a missing bucket, wrong credentials or
  an unreachable endpoint fail the start with one line saying which.
- Delete: a HEAD then a DELETE (S3's DELETE does not say whether the object existed).

- Master key rotation (``im keys rewrap``): :meth:`S3BlobStorage.replace_wrapped_key` rewrites a sealed
  object with its new trailer: its body is copied to a staging file (ranged GETs pinned to its ETag), and
  the whole object is PUT with ``If-Match`` that ETag (held in memory for the request), so a blob deleted
  or replaced meanwhile is left as it is.

Not here (the local :class:`~im.backends.blobs.encrypted.EncryptedBlobStorage` does it): sealing plaintext
blobs already in the bucket (``files.migrate_plaintext`` has no effect on S3; files stored in the clear
stay readable only with ``files.encrypt`` off).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import io
import os
import tempfile
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, NoReturn, TypeVar, cast

import obstore
from obstore.exceptions import AlreadyExistsError, BaseError, PreconditionError
from obstore.store import S3Store

from im.backends.blobs import (
    BlobCorrupt,
    BlobNotFound,
    BlobStorage,
    BlobUnavailable,
    PutResult,
    Staged,
    is_sha256,
)
from im.backends.blobs.encrypted import NAME_KEY, SEALED_DIR, FileKeys, _stream, key_context, stage_sealed
from im.backends.blobs.local import stage_plain
from im.backends.blobs.sealed import (
    MAX_CHUNK,
    MIN_CHUNK,
    TAIL,
    ChunkCipher,
    SealedReader,
    read_layout,
)

if TYPE_CHECKING:
    from obstore import GetOptions

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class S3Settings:
    """Where the bucket is and how to talk to it. Credentials left None are taken from the environment
    (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, and the other variables the AWS SDKs read)."""

    bucket: str
    #: None: AWS S3 itself (from ``region``); else the store's URL, e.g. ``http://127.0.0.1:8333``.
    endpoint: str | None = None
    region: str = "us-east-1"
    #: Prepended to every key (``im/`` keeps the blobs in a folder of a shared bucket).
    prefix: str = ""
    access_key_id: str | None = None
    secret_access_key: str | None = None
    #: Allow a plain-HTTP endpoint (a store on the same machine or a private network).
    allow_http: bool = False
    connect_timeout: float = 5.0
    #: The longest one request may take, its body included (a read window, a PUT, a part).
    request_timeout: float = 60.0
    #: Retries of a failed request (connection errors, 5xx, timeouts of reads) before it is given up.
    max_retries: int = 3

    def describe(self) -> str:
        return f"s3://{self.bucket}/{self.prefix} at {self.endpoint or 'AWS ' + self.region}"

    def client(self) -> S3Store:
        """The store client: one per storage, kept for its life (it pools its connections)."""
        config: dict[str, Any] = {"region": self.region}
        if self.endpoint is not None:
            config["endpoint"] = self.endpoint
            config["virtual_hosted_style_request"] = False
        if self.access_key_id is not None:
            config["access_key_id"] = self.access_key_id
        if self.secret_access_key is not None:
            config["secret_access_key"] = self.secret_access_key
        return S3Store(
            self.bucket,
            config=config,  # type: ignore[arg-type]
            client_options={
                "allow_http": self.allow_http,
                "connect_timeout": timedelta(seconds=self.connect_timeout),
                "timeout": timedelta(seconds=self.request_timeout),
            },
            retry_config={
                "max_retries": self.max_retries,
                "retry_timeout": timedelta(seconds=self.request_timeout * (self.max_retries + 1)),
                "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=2)},
            },
        )


def _reason(exc: BaseException) -> str:
    """The first line of an obstore error (the rest is a debug dump)."""
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


#: What a failed first request most likely means, by what its reason contains.
_START_HINTS = (
    ("403 Forbidden", " (the store refused the credentials: files.s3.access_key_id/secret_access_key or AWS_*)"),
    ("404 Not Found", " (no such bucket: create it, or fix files.s3.bucket)"),
    ("error sending request", " (nothing answers at the endpoint: is the store running? files.s3.endpoint)"),
)


def _unavailable(exc: BaseException, what: str) -> NoReturn:
    raise BlobUnavailable(f"object store: {what}: {_reason(exc)}") from None


class S3BlobStorage(BlobStorage):
    """:class:`BlobStorage` in a bucket of an S3-compatible store; sealed when given ``keys`` (see the
    module docstring).

    ``staging_dir``: local directory for uploads being received (one file per put in progress, at most
    ``max_bytes`` each). ``chunk_bytes``, ``buffer_bytes``: as :class:`EncryptedBlobStorage` (sealed) and
    :class:`LocalBlobStorage`. ``single_put_bytes``: the largest blob sent in one conditional PUT (held in
    memory for it); above, multipart in parts of ``part_bytes`` (at least 5 MiB, S3's minimum), two at a
    time. ``read_window_bytes``: the bytes of one ranged GET of a read.
    """

    def __init__(
        self,
        settings: S3Settings,
        staging_dir: Path,
        *,
        keys: FileKeys | None = None,
        chunk_bytes: int = 64 * 1024,
        buffer_bytes: int = 256 * 1024,
        single_put_bytes: int = 8 * 1024 * 1024,
        part_bytes: int = 8 * 1024 * 1024,
        read_window_bytes: int = 1024 * 1024,
    ) -> None:
        if not MIN_CHUNK <= chunk_bytes <= MAX_CHUNK:
            raise ValueError(f"chunk_bytes must be between {MIN_CHUNK} and {MAX_CHUNK}")
        if part_bytes < 5 * 1024 * 1024:
            raise ValueError("part_bytes must be at least 5 MiB (the S3 minimum part size)")
        self.settings = settings
        self._staging = Path(staging_dir)
        self._keys = keys
        self._chunk = chunk_bytes
        self._buffer_bytes = max(buffer_bytes, chunk_bytes)
        self._single_put = single_put_bytes
        self._part = part_bytes
        self._window = max(read_window_bytes, 4096)
        self._store: S3Store | None = None
        self._name_key: bytes | None = None

    # --- keys in the bucket ------------------------------------------------------------------------------

    def key(self, sha256: str) -> str:
        """The object key of the blob ``sha256`` (its sealed one when the storage has keys)."""
        if not is_sha256(sha256):
            raise BlobNotFound(sha256)
        prefix = self.settings.prefix
        if self._keys is None:
            return f"{prefix}{sha256[:2]}/{sha256}"
        if self._name_key is None:
            raise RuntimeError("S3BlobStorage is not started")
        name = hmac.new(self._name_key, sha256.encode(), hashlib.sha256).hexdigest()
        return f"{prefix}{SEALED_DIR}/{name[:2]}/{name}"

    @property
    def sealed(self) -> bool:
        """True when blobs are sealed (the storage has keys)."""
        return self._keys is not None

    def _client(self) -> S3Store:
        if self._store is None:
            raise RuntimeError("S3BlobStorage is not started")
        return self._store

    # --- lifecycle ---------------------------------------------------------------------------------------

    async def _acquire(self) -> None:
        await asyncio.to_thread(_prepare_staging, self._staging)
        store = self.settings.client()
        try:  # one page of one key: a missing bucket, refused credentials or no store fail here, in one line
            async for _ in obstore.list(store, prefix=self.settings.prefix or None, chunk_size=1):
                break
        except BaseError as exc:
            reason = _reason(exc)
            hint = next((h for code, h in _START_HINTS if code in reason), "")
            raise BlobUnavailable(f"object store: cannot list {self.settings.describe()}{hint}: {reason}") from None
        if self._keys is not None:
            self._name_key = await self._keys.named_key(NAME_KEY)
        self._store = store

    async def _release(self) -> None:
        self._store = None

    # --- put -----------------------------------------------------------------------------------------------

    async def put(
        self, chunks: AsyncIterable[bytes], *, max_bytes: int, inspect: Callable[[Staged], T]
    ) -> tuple[PutResult, T]:
        store = self._client()
        fd, name = await asyncio.to_thread(tempfile.mkstemp, dir=self._staging, prefix="put-")
        staging = Path(name)
        try:
            with os.fdopen(fd, "wb") as out:
                if self._keys is None:
                    sha256, size = await stage_plain(
                        out, chunks, max_bytes=max_bytes, buffer_bytes=self._buffer_bytes, fsync=False
                    )
                    staged = Staged(sha256, size, staging)
                else:
                    staged = await stage_sealed(
                        out,
                        staging,
                        chunks,
                        self._keys,
                        max_bytes=max_bytes,
                        chunk_bytes=self._chunk,
                        buffer_bytes=self._buffer_bytes,
                        fsync=False,
                    )
                    sha256, size = staged.sha256, staged.size
            verdict = await asyncio.to_thread(inspect, staged)
            created = await self._publish(store, self.key(sha256), staging)
        finally:
            with contextlib.suppress(FileNotFoundError):
                staging.unlink()
        return PutResult(sha256, size, created), verdict

    async def _publish(self, store: S3Store, key: str, staging: Path) -> bool:
        if await self._head(store, key) is not None:
            return False
        size = (await asyncio.to_thread(staging.stat)).st_size
        try:
            if size <= self._single_put:
                await obstore.put_async(store, key, staging, mode="create", use_multipart=False)
            else:
                await obstore.put_async(
                    store, key, staging, use_multipart=True, chunk_size=self._part, max_concurrency=2
                )
        except (AlreadyExistsError, PreconditionError):  # a concurrent put of the same bytes created it
            return False
        except BaseError as exc:
            _unavailable(exc, f"cannot store {key}")
        return True

    # --- read ----------------------------------------------------------------------------------------------

    async def _head(self, store: S3Store, key: str) -> tuple[int, str | None] | None:
        """The size and ETag of ``key``; None when it is absent."""
        try:
            meta = await obstore.head_async(store, key)
        except FileNotFoundError:
            return None
        except BaseError as exc:
            _unavailable(exc, f"cannot look up {key}")
        return meta["size"], meta["e_tag"]

    async def open(
        self, sha256: str, chunk_size: int = 256 * 1024, *, offset: int = 0, length: int | None = None
    ) -> AsyncIterator[bytes]:
        store = self._client()
        key = self.key(sha256)
        found = await self._head(store, key)
        if found is None:
            raise BlobNotFound(sha256)
        size, etag = found
        if self._keys is not None:
            return await self._open_sealed(store, key, sha256, size, etag, chunk_size, offset, length)
        end = size if length is None else min(size, offset + length)
        return self._windows(store, key, etag, offset, end, chunk_size)

    async def _windows(
        self, store: S3Store, key: str, etag: str | None, pos: int, end: int, chunk_size: int
    ) -> AsyncIterator[bytes]:
        while pos < end:
            stop = min(end, pos + self._window)
            options: GetOptions = {"range": (pos, stop)}
            if etag is not None:
                options["if_match"] = etag
            try:
                data = await (await obstore.get_async(store, key, options=options)).bytes_async()
            except FileNotFoundError:
                raise BlobUnavailable(f"object store: {key} was deleted while it was read") from None
            except PreconditionError:
                raise BlobUnavailable(f"object store: {key} was replaced while it was read; retry") from None
            except BaseError as exc:
                _unavailable(exc, f"cannot read {key}")
            if len(data) != stop - pos:
                raise BlobCorrupt(f"{key}: a range read returned {len(data)} bytes, not {stop - pos}")
            view = memoryview(data)
            for start in range(0, len(view), chunk_size):
                yield bytes(view[start : start + chunk_size])
            pos = stop

    async def _open_sealed(
        self,
        store: S3Store,
        key: str,
        sha256: str,
        size: int,
        etag: str | None,
        chunk_size: int,
        offset: int,
        length: int | None,
    ) -> AsyncIterator[bytes]:
        assert self._keys is not None
        f = cast(BinaryIO, _ObjectFile(store, key, size, etag, self._window))
        try:
            layout, wrapped = await asyncio.to_thread(read_layout, f)
            try:
                blob_key = await self._keys.unwrap(wrapped, key_context(sha256))
            except Exception:  # InvalidTag, ValueError, KeyUnavailable: as EncryptedBlobStorage
                raise BlobCorrupt(
                    f"the key of blob {sha256} does not unwrap (a blob moved, or another keyring)"
                ) from None
            reader = SealedReader(f, layout, ChunkCipher(blob_key, layout.chunk_size))
            reader.seek(offset)
            left = max(0, reader.size - offset)
            if length is not None:
                left = min(left, length)
            if left:  # authenticate the first chunk now: most damage is refused before any byte
                await asyncio.to_thread(reader.chunk, offset // layout.chunk_size)
        except BaseException:
            f.close()
            raise
        return _stream(reader, chunk_size, left)

    async def exists(self, sha256: str) -> bool:
        return is_sha256(sha256) and await self._head(self._client(), self.key(sha256)) is not None

    async def delete(self, sha256: str) -> bool:
        if not is_sha256(sha256):
            return False
        store, key = self._client(), self.key(sha256)
        if await self._head(store, key) is None:
            return False
        try:
            await obstore.delete_async(store, key)
        except BaseError as exc:
            _unavailable(exc, f"cannot delete {key}")
        return True

    # --- the wrapped keys (master key rotation) ------------------------------------------------------------

    async def wrapped_key(self, sha256: str) -> bytes | None:
        """The wrapped key in the trailer of the sealed blob ``sha256``; None when there is none (no such
        blob, or the storage does not seal). :class:`BlobCorrupt` when its layout is damaged."""
        if self._keys is None or not is_sha256(sha256):
            return None
        store, key = self._client(), self.key(sha256)
        found = await self._head(store, key)
        if found is None:
            return None
        f = cast(BinaryIO, _ObjectFile(store, key, found[0], found[1], self._window))
        with f:
            return (await asyncio.to_thread(read_layout, f))[1]

    async def replace_wrapped_key(self, sha256: str, old: bytes, new: bytes) -> bool:
        """Rewrite the sealed blob ``sha256`` with ``new`` as its wrapped key if its trailer still holds
        ``old`` (else False, nothing written); see the module docstring."""
        if self._keys is None or not is_sha256(sha256):
            return False
        store, key = self._client(), self.key(sha256)
        found = await self._head(store, key)
        if found is None:
            return False
        size, etag = found
        if etag is None:  # every S3 store sends one; without it the rewrite could not be made conditional
            raise BlobUnavailable(f"object store: {key} has no ETag; it cannot be rewritten safely")
        fd, name = await asyncio.to_thread(tempfile.mkstemp, dir=self._staging, prefix="put-rewrap-")
        staging = Path(name)
        window = self._window

        def copy_with_new_trailer() -> bool:
            with os.fdopen(fd, "wb") as out, cast(BinaryIO, _ObjectFile(store, key, size, etag, window)) as f:
                layout, wrapped = read_layout(f)
                if wrapped != old:
                    return False
                f.seek(0)
                left = layout.file_size - TAIL.size - len(old)
                while left:
                    piece = f.read(min(left, window))
                    if not piece:
                        raise BlobCorrupt(f"blob {sha256} ended early while being rewritten")
                    out.write(piece)
                    left -= len(piece)
                out.write(new + TAIL.pack(len(new)))
            return True

        try:
            if not await asyncio.to_thread(copy_with_new_trailer):
                return False
            try:
                await obstore.put_async(store, key, staging, mode={"e_tag": etag}, use_multipart=False)
            except (PreconditionError, FileNotFoundError):  # replaced or deleted meanwhile: leave it
                return False
            except BaseError as exc:
                _unavailable(exc, f"cannot rewrite {key}")
            return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                staging.unlink()


class _ObjectFile(io.RawIOBase):
    """An object read as a seekable file (blocking: run it in a worker thread), for the sealed format's
    reader: ranged GETs of ``window`` bytes pinned to ``etag``, the last window kept."""

    def __init__(self, store: S3Store, key: str, size: int, etag: str | None, window: int) -> None:
        super().__init__()
        self._store = store
        self._key = key
        self._size = size
        self._etag = etag
        self._window = window
        self._pos = 0
        self._cached: tuple[int, bytes] = (0, b"")

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        want = min(len(buffer), self._size - self._pos)
        if want <= 0:
            return 0
        start, data = self._cached
        if not start <= self._pos < start + len(data):
            start, data = self._pos, self._fetch(self._pos, min(self._size, self._pos + max(want, self._window)))
            self._cached = (start, data)
        piece = data[self._pos - start : self._pos - start + want]
        buffer[: len(piece)] = piece
        self._pos += len(piece)
        return len(piece)

    def read(self, size: int = -1) -> bytes:
        """Exactly ``size`` bytes unless the object ends first (``SealedReader`` reads a chunk at once)."""
        want = self._size - self._pos if size is None or size < 0 else size
        out = bytearray()
        while len(out) < want:
            piece = bytearray(want - len(out))
            n = self.readinto(piece)
            if not n:
                break
            out += piece[:n]
        return bytes(out)

    def _fetch(self, start: int, stop: int) -> bytes:
        options: GetOptions = {"range": (start, stop)}
        if self._etag is not None:
            options["if_match"] = self._etag
        try:
            return bytes(obstore.get(self._store, self._key, options=options).bytes())
        except FileNotFoundError:
            raise BlobUnavailable(f"object store: {self._key} was deleted while it was read") from None
        except PreconditionError:
            raise BlobUnavailable(f"object store: {self._key} was replaced while it was read; retry") from None
        except BaseError as exc:
            _unavailable(exc, f"cannot read {self._key}")


def _prepare_staging(staging: Path, stale_after: float = 3600.0) -> None:
    staging.mkdir(parents=True, exist_ok=True, mode=0o700)
    cutoff = time.time() - stale_after  # staging files of puts cut short by a crash, never one in progress
    for entry in staging.iterdir():
        with contextlib.suppress(OSError):
            if entry.name.startswith("put-") and entry.stat().st_mtime < cutoff:
                entry.unlink()
