"""Uploaded files: content-addressed blobs, their metadata, and who may read them.

    HTTP (im.api.routes_files) ──> FileService ──> BlobStorage   bytes, by SHA-256   (im.backends.blobs)
    chat send path (attachable) ─┘             └─> FileStore     metadata, owners,  (im.backends.files)
                                                                 read rule

- A file's id **is** the SHA-256 of its bytes (lowercase hex): the same bytes uploaded by anyone are
  stored once and have one id, on every node and every store, with no coordination.
- Knowing an id or a hash grants nothing. A user may read a file when they uploaded it, or when they
  are currently a member of a conversation it was sent in (``file_refs``, written by the chat commit of
  an ``image``/``file`` message). Everyone else is told "not found", exactly as for an unknown file.
- Types are sniffed from the bytes (see :mod:`im.files.sniff` for the rule on declared types).
"""

from im.files.service import FileInfo, FileService
from im.files.sniff import Sniffed, sniff

__all__ = ["FileInfo", "FileService", "Sniffed", "sniff"]
