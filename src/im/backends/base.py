"""The backend interfaces: small, each stating the guarantee the core relies on.

The IM rules (seq assignment, dedupe, membership, cursors) live in ``im.core``; a backend only stores,
looks up and carries. Every interface has an in-process implementation that ``im serve`` uses and that
the shared contract tests exercise; engine-backed ones (PostgreSQL, Redis, etcd)
must pass the same suite.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field

import msgspec

# --- data -----------------------------------------------------------------------------------------------


class StoredMessage(msgspec.Struct, gc=False):
    """One entry of a conversation's log. ``body`` is the message body as JSON text."""

    conv: str
    seq: int
    mid: int
    sender: int
    device: str
    cmid: str
    ts: int  # milliseconds since the Unix epoch
    type: str
    body: bytes


@dataclass(slots=True)
class ConversationState:
    """What the core needs to accept a send: the log head and who may write."""

    conv: str
    kind: str  # "direct" | "group"
    last_seq: int
    members: dict[int, str]  # uid -> role ("owner" | "admin" | "member")


@dataclass(frozen=True, slots=True)
class MemberChange:
    """Add (role set) or remove (role None) a member; ``joined_seq`` is the log head before they joined."""

    conv: str
    uid: int
    role: str | None
    joined_seq: int = 0


@dataclass(slots=True)
class CommitBatch:
    """Everything one group commit writes, atomically.

    ``heads`` maps conv -> (expected last_seq before, new last_seq, ts of the newest message); a store
    must refuse the whole batch with :class:`SeqConflict` when any expected head does not match, when a
    (conv, seq) exists already, or when a (sender, device, cmid) exists already.
    """

    messages: list[StoredMessage] = field(default_factory=list)
    heads: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    new_conversations: list[ConversationState] = field(default_factory=list)
    member_changes: list[MemberChange] = field(default_factory=list)
    read_marks: list[tuple[int, str, int]] = field(default_factory=list)  # (uid, conv, seq)
    file_refs: list[tuple[str, str]] = field(default_factory=list)  # (file_id, conv): grants members read


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    """One committed message waiting in the transactional outbox to be published (no body: the event
    says that something arrived, the log has the content). ``created_at`` is the message ts (ms)."""

    id: int
    conv: str
    seq: int
    mid: int
    sender: int
    type: str
    created_at: int


class SeqConflict(Exception):
    """Another writer got there first (head moved, seq taken or cmid used): reload and retry."""


class Conflict(Exception):
    """A unique value (user name, ...) is taken."""


@dataclass(frozen=True, slots=True)
class SyncPoint:
    """Per conversation of a user: the log head and where this device resumes when it says nothing."""

    conv: str
    last_seq: int
    cursor: int


@dataclass(frozen=True, slots=True)
class ConversationSummary:
    conv: str
    kind: str
    title: str
    last_seq: int
    read_seq: int
    unread: int
    last_message: StoredMessage | None
    peer: int | None  # the other user of a direct conversation


@dataclass(frozen=True, slots=True)
class User:
    uid: int
    username: str
    display_name: str
    created_at: int


@dataclass(frozen=True, slots=True)
class Group:
    gid: int
    name: str
    owner: int
    created_at: int


@dataclass(frozen=True, slots=True)
class AuthSession:
    """A login: the refresh token's hash, and whether logout revoked it.

    ``expires_at`` is when the refresh token stops working (the idle limit, moved on by each refresh but
    never past the absolute limit); ``created_at`` is the login and ``last_used`` the last refresh
    (seconds since the epoch; 0 for sessions stored before these were kept)."""

    sid: str
    uid: int
    refresh_hash: str
    expires_at: int
    revoked: bool
    created_at: int = 0
    last_used: int = 0


@dataclass(frozen=True, slots=True)
class Privacy:
    """What the consent rules need to know about one user: whom they block, whether only their
    contacts may start a direct conversation with them, and whether the account was deleted."""

    blocked: frozenset[int] = frozenset()
    contacts_only: bool = False
    deleted: bool = False


