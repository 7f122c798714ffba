"""The shared rate limits of a gateway's hub: per user over all their devices and gateways, and per
conversation over all its members (config ``rates``), in front of what connections carry out.

Each connection's own token buckets (``limits.send_rate``, ``limits.typing_rate``) come first, in the
session; what passes them comes here (:meth:`SharedRateGate.gate`). A connection takes units of the
shared budgets a few at a time (:class:`Lease`) and spends them without a limiter call. When it holds
none, an in-memory limiter (``im serve``) leases more at once; one that needs I/O (Redis) is called once
per event-loop turn for the commands of every connection that needs units, and each connection's
commands stay in order (a connection with a command waiting for that call queues its later ones).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

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


class Lease:
    """Units of one shared budget (a user's sends, typing or receipts; a conversation's sends) that a
    connection took ahead, ``size`` per limiter call.

    Taking a few units per limiter call instead of one per frame keeps the limiter off the per-message
    path; units are counted against the budget when taken, so a lease can only make the budget stricter,
    except that the units a connection still holds may be spent after the budget's window moved on (at
    most ``cap`` per lease). A lease refilled again within :data:`LEASE_REGROW` seconds (a busy sender)
    takes twice as many units the next time, up to ``cap``; one refilled later starts again from its
    base size, so a quiet connection holds few units."""

    __slots__ = ("base", "cap", "credit", "hit", "refilled", "size")

    def __init__(self, hit: Hit) -> None:
        self.hit = hit
        self.base = self.size = lease_size(hit.rule)
        self.cap = lease_cap(hit.rule)
        self.credit = 0
        self.refilled = -math.inf

    def granted(self, units: int, now: float) -> None:
        """The limiter granted ``units``: hold them, and size the next refill (see the class)."""
        self.credit += units
        if units >= self.size:  # a lease's worth (a batch may ask for a grown one ahead)
            self.size = min(self.cap, units * 2) if now - self.refilled < LEASE_REGROW else self.base
            self.refilled = now


#: Seconds within which a lease refilled again takes twice as many units the next time.
LEASE_REGROW = 1.0


def lease_size(rule: Rule) -> int:
    """Units a lease of ``rule`` first takes: 1/256 of its burst, 1 to 32 (small budgets stay exact)."""
    return max(1, min(32, rule.limit // 256))


def lease_cap(rule: Rule) -> int:
    """Units a lease of ``rule`` takes at most: 1/32 of its burst, up to 256; a budget whose leases start
    at one unit (under 512) stays exact."""
    base = lease_size(rule)
    return base if base == 1 else max(base, min(256, rule.limit // 32))


class SharedRateGate:
    """The hub's shared limits: leases on the connections, at most one limiter call in flight."""

    def __init__(self, limiter: RateLimiter | None, rates: HubRates | None, connections: Iterable[Connection]) -> None:
        #: None (no rates): only the per-connection limits apply, :attr:`enabled` is False.
        self._limiter = limiter if rates is not None else None
        self._rates = rates
        self._connections = connections  # the hub's live set: leases are dropped there on a change
        self._gated: list[tuple[Connection, Gated]] = []
        #: The task deciding queued commands (None when none wait); the hub cancels it when it stops.
        self.task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        """Whether sends, typing and receipts pass the shared rate limits (:meth:`gate`)."""
        return self._limiter is not None

    def set_rates(self, rates: HubRates) -> None:
        """New shared rate limits (a dynamic setting changed): every connection takes its leases afresh
        at its next limited frame (units it held ahead are dropped, never granted twice)."""
        if self._rates is None or rates == self._rates:
            return  # built without shared limits, or unchanged: nothing to do
        self._rates = rates
        for conn in self._connections:
            conn.user_leases = None
            conn.conv_sends = None

    def user_hits(self, uid: int) -> tuple[Hit, Hit, Hit] | None:
        """A user's hits of the per-user limits (sends, typing, receipts); None without shared limits."""
        if self._limiter is None or self._rates is None:
            return None
        r, key = self._rates, str(uid)
        return Hit(r.sends_per_user, key), Hit(r.typing_per_user, key), Hit(r.receipts_per_user, key)

    def _leases(self, conn: Connection, c: Gated) -> tuple[Lease, Lease | None]:
        """The leases ``c`` takes a unit of: a send its user's and its conversation's, a typing frame its
        user's typing budget, a recv or read its user's receipts budget."""
        user = conn.user_leases
        if user is None:
            hits = self.user_hits(conn.session.uid)
            assert hits is not None
            user = conn.user_leases = (Lease(hits[0]), Lease(hits[1]), Lease(hits[2]))
        t = type(c)
        if t is cmd.Submit:
            return user[0], self._conv_lease_of(conn, c)  # type: ignore[arg-type]
        return (user[1] if t is cmd.SendTyping else user[2]), None

    def _conv_lease_of(self, conn: Connection, c: cmd.Submit) -> Lease:
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
            lease = leases[key] = Lease(Hit(self._rates.sends_per_conversation, conv))
        return lease

    def _take_now(self, lease: Lease) -> float | None:
        """Lease units without I/O: ``size`` in one call, or one when fewer are left. 0.0 when the lease
        holds a unit now, the wait when the budget is spent, None when the limiter needs I/O."""
        assert self._limiter is not None
        check = self._limiter.check_now
        size = lease.size
        if size > 1:
            waits = check((lease.hit._replace(cost=size),))
            if waits is None:
                return None
            if not waits[0]:
                lease.granted(size, time.monotonic())
                return 0.0
        waits = check((lease.hit,))
        if waits is None:
            return None
        if not waits[0]:
            lease.granted(1, time.monotonic())
        return waits[0]

    def gate(self, conn: Connection, c: Gated) -> None:
        """Pass a command through the shared rate limits: at once when the connection holds the units
        (or the limiter leases more without I/O, in memory: ``im serve``) and has no earlier command
        waiting; else queued and decided with the others of this loop turn in one limiter call."""
        if not conn.gated:
            first, second = self._leases(conn, c)
            if not (first.credit and (second is None or second.credit)):
                first_wait = self._take_now(first) if not first.credit else 0.0
                second_wait: float | None = 0.0
                if second is not None and first_wait == 0.0 and not second.credit:
                    second_wait = self._take_now(second)
                if first_wait is not None and second_wait is not None and (first_wait or second_wait):
                    self._refuse(conn, c, first_wait, second_wait, None)
                    return
            if first.credit and (second is None or second.credit):  # (else the limiter needs I/O)
                first.credit -= 1
                if second is not None:
                    second.credit -= 1
                conn.perform(c)
                return
        conn.gated += 1
        self._gated.append((conn, c))
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._run_gate(), name="im-hub-rates")

    async def _run_gate(self) -> None:
        try:
            while self._gated:
                batch, self._gated = self._gated, []
                exact = False
                while batch:
                    batch = await self._decide(batch, exact)
                    exact = True
        finally:
            self.task = None

    async def _decide(self, batch: list[tuple[Connection, Gated]], exact: bool) -> list[tuple[Connection, Gated]]:
        """One limiter call for the batch: each lease that runs short takes ``size`` units (one when
        ``exact``), then the commands are carried out in order from what the leases hold. A send needs a
        unit of its user's and its conversation's budgets (refused: ``error rate_limited`` with ref and
        retry_after); a recv or read one of its user's receipts budget (refused: dropped, one ``error
        rate_limited`` per connection and batch); typing one of the typing budget (refused: dropped
        silently, as the session's own typing limit does). A lease refused ``size`` units may still get
        one: its commands, and their connections' later ones, are returned for an exact round."""
        assert self._limiter is not None
        hits: list[Hit] = []
        refills: list[tuple[Lease, int]] = []  # the lease and the units asked for it, per hit
        planned: dict[Lease, int] = {}  # a lease's units after this batch's earlier commands
        regrown: dict[Lease, int] = {}  # the size of a lease's next refill in this batch (it grows)
        for conn, c in batch:
            if conn.closed:
                continue
            for lease in self._leases(conn, c):
                if lease is None:
                    continue
                units = planned.get(lease)
                if units is None:
                    units = lease.credit
                if not units:
                    if exact:
                        units = 1
                    else:
                        units = regrown.get(lease, lease.size)
                        regrown[lease] = min(lease.cap, units * 2)
                    hits.append(lease.hit._replace(cost=units) if units > 1 else lease.hit)
                    refills.append((lease, units))
                planned[lease] = units - 1
        waits = await self._limiter.check(hits) if hits else []
        return self._settle(batch, refills, waits, exact)

    def _settle(
        self,
        batch: list[tuple[Connection, Gated]],
        refills: list[tuple[Lease, int]],
        waits: list[float],
        exact: bool,
    ) -> list[tuple[Connection, Gated]]:
        """Credit the granted refills, carry out or refuse the commands in order; return those to decide
        again in an exact round (see :meth:`_decide`)."""
        refused: dict[Lease, float] = {}  # leases refused their last unit: the wait until one comes back
        now = time.monotonic()
        for (lease, units), wait in zip(refills, waits, strict=True):
            if not wait:
                lease.granted(units, now)
            elif units == 1:
                refused[lease] = wait
        again: list[tuple[Connection, Gated]] = []
        held: set[Connection] = set()  # connections with a command in ``again``: their later ones follow it
        told: set[Connection] = set()
        for conn, c in batch:
            if conn.closed:
                conn.gated -= 1
                continue
            if conn in held:
                again.append((conn, c))
                continue
            first, second = self._leases(conn, c)
            if first.credit and (second is None or second.credit):
                first.credit -= 1
                if second is not None:
                    second.credit -= 1
                conn.gated -= 1
                conn.perform(c)
                continue
            first_wait = 0.0 if first.credit else refused.get(first)
            second_wait = 0.0 if second is None or second.credit else refused.get(second)
            if first_wait is None or (not first_wait and second_wait is None):
                # Refused a lease's worth (a unit may be left), or the leases were replaced meanwhile
                # (set_rates): decide again, one unit at a time.
                held.add(conn)
                again.append((conn, c))
                continue
            conn.gated -= 1
            self._refuse(conn, c, first_wait, second_wait or 0.0, told)
        return again

    def _refuse(
        self, conn: Connection, c: Gated, first_wait: float, second_wait: float, told: set[Connection] | None
    ) -> None:
        """Answer a command the limits refused (see :meth:`_decide`); ``told``: the connections already
        told of a dropped receipt in this batch."""
        retry = math.ceil((first_wait or second_wait) * 1000) / 1000
        t = type(c)
        if t is cmd.Submit:
            what = "user" if first_wait else "conversation"
            METRICS.rate_refused("send-user" if first_wait else "send-conv")
            conn.session.send_failed(c.cmid, ErrorCode.RATE_LIMITED, f"{what} send limit reached", retry)  # type: ignore[union-attr]
            conn.mark_dirty()
        elif t is cmd.SendTyping:
            METRICS.rate_refused("typing")
        else:
            METRICS.rate_refused("receipts")
            if told is not None:
                if conn in told:
                    return
                told.add(conn)
            conn.session.refuse(ErrorCode.RATE_LIMITED, "receipt limit reached (recv/read dropped)", retry)
            conn.mark_dirty()
