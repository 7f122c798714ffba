"""The in-process rate limiter: one dict of GCRA timestamps, for ``im serve`` and single-process roles."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from im.backends.rate_limit import Hit, RateLimiter


class MemoryRateLimiter(RateLimiter):
    """:class:`RateLimiter` in this process (``im serve``). ``clock`` is monotonic seconds. Past
    ``max_keys`` keys, a sweep drops those whose budget is full again (they hold no information); the next
    sweep waits until the live keys have doubled, so sweeping stays amortized O(1) per hit."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, max_keys: int = 100_000) -> None:
        self._clock = clock
        self._tat: dict[tuple[str, str], float] = {}
        self._max_keys = max_keys
        self._sweep_at = max_keys

    async def check(self, hits: Sequence[Hit]) -> list[float]:
        return self.check_now(hits)

    def check_now(self, hits: Sequence[Hit]) -> list[float]:
        now = self._clock()
        tats = self._tat
        get = tats.get
        out: list[float] = []
        append = out.append
        for rule, key, cost in hits:  # the gateway's hot path: kept to a few lookups per hit
            k = (rule.name, key)
            tat = get(k, now)
            if tat < now:
                tat = now
            new_tat = tat + cost * rule.interval
            over = new_tat - now - rule.period
            if over <= 1e-9:  # float rounding: a burst of exactly `limit` passes
                tats[k] = new_tat
                append(0.0)
            else:
                append(rule.period if cost > rule.limit else over)
        if len(tats) > self._sweep_at:
            self._tat = {k: t for k, t in tats.items() if t > now}
            self._sweep_at = max(self._max_keys, 2 * len(self._tat))
        return out
