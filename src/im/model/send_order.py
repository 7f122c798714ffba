"""One device's sends to one conversation are stored in the order it sent them, across retryable refusals.

A client pipelines its sends. When send X of a device to conversation c is refused with a retryable code
(``unavailable``, ``rate_limited``, ``too_many_in_flight``), a later send Y of that device to c may already
be on its way, and could be stored before X is resent: the device's messages would be stored out of the
order it typed them. :class:`SendOrder` is the barrier that prevents it: once X is refused, every later
send of that (device, conversation) is refused too (``unavailable``, :func:`behind_refused`) until X
itself arrives again (it lifts the barrier and goes ahead), X is found stored (:meth:`SendOrder.lift`: the
client resent it to another node, which took it) or the barrier expires (``hold`` seconds: a
client that gave X up is not blocked for ever). A client that resends its refused sends in their
original order, before newer ones (the SDK and the web client do), sees every send stored in order.

Sans-I/O: no asyncio, the clock is injected. Used by the committer (keys: uid, device, conversation) and
by each gateway connection's session (key: the conversation; the connection fixes uid and device).

Guarantees and limits: checking a send costs one dict lookup, and nothing at all while no barrier is
held (callers test :attr:`SendOrder.held` first); memory is bounded by ``max_entries`` (the oldest
barrier goes first; an evicted barrier no longer holds its later sends back) and expired barriers are
dropped as new ones come.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from im.model.errors import ErrorCode, ImError

K = TypeVar("K", bound=Hashable)

#: Seconds a barrier holds when nothing else says (``limits.send_order_hold``).
DEFAULT_HOLD = 30.0


def behind_refused(barring: str) -> ImError:
    """The refusal of a send that waits for the earlier refused send ``barring`` to be resent."""
    return ImError(
        ErrorCode.UNAVAILABLE,
        f"an earlier send of this conversation (cmid {barring[:64]!r}) was refused; resend it first, then this one",
    )


class SendOrder(Generic[K]):
    """Barriers by key: the refused send each waits for, its order and when it was refused.

    ``order`` numbers are the caller's (e.g. a connection's send counter): a refusal of an earlier send
    (a lower number) takes the barrier over from a later one, whatever order the refusals came back in;
    a check with a number only stops sends after the barrier's. Callers whose refusals always arrive in
    send order (the committer) leave them out."""

    __slots__ = ("_clock", "held", "hold", "max_entries")

    def __init__(
        self, *, hold: float = DEFAULT_HOLD, max_entries: int = 100_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        #: key -> (cmid of the refused send, its order, when it was refused). Empty: nothing is held.
        self.held: dict[K, tuple[str, int, float]] = {}
        #: Seconds a barrier holds (0: no barrier is ever made).
        self.hold = hold
        self.max_entries = max_entries
        self._clock = clock

    def refused(self, key: K, cmid: str, order: int | None = None) -> None:
        """Send ``cmid`` of ``key`` was refused with a retryable code: hold its later sends back. A barrier
        already held for an earlier (or unnumbered) send stays."""
        if self.hold <= 0:
            return
        held = self.held
        now = self._clock()
        entry = held.get(key)
        if entry is not None:
            if now - entry[2] < self.hold and (order is None or entry[1] <= order):
                return
            del held[key]  # (re-added at the end: the dict stays in the order of refusal)
        held[key] = (cmid, 0 if order is None else order, now)
        # Bounded: expired barriers from the oldest end, then the oldest while over the cap.
        while held:
            first = next(iter(held))
            if now - held[first][2] < self.hold and len(held) <= self.max_entries:
                break
            del held[first]

    def barring(self, key: K, cmid: str, order: int | None = None) -> str | None:
        """The cmid of the refused send that send ``cmid`` of ``key`` must wait for, or None when it may go
        ahead: no barrier, it is that refused send itself (which lifts the barrier), the barrier expired,
        or (``order`` given) it was sent before the refused one."""
        entry = self.held.get(key)
        if entry is None:
            return None
        if entry[0] == cmid or self._clock() - entry[2] >= self.hold:
            del self.held[key]
            return None
        if order is not None and order <= entry[1]:
            return None
        return entry[0]

    def lift(self, key: K, cmid: str) -> None:
        """Refused send ``cmid`` of ``key`` is stored after all (resent to another node, which took it): the
        barrier held for it goes, as if it had come again; one held for another send stays."""
        entry = self.held.get(key)
        if entry is not None and entry[0] == cmid:
            del self.held[key]

    def __len__(self) -> int:
        return len(self.held)
