"""Password hashing under a flood: bounded concurrency, a bounded queue, fair between client addresses.

argon2id at its default cost (64 MiB, t=3, p=4) takes about 0.2 s of both cores of a small machine, so
a few dozen concurrent logins would otherwise queue every login behind them (and hold 64 MiB each).
:class:`HashSlots` runs at most ``concurrency`` hashes at once in worker threads and lets callers wait in
a queue of at most ``queue`` entries. Fairness, so one address cannot crowd out the others:

- one address (the caller's ``source``) may have at most ``per_source`` hashes running or waiting;
  beyond that it is refused at once (``rate_limited``, with a retry time);
- one address may hold at most ``concurrency - 1`` slots (at least one), so with two or more slots one
  is always left for the other addresses;
- a freed slot goes to the waiting address with the fewest hashes running, and among those to the one
  served least recently (so two addresses with one waiter each take turns).

So under a flood from one address, another address's login starts hashing at once (with one slot: after
at most the running hash and one more of the flood's).
Past the queue every caller is refused at once (``unavailable``, with a retry time) instead of waiting
without bound. Memory for hashing is bounded by ``concurrency`` x the argon2 memory cost.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from typing import TypeVar

from im.backends.rate_limit import Hit, RateLimiter, Rule
from im.model.errors import ErrorCode, ImError
from im.observability.metrics import METRICS

T = TypeVar("T")


class HashSlots:
    """Runs blocking hash functions in threads, ``concurrency`` at a time, fairly between sources."""

    def __init__(
        self, *, concurrency: int = 2, queue: int = 64, per_source: int = 2, hash_seconds: float = 0.25
    ) -> None:
        if concurrency < 1 or queue < 0 or per_source < 1:
            raise ValueError("concurrency >= 1, queue >= 0, per_source >= 1")
        self.concurrency = concurrency
        self.queue = queue
        self.per_source = per_source
        #: A typical hash's duration, for the retry times given with refusals.
        self.hash_seconds = hash_seconds
        self._max_running = max(1, concurrency - 1)  # per source
        self._running: dict[str, int] = {}  # source -> hashes running
        self._held: dict[str, int] = {}  # source -> running + waiting
        self._waiting: dict[str, deque[asyncio.Future[None]]] = {}  # source -> waiters, in arrival order
        self._n_running = 0
        self._n_waiting = 0
        self._served: dict[str, int] = {}  # source -> grant number of its latest start (while it holds any)
        self._grants = 0

    @property
    def running(self) -> int:
        return self._n_running

    @property
    def waiting(self) -> int:
        return self._n_waiting

    async def run(self, source: str, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` in a worker thread once a slot is free; ImError when refused (see the module)."""
        await self._acquire(source)
        try:
            return await asyncio.to_thread(fn, *args)
        finally:
            self._release(source)

    def _retry_after(self, ahead: int) -> float:
        return math.ceil(max(1.0, self.hash_seconds * (ahead + 1) / self.concurrency))

    async def _acquire(self, source: str) -> None:
        held = self._held.get(source, 0)
        if held >= self.per_source:
            raise ImError(
                ErrorCode.RATE_LIMITED,
                "too many password checks from this address at once",
                retry_after=self._retry_after(held),
            )
        if (
            self._n_running < self.concurrency
            and self._running.get(source, 0) < self._max_running
            and not any(self._eligible(s) for s in self._waiting)
        ):
            self._start(source)
            self._held[source] = held + 1
            return
        if self._n_waiting >= self.queue:
            raise ImError(
                ErrorCode.UNAVAILABLE,
                "the server is busy checking passwords; retry later",
                retry_after=self._retry_after(self._n_waiting),
            )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(source, deque()).append(waiter)
        self._n_waiting += 1
        self._held[source] = held + 1
        try:
            await waiter  # _grant has counted us as running when this resolves
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._release(source)  # granted, then cancelled before running: pass the slot on
            else:
                self._forget_waiter(source, waiter)
            raise

    def _eligible(self, source: str) -> bool:
        return self._running.get(source, 0) < self._max_running

    def _start(self, source: str) -> None:
        self._grants += 1
        self._served[source] = self._grants
        self._n_running += 1
        self._running[source] = self._running.get(source, 0) + 1

    def _forget_waiter(self, source: str, waiter: asyncio.Future[None]) -> None:
        waiters = self._waiting.get(source)
        if waiters is not None and waiter in waiters:
            waiters.remove(waiter)
            self._n_waiting -= 1
            if not waiters:
                del self._waiting[source]
        self._drop_held(source)

    def _drop_held(self, source: str) -> None:
        left = self._held.get(source, 1) - 1
        if left:
            self._held[source] = left
        else:
            self._held.pop(source, None)
            self._served.pop(source, None)

    def _release(self, source: str) -> None:
        self._n_running -= 1
        left = self._running.get(source, 1) - 1
        if left:
            self._running[source] = left
        else:
            self._running.pop(source, None)
        self._drop_held(source)
        self._grant()

    def _grant(self) -> None:
        """Free slots go to the waiting sources with the fewest running hashes, then the one served least
        recently (never served first; then dict order: the one that started waiting first)."""
        while self._n_running < self.concurrency:
            eligible = [s for s in self._waiting if self._eligible(s)]
            if not eligible:
                return
            source = min(eligible, key=lambda s: (self._running.get(s, 0), self._served.get(s, 0)))
            waiters = self._waiting[source]
            waiter = waiters.popleft()
            self._n_waiting -= 1
            if not waiters:
                del self._waiting[source]
            self._start(source)
            waiter.set_result(None)


