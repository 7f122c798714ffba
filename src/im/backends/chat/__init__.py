"""The chat store, split by concern: what each consumer may depend on, and the composite adapters implement.

    MessageLog ─────┐
    GroupDirectory ─┤
    CursorStore ────┼── ChatStore ── SqliteChatStore, PostgresChatStore
    Outbox ─────────┘
    ConversationKeys ── SqliteConversationKeys, PostgresConversationKeys (on the same database, apart)
    StoredBodies ────── SqliteStoredBodies, PostgresStoredBodies (the plaintext migration's rewrites)

Each narrow interface states its own guarantee. :class:`ChatStore` is all four on **one database**: that
is what lets :meth:`MessageLog.commit` span the concerns in one transaction (the messages, the
membership changes and read marks of a batch, and with ``outbox=True`` the outbox rows). An
implementation of a single concern alone could not keep those guarantees; so adapters implement the
composite, and consumers are typed by the part they use.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterable, Sequence
from contextlib import AbstractAsyncContextManager

from im.backends.lifecycle import Service
from im.model.chat import (
    CommitBatch,
    ConversationState,
    ConversationSummary,
    Group,
    OutboxEvent,
    StoredMessage,
    SyncPoint,
)
from im.model.keys import WrappedKey


def by_conversation(messages: Iterable[StoredMessage]) -> dict[str, list[StoredMessage]]:
    """``messages`` grouped by conversation, each group in the order given (what :meth:`MessageLog.read_ranges`
    answers)."""
    out: dict[str, list[StoredMessage]] = {}
    for m in messages:
        out.setdefault(m.conv, []).append(m)
    return out


class MessageLog(Service, abc.ABC):
    """The conversation logs: the committer's reads and its one write.

    Guarantees: :meth:`commit` is atomic and durable when it returns (all of a batch or none of it);
    (conv, seq) and (sender, device, cmid) are unique; a batch whose heads moved is refused whole. Reads
    see every committed batch. Messages are never deleted.
    """

    @abc.abstractmethod
    async def load_conversations(self, convs: Sequence[str]) -> dict[str, ConversationState]:
        """The state of each existing conversation among ``convs`` (absent ones are left out)."""

    @abc.abstractmethod
    async def find_sent(self, keys: Sequence[tuple[int, str, str]]) -> dict[tuple[int, str, str], StoredMessage]:
        """Messages already stored under (sender, device, cmid), for idempotent retries."""

    @abc.abstractmethod
    async def commit(self, batch: CommitBatch) -> None:
        """Write the batch atomically and durably, or raise :class:`SeqConflict` (or, for a batch fenced
        by a token lower than the one recorded for its node id, ``FenceRefused``) and write nothing.

        The batch spans every concern of the store it was given to: new conversations and member
        changes, messages, file refs, read marks, and the outbox rows of a store built with the outbox."""

    @abc.abstractmethod
    async def raise_fence(self, node_id: int, token: int) -> int:
        """Record that the claim with fencing ``token`` holds ``node_id`` now; returns the token the store
        records for it after the call (the larger of the stored one and ``token``: it never goes down).

        Fencing: a :meth:`commit` whose ``batch.fence`` is (node_id, t) with t below the recorded token
        raises :class:`~im.model.errors.FenceRefused` and writes nothing, in the same transaction as the
        write (one indexed lookup per batch). The check and the raise are linearizable: once a raise
        returns, no commit under a lower token of that node id lands. A node id with no token recorded
        (or a batch without a fence) passes."""

    @abc.abstractmethod
    async def read_range(
        self, conv: str, after: int, before: int | None, limit: int, newest_first: bool = False
    ) -> list[StoredMessage]:
        """Messages with after < seq < before (before None: no upper bound), ``limit`` at most.

        Oldest first, or newest first when ``newest_first`` (for paging back through history).
        """

    @abc.abstractmethod
    async def read_ranges(self, ranges: Sequence[tuple[str, int, int]], limit: int) -> dict[str, list[StoredMessage]]:
        """For each (conv, after, upto) of ``ranges`` (one per conversation): its messages with
        after < seq <= upto, oldest first, ``limit`` at most per conversation; a conversation with none is
        absent. One read for many conversations (a device's replay at login, a catch-up), where
        :meth:`read_range` per conversation would cost a round trip each."""

    @abc.abstractmethod
    async def wrote_in(self, pairs: Sequence[tuple[int, str]]) -> set[tuple[int, str]]:
        """Those (sender, conv) pairs where ``sender`` has at least one message in ``conv`` (the
        presence rule: a direct partner sees you once you wrote). Committed messages only; once true,
        true for ever (messages are never deleted)."""


class GroupDirectory(Service, abc.ABC):
    """Groups and who is in which conversation.

    Guarantees: a group and its conversation ``g:<gid>`` (with its first message and members) appear
    together or not at all; gids are unique and never reused. Membership read here is what the last
    committed batch left (membership changes are written by :meth:`MessageLog.commit`)."""

    @abc.abstractmethod
    async def create_group(
        self, group: Group, first: StoredMessage, members: dict[int, str], *, fence: tuple[int, int] | None = None
    ) -> int:
        """Create a group, its conversation ``g:<gid>`` with ``first`` as seq 1, and its members.

        Returns the gid: ``group.gid`` when it is not 0 (one :meth:`reserve_gid` returned), else a new one
        the store assigns. ``first.conv`` is ignored (the conversation is ``g:<gid>``). ``fence``: as
        ``CommitBatch.fence`` (:meth:`MessageLog.raise_fence`): a lower token than the one recorded for
        its node id raises ``FenceRefused`` and creates nothing.
        """

    @abc.abstractmethod
    async def reserve_gid(self) -> int:
        """A gid no group has and no later call or :meth:`create_group` will hand out, for a
        :meth:`create_group` that must know its conversation before writing (the encrypted store binds
        the first message's ciphertext to it). A reserved gid never used is a gap, nothing more."""

    @abc.abstractmethod
    async def get_group(self, gid: int) -> Group | None: ...

    @abc.abstractmethod
    async def list_conversations(self, uid: int) -> list[ConversationSummary]:
        """The user's conversations, most recently active first."""


class CursorStore(Service, abc.ABC):
    """Where each device resumes (delivery cursors) and what each user read (read marks).

    Guarantees: cursors and marks never move back (saving a smaller value keeps the larger); a save is
    durable when it returns; a device never resumes before the point its user joined the conversation."""

    @abc.abstractmethod
    async def sync_points(self, uid: int, device: str) -> list[SyncPoint]:
        """For every conversation ``uid`` is a member of: head and this device's stored cursor
        (or the point the user joined, when the device has none)."""

    @abc.abstractmethod
    async def heads(self, uids: Sequence[int]) -> dict[int, dict[str, int]]:
        """uid -> {conv: last seq} for every conversation each of ``uids`` is a member of (a user in none
        is absent): one read for many users, for a gateway that checks what its devices may have missed."""

    @abc.abstractmethod
    async def start_cursor(self, uid: int, device: str, conv: str) -> int:
        """Where ``device`` resumes in ``conv``: the larger of its stored cursor and the user's join point."""

    @abc.abstractmethod
    async def save_cursors(self, cursors: Iterable[tuple[int, str, str, int]]) -> None:
        """Store (uid, device, conv, seq) delivery cursors; a cursor never moves back."""

    @abc.abstractmethod
    async def save_read_marks(self, marks: Iterable[tuple[int, str, int]]) -> None:
        """Store (uid, conv, seq) read marks; a mark never moves back."""

    @abc.abstractmethod
    async def read_marks(self, conv: str) -> dict[int, int]:
        """uid -> read seq for every member of ``conv``."""

    @abc.abstractmethod
    async def delivered_marks(self, conv: str) -> dict[int, int]:
        """uid -> the highest delivery cursor any of the user's devices saved in ``conv`` (0 when none),
        for every member of ``conv``."""

    @abc.abstractmethod
    async def devices(self, uid: int) -> list[tuple[str, int]]:
        """(name, last activity) of each device of the user that ever saved a delivery cursor, by name;
        the activity is when it last saved one (seconds since the epoch, the store's clock; 0 before this
        was kept)."""


class OutboxLockLost(Exception):
    """The holder of :meth:`Outbox.outbox_exclusive` lost it meanwhile (its database session ended): the
    store refused this fetch or delete, another relay may hold the lock now. Leave the exclusive block
    and enter it again."""


class Outbox(Service, abc.ABC):
    """The transactional outbox (a store built with ``outbox=True``): :meth:`MessageLog.commit` writes one
    row per committed message in the same transaction as the message, so an event exists if and only if
    its message was committed. A relay drains it: fetch, publish, then delete what was published.

    Guarantees: at least once (a row stays until deleted); per conversation, rows come in seq order;
    one drainer at a time across processes (:meth:`outbox_exclusive`), enforced by the store: a holder
    whose lock went away is refused (:class:`OutboxLockLost`) on its next fetch or delete."""

    @abc.abstractmethod
    async def outbox_fetch(self, limit: int) -> list[OutboxEvent]:
        """Up to ``limit`` outbox rows, oldest (smallest id) first.

        Guarantees: ids increase with commit order within a conversation (commits of one conversation
        are serialised), so per conversation the rows come in seq order; a row stays until
        :meth:`outbox_delete` removes it, so a relay that crashes before deleting fetches it again
        (at least once). Empty when the store was built without the outbox."""

    @abc.abstractmethod
    async def outbox_delete(self, ids: Sequence[int]) -> None:
        """Remove the given outbox rows (ids already gone are ignored); durable when it returns."""

    def outbox_exclusive(self) -> AbstractAsyncContextManager[None]:
        """Entered by a relay before it drains the outbox; held by one holder at a time across every
        process sharing the store, so two relays never interleave (which would break per-conversation
        order). Waits while another holder has it. The default suits stores one process owns.

        Fenced: a store whose hold can be lost without the holder knowing (a database session that dies
        with a database restart) makes :meth:`outbox_fetch` and :meth:`outbox_delete` fail, while held,
        once the hold is gone; the holder must then leave and enter again (waiting for whoever took it
        meanwhile), never go on draining without it."""
        return contextlib.nullcontext()


class ChatStore(MessageLog, GroupDirectory, CursorStore, Outbox, abc.ABC):
    """Durable conversation logs, groups and membership, cursors and read marks, and the outbox: the four
    concerns on one database, so that :meth:`commit` writes across them in one transaction.

    Guarantees: those of each part; and one commit is one transaction over all of them (a batch's
    messages, membership changes, read marks and outbox rows are all written, or none)."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Return once the database answered a trivial query now; raise if it cannot (readiness checks,
        im.observability.health). Touches no table: cheap enough for every probe the cache lets through."""


class ConversationKeys(Service, abc.ABC):
    """The wrapped data keys (``im.backends.keys.keyring``): one row per (name, version), the key itself
    encrypted by a master key the store never sees.

    Guarantees: :meth:`add_key` is insert-if-absent, so two processes that create the first key of a
    conversation at once both end up with the one that was stored first; a stored row never changes
    except by :meth:`rewrap` (same key, new wrapping) and never comes back once deleted; writes are
    durable when they return. Not part of :class:`ChatStore`'s commit: a key is stored (committed)
    before the first message it encrypts, so a crash between the two leaves an unused key, never a
    message without its key.
    """

    @abc.abstractmethod
    async def load_keys(self, names: Sequence[str]) -> dict[str, list[WrappedKey]]:
        """Every stored version of each of ``names`` (absent names left out), oldest version first;
        one round trip whatever the number of names."""

    @abc.abstractmethod
    async def add_key(self, key: WrappedKey) -> WrappedKey:
        """Store ``key`` unless (name, version) exists; returns what is stored there (``key``, or the
        row another writer stored first)."""

    @abc.abstractmethod
    async def list_keys(self, after: tuple[str, int] | None, limit: int) -> list[WrappedKey]:
        """Up to ``limit`` rows past (name, version) ``after`` in (name, version) order: every key, page
        by page (for rewrapping under a new master key)."""

    @abc.abstractmethod
    async def rewrap(self, old: WrappedKey, new: WrappedKey) -> bool:
        """Replace the wrapping of one row if it is still ``old`` (compare-and-set on master id and bytes);
        False when it changed meanwhile or is gone."""

    @abc.abstractmethod
    async def masters(self) -> dict[str, int]:
        """How many stored rows each master key id wraps (what a rotation has left to rewrap, and what
        a retirement must not remove)."""

    @abc.abstractmethod
    async def other_master(self, master_id: str) -> str | None:
        """The id of a master key other than ``master_id`` that wrapped some stored key, if any."""

    @abc.abstractmethod
    async def delete_keys(self, names: Sequence[str]) -> int:
        """Delete every version of each of ``names`` (crypto-shredding: what they encrypted becomes
        unreadable for good); returns the rows deleted."""


class StoredBodies(Service, abc.ABC):
    """Message bodies rewritten in place: what the online migration of a plaintext database uses
    (:class:`im.backends.chat.encrypted.PlaintextMigration`). Only that migration rewrites a stored body;
    everything else appends.

    A body is *plaintext* when its first byte is not ``0x01`` (the sealed format's first byte, which no
    JSON text starts with). Guarantees: :meth:`replace_bodies` is a compare-and-set per row (a row whose
    body is no longer the one read is left alone), all of one call in one transaction, durable when it
    returns; pages come in (conv, seq) order, so a scan resumed after a given (conv, seq) misses no row
    that existed when it started.
    """

    @abc.abstractmethod
    async def count_plaintext(self) -> tuple[int, int]:
        """(plaintext bodies, all messages) stored now."""

    @abc.abstractmethod
    async def plaintext_page(self, after: tuple[str, int] | None, limit: int) -> list[StoredMessage]:
        """Up to ``limit`` messages with a plaintext body past (conv, seq) ``after``, in (conv, seq) order."""

    @abc.abstractmethod
    async def replace_bodies(self, changes: Sequence[tuple[StoredMessage, bytes]]) -> int:
        """For each (message as read, new body): set the body of (conv, seq) to the new one if it is still
        the one read. Returns the rows changed. The old bytes are overwritten where the engine allows it
        (SQLite: ``secure_delete`` for these writes)."""

    @abc.abstractmethod
    async def scrub(self) -> bool:
        """After a migration: drop what the engine keeps of overwritten rows where it can do so online
        (SQLite: ``VACUUM`` the file, writers waiting meanwhile, then checkpoint and truncate the WAL;
        PostgreSQL: ``VACUUM`` the table; dead row versions and WAL archives are the operator's,
        docs/security.md 11.3). False when other connections kept it
        from finishing (SQLite under load, within its time-out): old versions may remain until the next
        full checkpoint."""
