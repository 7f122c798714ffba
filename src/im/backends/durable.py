"""Durable file operations the file-backed adapters share (blobs, key files)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename or a new name in ``path`` durable: fsync the directory itself (the file's own fsync
    does not cover its directory entry)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_tmp(path: Path, data: bytes, mode: int = 0o600) -> Path:
    """``data`` in a new temporary file beside ``path`` (``mode``, fsynced), to link or rename into place;
    the caller removes it afterwards."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return tmp


def create_once(path: Path, data: bytes, mode: int = 0o600) -> bool:
    """Create ``path`` holding ``data`` (``mode``, fsynced), never replacing a file there: the name
    appears with the whole content at once, so processes sharing a directory that start together all
    read the one that won. True when this call created it."""
    tmp = write_tmp(path, data, mode)
    try:
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        fsync_dir(path.parent)
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
