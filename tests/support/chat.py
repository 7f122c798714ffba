"""The chat core of one process wired over given backends, as the composition root wires it: one state
cache and one consent shared by the committer, the group writes and the read side."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from im.backends.accounts import AccountStore
from im.backends.chat import ChatStore
from im.backends.presence import Presence
from im.backends.routing import Router
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
) -> ChatCore:
    """Build (not start) the core: ``core.committer.start()`` before sending, ``stop()`` after."""
    states = ConversationStates(store, ttl=state_ttl, clock=clock)
    consent = Consent(accounts, store, ttl=privacy_ttl, clock=clock)
    ids = Snowflake(node_id)
    committer = Committer(store, accounts, router, presence, states, consent, files=files, ids=ids, clock=clock)
    groups = Groups(committer, store, accounts, consent)
    reads = ChatReads(store, accounts, presence, states, consent)
    return ChatCore(committer, groups, reads, consent, store, accounts, router, presence)
