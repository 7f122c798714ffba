"""Durable file operations the file-backed adapters share (blobs, key files)."""

from __future__ import annotations

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