# --- interfaces -----------------------------------------------------------------------------------------


class ChatStore(abc.ABC):
    """Durable conversation logs, membership and cursors.

    Guarantees: :meth:`commit` is atomic and durable when it returns (all of a batch or none of it);
    (conv, seq) and (sender, device, cmid) are unique; a batch whose heads moved is refused whole. Reads
    see every committed batch.
    """

    async def start(self) -> None:  # noqa: B027 - optional lifecycle hook
        """Open connections, run migrations."""

    async def close(self) -> None:  # noqa: B027
        """Release resources; pending commits have finished."""

    @abc.abstractmethod
    async def load_conversations(self, convs: Sequence[str]) -> dict[str, ConversationState]:
        """The state of each existing conversation among ``convs`` (absent ones are left out)."""

    @abc.abstractmethod
    async def find_sent(self, keys: Sequence[tuple[int, str, str]]) -> dict[tuple[int, str, str], StoredMessage]:
        """Messages already stored under (sender, device, cmid), for idempotent retries."""

    @abc.abstractmethod
    async def commit(self, batch: CommitBatch) -> None:
        """Write the batch atomically and durably, or raise :class:`SeqConflict` and write nothing."""

    @abc.abstractmethod
    async def create_group(self, group: Group, first: StoredMessage, members: dict[int, str]) -> int:
        """Create a group, its conversation ``g:<gid>`` with ``first`` as seq 1, and its members.

        Returns the new gid (``group.gid`` and ``first.conv`` are ignored; the store assigns them).
        """

    @abc.abstractmethod
    async def get_group(self, gid: int) -> Group | None: ...

    @abc.abstractmethod
    async def read_range(
        self, conv: str, after: int, before: int | None, limit: int, newest_first: bool = False
    ) -> list[StoredMessage]:
        """Messages with after < seq < before (before None: no upper bound), ``limit`` at most.

        Oldest first, or newest first when ``newest_first`` (for paging back through history).
        """

    @abc.abstractmethod
    async def sync_points(self, uid: int, device: str) -> list[SyncPoint]:
        """For every conversation ``uid`` is a member of: head and this device's stored cursor
        (or the point the user joined, when the device has none)."""

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
    async def list_conversations(self, uid: int) -> list[ConversationSummary]:
        """The user's conversations, most recently active first."""

    # The transactional outbox (a store built with ``outbox=True``): :meth:`commit` writes one row per
    # committed message in the same transaction as the message, so an event exists if and only if its
    # message was committed. A relay drains it: fetch, publish, then delete what was published.

    @abc.abstractmethod
    async def devices(self, uid: int) -> list[tuple[str, int]]:
        """(name, last activity) of each device of the user that ever saved a delivery cursor, by name;
        the activity is when it last saved one (seconds since the epoch, the store's clock; 0 before this
        was kept)."""

    @abc.abstractmethod
    async def wrote_in(self, pairs: Sequence[tuple[int, str]]) -> set[tuple[int, str]]:
        """Those (sender, conv) pairs where ``sender`` has at least one message in ``conv`` (the
        presence rule: a direct partner sees you once you wrote). Committed messages only; once true,
        true for ever (messages are never deleted)."""

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
        order). Waits while another holder has it. The default suits stores one process owns."""
        return contextlib.nullcontext()


class AccountStore(abc.ABC):
    """Users, login sessions, contacts, blocks and settings. Guarantees: user names are unique
    (case-insensitive); a revoked session stays revoked; a deleted user stays deleted (its row stays as a
    tombstone so messages keep a sender, its name is freed). Every write is durable when it returns."""

    async def start(self) -> None:  # noqa: B027
        """Open connections, run migrations."""

    async def close(self) -> None:  # noqa: B027
        """Release resources."""

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

    @abc.abstractmethod
    async def delete_user(self, uid: int, now: int) -> list[str]:
        """Delete an account, atomically: its sessions are revoked (their sids are returned), its
        contacts, blocks (both ways), device cursors and file ownerships are removed, and its row becomes
        a tombstone (name ``~deleted~<uid>``, so the old name is free; display name "Deleted user"; no
        password). Messages and conversation memberships are left to the chat rules."""

    # --- consent ------------------------------------------------------------------------------------------

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


@dataclass(frozen=True, slots=True)
class DeviceLocation:
    uid: int
    device: str
    node: str


class Presence(abc.ABC):
    """Which gateway node holds which (user, device). A routing hint, never the truth: an entry may be
    stale for up to its TTL, so senders must rely on the log and cursors, not on presence, for delivery."""

    @abc.abstractmethod
    async def set_online(self, entries: Sequence[DeviceLocation], ttl: float) -> None:
        """Add or refresh entries; each expires ``ttl`` seconds after its last refresh."""

    @abc.abstractmethod
    async def set_offline(self, entries: Sequence[DeviceLocation]) -> None: ...

    @abc.abstractmethod
    async def locate(self, uids: Iterable[int]) -> dict[int, list[DeviceLocation]]:
        """Live entries of the given users (users with none are left out)."""


class DeliverySink(abc.ABC):
    """What a gateway node exposes to the router: messages and events for its local sessions."""

    @abc.abstractmethod
    def deliver(self, messages: Sequence[StoredMessage], recipients: Sequence[Sequence[int]]) -> None:
        """``messages[i]`` goes to every local device of the users ``recipients[i]``."""

    @abc.abstractmethod
    def deliver_event(self, frame: object, uids: Iterable[int], skip: tuple[int, str] | None) -> None:
        """An ephemeral frame (typing, receipt) to the users' local devices, except ``skip`` (uid, device)."""


