"""Uploaded files as the stores describe them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FileMeta:
    """One stored file. ``file_id`` is the SHA-256 of the bytes (lowercase hex), so it equals ``sha256``."""

    file_id: str
    sha256: str
    size: int
    content_type: str  # sniffed from the bytes, never the client's word
    width: int | None  # images only
    height: int | None
    created_at: int  # milliseconds since the Unix epoch (first upload)
