"""Consent: who may write to whom, who may add whom to a group, and who sees whose presence and typing.

The rules (docs/protocol.md section 18, "Blocking and consent"):

- a user who is blocked by X cannot write in the direct conversation with X, start one, add X to a
  group, or see X's presence or typing; X, while blocking them, cannot write to them either;
- with the setting ``contacts_only``, only users X has in its contacts may start a direct conversation
  with X (existing conversations go on);
- both refusals read the same (``forbidden``, "user X does not accept your messages"), so the refused
  user cannot tell a block from the setting; group messages are not filtered by blocks;
- a deleted account takes no messages (``not_found``, as an unknown user).

The checks run inside the committer's pass with no I/O: :meth:`Consent.prepare` loads what a pass needs
in one batch before it. Blocks and settings are cached per user: kept until :meth:`Consent.forget` when
``ttl`` is None (``im serve``: the account service of the same process announces each change, so a
block takes effect at once), read again when older than ``ttl`` otherwise (distributed mode: a block
takes effect everywhere within that time). Users who block nobody cost one dict lookup per send.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence

from im.backends.base import AccountStore, ChatStore, Privacy
from im.protocol.errors import ErrorCode, ImError

#: What an unknown user reads as: nobody may write to it.
_GONE = Privacy(deleted=True)
#: Cached entries (users, and (uid, conv) facts) beyond which a cache starts over.
_MAX_CACHED = 100_000


class Consent:
    """The consent rules over cached privacy (blocks, settings) of users. Lives on one event loop."""

    def __init__(
        self,
        accounts: AccountStore,
        chat: ChatStore,
        *,
        ttl: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._accounts = accounts
        self._chat = chat
        self._ttl = ttl
        self._clock = clock
        self._privacy: dict[int, tuple[Privacy, float]] = {}
        self._contacts_ok: set[tuple[int, int]] = set()  # (peer, sender) of this pass: sender is peer's contact
        self._wrote: set[tuple[int, str]] = set()  # (uid, direct conv) where uid has written: never undone

    def forget(self, uid: int) -> None:
        self._privacy.pop(uid, None)

    async def load(self, uids: Iterable[int]) -> dict[int, Privacy]:
        """Privacy of ``uids``; what is not cached (or is older than ``ttl``) is read in one batch."""
        cache, ttl = self._privacy, self._ttl
        now = self._clock()
        wanted = set(uids)
        missing = [u for u in wanted if (c := cache.get(u)) is None or (ttl is not None and now - c[1] > ttl)]
        if missing:
            found = await self._accounts.privacy(missing)
            if len(cache) + len(missing) > _MAX_CACHED:
                cache.clear()
            for u in missing:
                cache[u] = (found.get(u, _GONE), now)
        return {u: cache[u][0] for u in wanted}

    async def prepare(self, uids: set[int], new_direct: Sequence[tuple[int, int]]) -> None:
        """Before a committer pass: the privacy of ``uids`` (both users of each direct send, users being
        added to groups), and for each (sender, peer) starting a direct conversation with a contacts-only
        peer, whether the peer has the sender as a contact."""
        self._contacts_ok = set()
        if not uids:
            return
        privacy = await self.load(uids)
        asks = {(peer, sender) for sender, peer in new_direct if privacy[peer].contacts_only}
        if asks:
            self._contacts_ok = await self._accounts.contact_pairs(sorted(asks))

    def check_send(self, sender: int, peer: int, *, new: bool) -> None:
        """Raise the refusal when ``sender`` may not write to ``peer`` (``new``: the direct conversation
        does not exist yet). Uses what :meth:`prepare` loaded; a user it did not load passes."""
        theirs = self._privacy.get(peer)
        if theirs is not None:
            p = theirs[0]
            if p.deleted:
                raise ImError(ErrorCode.NOT_FOUND, f"no user {peer}")
            if sender in p.blocked or (new and p.contacts_only and (peer, sender) not in self._contacts_ok):
                raise ImError(ErrorCode.FORBIDDEN, f"user {peer} does not accept your messages")
        mine = self._privacy.get(sender)
        if mine is not None and peer in mine[0].blocked:
            raise ImError(ErrorCode.FORBIDDEN, f"you blocked user {peer}: unblock them to write")

    def check_add(self, actor: int, uid: int) -> None:
        """Raise the refusal when ``actor`` may not add ``uid`` to a group (``uid`` blocks the actor, or
        is deleted). Uses what :meth:`load` or :meth:`prepare` loaded."""
        cached = self._privacy.get(uid)
        if cached is not None:
            if cached[0].deleted:
                raise ImError(ErrorCode.NOT_FOUND, f"no user {uid}")
            if actor in cached[0].blocked:
                raise ImError(ErrorCode.FORBIDDEN, f"user {uid} does not accept your messages")

    async def hidden_from(self, uid: int, viewers: Sequence[int]) -> set[int]:
        """Those of ``viewers`` that must not see ``uid``'s typing or presence: the users ``uid`` blocks,
        and the users who block ``uid``."""
        privacy = await self.load({uid, *viewers})
        mine = privacy[uid].blocked
        return {v for v in viewers if v in mine or uid in privacy[v].blocked}

    async def wrote_in(self, pairs: Sequence[tuple[int, str]]) -> set[tuple[int, str]]:
        """Those (uid, conv) where ``uid`` has written in ``conv``; a yes is cached for good (messages are
        never deleted), a no is asked again next time."""
        ask = [pair for pair in pairs if pair not in self._wrote]
        if ask:
            if len(self._wrote) > _MAX_CACHED:
                self._wrote.clear()
            self._wrote.update(await self._chat.wrote_in(ask))
        return {pair for pair in pairs if pair in self._wrote}
