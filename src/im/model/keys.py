"""Data keys as the database keeps them: wrapped (encrypted) by a master key, never in clear."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class WrappedKey:
    """One version of a named data key, encrypted by the master key ``master_id``.

    ``name`` says what the key is for: ``conv:<conversation id>`` for a conversation's messages,
    ``named:<purpose>`` for a purpose-wide key (for example ``named:blob-names``). Versions start at 1;
    a rotated key gets the next version and the older ones stay, so what they encrypted stays readable.
    """

    name: str
    version: int
    master_id: str
    wrapped: bytes
    created_at: int  # seconds since the Unix epoch
