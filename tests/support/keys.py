"""A small real keyring for tests: what :class:`im.backends.blobs.encrypted.FileKeys` asks of the real one.

AES-256-GCM key wrapping under a random master key (context as associated data), named keys created once
and kept in a dict. Share one instance between storages to model a restart or a second node."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from im.backends.blobs.encrypted import key_context
from im.backends.blobs.sealed import MAGIC, ChunkCipher, SealedReader, read_layout

SEALED_MAGIC = MAGIC


class MemoryFileKeys:
    def __init__(self) -> None:
        self._master = AESGCM(AESGCM.generate_key(256))
        self._named: dict[str, bytes] = {}
        self.unwraps = 0

    async def wrap(self, key: bytes, context: bytes) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._master.encrypt(nonce, key, context)

    async def unwrap(self, wrapped: bytes, context: bytes) -> bytes:
        """Raises ``InvalidTag`` when ``wrapped`` was not made by :meth:`wrap` with this context."""
        self.unwraps += 1
        return self.unwrap_now(wrapped, context)

    def unwrap_now(self, wrapped: bytes, context: bytes) -> bytes:
        return self._master.decrypt(wrapped[:12], wrapped[12:], context)

    async def named_key(self, name: str) -> bytes:
        return self._named.setdefault(name, os.urandom(32))


def sealed_plaintext(path: Path, keys: MemoryFileKeys, sha256: str) -> bytes:
    """The plaintext of the sealed blob file ``path`` (blocking; for harnesses that look behind the API)."""
    with path.open("rb") as f:
        layout, wrapped = read_layout(f)
        key = keys.unwrap_now(wrapped, key_context(sha256))
        f.seek(0)
        reader = SealedReader(f, layout, ChunkCipher(key, layout.chunk_size))
        return reader.take(layout.size)
