"""The master key in a file: created (0600, in a 0700 directory) when missing, never overwritten.

The file holds comment lines (``#``) and one line of base64 (32 random bytes). It is read once, at
start. A file that others than its owner may read (any group or other permission bit) is refused: the
key opens every message. Creation is atomic and safe against two processes starting at once: the key
is written to a temporary file, then hard-linked to the final name, which fails if the name exists (the
other process's key is then read and used).
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from pathlib import Path

from im.backends.keys.aes import AesKeyProvider, decode_master_key, encode_master_key, new_master_key

log = logging.getLogger("im.keys")

_HEADER = (
    "# im master key: it unwraps every conversation key, so every message.\n"
    "# Keep a copy apart from the database backups; without it the encrypted data is lost for good.\n"
    "# Every node of a cluster needs this same file (or the same value in the key environment variable).\n"
)


class FileKeyProvider(AesKeyProvider):
    """The master key read from ``path``; with ``create`` (the default), a new one is made when the file
    does not exist."""

    def __init__(self, path: Path | str, *, create: bool = True) -> None:
        self.path = Path(path)
        self.create = create
        self.created = False  # True when this start wrote a new key file

    async def _acquire(self) -> None:
        if not self.path.exists():
            if not self.create:
                raise FileNotFoundError(f"master key file {self.path} does not exist")
            self.created = write_key_file(self.path, new_master_key())
            if self.created:
                log.warning("created a new master key in %s: back it up (docs/security.md, Encryption)", self.path)
        self._set_master(read_key_file(self.path))


def read_key_file(path: Path) -> bytes:
    """The master key in ``path``; ``PermissionError`` when group or others may read or write it."""
    st = path.stat()
    if st.st_mode & 0o077:
        raise PermissionError(
            f"master key file {path} is accessible to others (mode {stat.S_IMODE(st.st_mode):04o}): chmod 600 it"
        )
    lines = [line for line in path.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if len(lines) != 1:
        raise ValueError(f"master key file {path}: expected one line of base64 besides comments")
    return decode_master_key(lines[0], source=f"master key file {path}")


def write_key_file(path: Path, key: bytes) -> bool:
    """Write ``key`` to ``path`` (mode 0600; a missing directory made 0700), never replacing a file
    there. True when written; False when another writer got there first (its key stands)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(_HEADER + encode_master_key(key) + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        _fsync_dir(path.parent)
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
