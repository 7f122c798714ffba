"""Uploaded files: content-addressed blobs, their metadata, and who may read them.

    HTTP (im.api.routes_files) ──> FileService ──> BlobStorage   bytes, by SHA-256   (storage.py)
    chat send path (attachable) ─┘             └─> FileStore     metadata, owners,  (store.py,
                                                                 read rule           sqlite_store.py)

- A file's id **is** the SHA-256 of its bytes (lowercase hex): the same bytes uploaded by anyone are
  stored once and have one id, on every node and every store, with no coordination.
- Knowing an id or a hash grants nothing. A user may read a file when they uploaded it, or when they
  are currently a member of a conversation it was sent in (``file_refs``, written by the chat commit of
  an ``image``/``file`` message). Everyone else is told "not found", exactly as for an unknown file.
- Types are sniffed from the bytes (see :mod:`im.files.sniff` for the rule on declared types).
"""

from im.files.service import FileInfo, FileService
from im.files.sniff import Sniffed, sniff
from im.files.sqlite_store import SqliteFileStore
from im.files.storage import BlobNotFound, BlobStorage, BlobTooLarge, LocalBlobStorage, PutResult, Staged
from im.files.store import FileMeta, FileStore

__all__ = [
    "BlobNotFound",
    "BlobStorage",
    "BlobTooLarge",
    "FileInfo",
    "FileMeta",
    "FileService",
    "FileStore",
    "LocalBlobStorage",
    "PutResult",
    "Sniffed",
    "SqliteFileStore",
    "Staged",
    "sniff",
]
