"""The master key: what wraps (encrypts) the data keys that the database keeps.

    KeyProvider ── FileKeyProvider (file.py: a key file), EnvKeyProvider (env.py: an environment variable),
                   or an external KMS (implement the three members below)
    Keyring (keyring.py) ── per-conversation and named data keys, wrapped by a KeyProvider and kept in a
                            ConversationKeys store (im.backends.chat), unwrapped ones cached in memory

Data keys never leave the process in clear: the database holds each one wrapped by the master key, with
the id of the master key that wrapped it. The master key itself is never stored in the database. Every
node of a cluster must use the same master key (the same key file, the same environment value, or the
same KMS key), or it cannot read what the others wrote; a node started with another master key than the
one the stored data keys were wrapped with refuses to start (:class:`MasterKeyMismatch`).

Writing a provider for a KMS (AWS KMS, Google Cloud KMS, Vault transit, an HSM): ``wrap`` calls the
KMS's encrypt with ``context`` as its additional authenticated data (AWS: ``EncryptionContext``; Vault:
``context``/``associated_data``), ``unwrap`` its decrypt with the same context; ``key_id`` names the KMS
key (and version, if the KMS does not record it in the ciphertext). A wrapped key is at most a few
hundred bytes. The keyring calls ``unwrap`` once per data key it has not cached, so a KMS round trip is
paid once per conversation per process (not per message); ``wrap`` once per new conversation.

Rotation (``im keys rotate``, docs/security.md 11.3): a provider may hold several master keys at once,
the current one (``key_id``: it wraps) and older ones (``key_ids``: they still unwrap) until every data
key has been rewrapped under the current one. A KMS provider usually gets this from the KMS itself (key
versions recorded in the ciphertext); ``master_of`` tells the rewrap what needs rewrapping and
``reload`` lets a running process pick up a rotated key source.
"""

from __future__ import annotations

import abc

from im.backends.lifecycle import Service


class KeyUnavailable(Exception):
    """A data key could not be unwrapped or loaded: wrong master key, a damaged or moved wrapped key,
    or a KMS that refused. The message says which key; it never contains key material."""


class MasterKeyMismatch(RuntimeError):
    """The stored data keys were wrapped by another master key than the one this process has."""


class KeyProvider(Service, abc.ABC):
    """Wraps and unwraps data keys with a master key that this interface never hands out.

    Guarantees: ``unwrap(wrap(k, c), c) == k``; ``unwrap`` with any other context, or of bytes that were
    altered, raises :class:`KeyUnavailable` (authenticated encryption with the context as associated
    data, so a wrapped key moved to another key's row does not unwrap). ``key_id`` is stable for one
    master key and differs between master keys; it is safe to store and to log (it reveals nothing of
    the key). Both calls may be made concurrently.
    """

    @property
    @abc.abstractmethod
    def key_id(self) -> str:
        """Which master key this is (at most 64 characters); recorded beside every key it wraps."""

    @abc.abstractmethod
    async def wrap(self, key: bytes, context: bytes) -> bytes:
        """``key`` encrypted and authenticated under the master key, bound to ``context``."""

    @abc.abstractmethod
    async def unwrap(self, wrapped: bytes, context: bytes) -> bytes:
        """The key that :meth:`wrap` was given with the same ``context`` (under any master key this
        provider holds); :class:`KeyUnavailable` if not."""

    @property
    def key_ids(self) -> tuple[str, ...]:
        """Every master key this provider can unwrap with, the current one (:attr:`key_id`) first."""
        return (self.key_id,)

    def master_of(self, wrapped: bytes) -> str | None:
        """The id of the master key that wrapped ``wrapped``, when its format records it (None: unknown,
        for example a KMS whose ciphertexts carry their own key version)."""
        return None

    async def reload(self) -> bool:
        """Re-read the key source (a rotated key file); True when the keys held changed. Keys held before
        stay usable until the new source is read successfully; a source that does not load raises and
        changes nothing. The default has nothing to re-read."""
        return False
