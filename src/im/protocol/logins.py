"""Admission of logins at a gateway: how many ``auth`` frames one process starts per second.

A login is the costly step of a connection: the token check, the presence claim, the sync points and the
replay that follows. When a gateway dies, every client it held reconnects to the others at once (a
reconnect storm); started all together, those logins would queue without bound in the event loop, the
store and Redis, and connections would time out before their turn, only to come back again.
:class:`LoginGate` keeps that work to a bounded rate instead, and tells the excess when to come back.

The rule, per gateway process (``limits.auth_rate`` logins per second, bursts of ``limits.auth_burst``;
a token bucket whose tokens may go below zero by the logins waiting for their turn):

1. a login that fits the rate starts at once;
2. one that would fit within ``limits.auth_max_wait`` seconds waits for its turn (so a bounded queue of at
   most ``auth_rate * auth_max_wait`` logins smooths short bursts without a round trip);
3. any other is refused with a ``retry_after``: the transport answers ``error unavailable`` (with
   ``retry_after``) and ``bye unavailable`` and closes (docs/protocol.md, "Login admission"). The refusals
   of one burst are told successive times, one admission interval apart, starting when the queue will
   have drained: clients that honour them come back spread out at about the rate the gateway admits,
   not all together at the same instant. A promise is at most :data:`MAX_RETRY_AFTER` seconds away.

No I/O and no clock of its own (the clock is injected): the same object runs under asyncio and in tests.
The rates are read from the shared :class:`~im.protocol.session.Limits` on every call, so a dynamic change
(im.live_config) applies to the next login.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from im.observability.metrics import METRICS

__all__ = ["MAX_RETRY_AFTER", "Busy", "LoginGate", "LoginLimits"]

#: Longest wait a refusal asks for (seconds): past it, refusals all say this (the client's jitter spreads them).
MAX_RETRY_AFTER = 60.0


class LoginLimits(Protocol):
    """What the gate reads (the gateway's shared :class:`~im.protocol.session.Limits`)."""

    auth_rate: float
    auth_burst: int
    auth_max_wait: float


@dataclass(frozen=True, slots=True)
class Busy:
    """A refused login: the client should come back in ``retry_after`` seconds (rounded up to the ms)."""

    retry_after: float


class LoginGate:
    """Admits logins at ``limits.auth_rate`` per second (see the module docstring for the rule).

    :meth:`admit` answers each login with the seconds to wait before starting it (0.0: now), or
    :class:`Busy`; a queued login whose connection closed before its turn hands it back
    (:meth:`give_back`). Counters (``admitted``, ``queued``, ``refused``, ``returned``) are for metrics
    and tests.
    """

    __slots__ = ("_clock", "_last", "_promised", "_tokens", "admitted", "limits", "queued", "refused", "returned")

    def __init__(self, limits: LoginLimits, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self._tokens = float(limits.auth_burst)  # below zero: logins admitted that wait for their turn
        self._last = clock()
        self._promised = 0.0  # the time promised to the last refusal; the next one is told 1/rate later
        self.admitted = 0
        self.queued = 0
        self.refused = 0
        self.returned = 0

    def admit(self) -> float | Busy:
        """Take a turn for one login: seconds to wait before starting it, or :class:`Busy`."""
        lim = self.limits
        now = self._clock()
        rate = lim.auth_rate
        tokens = min(float(lim.auth_burst), self._tokens + (now - self._last) * rate)
        self._last = now
        if tokens >= 1.0:
            self._tokens = tokens - 1.0
            self.admitted += 1
            METRICS.logins["admitted"] += 1
            return 0.0
        wait = (1.0 - tokens) / rate  # when a token is free for this login, after those already waiting
        if wait <= lim.auth_max_wait:
            self._tokens = tokens - 1.0
            self.queued += 1
            METRICS.logins["queued"] += 1
            return wait
        self._tokens = tokens
        self.refused += 1
        METRICS.logins["refused"] += 1
        # After the queue drains, one interval per refusal: they come back at the rate logins are admitted.
        promised = max(self._promised, now + wait)
        if promised - now < MAX_RETRY_AFTER:
            self._promised = promised + 1.0 / rate
        retry_after = min(MAX_RETRY_AFTER, promised - now)
        return Busy(math.ceil(retry_after * 1000) / 1000)

    def give_back(self) -> None:
        """A queued login will not start after all (its connection closed while it waited): its turn goes to
        the next login instead of to nobody, so clients that give up in a storm do not slow the others."""
        self._tokens = min(float(self.limits.auth_burst), self._tokens + 1.0)
        self.returned += 1
