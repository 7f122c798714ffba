"""Liveness and readiness of one process (docs/operations.md, "Health and readiness").

- **Live**: the process runs and its event loop answers (whoever calls :meth:`Readiness.live` got an
  answer from the loop). A failing liveness probe means "restart me"; engines being away never fails it,
  or a store outage would restart every node at once.
- **Ready**: the engines this role needs answer (each a named async check with its own timeout: the store
  runs a trivial query, presence a Redis ``PING``, the registry an etcd status call, the event bus a
  connection to RabbitMQ when events are on), the process is registered (its registry entry is up), and
  it is not draining (a stop has begun). Not ready means "send nothing new here"; load balancers and the
  API's gateway picker act on it.

The engine checks are cached for ``cache_for`` seconds and run at most once at a time (callers that
arrive while a round runs await that round), so a flood of probes costs the engines one round per
window. The ``registered`` and ``draining`` flags are read on every call (they cost nothing).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from im.observability import tracing

__all__ = ["PROCESS_STARTED", "Check", "Readiness", "im_version"]

#: When this process started (Unix seconds): published in the registry, shown by ``im status``.
PROCESS_STARTED = time.time()


def im_version() -> str:
    """im's installed version ("unknown" when run from a tree that is not installed)."""
    try:
        return importlib.metadata.version("im")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


#: An engine check: returns when the engine answered, raises when it did not.
Check = Callable[[], Awaitable[object]]


@dataclass(frozen=True, slots=True)
class _Named:
    name: str
    check: Check
    timeout: float


class Readiness:
    """The named checks of one process, with the registered and draining flags.

    ``check()`` returns ``(ready, details)``; ``details`` is JSON-ready: ``{"checks": {name: {"ok":
    bool, "ms": float, "error": str}}, "registered": bool, "draining": bool}`` (``error`` only on a
    failed check). A process that registers nowhere (``im api``) starts with ``registered`` True.
    """

    def __init__(self, *, cache_for: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.cache_for = cache_for
        self._clock = clock
        self._checks: list[_Named] = []
        self.registered = False
        self.draining = False
        self._cached: tuple[float, bool, dict[str, dict[str, object]]] | None = None
        self._round: asyncio.Task[tuple[bool, dict[str, dict[str, object]]]] | None = None
        #: Rounds actually run against the engines (tests read it: the cache works).
        self.rounds = 0

    def add(self, name: str, check: Check, *, timeout: float = 2.0) -> None:
        """Add an engine check; one that has not answered within ``timeout`` seconds fails."""
        self._checks.append(_Named(name, check, timeout))
        self._cached = None

    @property
    def names(self) -> list[str]:
        return [c.name for c in self._checks]

    def start_draining(self) -> None:
        """A stop has begun: not ready from now on (the lifecycle's stop hook)."""
        self.draining = True

    def live(self) -> bool:
        """True: answering at all is the proof (the loop ran this call)."""
        return True

    async def check(self) -> tuple[bool, dict[str, object]]:
        """Ready or not, and why (see the class); the engine checks at most once per ``cache_for`` s."""
        engines_ok, results = await self._engines()
        ready = engines_ok and self.registered and not self.draining
        return ready, {"checks": results, "registered": self.registered, "draining": self.draining}

    async def engines(self) -> tuple[bool, dict[str, dict[str, object]]]:
        """The engine checks alone (cached like :meth:`check`): all ok, and each one's result."""
        return await self._engines()

    async def _engines(self) -> tuple[bool, dict[str, dict[str, object]]]:
        cached = self._cached
        if cached is not None and self._clock() - cached[0] < self.cache_for:
            return cached[1], cached[2]
        if self._round is None or self._round.done():
            self._round = asyncio.get_running_loop().create_task(self._run_round(), name="im-readiness")
        # shield: one caller giving up (a probe's client went away) does not cancel the round for the rest
        return await asyncio.shield(self._round)

    async def _run_round(self) -> tuple[bool, dict[str, dict[str, object]]]:
        self.rounds += 1
        with tracing.untraced():  # this task's context only: the checks' SQL, PING, ... make no spans
            answers = await asyncio.gather(*(self._one(c) for c in self._checks))
        results = {c.name: a for c, a in zip(self._checks, answers, strict=True)}
        ok = all(a["ok"] for a in answers)
        self._cached = (self._clock(), ok, results)
        return ok, results

    @staticmethod
    async def _one(c: _Named) -> dict[str, object]:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(c.timeout):
                await c.check()
        except TimeoutError:
            error = f"no answer within {c.timeout:g} s"
        except Exception as exc:
            error = f"{type(exc).__name__}: {str(exc)[:200]}"
        else:
            return {"ok": True, "ms": round((time.perf_counter() - started) * 1000, 2)}
        return {"ok": False, "ms": round((time.perf_counter() - started) * 1000, 2), "error": error}