class Router(abc.ABC):
    """Carries committed messages to the gateway nodes that hold recipients.

    Guarantee: per (sending core, gateway node), batches arrive in the order published; at most once
    (a lost batch is recovered by the recipient session from the log, never by the router)."""

    @abc.abstractmethod
    def attach(self, node: str, sink: DeliverySink) -> None:
        """Register a local gateway node."""

    @abc.abstractmethod
    def detach(self, node: str) -> None: ...

    @abc.abstractmethod
    def publish(self, node: str, messages: Sequence[StoredMessage], recipients: Sequence[Sequence[int]]) -> None:
        """Send one batch to ``node``; never blocks, never raises for an unreachable node."""

    @abc.abstractmethod
    def publish_event(self, node: str, frame: object, uids: Sequence[int], skip: tuple[int, str] | None) -> None:
        """Send an ephemeral event to ``node``."""


@dataclass(frozen=True, slots=True)
class ServiceInstance:
    role: str  # "gateway" | "transfer" | "api"
    node: str
    addresses: dict[str, str]  # e.g. {"ws": "ws://host:port/ws"}
    load: int = 0


class Registry(abc.ABC):
    """Live service instances. Guarantee: an instance is listed only while its registration is alive
    (kept alive by its owner; gone after a clean stop at once, after a crash within its TTL)."""

    @abc.abstractmethod
    async def register(self, instance: ServiceInstance, ttl: float) -> None: ...

    @abc.abstractmethod
    async def update_load(self, node: str, load: int) -> None:
        """Publish the node's load; also renews its registration (a keepalive)."""

    @abc.abstractmethod
    async def deregister(self, node: str) -> None: ...

    @abc.abstractmethod
    async def instances(self, role: str) -> list[ServiceInstance]: ...

    @abc.abstractmethod
    def watch(self, role: str, callback: Callable[[list[ServiceInstance]], None]) -> Callable[[], None]:
        """Call ``callback`` with the full live list now and on every change; returns an unsubscribe."""
