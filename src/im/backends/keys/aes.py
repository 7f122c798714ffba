"""A master key held in this process: AES-256-GCM key wrapping, shared by the file and environment
providers.

Wrapped format: ``0x01`` (format version), the 8 bytes of the master key's id, a 12-byte random nonce,
then the AES-256-GCM ciphertext of the data key and its 16-byte tag; the context is the associated data.
The key id is the first 8 bytes of HMAC-SHA256(master key, "im master key id") (in hex as ``key_id``):
it names the key without revealing it, and lets a keyring that holds several master keys (during a
rotation) pick the one a wrapped key needs.

A provider holds one or more master keys: the first is current (it wraps), the others only unwrap (the
old keys kept through a rotation until every wrapped key was rewrapped, docs/security.md 11.3). Text
form of several keys (key file lines, or the environment variable): base64 keys separated by commas
or newlines, the current one first.
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


def decode_master_keys(text: str, *, source: str) -> list[bytes]:
    """One or more master keys (base64, separated by commas or newlines; the current one first);
    ``ValueError`` naming ``source`` when there is none, one is invalid, or one is there twice."""
    parts = [p.strip() for p in text.replace(",", "\n").splitlines() if p.strip()]
    if not parts:
        raise ValueError(f"{source}: no master key (expected {MASTER_KEY_BYTES} random bytes in base64)")
    if len(parts) == 1:
        return [decode_master_key(parts[0], source=source)]
    keys = [decode_master_key(p, source=f"{source}, key {i + 1}") for i, p in enumerate(parts)]
    if len({master_key_id(k) for k in keys}) != len(keys):
        raise ValueError(f"{source}: the same master key is listed twice")
    return keys


def master_key_id(key: bytes) -> str:
    return hmac.new(key, b"im master key id", hashlib.sha256).hexdigest()[:16]


def wrapped_master_id(wrapped: bytes) -> str | None:
    """The id of the master key that made ``wrapped`` (this module's format), else None."""
    if len(wrapped) < _HEAD + 16 or wrapped[:1] != _FORMAT:
        return None
    return wrapped[1:_ID_END].hex()


class AesKeyProvider(KeyProvider):
    """A :class:`KeyProvider` on master keys in memory (set by the subclass, in ``_acquire`` or before):
    the first wraps, every one unwraps what it wrapped."""

    _aead: AESGCM | None = None
    _key_id: str = ""
    _all: dict[str, AESGCM] | None = None

    def _set_master(self, key: bytes) -> None:
        self._set_masters([key])

    def _set_masters(self, keys: list[bytes]) -> bool:
        """Hold ``keys`` (the current one first); True when that changed what is held."""
        if not keys:
            raise ValueError("no master key")
        ids = [master_key_id(k) for k in keys]
        changed = self._all is None or list(self._all) != ids
        self._all = {i: AESGCM(k) for i, k in zip(ids, keys, strict=True)}
        self._aead = self._all[ids[0]]
        self._key_id = ids[0]
        return changed

    @property
    def key_ids(self) -> tuple[str, ...]:
        if self._all is None:
            return (self.key_id,)
        return tuple(self._all)

    def master_of(self, wrapped: bytes) -> str | None:
        return wrapped_master_id(wrapped)

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
        self._cipher()
        key_id = wrapped_master_id(wrapped)
        if key_id is None:
            raise KeyUnavailable("a wrapped key in an unknown format")
        aead = self._all.get(key_id) if self._all is not None else None
        if aead is None and await self._reload_for(key_id):  # a rotated key file not read yet
            aead = self._all.get(key_id) if self._all is not None else None
        if aead is None:
            held = ", ".join(self.key_ids)
            raise KeyUnavailable(f"a key wrapped by master key {key_id}, and this process holds {held}")
        try:
            return aead.decrypt(wrapped[_ID_END:_HEAD], wrapped[_HEAD:], context)
        except InvalidTag:
            raise KeyUnavailable(
                f"a wrapped key does not open with master key {key_id} (another master key, or altered)"
            ) from None

    async def _reload_for(self, key_id: str) -> bool:
        """Called when a wrapped key names a master key not held; the file provider re-reads its file
        (at most once a second), so a node picks up a rotation another process made at once."""
        return False

    async def _release(self) -> None:
        self._aead = None
        self._all = None
