"""File metadata and the read rule: the :class:`FileStore` interface and its data.

How the tables name a file (by its SHA-256, or by a keyed id with encryption at rest on) is
:mod:`im.backends.files.ids`; the interface speaks SHA-256 only.
"""

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
    - Callers name files by their SHA-256 only, and get back the SHA-256 they named (``file_id`` and
      ``sha256`` of every :class:`FileMeta` returned are the hash asked for or uploaded). What the tables
      hold in its place is the store's own business: with keyed ids (:mod:`im.backends.files.ids`) no
      table holds a file's SHA-256 in clear, and lookups find a file whether its rows are keyed yet or
      not (a conversion under way).
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
    async def hashes(self, after: str | None, limit: int) -> tuple[list[str], str | None]:
        """The sha256 of the stored files of one page of at most ``limit`` rows past the cursor ``after``
        (None: from the start), and the cursor of the next page (None: this was the last). Paging from
        None to the end lists every file stored before the listing started at least once, in the store's
        order (not the hashes' order: the rows are ordered by what the table holds); a file whose rows
        were converted to keyed ids meanwhile may come twice, and a row whose sealed hash does not open
        is left out and logged. For maintenance on the blobs, such as rewrapping their keys after a
        master key rotation. The cursor is opaque."""
