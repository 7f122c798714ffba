"""Rate limits shared by every process of a deployment: the interface, and the fail-open policy.

A :class:`Rule` allows ``limit`` units per ``period`` seconds with bursts of up to ``limit``: the generic
cell rate algorithm (GCRA, the token bucket written as one timestamp per key). Per key the limiter keeps
a "theoretical arrival time" ``tat``; a hit of ``cost`` units at ``now`` is allowed when
``max(tat, now) + cost * period / limit - now <= period``, and then moves ``tat`` there. A refusal takes
nothing and says how long until the same hit would be allowed.

:class:`RateLimiter` is batched: one :meth:`~RateLimiter.check` decides many hits (one per send, receipt,
login attempt ...), so the gateway pays one call (one Redis round trip) per event-loop turn, never one per
message. ``memory.MemoryRateLimiter`` serves ``im serve``; ``im.backends.rate_limit.redis.RedisRateLimiter``
serves processes that share one budget per user (``presence.kind=redis``, distributed mode)."""

from __future__ import annotations

import abc
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from im.backends.lifecycle import Service
from im.observability.metrics import METRICS

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Rule:
    """``limit`` units per ``period`` seconds, bursts of up to ``limit``. ``name`` namespaces the keys, so
    one key (a user id) can be under several rules."""

    name: str
    limit: int
    period: float
    #: Seconds one unit takes to come back (period / limit).
    interval: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.limit < 1 or self.period <= 0 or not self.name or ":" in self.name:
            raise ValueError(f"bad rate rule {self!r}: limit >= 1, period > 0, a name without ':'")
        object.__setattr__(self, "interval", self.period / self.limit)


class Hit(NamedTuple):
    """One use of ``cost`` units of ``rule``'s budget for ``key`` (a user id, an address, ...). A tuple:
    the gateway makes one per send and receipt."""

    rule: Rule
    key: str
    cost: int = 1


class RateLimiter(Service, abc.ABC):
    """Decides hits against per-key budgets.

    Guarantees:
    - :meth:`check` answers one number per hit, in order: ``0.0`` allowed (the units are taken), else the
      seconds after which the same hit would be allowed (nothing is taken). A hit costing more than its
      rule's ``limit`` is never allowed (its answer is the rule's period).
    - The hits of one call are decided one after another, atomically with respect to other calls and
      other processes sharing the implementation's storage: two hits on one key in one call see each
      other, and every process sharing one Redis (same prefix) draws from one budget.
    - State is soft: it may be lost (restart, Redis flush), which only forgives past hits. Keys
      disappear once their budget is full again, so memory is bounded by the keys used within a period.
    - An engine failure raises; what to do then is the caller's policy (:class:`FailOpen`).
    """

    @abc.abstractmethod
    async def check(self, hits: Sequence[Hit]) -> list[float]:
        """Decide ``hits`` in order: 0.0 for allowed (taken), else seconds to wait (nothing taken)."""

    def check_now(self, hits: Sequence[Hit]) -> list[float] | None:
        """:meth:`check` without waiting, for implementations that need no I/O to decide; None when this
        one cannot (a caller then batches and awaits :meth:`check`). Same guarantees as :meth:`check`.
        The gateway decides each send inline when it can, instead of deferring it to a batch."""
        return None


class FailOpen(RateLimiter):
    """The fail-open policy around another limiter: when it raises (Redis away), every hit is allowed,
    with one warning line per ``warn_every`` seconds. Rate limits protect capacity; refusing every send
    and login while Redis restarts would be the bigger outage."""

    def __init__(self, limiter: RateLimiter, *, warn_every: float = 10.0) -> None:
        self.limiter = limiter
        self._warn_every = warn_every
        self._warned_at = -math.inf
        self.failures = 0

    async def _acquire(self) -> None:
        await self.limiter.start()

    async def _release(self) -> None:
        await self.limiter.close()

    def check_now(self, hits: Sequence[Hit]) -> list[float] | None:
        return self.limiter.check_now(hits)

    async def check(self, hits: Sequence[Hit]) -> list[float]:
        try:
            return await self.limiter.check(hits)
        except Exception as exc:
            self.failures += 1
            METRICS.engine_error(exc)
            now = time.monotonic()
            if now - self._warned_at >= self._warn_every:
                self._warned_at = now
                log.warning(
                    "rate limiter unavailable (%s: %s): allowing; %d failed checks so far",
                    type(exc).__name__,
                    exc,
                    self.failures,
                )
            return [0.0] * len(hits)
