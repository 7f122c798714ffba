"""The master key in a file: created (0600, in a 0700 directory) when missing, never overwritten by a
start.

The file holds comment lines (``#``) and one or more lines of base64 (32 random bytes each). The first
key line is the **current** master key: it wraps every new data key. Any further lines are **older**
master keys, kept after a rotation (``im keys rotate``) so that keys they wrapped still unwrap until
they are rewrapped under the current one; ``im keys retire`` removes them once nothing needs them::

    # im master key: ...
    Vb5x...=      <- current (wraps)
    p0Qa...=      <- older (unwraps only, until retired)

A file that others than its owner may read (any group or other permission bit) is refused: the key
opens every message. Creation is atomic and safe against two processes starting at once: the key is
written to a temporary file, then hard-linked to the final name, which fails if the name exists (the
other process's key is then read and used). Rotation and retirement replace the file atomically (a
temporary file renamed over it), so a reader sees the old file or the new one, never a mix.

A running process re-reads the file on :meth:`FileKeyProvider.reload` (SIGHUP, and the periodic check
of ``encryption.key_reload_interval``), and at once when a wrapped key names a master key it does not
hold (at most once a second), so a rotation made by another process is picked up before it matters.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import time
from pathlib import Path

from im.backends.durable import create_once, fsync_dir, write_tmp
from im.backends.keys.aes import (
    AesKeyProvider,
    decode_master_keys,
    encode_master_key,
    master_key_id,
    new_master_key,
)

log = logging.getLogger("im.keys")

_HEADER = (
    "# im master key: it unwraps every conversation key, so every message.\n"
    "# Keep a copy apart from the database backups; without it the encrypted data is lost for good.\n"
    "# Every node of a cluster needs this same file (or the same value in the key environment variable).\n"
)
_ROTATED = (
    "# The first key line is the current master key (it wraps new keys); the lines after it are older\n"
    "# master keys that still unwrap keys not yet rewrapped. Remove them only with `im keys retire`.\n"
)
_RELOAD_ON_MISS = 1.0  # seconds between two re-reads caused by an unknown master key id


class FileKeyProvider(AesKeyProvider):
    """The master key(s) read from ``path``; with ``create`` (the default), a new one is made when the
    file does not exist."""

    def __init__(self, path: Path | str, *, create: bool = True) -> None:
        self.path = Path(path)
        self.create = create
        self.created = False  # True when this start wrote a new key file
        self._stamp: tuple[int, int, int] | None = None
        self._missed_at = 0.0

    async def _acquire(self) -> None:
        if not self.path.exists():
            if not self.create:
                raise FileNotFoundError(f"master key file {self.path} does not exist")
            self.created = write_key_file(self.path, new_master_key())
            if self.created:
                log.warning("created a new master key in %s: back it up (docs/security.md, Encryption)", self.path)
        self._stamp = _stamp(self.path)
        self._set_masters(read_key_file_all(self.path))

    async def reload(self) -> bool:
        """Re-read the file when it changed (inode, size, modification time); True when the keys held
        changed. A file that does not load is raised and changes nothing."""
        self._cipher()
        stamp = await asyncio.to_thread(_stamp, self.path)
        if stamp == self._stamp:
            return False
        keys = await asyncio.to_thread(read_key_file_all, self.path)
        before = self.key_ids
        changed = self._set_masters(keys)
        self._stamp = stamp
        if changed:
            log.warning(
                "master key file %s re-read: current master key %s, also holding %s (was %s)",
                self.path,
                self.key_id,
                ", ".join(self.key_ids[1:]) or "no other",
                ", ".join(before),
            )
        return changed

    async def _reload_for(self, key_id: str) -> bool:
        now = time.monotonic()
        if now - self._missed_at < _RELOAD_ON_MISS:
            return False
        self._missed_at = now
        try:
            return await self.reload()
        except (OSError, ValueError) as exc:
            log.error("master key file %s does not load (%s); keeping the keys held", self.path, exc)
            return False


def _stamp(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def read_key_file(path: Path) -> bytes:
    """The current master key in ``path`` (the first key line); see :func:`read_key_file_all`."""
    return read_key_file_all(path)[0]


def read_key_file_all(path: Path) -> list[bytes]:
    """Every master key in ``path``, the current one first; ``PermissionError`` when group or others
    may read or write it, ``ValueError`` when it holds no key or an invalid one."""
    st = path.stat()
    if st.st_mode & 0o077:
        raise PermissionError(
            f"master key file {path} is accessible to others (mode {stat.S_IMODE(st.st_mode):04o}): chmod 600 it"
        )
    lines = [line for line in path.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not lines:
        raise ValueError(f"master key file {path}: expected one line of base64 besides comments")
    return decode_master_keys("\n".join(lines), source=f"master key file {path}")


def write_key_file(path: Path, key: bytes) -> bool:
    """Write ``key`` to ``path`` (mode 0600; a missing directory made 0700), never replacing a file
    there. True when written; False when another writer got there first (its key stands)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    return create_once(path, _key_file_text([key]).encode())


def replace_key_file(path: Path, keys: list[bytes]) -> None:
    """Replace ``path`` atomically with ``keys`` (the current one first), mode 0600, fsynced."""
    if not keys:
        raise ValueError("a key file needs at least one key")
    tmp = write_tmp(path, _key_file_text(keys).encode())
    try:
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def rotate_key_file(path: Path, new: bytes | None = None) -> tuple[str, list[str]]:
    """Put a new master key first in ``path``, keeping every key there after it (they still unwrap);
    returns (the new key's id, the older ids)."""
    old = read_key_file_all(path)
    key = new or new_master_key()
    if master_key_id(key) in {master_key_id(k) for k in old}:
        raise ValueError("that master key is in the file already")
    replace_key_file(path, [key, *old])
    return master_key_id(key), [master_key_id(k) for k in old]


def retire_from_key_file(path: Path, retire: set[str]) -> list[str]:
    """Remove the older master keys whose ids are in ``retire`` from ``path`` (never the current one);
    returns the ids removed. The caller checks first that nothing is wrapped by them."""
    keys = read_key_file_all(path)
    if master_key_id(keys[0]) in retire:
        raise ValueError(f"master key {master_key_id(keys[0])} is the current one: it cannot be retired")
    kept = [k for k in keys if master_key_id(k) not in retire]
    removed = [master_key_id(k) for k in keys if master_key_id(k) in retire]
    if removed:
        replace_key_file(path, kept)
    return removed


def _key_file_text(keys: list[bytes]) -> str:
    return _HEADER + (_ROTATED if len(keys) > 1 else "") + "".join(encode_master_key(k) + "\n" for k in keys)
