"""One lifecycle for every role (``im serve``, ``im transfer``, ``im gateway``, ``im api``).

A role is a list of :class:`Part` s and a few background loops. :meth:`Lifecycle.run` keeps two rules:

- **Parts start in the order listed and stop in the reverse order**, each stop only if its start returned,
  and even when a later start fails (an :class:`contextlib.AsyncExitStack`). So a role states its
  shutdown order by where it lists each part: whatever must stop last (the stores) comes first.
- **Background loops belong to a task group** (:class:`asyncio.TaskGroup`): they are cancelled and
  awaited before the first part stops. A loop that fails stops the role (its parts stop in order, then
  the error propagates): a loop meant to run forever does not die unnoticed.

A stop that raises is logged and the next one still runs (one failing close never keeps the others
open); a start that raises stops what already started and propagates.

What this layer does not do: it never waits by the clock. A part that needs something drained before the
next stop says so in its own stop (the committer's ``stop`` returns once the answers of its last batch
are handed over, the hub's ``drain_and_close`` once its connections closed, ...).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from im.backends.registry import Registry
from im.config import TracingConfig
from im.model.cluster import ServiceInstance
from im.observability import tracing
from im.observability.health import Readiness

log = logging.getLogger("im")

Step = Callable[[], Awaitable[None] | None]
Loop = tuple[str, Coroutine[Any, Any, None]]


@dataclass(frozen=True)
class Part:
    """One step of a role's start and the step of its stop that undoes it (sync or async callables)."""

    name: str
    start: Step
    stop: Step | None = None


async def _call(step: Step) -> None:
    result = step()
    if inspect.isawaitable(result):
        await result


class Lifecycle:
    """Runs a role: starts its parts, runs its loops until :meth:`request_stop` (or SIGINT/SIGTERM),
    then cancels the loops and stops the parts in reverse. SIGHUP runs the :meth:`on_reload` hooks."""

    def __init__(self) -> None:
        self._stop = asyncio.Event()
        self._reloads: list[Callable[[], object]] = []
        self._stopping: list[Callable[[], object]] = []

    def request_stop(self) -> None:
        """Begin the graceful stop (safe to call more than once, from a signal handler too)."""
        self._stop.set()

    def on_reload(self, reload: Callable[[], object]) -> None:
        """Call ``reload`` on SIGHUP while running (re-read certificates, ...), before :meth:`run`. With
        no such hook SIGHUP keeps its default action (the process ends, as when its terminal closes)."""
        self._reloads.append(reload)

    def on_stop(self, hook: Callable[[], object]) -> None:
        """Call ``hook`` when the stop begins, before the loops are cancelled and the parts stop (readiness
        turns to draining there)."""
        self._stopping.append(hook)

    def reload(self) -> None:
        """Run every reload hook (what SIGHUP does); one that raises is logged and the others still run."""
        log.info("reloading (SIGHUP)")
        for hook in self._reloads:
            try:
                hook()
            except Exception:
                log.exception("reload hook %s failed", getattr(hook, "__qualname__", hook))

    async def run(
        self,
        parts: Sequence[Part],
        *,
        loops: Callable[[], Iterable[Loop]] = tuple,
        ready: Callable[[], None] | None = None,
        stopping: str = "stopping",
    ) -> None:
        """Start ``parts`` in order, call ``ready``, run ``loops()`` until a stop is requested, then stop.

        ``loops`` is called once every part has started (its coroutines may use what they started);
        ``stopping`` is the log line that opens the stop.
        """
        async with contextlib.AsyncExitStack() as stack:
            for part in parts:
                await _call(part.start)
                if part.stop is not None:
                    stack.push_async_callback(self._stop_part, part)
            self._install_signal_handlers(stack)
            try:
                async with asyncio.TaskGroup() as group:
                    tasks = [group.create_task(coro, name=name) for name, coro in loops()]
                    if ready is not None:
                        ready()
                    await self._stop.wait()  # a failed loop cancels this wait (the group's rule)
                    log.info(stopping)
                    for hook in self._stopping:
                        try:
                            hook()
                        except Exception:
                            log.exception("stop hook %s failed", getattr(hook, "__qualname__", hook))
                    for task in tasks:
                        task.cancel()
            except* Exception:
                log.error("a background loop failed: stopping")
                raise
        log.info("stopped")

    @staticmethod
    async def _stop_part(part: Part) -> None:
        if part.stop is None:
            return
        try:
            await _call(part.stop)
        except Exception:
            log.exception("stopping %s failed", part.name)

    def _install_signal_handlers(self, stack: contextlib.AsyncExitStack) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self.request_stop)
                stack.callback(loop.remove_signal_handler, sig)
        if self._reloads:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signal.SIGHUP, self.reload)
                stack.callback(loop.remove_signal_handler, signal.SIGHUP)


