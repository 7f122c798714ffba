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
takes effect everywhere within that time). The hot path stays cheap: a direct conversation whose two
users are cached is remembered as fresh (one lookup per send), and the send check runs only while some
cached user restricts anything (:attr:`Consent.restricted`), so where nobody blocks, a send costs a
set lookup and an attribute test (about 0.1 µs).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence

from im.backends.accounts import PrivacyStore
from im.backends.chat import MessageLog
from im.model.accounts import Privacy
from im.model.errors import ErrorCode, ImError

#: What an unknown user reads as: nobody may write to it.
_GONE = Privacy(deleted=True)
#: Cached entries (users, and (uid, conv) facts) beyond which a cache starts over.
_MAX_CACHED = 100_000


class Consent:
    """The consent rules over cached privacy (blocks, settings) of users. Lives on one event loop."""

    def __init__(
        self,
        accounts: PrivacyStore,
        chat: MessageLog,
        *,
        ttl: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._accounts = accounts
        self._chat = chat
        self._ttl = ttl
        self._clock = clock
        self._privacy: dict[int, tuple[Privacy, float]] = {}
        #: Cached users whose privacy restricts anything (blocks someone, contacts-only, deleted).
        self.restricted: set[int] = set()
        self._fresh: set[str] = set()  # direct convs whose two users are cached
        self._fresh_since = 0.0  # when the oldest user behind ``_fresh`` was loaded
        self._contacts_ok: set[tuple[int, int]] = set()  # (peer, sender) of this pass: sender is peer's contact
        self._wrote: set[tuple[int, str]] = set()  # (uid, direct conv) where uid has written: never undone

    def forget(self, uid: int) -> None:
        self._privacy.pop(uid, None)
        self.restricted.discard(uid)
        self._fresh.clear()  # rare (a block, a setting): simpler than finding uid's conversations

    def fresh_convs(self) -> set[str]:
        """Direct conversations whose two users are cached (within ``ttl``): nothing to load for them.
        With a ``ttl``, the whole set starts over once its oldest user is due to be read again."""
        if self._ttl is not None and self._fresh and self._clock() - self._fresh_since > self._ttl:
            self._fresh.clear()
        return self._fresh

    async def load(self, uids: Iterable[int]) -> dict[int, Privacy]:
        """Privacy of ``uids``; what is not cached (or is older than ``ttl``) is read in one batch."""
        wanted = set(uids)
        await self._ensure(wanted)
        cache = self._privacy
        return {u: cache[u][0] for u in wanted}

    async def _ensure(self, wanted: set[int]) -> None:
        cache, ttl = self._privacy, self._ttl
        now = self._clock()
        missing = [u for u in wanted if (c := cache.get(u)) is None or (ttl is not None and now - c[1] > ttl)]
        if not missing:
            return
        if len(cache) + len(missing) > _MAX_CACHED:  # start over (then everything wanted is read now)
            cache.clear()
            self.restricted.clear()
            self._fresh.clear()
            missing = list(wanted)
        found = await self._accounts.privacy(missing)
        for u in missing:
            p = found.get(u, _GONE)
            cache[u] = (p, now)
            if p.blocked or p.contacts_only or p.deleted:
                self.restricted.add(u)
            else:
                self.restricted.discard(u)

    async def prepare(self, uids: set[int], new_direct: Sequence[tuple[int, int]], directs: Sequence[str] = ()) -> None:
        """Before a committer pass: the privacy of ``uids`` (both users of each direct send, users being
        added to groups), and for each (sender, peer) starting a direct conversation with a contacts-only
        peer, whether the peer has the sender as a contact. ``directs`` (existing direct conversations
        whose users are among ``uids``) are remembered as fresh."""
        self._contacts_ok = set()
        if not uids:
            return
        await self._ensure(uids)
        cache = self._privacy
        fresh = self._fresh
        if len(fresh) + len(directs) > _MAX_CACHED:
            fresh.clear()
        for conv in directs:
            _, a, b = conv.split(":")
            loaded = min(cache[int(a)][1], cache[int(b)][1])
            self._fresh_since = min(self._fresh_since, loaded) if fresh else loaded
            fresh.add(conv)
        asks = {(peer, sender) for sender, peer in new_direct if cache[peer][0].contacts_only}
        if asks:
            self._contacts_ok = await self._accounts.contact_pairs(sorted(asks))

    def check_send(self, sender: int, peer: int, *, new: bool) -> None:
        """Raise the refusal when ``sender`` may not write to ``peer`` (``new``: the direct conversation
        does not exist yet). Uses what :meth:`prepare` loaded; a user it did not load passes."""
        restricted = self.restricted
        if sender not in restricted and peer not in restricted:
            return
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
