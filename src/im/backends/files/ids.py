"""File ids at rest: what the file tables hold in place of a file's SHA-256.

    files (file_id, sha256, size, ...)    file_owners (file_id, uid, ...)    file_refs (file_id, conv)

A client names a file by the SHA-256 of its bytes (docs/protocol.md, files). Stored as it is, that hash
lets anyone who can read the database test whether a known file is stored, who uploaded it and which
conversations it was sent to. So, with encryption at rest on (``files.encrypt``, by default as
``encryption.enabled``), :class:`FileIds` is *keyed* and the tables hold:

- ``file_id``: ``"k"`` + HMAC-SHA256(K_id, sha256) in hex (65 characters). No SHA-256 hex starts with
  ``k`` or a later character, so the two forms never collide and sort apart (clear ids before keyed
  ones): ``file_id < 'k'`` selects the rows in clear, through the primary key indexes.
- ``files.sha256``: the SHA-256 sealed, ``"s"`` + base64url(nonce ‖ AES-256-GCM(K_seal, the 32 bytes,
  associated data = the row's ``file_id``)): what a listing of every stored file (the blob key rewrap)
  reads back; a value copied to another row does not open.
- K_id and K_seal are HMAC-SHA256 of two labels under the keyring's named key ``"file-ids"``: created
  once for the cluster, wrapped by the master key, rewrapped (never changed) by ``im keys rotate``, so a
  file's keyed id is the same in every process and across master key rotations. Losing the keyring
  loses the way from a hash to its rows (as it loses the blobs: they are sealed under it too).

Off (no keyed ids), the tables hold the hash itself, in both columns, as before.

Converting a database written in clear (:class:`FileIdConversion`, run at start in the background by
the processes that run the plaintext body migration; resumable, online): page by page in ``file_id``
order, every row of an id in clear is moved to its keyed id in one transaction per page (insert the
keyed row if absent, delete the clear one). While rows of both forms may exist, the stores look a file
up under both (:class:`IdForms`), so a lookup during the conversion finds it whichever rows are moved
yet; an upload of a file still in clear moves that file's rows first, in its own transaction. Turning
encryption off again writes new rows in clear and keeps finding the keyed ones while the keyring is
there (they are not converted back).

What keyed ids do not hide: how many files there are, their sizes, types, image dimensions and upload
times, how many uploaders and conversations each has, and which rows belong to the same file.
"""

from __future__ import annotations

import abc
import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from im.backends.blobs import is_sha256
from im.backends.files import FileStore
from im.backends.sql.shared_db import DB, OnSharedDatabase

log = logging.getLogger("im.encryption")

#: The keyring's name of the key behind keyed file ids.
NAME_KEY = "file-ids"
#: The first character of a keyed id: after every hex digit.
KEYED = "k"
#: The first character of a sealed SHA-256 in ``files.sha256``.
SEALED = "s"
_NONCE = 12
#: The tables that name files by id, and the ``files`` columns besides the id and the hash.
TABLES = ("files", "file_owners", "file_refs")
DATA_COLUMNS = "size, content_type, width, height, created_at"
#: Rows of the three tables whose id is in clear (the same SQL on both engines).
COUNT_CLEAR = "SELECT " + " + ".join(f"(SELECT count(*) FROM {t} WHERE file_id < '{KEYED}')" for t in TABLES)


class NamedKeys(Protocol):
    """What keyed ids need of the keyring: a purpose-wide data key, the same in every process and for ever
    (:meth:`im.backends.keys.keyring.Keyring.named_key`)."""

    async def named_key(self, name: str) -> bytes: ...


