"""The chat core of one process wired over given backends, as the composition root wires it: one state
cache and one consent shared by the committer, the group writes and the read side."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from im.backends.accounts import AccountStore
from im.backends.accounts.sqlite import SqliteAccountStore
from im.backends.chat import ChatStore
from im.backends.chat.sqlite import SqliteChatStore
from im.backends.presence import Presence
from im.backends.presence.memory import MemoryPresence
from im.backends.routing import Router
from im.backends.routing.memory import MemoryRouter
from im.backends.sql.sqlite_db import SqliteDatabase
from im.core.committer import Committer, FileAccess
from im.core.consent import Consent
from im.core.groups import Groups
from im.core.ids import Snowflake
from im.core.reads import ChatReads
from im.core.states import ConversationStates


@dataclass(frozen=True, slots=True)
class ChatCore:
    """The write path (``committer``, ``groups``) and the read side (``reads``) of one process, and the
    backends they were built on (for the tests' own setup and teardown)."""

    committer: Committer
    groups: Groups
    reads: ChatReads
    consent: Consent
    store: ChatStore
    accounts: AccountStore
    router: Router
    presence: Presence


def chat_core(
    store: ChatStore,
    accounts: AccountStore,
    router: Router,
    presence: Presence,
    *,
    files: FileAccess | None = None,
    node_id: int = 0,
    state_ttl: float | None = None,
    privacy_ttl: float | None = None,
    clock: Callable[[], float] = time.time,
    shred: Callable[[Sequence[str]], Awaitable[int]] | None = None,
) -> ChatCore:
    """Build (not start) the core: ``core.committer.start()`` before sending, ``stop()`` after.
    ``shred``: what the group writes destroy a conversation's keys with (as the composition root wires
    the keyring's); None: they destroy none."""
    states = ConversationStates(store, ttl=state_ttl, clock=clock)
    consent = Consent(accounts, store, ttl=privacy_ttl, clock=clock)
    ids = Snowflake(node_id)
    committer = Committer(store, accounts, router, presence, states, consent, files=files, ids=ids, clock=clock)
    groups = Groups(committer, store, accounts, consent, shred=shred)
    reads = ChatReads(store, accounts, presence, states, consent)
    return ChatCore(committer, groups, reads, consent, store, accounts, router, presence)


@contextlib.asynccontextmanager
async def two_writers(db_file: Path, users: Sequence[str]) -> AsyncIterator[tuple[ChatCore, ChatCore]]:
    """Two started cores (two processes: each its own SQLite database object, committer and memory router
    and presence) writing to one database file, on which ``users`` are created (uids 1, 2, ... in order);
    stopped and closed at the end."""
    cores = []
    for _ in range(2):
        db = SqliteDatabase(db_file)  # two database objects: two writers on one file
        chat, accounts = SqliteChatStore(db), SqliteAccountStore(db)
        await chat.start()
        await accounts.start()
        core = chat_core(chat, accounts, MemoryRouter(), MemoryPresence())
        core.committer.start()
        cores.append(core)
    for name in users:
        await cores[0].accounts.create_user(name, name, "hash", 0)
    yield cores[0], cores[1]
    for core in cores:
        await core.committer.stop()
        await core.accounts.close()
        await core.store.close()
