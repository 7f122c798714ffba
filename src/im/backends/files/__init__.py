"""File metadata and the read rule: the :class:`FileStore` interface and its data."""

from __future__ import annotations

import abc
from collections.abc import Sequence

from im.backends.lifecycle import Service
from im.model.files import FileMeta


class FileStore(Service, abc.ABC):
    """Who uploaded which file, and which conversations it was sent to.

    Guarantees:

    - One row per file; ``file_id`` and ``sha256`` map 1:1. The first upload's metadata is kept
      (every later upload of the same bytes computes the same values anyway).
    - Uploaders are a set per file; re-uploading adds nothing and keeps the first name given.
    - The read rule is evaluated at call time against current membership: a user may read a file when
      the file exists and they uploaded it, or they are now a member of a conversation it was sent to
      (a ``file_refs`` row, written by the chat store when the message commits). Leaving the conversation
      takes the right away (unless they uploaded the same bytes themselves).
    - Unknown files and files the user may not read look the same to every method: ``None``/``False``.
    """

    @abc.abstractmethod
    async def add_upload(self, meta: FileMeta, uid: int, name: str, now: int) -> tuple[FileMeta, str, bool]:
        """Record that ``uid`` uploaded the file (creating its row when new), atomically.

        Returns the stored metadata, the name stored for this uploader, and whether ``uid`` is a new
        uploader of it (False when they had uploaded the same bytes before).
        """

    @abc.abstractmethod
    async def lookup(self, uid: int, file_id: str) -> tuple[FileMeta, str | None] | None:
        """The file and the name ``uid`` uploaded it under (None when they did not upload it), if ``uid``
        may read it; None when it is unknown or they may not."""

    @abc.abstractmethod
    async def readable(self, pairs: Sequence[tuple[int, str]]) -> set[tuple[int, str]]:
        """Of the (uid, file_id) pairs, those whose file exists and that user may read."""

    @abc.abstractmethod
    async def add_refs(self, refs: Sequence[tuple[str, str]]) -> None:
        """Record (file_id, conv) pairs: the file was sent to the conversation. The chat store writes the
        same rows in its own commit; this is for cores that do not."""

    @abc.abstractmethod
    async def hashes(self, after: str | None, limit: int) -> list[str]:
        """Up to ``limit`` stored files' sha256 past ``after``, in order: every file, page by page (for
        maintenance on the blobs, such as rewrapping their keys after a master key rotation)."""