class LoginGuard:
    """The rate limits of login and registration, checked before any password is hashed.

    Login attempts are counted (successful or not) under three rules: per (account, address), strict:
    guessing from one place slows to the rule's rate; per address over all accounts: spraying one
    password over many names; per account from anywhere, looser: a guesser with many addresses is
    bounded too. The per-account rule counts only attempts that both address rules allowed, so one
    address alone cannot exhaust it (its strict budget, 10 per 10 minutes by default, refills slower than
    the account's 100 per hour): locking an owner out takes many addresses, and even then only stops new
    password logins, never the owner's live sessions. Unknown names are counted like
    known ones, so the answers do not reveal which names exist. Registrations are counted per address.
    A refusal is ``rate_limited`` with the seconds until the next attempt would be taken.

    Refusals of a whole address (its login or registration budget spent) are also kept here until their
    retry time, so the HTTP layer refuses that address's next attempts before reading their bodies
    (:meth:`refused_for`): a flood of refused attempts costs the server almost nothing and cannot slow
    the event loop for everyone else. Keeping them is exact: a budget never refills sooner than the
    retry time it gave.
    """

    def __init__(
        self,
        limiter: RateLimiter,
        *,
        login_per_account_address: Rule,
        login_per_account: Rule,
        login_per_address: Rule,
        register_per_address: Rule,
    ) -> None:
        self._limiter = limiter
        self._per_pair = login_per_account_address
        self._per_account = login_per_account
        self._per_address = login_per_address
        self._register = register_per_address
        self._refused: dict[tuple[str, str], float] = {}  # (kind, address) -> refused until (monotonic)
        self._sweep_at = 10_000
        self._clock = time.monotonic

    def set_rules(
        self,
        *,
        login_per_account_address: Rule,
        login_per_account: Rule,
        login_per_address: Rule,
        register_per_address: Rule,
    ) -> None:
        """New budgets (dynamic settings changed): the next attempt is counted under them."""
        self._per_pair = login_per_account_address
        self._per_account = login_per_account
        self._per_address = login_per_address
        self._register = register_per_address

    def refused_for(self, kind: str, address: str) -> float:
        """Seconds ``address`` stays refused for ``kind`` ("login" or "register"); 0 when it is not."""
        until = self._refused.get((kind, address))
        if until is None:
            return 0.0
        left = until - self._clock()
        if left <= 0:
            del self._refused[(kind, address)]
            return 0.0
        return left

    def _refuse_address(self, kind: str, address: str, wait: float) -> None:
        if len(self._refused) >= self._sweep_at:  # bound memory: keep the live entries only (amortized)
            now = self._clock()
            self._refused = {k: t for k, t in self._refused.items() if t > now}
            self._sweep_at = max(10_000, 2 * len(self._refused))
        self._refused[(kind, address)] = self._clock() + wait

    async def login_attempt(self, username: str, address: str) -> None:
        account = username.lower()[:64]
        # The address's own budgets first; the account's shared one only when they allow the attempt, so
        # attempts refused to one address do not use up the budget the account's owner logs in with.
        pair, per_address = Hit(self._per_pair, f"{account}|{address}"), Hit(self._per_address, address)
        left = self.refused_for("login", address)
        if left:
            _refuse(left, "too many login attempts from this address")
        waits = await self._limiter.check([pair, per_address])
        if waits[1]:
            METRICS.rate_refused("login-address")
            self._refuse_address("login", address, waits[1])
        elif waits[0]:
            METRICS.rate_refused("login-pair")
        _refuse(max(waits), "too many login attempts")
        [wait] = await self._limiter.check([Hit(self._per_account, account)])
        if wait:
            METRICS.rate_refused("login-account")
        _refuse(wait, "too many login attempts for this account")

    async def register_attempt(self, address: str) -> None:
        left = self.refused_for("register", address)
        if left:
            _refuse(left, "too many registrations from this address")
        [wait] = await self._limiter.check([Hit(self._register, address)])
        if wait:
            METRICS.rate_refused("register")
            self._refuse_address("register", address, wait)
        _refuse(wait, "too many registrations from this address")


def _refuse(wait: float, what: str) -> None:
    if wait > 0:
        seconds = math.ceil(wait)
        raise ImError(ErrorCode.RATE_LIMITED, f"{what}; retry in {seconds} s", retry_after=seconds)