class FileIds:
    """How the file tables name a file: keyed (``keyed``, needs ``keys``) or by its SHA-256.

    ``keys`` given with ``keyed`` False (encryption turned off, the keyring still there): rows are written
    in clear, and keyed rows written before are still found (:meth:`other`). :meth:`load` fetches the key
    once; the other methods are synchronous and cheap (one HMAC per id).
    """

    def __init__(self, keys: NamedKeys | None, *, keyed: bool) -> None:
        if keyed and keys is None:
            raise ValueError("keyed file ids need the keyring")
        self.keys = keys
        self.keyed = keyed
        self._mac: hmac.HMAC | None = None
        self._aead: AESGCM | None = None
        self._loading: asyncio.Lock | None = None

    @property
    def loaded(self) -> bool:
        return self._mac is not None

    async def load(self) -> None:
        """Fetch the named key (created on first use in the cluster); once, a no-op without a keyring."""
        if self._mac is not None or self.keys is None:
            return
        if self._loading is None:
            self._loading = asyncio.Lock()
        async with self._loading:
            if self._mac is None:
                key = await self.keys.named_key(NAME_KEY)
                self._aead = AESGCM(hmac.digest(key, b"im-file-id/seal", "sha256"))
                self._mac = hmac.new(hmac.digest(key, b"im-file-id/name", "sha256"), digestmod=hashlib.sha256)

    def keyed_id(self, sha256: str) -> str:
        """The keyed id of ``sha256`` (needs :meth:`load`)."""
        if self._mac is None:
            raise RuntimeError("FileIds.load() was not awaited")
        mac = self._mac.copy()
        mac.update(sha256.encode())
        return KEYED + mac.hexdigest()

    def stored(self, sha256: str) -> str:
        """The id that rows written now carry for the file ``sha256``."""
        return self.keyed_id(sha256) if self.keyed else sha256

    def other(self, sha256: str) -> str | None:
        """The id of the file in the form not written now (None when there is none: no keyring)."""
        if self.keyed:
            return sha256
        return None if self._mac is None else self.keyed_id(sha256)

    def stored_refs(self, refs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
        """(file_id, conv) pairs as the ``file_refs`` table stores them."""
        if not self.keyed:
            return list(refs)
        return [(self.keyed_id(sha), conv) for sha, conv in refs]

    def seal(self, sha256: str, file_id: str) -> str:
        """The ``files.sha256`` value of the row ``file_id`` of the file ``sha256``."""
        if not file_id.startswith(KEYED):
            return sha256
        if self._aead is None:
            raise RuntimeError("FileIds.load() was not awaited")
        nonce = os.urandom(_NONCE)
        sealed = self._aead.encrypt(nonce, bytes.fromhex(sha256), file_id.encode())
        return SEALED + base64.urlsafe_b64encode(nonce + sealed).decode()

    def open(self, value: str, file_id: str) -> str | None:
        """The SHA-256 that ``files.sha256`` holds for the row ``file_id``; None when it does not open
        (damaged, moved from another row, or no keyring)."""
        if is_sha256(value):
            return value if value == file_id else None
        if not value.startswith(SEALED) or self._aead is None:
            return None
        try:
            raw = base64.urlsafe_b64decode(value[1:])
            digest = self._aead.decrypt(raw[:_NONCE], raw[_NONCE:], file_id.encode())
        except (InvalidTag, ValueError, binascii.Error):
            return None
        sha256 = digest.hex()
        return sha256 if self.keyed_id(sha256) == file_id else None

    def open_rows(self, rows: Sequence[tuple[str, str]]) -> list[str]:
        """The SHA-256 of each (file_id, files.sha256) row; one that does not open is logged and left out."""
        out = []
        for file_id, value in rows:
            sha256 = self.open(value, file_id)
            if sha256 is None:
                log.error("files row %s: its sealed sha256 does not open (moved, damaged, or another keyring)", file_id)
            else:
                out.append(sha256)
        return out

    def conversions(self, ids: Sequence[str]) -> list[tuple[str, str, str]]:
        """(id in clear, keyed id, its files.sha256 value) for each of ``ids``; one that is not a SHA-256
        (no upload writes such a row) is logged and left in clear."""
        out = []
        for sha256 in ids:
            if not is_sha256(sha256):
                log.error("file table rows under %r: not a SHA-256, left in clear", sha256[:80])
                continue
            file_id = self.keyed_id(sha256)
            out.append((sha256, file_id, self.seal(sha256, file_id)))
        return out


class IdForms:
    """Which forms of a file's id a store's tables may hold now: one (the written form), or both while
    rows of the other form may be left (a conversion under way, or encryption turned off after keyed
    rows were written). ``mixed`` is set from a probe of the tables at start, cleared by a conversion
    that finished in this process, and otherwise probed again at most every ``recheck`` seconds (a
    process that does not convert learns that another one finished)."""

    def __init__(self, ids: FileIds, *, recheck: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.ids = ids
        self.recheck = recheck
        self.mixed = False
        self._clock = clock
        self._next_check = 0.0

    def set_mixed(self, mixed: bool) -> None:
        self.mixed = mixed
        self._next_check = self._clock() + self.recheck

    def due(self) -> bool:
        """True when a mixed store should probe its tables again."""
        return self.mixed and self._clock() >= self._next_check

    def forms(self, sha256: str) -> tuple[str, ...]:
        """The ids a lookup of ``sha256`` matches: the written form first."""
        stored = self.ids.stored(sha256)
        other = self.ids.other(sha256) if self.mixed else None
        return (stored,) if other is None else (stored, other)

    def other(self, sha256: str) -> str | None:
        """The other form's id of ``sha256`` while the tables are mixed (an upload moves its rows first)."""
        return self.ids.other(sha256) if self.mixed else None


class FileStoreOnSharedDatabase(OnSharedDatabase[DB], FileStore):
    """What the SQL file stores share about the two forms of ids: ``ids`` (the written form, default by
    the SHA-256), ``forms`` (whether the other form may be left; ``recheck``: see :class:`IdForms`), the
    key and the first probe at start; each store writes the probe's query in its own SQL (:meth:`_any_row`)."""

    def __init__(self, db: DB, *, ids: FileIds | None = None, recheck: float = 60.0) -> None:
        super().__init__(db)
        self.ids = ids if ids is not None else FileIds(None, keyed=False)
        self.forms = IdForms(self.ids, recheck=recheck)

    async def _acquire(self) -> None:
        await super()._acquire()
        try:
            await self.ids.load()
            self.forms.set_mixed(await self._probe())
        except BaseException:
            await self._release()
            raise

    async def _probe(self) -> bool:
        """Whether any table holds a row in the form not written now."""
        if self.ids.keyed:
            return await self._any_row(f"file_id < '{KEYED}'")
        return await self._any_row(f"file_id >= '{KEYED}'") if self.ids.loaded else False

    @abc.abstractmethod
    async def _any_row(self, where: str) -> bool:
        """Whether any of :data:`TABLES` holds a row matching ``where`` (a condition on ``file_id``)."""

    async def _recheck(self) -> None:
        if self.forms.due():
            self.forms.set_mixed(await self._probe())

    def _hashes_page(self, rows: Sequence[tuple[str, str]], limit: int) -> tuple[list[str], str | None]:
        """:meth:`FileStore.hashes` of one page of (file_id, files.sha256) rows read in ``file_id`` order:
        the hashes that open, and the cursor of the next page (the last id; None when the page was short)."""
        return self.ids.open_rows(rows), (rows[-1][0] if rows and len(rows) == limit else None)

    async def converted(self) -> bool:
        """(:class:`StoredFileIds`) Probe the tables; True when no id in the other form is left."""
        self.forms.set_mixed(await self._probe())
        return not self.forms.mixed


@runtime_checkable
class StoredFileIds(Protocol):
    """What :class:`FileIdConversion` needs of a file store (the SQL stores implement it).

    - ``ids``: how the store names files (a conversion runs only when they are keyed).
    - ``count_unconverted``: rows (of the three tables) whose id is in clear while ids are keyed.
    - ``unconverted``: up to ``limit`` distinct ids in clear past ``after``, in order.
    - ``convert``: move every row of each of those ids to its keyed id, all in one transaction (a keyed
      row already there wins: insert if absent, then delete the clear one); returns the rows moved.
    - ``converted``: probe the tables; True when no id in clear is left (lookups then use one form).
    """

    ids: FileIds

    async def count_unconverted(self) -> int: ...

    async def unconverted(self, after: str | None, limit: int) -> list[str]: ...

    async def convert(self, ids: Sequence[str]) -> int: ...

    async def converted(self) -> bool: ...


@dataclass
class IdConversionProgress:
    """Where a :class:`FileIdConversion` is: rows in clear found at its start, files and rows converted."""

    total: int = 0
    files: int = 0
    rows: int = 0
    finished: bool = False
    #: False when rows in clear were still found at the end (written meanwhile by a process with
    #: encryption off): the next run converts them.
    complete: bool = True
    #: False when the engine could not drop the old versions at the end (see ``scrub``).
    scrubbed: bool = True

    def line(self) -> str:
        pct = 100.0 if not self.total else min(100.0, 100.0 * self.rows / self.total)
        return f"{self.rows}/{self.total} file table rows keyed ({pct:.1f}%, {self.files} files)"


class FileIdConversion:
    """Moves the file tables' rows in clear to keyed ids, online (see the module docstring).

    ``batch`` ids per transaction, ``pause`` seconds between two. ``scrub``: called at the end when
    anything was moved, to drop what the engine keeps of the deleted rows (the chat store's
    ``StoredBodies.scrub``: SQLite ``VACUUM`` and a truncated WAL). Resumable: a run (after a crash, a
    stop, or at the next start) finds what is still in clear; a moved row is never moved twice.
    """

    def __init__(
        self,
        store: StoredFileIds,
        *,
        batch: int = 500,
        pause: float = 0.0,
        report_interval: float = 5.0,
        scrub: Callable[[], Awaitable[bool]] | None = None,
    ) -> None:
        if batch < 1:
            raise ValueError("batch must be at least 1")
        self.store = store
        self.batch = batch
        self.pause = pause
        self.report_interval = report_interval
        self.scrub = scrub

    async def run(self, progress: Callable[[IdConversionProgress], None] | None = None) -> IdConversionProgress:
        state = IdConversionProgress(total=await self.store.count_unconverted())
        reported = time.monotonic()
        after: str | None = None
        while state.total:
            page = await self.store.unconverted(after, self.batch)
            if not page:
                break
            state.rows += await self.store.convert(page)
            state.files += len(page)
            after = page[-1]
            if progress is not None and time.monotonic() - reported >= self.report_interval:
                reported = time.monotonic()
                progress(state)
            if self.pause:
                await asyncio.sleep(self.pause)
        state.complete = await self.store.converted()
        if state.rows and self.scrub is not None:
            state.scrubbed = await self.scrub()
        state.finished = True
        if progress is not None:
            progress(state)
        return state
