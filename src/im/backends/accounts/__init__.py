"""The account store, split by concern: users and credentials, login sessions, contacts/blocks/settings.

    UserDirectory ─┐
    SessionStore ──┼── AccountStore (+ delete_user) ── SqliteAccountStore, PostgresAccountStore
    PrivacyStore ──┘

Each narrow interface states its own guarantee; consumers are typed by the part they use (the consent
rules read only :class:`PrivacyStore`). :class:`AccountStore` is the three on **one database**, which is
what lets :meth:`AccountStore.delete_user` revoke sessions, drop contacts and blocks and leave a
tombstone in one transaction; adapters implement the composite.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

from im.backends.lifecycle import Service
from im.model.accounts import AuthSession, Privacy, User


class UserDirectory(Service, abc.ABC):
    """Users and their password hashes. Guarantees: user names are unique (case-insensitive); every
    write is durable when it returns; a deleted user's row stays as a tombstone (its uid is never
    reused, its name is freed)."""

    @abc.abstractmethod
    async def create_user(self, username: str, display_name: str, password_hash: str, now: int) -> User:
        """Raise :class:`Conflict` when the name is taken."""

    @abc.abstractmethod
    async def get_user(self, uid: int) -> User | None: ...

    @abc.abstractmethod
    async def get_users(self, uids: Sequence[int]) -> dict[int, User]: ...

    @abc.abstractmethod
    async def find_user(self, username: str) -> tuple[User, str] | None:
        """The user and their password hash, by name (case-insensitive)."""

    @abc.abstractmethod
    async def search_users(self, prefix: str, limit: int) -> list[User]: ...

    @abc.abstractmethod
    async def set_password_hash(self, uid: int, password_hash: str) -> None:
        """Replace a hash (rehash on login when parameters changed)."""


class SessionStore(Service, abc.ABC):
    """Login sessions (one per refresh-token family). Guarantees: a revoked session stays revoked and
    never rotates again; :meth:`rotate_refresh` is a compare-and-swap, so of two concurrent rotations
    with the same old hash exactly one wins; every write is durable when it returns."""

    @abc.abstractmethod
    async def create_session(self, session: AuthSession) -> None: ...

    @abc.abstractmethod
    async def get_session(self, sid: str) -> AuthSession | None: ...

    @abc.abstractmethod
    async def rotate_refresh(self, sid: str, old_hash: str, new_hash: str, expires_at: int, used_at: int = 0) -> bool:
        """Swap the refresh hash if it is still ``old_hash`` and the session is live; False otherwise.
        ``used_at`` (when > 0) becomes the session's ``last_used``."""

    @abc.abstractmethod
    async def revoke_session(self, sid: str) -> None: ...

    @abc.abstractmethod
    async def list_sessions(self, uid: int) -> list[AuthSession]:
        """The user's sessions that are not revoked (expired ones included: the caller filters by its
        clock), oldest first."""

    @abc.abstractmethod
    async def revoke_sessions(self, uid: int, keep: str | None = None) -> list[str]:
        """Revoke every live session of ``uid`` except ``keep``, atomically; returns the sids revoked."""


class PrivacyStore(Service, abc.ABC):
    """Contacts, blocks and the contacts-only setting: what the consent rules read. Guarantees: contacts
    and blocks are one-way sets (adding twice adds nothing); the batch reads answer in one round trip;
    every write is durable when it returns."""

    @abc.abstractmethod
    async def block(self, uid: int, other: int, now: int) -> None:
        """``uid`` blocks ``other`` (idempotent)."""

    @abc.abstractmethod
    async def unblock(self, uid: int, other: int) -> bool:
        """Lift a block; False when there was none."""

    @abc.abstractmethod
    async def list_blocks(self, uid: int) -> list[User]:
        """The users ``uid`` blocks, by name."""

    @abc.abstractmethod
    async def set_contacts_only(self, uid: int, contacts_only: bool) -> None:
        """The setting "only my contacts may start a direct conversation with me"."""

    @abc.abstractmethod
    async def privacy(self, uids: Sequence[int]) -> dict[int, Privacy]:
        """Every given user that exists (deleted ones included, marked so), in one round trip."""

    @abc.abstractmethod
    async def contact_pairs(self, pairs: Sequence[tuple[int, int]]) -> set[tuple[int, int]]:
        """Those (uid, contact) pairs where ``uid`` has ``contact`` in its contacts, in one round trip."""

    @abc.abstractmethod
    async def add_contact(self, uid: int, contact: int, now: int) -> None: ...

    @abc.abstractmethod
    async def remove_contact(self, uid: int, contact: int) -> bool: ...

    @abc.abstractmethod
    async def list_contacts(self, uid: int) -> list[User]: ...


class AccountStore(UserDirectory, SessionStore, PrivacyStore, abc.ABC):
    """Users, login sessions, contacts, blocks and settings on one database. Guarantees: those of each
    part; a deleted user stays deleted (its row stays as a tombstone so messages keep a sender, its name
    is freed), and :meth:`delete_user` is one transaction across the parts."""

    @abc.abstractmethod
    async def delete_user(self, uid: int, now: int) -> list[str]:
        """Delete an account, atomically: its sessions are revoked (their sids are returned), its
        contacts, blocks (both ways), device cursors and file ownerships are removed, and its row becomes
        a tombstone (name ``~deleted~<uid>``, so the old name is free; display name "Deleted user"; no
        password). Messages and conversation memberships are left to the chat rules."""
