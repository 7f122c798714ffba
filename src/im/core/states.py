"""The cached state of conversations (kind, members and roles, head seq), shared by the committer and
the read side of one process.

The committer checks every send and membership change against this state and advances it in place as
it builds a batch (a pass bumps ``last_seq``, adds and removes members), so in ``im serve``, where that
committer is the only writer, the cache is the truth and the read side sees each change as soon as it is
committed. Where other processes write too (distributed mode), ``ttl`` bounds how stale a read may be:
an entry older than that is read again from the store. The committer never trusts a stale entry for a
write: the store refuses a batch whose heads moved (:class:`~im.model.errors.SeqConflict`) and the
committer drops what it cached before retrying.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from im.backends.chat import MessageLog
from im.model.chat import ConversationState
from im.model.errors import ErrorCode, ImError
from im.model.ids import conv_out_of_range

#: Load times kept (distributed mode) beyond which the bookkeeping starts over (entries then age anew).
_MAX_LOAD_TIMES = 100_000


def unknown_conv(conv: str) -> ImError:
    """The refusal of a conversation id :func:`~im.model.ids.parse_conv` refused: ``invalid`` when only
    an id in it is out of range (docs/protocol.md section 6), else ``not_found``."""
    if conv_out_of_range(conv):
        return ImError(ErrorCode.INVALID, "ids in a conversation id are 1..2^63-1")
    return ImError(ErrorCode.NOT_FOUND, f"no conversation {conv[:80]!r}")


class ConversationStates:
    """Conversation states by conversation id, loaded from the store in batches. One event loop."""

    def __init__(self, store: MessageLog, *, ttl: float | None = None, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        # None: this process's committer is the only writer and the cache is the truth (im serve). A
        # number: other processes write too, so states older than this are read again.
        self._ttl = ttl
        self._clock = clock
        self._loaded_at: dict[str, float] = {}
        #: The cached states. The committer reads and edits them in place on its hot path (a pass advances
        #: ``last_seq`` and the members); everyone else goes through :meth:`load` and :meth:`members_by_conv`.
        self.by_conv: dict[str, ConversationState] = {}

    def get(self, conv: str) -> ConversationState | None:
        """The cached state of ``conv`` (None when not cached or unknown); call :meth:`load` first."""
        return self.by_conv.get(conv)

    def forget(self, conv: str) -> None:
        """Drop the cached state of ``conv``: the next :meth:`load` reads it from the store."""
        self.by_conv.pop(conv, None)

    async def load(self, convs: Sequence[str]) -> None:
        """Make the state of every known conversation of ``convs`` cached and within ``ttl``: what is not
        cached (or too old) is read in one store call. Unknown conversations stay absent."""
        states, ttl = self.by_conv, self._ttl
        now = 0.0
        if ttl is not None:
            now = self._clock()
            loaded_at = self._loaded_at
            for c in convs:
                if now - loaded_at.get(c, -1e18) > ttl:
                    states.pop(c, None)
        missing = sorted({c for c in convs if c not in states})
        if missing:
            states.update(await self._store.load_conversations(missing))
            if ttl is not None:
                if len(self._loaded_at) > _MAX_LOAD_TIMES:
                    self._loaded_at.clear()
                self._loaded_at.update(dict.fromkeys(missing, now))

    async def members_by_conv(self, convs: Sequence[str]) -> dict[str, dict[int, str]]:
        """Members of each conversation (empty for an unknown one), as copies; one batched load."""
        await self.load(convs)
        states = self.by_conv
        return {conv: dict(state.members) if (state := states.get(conv)) else {} for conv in convs}