async def report_load(
    registry: Registry,
    node: str,
    load: Callable[[], int],
    *,
    interval: float,
    readiness: Readiness | None = None,
) -> None:
    """Publish the load every ``interval`` seconds, which also renews the registration (a loop); with
    ``readiness``, its answer too (the API's gateway picker skips a node that is not ready), and a line
    in the log when it changes."""
    was_ready: bool | None = None
    while True:
        await asyncio.sleep(interval)
        ready: bool | None = None
        if readiness is not None:
            ready, details = await readiness.check()
            if ready != was_ready and (was_ready is not None or not ready):
                if ready:
                    log.info("ready again: published in the registry")
                else:
                    log.warning("not ready (%s): published in the registry", _why(details))
            was_ready = ready
        try:
            await registry.update_load(node, load(), ready=ready)
        except Exception as exc:  # the registry's own keepalive carries on; try again next time
            log.warning("registry load report failed (%s: %s)", type(exc).__name__, exc)


#: The setting that points at each engine a readiness check names: the hint of a "not ready" line.
ENGINE_SETTINGS = {
    "store": "store.postgres_dsn",
    "presence": "presence.redis_url",
    "registry": "registry.etcd_endpoints",
    "events": "events.amqp_url",
}


def _why(details: dict[str, object]) -> str:
    checks = details.get("checks")
    out = []
    if isinstance(checks, dict):
        out = [
            f"{name}: {c.get('error')} (is it running? check {ENGINE_SETTINGS.get(name, name)})"
            for name, c in checks.items()
            if isinstance(c, dict) and not c.get("ok")
        ]
    if details.get("draining"):
        out.append("draining")
    if not details.get("registered"):
        out.append("not registered")
    return "; ".join(out) or "unknown"


def registration(
    registry: Registry, instance: Callable[[], ServiceInstance], ttl: float, readiness: Readiness | None = None
) -> Part:
    """Listed in the registry while running (``instance`` is read at start: the addresses are known by
    then), with ``readiness``'s engine checks as its first ``ready`` (then :func:`report_load` keeps it
    current), which is then marked registered. Leaving it is the first step of a stop: the others stop
    choosing this node; when the registry is unreachable, the lease expires by itself within its TTL."""
    node = ""

    async def register() -> None:
        nonlocal node
        listed = instance()
        if readiness is not None:
            engines_ok, _ = await readiness.engines()
            listed = dataclasses.replace(listed, ready=engines_ok and not readiness.draining)
        await registry.register(listed, ttl=ttl)
        node = listed.node
        if readiness is not None:
            readiness.registered = True

    async def deregister() -> None:
        if readiness is not None:
            readiness.registered = False
        try:
            await asyncio.wait_for(registry.deregister(node), 3.0)
        except Exception as exc:
            log.warning("registry unreachable while deregistering %s (%s); the lease expires by itself", node, exc)

    return Part("registration", register, deregister)


async def close_all(*closers: Callable[[], Awaitable[None]]) -> None:
    """Close in order; one failing does not keep the others open."""
    for close in closers:
        try:
            await close()
        except Exception:
            log.exception("close failed")


def tracing_part(config: TracingConfig, service: str, node: str, app: Any = None) -> Part:
    """OpenTelemetry for this process (im.observability.tracing): installed first, shut down last, so
    the spans of the whole stop are flushed to Zipkin before the process exits (bounded by the export
    timeout: the exporter posts from its own thread). Disabled: nothing is installed."""

    def start() -> None:
        tracing.setup(config, service, node, fastapi_app=app)

    async def stop() -> None:
        if not tracing.installed():
            return
        try:
            await asyncio.wait_for(asyncio.to_thread(tracing.shutdown), config.export_timeout + 2.0)
        except TimeoutError:
            log.warning("tracing: spans not flushed within %.0fs at shutdown", config.export_timeout + 2.0)

    return Part("tracing", start, stop)
