"""The shared rate limits of a gateway's hub: per user over all their devices and gateways, and per
conversation over all its members (config ``rates``), in front of what connections carry out.

Each connection's own token buckets (``limits.send_rate``, ``limits.typing_rate``) come first, in the
session; what passes them comes here (:meth:`SharedRateGate.gate`). With an in-memory limiter (``im
serve``) a command is decided at once; with one that needs I/O (Redis), the commands of one event-loop
turn are decided in one call, one call at a time, so each connection's commands keep their order.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from im.backends.rate_limit import Hit, RateLimiter, Rule
from im.model.errors import ErrorCode
from im.model.ids import direct_conv
from im.observability.metrics import METRICS
from im.protocol import commands as cmd

if TYPE_CHECKING:
    from im.gateway.hub import Connection

#: A command that passes the shared limits before it is carried out.
Gated = cmd.Submit | cmd.SaveCursor | cmd.MarkRead | cmd.SendTyping


@dataclass(frozen=True, slots=True)
class HubRates:
    """The shared rate limits the gateway applies (config ``rates``): per user over all their devices and
    gateways, and per conversation over all its members. Each connection's own token buckets
    (``limits.send_rate``, ``limits.typing_rate``) come first, in the session."""

    sends_per_user: Rule
    sends_per_conversation: Rule
    typing_per_user: Rule
    receipts_per_user: Rule


class SendLease:
    """Units of one shared send budget (a user's, or a conversation's) that a connection took ahead.

    Taking a few units per limiter call instead of one per send keeps the limiter off the per-message
    path of ``im serve``; units are counted against the budget when taken, so a lease can only make the
    budget stricter, except that the units a connection still holds may be spent after the budget's
    window moved on (at most the lease size per connection)."""

    __slots__ = ("credit", "hit")

    def __init__(self, hit: Hit) -> None:
        self.hit = hit
        self.credit = 0


def lease_size(rule: Rule) -> int:
    """Units taken per limiter call for ``rule``: 1/256 of its burst, 1 to 32 (small budgets stay exact)."""
    return max(1, min(32, rule.limit // 256))


class SharedRateGate:
    """The hub's shared limits: hits and leases on the connections, one limiter call per loop turn."""

    def __init__(self, limiter: RateLimiter | None, rates: HubRates | None, connections: Iterable[Connection]) -> None:
        #: None (no rates): only the per-connection limits apply, :attr:`enabled` is False.
        self._limiter = limiter if rates is not None else None
        self._rates = rates
        self._connections = connections  # the hub's live set: leases are dropped there on a change
        self._user_lease = lease_size(rates.sends_per_user) if rates is not None else 1
        self._conv_lease = lease_size(rates.sends_per_conversation) if rates is not None else 1
        self._gated: list[tuple[Connection, Gated]] = []
        #: The task deciding queued commands (None when none wait); the hub cancels it when it stops.
        self.task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        """Whether sends, typing and receipts pass the shared rate limits (:meth:`gate`)."""
        return self._limiter is not None

    def _first_limited_frame(self, conn: Connection) -> None:
        hits = conn.user_hits = self.user_hits(conn.session.uid)
        assert hits is not None
        conn.user_sends = SendLease(hits[0])

    def set_rates(self, rates: HubRates) -> None:
        """New shared rate limits (a dynamic setting changed): every connection takes its hits and leases
        afresh at its next limited frame (units it held ahead are dropped, never granted twice)."""
        if self._rates is None or rates == self._rates:
            return  # built without shared limits, or unchanged: nothing to do
        self._rates = rates
        self._user_lease = lease_size(rates.sends_per_user)
        self._conv_lease = lease_size(rates.sends_per_conversation)
        for conn in self._connections:
            conn.user_hits = None
            conn.user_sends = None
            conn.conv_sends = None

    def user_hits(self, uid: int) -> tuple[Hit, Hit, Hit] | None:
        """A user's hits of the per-user limits (sends, typing, receipts); None without shared limits."""
        if self._limiter is None or self._rates is None:
            return None
        r, key = self._rates, str(uid)
        return Hit(r.sends_per_user, key), Hit(r.typing_per_user, key), Hit(r.receipts_per_user, key)

    def _conv_lease_of(self, conn: Connection, c: cmd.Submit) -> SendLease:
        key = c.conv if c.conv is not None else c.to
        leases = conn.conv_sends
        if leases is None:
            leases = conn.conv_sends = {}
        lease = leases.get(key)
        if lease is None:
            assert self._rates is not None
            if len(leases) >= 1024:  # bound the per-connection cache (held units are forgone)
                leases.clear()
            conv = c.conv if c.conv is not None else direct_conv(conn.session.uid, c.to or 0)
            lease = leases[key] = SendLease(Hit(self._rates.sends_per_conversation, conv))
        return lease

    def _refill(self, lease: SendLease, size: int) -> float | None:
        """Make ``lease`` hold a unit: take ``size`` units in one call, or one when fewer are left. 0.0
        when it holds one, the wait when the budget is spent, None when the limiter needs I/O."""
        if lease.credit:
            return 0.0
        assert self._limiter is not None
        check = self._limiter.check_now
        if size > 1:
            waits = check((lease.hit._replace(cost=size),))
            if waits is None:
                return None
            if not waits[0]:
                lease.credit = size
                return 0.0
        waits = check((lease.hit,))
        if waits is None:
            return None
        if not waits[0]:
            lease.credit = 1
        return waits[0]

    def gate(self, conn: Connection, c: Gated) -> None:
        """Pass a command through the shared rate limits: at once when the limiter decides without I/O
        (in memory: ``im serve``) and nothing is waiting for a decision (which keeps each connection's
        order); else queued and decided with the others of this loop turn in one call."""
        if not self._gated:  # decide at once if the limiter can without I/O (in memory: im serve)
            if conn.user_sends is None:
                self._first_limited_frame(conn)
            assert conn.user_hits is not None and conn.user_sends is not None
            if type(c) is cmd.Submit:
                user, conv = conn.user_sends, self._conv_lease_of(conn, c)
                if not (user.credit and conv.credit):
                    user_wait = self._refill(user, self._user_lease)
                    conv_wait = self._refill(conv, self._conv_lease) if user_wait == 0.0 else 0.0
                    if user_wait is not None and conv_wait is not None and (user_wait or conv_wait):
                        self._apply([(conn, c)], [user_wait, conv_wait])
                        return
                if user.credit and conv.credit:  # (else the limiter needs I/O: the batch below decides)
                    user.credit -= 1
                    conv.credit -= 1
                    conn.perform(c)
                    return
            else:
                assert self._limiter is not None
                user_hits = conn.user_hits
                waits = self._limiter.check_now((user_hits[1] if type(c) is cmd.SendTyping else user_hits[2],))
                if waits is not None:
                    if waits[0]:
                        self._apply([(conn, c)], waits)
                    else:
                        conn.perform(c)
                    return
        self._gated.append((conn, c))
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._run_gate(), name="im-hub-rates")

    async def _run_gate(self) -> None:
        try:
            while self._gated:
                batch, self._gated = self._gated, []
                await self._decide(batch)
        finally:
            self.task = None

    async def _decide(self, batch: list[tuple[Connection, Any]]) -> None:
        """One limiter call for the batch: a send takes one unit of its user's and its conversation's
        budgets (refused: ``error rate_limited`` with ref and retry_after; the connection's later sends
        are decided after it, in order); a recv or read one of its user's receipts budget (refused:
        dropped, one ``error rate_limited`` per connection and batch); typing one of the typing budget
        (refused: dropped silently, as the session's own typing limit does)."""
        assert self._limiter is not None
        self._apply(batch, await self._limiter.check(self._hits(batch)))

    def _hits(self, batch: list[tuple[Connection, Any]]) -> list[Hit]:
        """The limiter hits of the commands, in order: two per send (user, conversation), one otherwise."""
        hits: list[Hit] = []
        add = hits.append
        submit, send_typing = cmd.Submit, cmd.SendTyping
        for conn, c in batch:
            if conn.user_sends is None:
                self._first_limited_frame(conn)
            user = conn.user_hits
            assert user is not None
            if type(c) is submit:
                add(user[0])
                add(self._conv_lease_of(conn, c).hit)
            elif type(c) is send_typing:
                add(user[1])
            else:
                add(user[2])
        return hits

    def _apply(self, batch: list[tuple[Connection, Any]], waits: list[float]) -> None:
        """Carry out what the limiter allowed; answer the refusals (see :meth:`_decide`)."""
        i = 0
        told: set[Connection] = set()
        for conn, c in batch:
            if type(c) is cmd.Submit:
                wait = waits[i] or waits[i + 1]
                user_wait = waits[i]
                i += 2
            else:
                wait = user_wait = waits[i]
                i += 1
            if conn.closed:
                continue
            if not wait:
                conn.perform(c)
                continue
            retry = math.ceil(wait * 1000) / 1000
            if type(c) is cmd.Submit:
                what = "user" if user_wait else "conversation"
                METRICS.rate_refused("send-user" if user_wait else "send-conv")
                conn.session.send_failed(c.cmid, ErrorCode.RATE_LIMITED, f"{what} send limit reached", retry)
                conn.mark_dirty()
            elif type(c) is cmd.SendTyping:
                METRICS.rate_refused("typing")
            else:
                METRICS.rate_refused("receipts")
                if conn in told:
                    continue
                told.add(conn)
                conn.session.refuse(ErrorCode.RATE_LIMITED, "receipt limit reached (recv/read dropped)", retry)
                conn.mark_dirty()
