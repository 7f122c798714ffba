"""Blob storage: content-addressed bytes, written atomically.

    BlobStorage (ABC) ── LocalBlobStorage       <root>/<sha[:2]>/<sha>, temp files in <root>/tmp
                     ├─ EncryptedBlobStorage   AES-256-GCM at rest, a key per file, keyed names
                     │                         (im.backends.blobs.encrypted; reads the local layout too)
                     └─ S3BlobStorage          a bucket of an S3-compatible object store, plain or sealed
                                               (im.backends.blobs.s3)

A blob's key is the SHA-256 of its bytes (lowercase hex). ``put`` streams the bytes to a staging file
while hashing, lets the caller inspect the staged bytes, and only then publishes the blob, so nothing
is ever visible that the caller refused."""

from __future__ import annotations

import abc
import re
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

from im.backends.lifecycle import Service

T = TypeVar("T")

_SHA256 = re.compile(r"[0-9a-f]{64}")


def is_sha256(value: str) -> bool:
    """True for a lowercase hex SHA-256 (64 characters)."""
    return _SHA256.fullmatch(value) is not None


class BlobTooLarge(Exception):
    """The stream went past ``max_bytes``; nothing was stored."""


class BlobNotFound(KeyError):
    """No blob has that hash."""


class BlobUnavailable(Exception):
    """The storage could not be reached or refused the request (an object store down, timing out or
    denying the credentials); nothing was stored. Transient as far as the caller knows: retry later."""


class BlobCorrupt(Exception):
    """The stored bytes of a blob fail their integrity check: tampered with, truncated, reordered, moved
    from another blob's place, or sealed under a key this keyring cannot unwrap. Never wrong bytes: a
    read raises this instead (before the first byte when the damage is in what ``open`` checks, else at
    the damaged chunk)."""


@dataclass(frozen=True, slots=True)
class Staged:
    """A blob written in full but not yet published: its hash, size, and a way to read it back.

    ``path`` is the staging file (its bytes may be sealed); :meth:`open` always reads the blob's own
    bytes, seekable (``opener`` when the storage transforms them on disk)."""

    sha256: str
    size: int
    path: Path
    opener: Callable[[], BinaryIO] | None = None

    def open(self) -> BinaryIO:
        return self.opener() if self.opener is not None else self.path.open("rb")


@dataclass(frozen=True, slots=True)
class PutResult:
    sha256: str
    size: int
    created: bool  # False: a blob with these bytes was already stored


class BlobStorage(Service, abc.ABC):
    """Immutable blobs keyed by the SHA-256 of their bytes.

    Guarantees:

    - ``put`` is atomic: a blob appears whole under its key, or not at all (a refused, oversized,
      failed or cancelled put leaves nothing behind).
    - Content addressing: the key is the SHA-256 of exactly the bytes stored; a blob never changes.
    - Idempotent: putting bytes that are already stored stores nothing more and returns the same key.
    - Streaming: ``put`` never holds the whole blob in memory; ``open`` reads only what it returns
      (a range reads only the part of storage that holds it).
    """

    @abc.abstractmethod
    async def put(
        self, chunks: AsyncIterable[bytes], *, max_bytes: int, inspect: Callable[[Staged], T]
    ) -> tuple[PutResult, T]:
        """Store the bytes of ``chunks``.

        Raises :class:`BlobTooLarge` as soon as more than ``max_bytes`` arrive. Once all bytes are staged,
        ``inspect`` runs (in a worker thread: it may block) and may raise to refuse the blob; its result
        is returned with the :class:`PutResult`. Anything raised leaves no blob behind.
        """

    @abc.abstractmethod
    async def open(
        self, sha256: str, chunk_size: int = 256 * 1024, *, offset: int = 0, length: int | None = None
    ) -> AsyncIterator[bytes]:
        """The blob's bytes from ``offset`` (at most ``length`` of them; None: to the end), in chunks of
        at most ``chunk_size``. An offset at or past the end yields nothing. Raises :class:`BlobNotFound`
        (before any byte) when absent, :class:`BlobCorrupt` when the stored bytes fail a check,
        :class:`BlobUnavailable` (before any byte, or while streaming) when the storage cannot be read."""

    @abc.abstractmethod
    async def exists(self, sha256: str) -> bool: ...

    @abc.abstractmethod
    async def delete(self, sha256: str) -> bool:
        """Remove a blob (for garbage collection); False when it was absent."""
