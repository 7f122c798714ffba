"""A master key held in this process: AES-256-GCM key wrapping, shared by the file and environment
providers.

Wrapped format: ``0x01`` (format version), the 8 bytes of the master key's id, a 12-byte random nonce,
then the AES-256-GCM ciphertext of the data key and its 16-byte tag; the context is the associated data.
The key id is the first 8 bytes of HMAC-SHA256(master key, "im master key id") (in hex as ``key_id``):
it names the key without revealing it, and lets a keyring that holds several master keys (during a
rotation) pick the one a wrapped key needs.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from im.backends.keys import KeyProvider, KeyUnavailable

MASTER_KEY_BYTES = 32
_FORMAT = b"\x01"
_NONCE = 12
_ID_END = 1 + 8
_HEAD = _ID_END + _NONCE


def new_master_key() -> bytes:
    return os.urandom(MASTER_KEY_BYTES)


def encode_master_key(key: bytes) -> str:
    """The text form of a master key (standard base64), as key files and ``IM_MASTER_KEY`` hold it."""
    return base64.b64encode(key).decode()


def decode_master_key(text: str, *, source: str) -> bytes:
    """A master key from its base64 text; ``ValueError`` naming ``source`` (never the text) if invalid."""
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{source}: not base64 (expected {MASTER_KEY_BYTES} random bytes in base64)") from None
    if len(key) != MASTER_KEY_BYTES:
        raise ValueError(f"{source}: {len(key)} bytes; a master key is {MASTER_KEY_BYTES} bytes (base64)")
    return key


def master_key_id(key: bytes) -> str:
    return hmac.new(key, b"im master key id", hashlib.sha256).hexdigest()[:16]


class AesKeyProvider(KeyProvider):
    """A :class:`KeyProvider` on a master key in memory (set by the subclass, in ``_acquire`` or before)."""

    _aead: AESGCM | None = None
    _key_id: str = ""

    def _set_master(self, key: bytes) -> None:
        self._aead = AESGCM(key)
        self._key_id = master_key_id(key)

    @property
    def key_id(self) -> str:
        """Known from the first start on (and kept after close: it is not secret)."""
        if not self._key_id:
            raise RuntimeError(f"{type(self).__name__} was never started")
        return self._key_id

    def _cipher(self) -> AESGCM:
        if self._aead is None:
            raise RuntimeError(f"{type(self).__name__} is not started")
        return self._aead

    async def wrap(self, key: bytes, context: bytes) -> bytes:
        nonce = os.urandom(_NONCE)
        aead = self._cipher()
        return _FORMAT + bytes.fromhex(self._key_id) + nonce + aead.encrypt(nonce, key, context)

    async def unwrap(self, wrapped: bytes, context: bytes) -> bytes:
        aead = self._cipher()
        if len(wrapped) < _HEAD + 16 or wrapped[:1] != _FORMAT:
            raise KeyUnavailable("a wrapped key in an unknown format")
        if wrapped[1:_ID_END].hex() != self._key_id:
            raise KeyUnavailable(f"a key wrapped by master key {wrapped[1:_ID_END].hex()}, not {self._key_id}")
        try:
            return aead.decrypt(wrapped[_ID_END:_HEAD], wrapped[_HEAD:], context)
        except InvalidTag:
            raise KeyUnavailable(
                f"a wrapped key does not open with master key {self._key_id} (another master key, or altered)"
            ) from None

    async def _release(self) -> None:
        self._aead = None
