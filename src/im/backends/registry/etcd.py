"""The service registry on etcd: leases for liveness, a watched view per role for discovery.

Layout: one key per instance, ``<prefix><role>/<node>``, whose value is JSON ``{role, node, addresses,
load, ready, version, started_at}`` (the last three optional: an entry without them reads as ready) and
which is attached to a lease of the registration's TTL. etcd deletes the key when the lease ends, so the
registry's guarantee (an instance is listed only while its registration is alive) is etcd's own:

- a clean stop (:meth:`EtcdRegistry.deregister`) revokes the lease: the key is gone at once;
- a crash stops the keepalives: the lease expires within its TTL (etcd checks every 0.5 s, so allow
  TTL + 0.5 s), and the key with it;
- an etcd restart keeps leases and extends them (the new leader re-arms every lease), so live owners
  keep their registration once their keepalives get through again.

TTLs are whole seconds in etcd: a TTL is rounded up, and etcd raises it to its minimum (about 1.5 x its
election timeout, 2 s with the default settings).

Liveness is kept by a keepalive task per registration, refreshing the lease every TTL/3 (and sooner
while etcd does not answer). A lease found lost (expired while this process could not reach etcd, or
revoked by someone else) is granted again and the key put again: an owner that is alive shows up again.

:meth:`EtcdRegistry.watch` reads from a watched view per role: one background task keeps a local dict
from a prefix get and a watch from the next revision, and calls every subscriber with the whole live list
after each change. When the watch stream breaks (etcd restart: ``ConnectionFailedError``), it is reopened
from the last revision seen + 1 with backoff, so no change is missed; if that revision has been
compacted, the view lists the prefix again and calls back if anything changed.

Every background task belongs to the registry and :meth:`EtcdRegistry.close` cancels them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Concatenate, ParamSpec, TypeVar

import aetcd
import aetcd.rpc
import aetcd.watcher
import grpc
import msgspec

from im.backends.registry import Registry
from im.backends.tls import ClientTls
from im.cancel import raise_if_cancelling, retry_pause
from im.model.cluster import ServiceInstance
from im.observability.metrics import METRICS

log = logging.getLogger(__name__)

Callback = Callable[[list[ServiceInstance]], None]


class _Record(msgspec.Struct, frozen=True):
    """The value stored under an instance's key."""

    role: str
    node: str
    addresses: dict[str, str]
    load: int = 0
    ready: bool = True
    version: str = ""
    started_at: float = 0.0


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(_Record).decode


def _instance(value: bytes) -> ServiceInstance:
    r = _decode(value)
    return ServiceInstance(r.role, r.node, dict(r.addresses), r.load, r.ready, r.version, r.started_at)


@dataclass(eq=False)
class _Registration:
    """One instance this registry keeps alive."""

    instance: ServiceInstance
    ttl: float
    key: bytes
    lease: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    keepalive: asyncio.Task[None] | None = None

    @property
    def value(self) -> bytes:
        i = self.instance
        return _encode(_Record(i.role, i.node, i.addresses, i.load, i.ready, i.version, i.started_at))


@dataclass(eq=False)
class _View:
    """The live instances of one role, as last seen by the watch, and who wants them."""

    role: str
    entries: dict[bytes, ServiceInstance] = field(default_factory=dict)
    subscribers: list[Callback] = field(default_factory=list)
    synced: bool = False
    task: asyncio.Task[None] | None = None

    def live(self) -> list[ServiceInstance]:
        return [self.entries[k] for k in sorted(self.entries)]

    def notify(self) -> None:
        for callback in list(self.subscribers):
            try:
                callback(self.live())
            except Exception:
                log.exception("registry watch callback for %r failed", self.role)


P = ParamSpec("P")
T = TypeVar("T")
R = TypeVar("R", bound="EtcdRegistry")


def _channel_closed() -> bool:
    """Whether the CancelledError being handled is not a cancellation of this task: gRPC raises one in
    every call in flight on a channel that another task closed (the client moving to the next member)."""
    task = asyncio.current_task()
    return task is not None and not task.cancelling()


@contextlib.contextmanager
def closed_channel_fails() -> Iterator[None]:
    """Inside: a CancelledError that gRPC raises because another task closed the channel (not a stop of
    this task) comes out as ``aetcd.ConnectionFailedError``, so that a loop which retries after etcd
    errors retries it instead of ending as if it had been stopped."""
    try:
        yield
    except asyncio.CancelledError:
        if not _channel_closed():
            raise
        raise aetcd.ConnectionFailedError("the etcd channel was closed under the call") from None


def _failing_over(
    method: Callable[Concatenate[R, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[R, P], Coroutine[Any, Any, T]]:
    """A call that finds its etcd member unreachable moves the client to the next member and is made
    again there, once per other member (and again on the same member when it answered that the leader
    changed); when every attempt failed it raises (the caller retries, as it would after any etcd
    error). The calls so wrapped are safe to repeat."""

    async def call(self: R, /, *args: P.args, **kwargs: P.kwargs) -> T:
        for _ in range(len(self.client.members) - 1):
            epoch = self.client.epoch
            try:
                return await method(self, *args, **kwargs)
            except asyncio.CancelledError:
                if not _channel_closed():
                    raise
                # another task closed the channel under this call (a move to the next member): again
            except Exception as e:
                if not await self.client.failed(e, epoch):
                    raise
        epoch = self.client.epoch
        try:
            with closed_channel_fails():
                return await method(self, *args, **kwargs)
        except Exception as e:
            await self.client.failed(e, epoch)
            raise

    call.__name__, call.__qualname__, call.__doc__ = method.__name__, method.__qualname__, method.__doc__
    return call


class EtcdRegistry(Registry):
    """:class:`Registry` on etcd (v3 API over gRPC, via ``aetcd``).

    ``endpoints``: the etcd members, ``host:port`` each (a list, or one string, commas between members):
    the client talks to one and moves to the next when a call finds it unreachable, where the call is
    made again (any member serves every call; background tasks move the same way). ``tls``: TLS to
    etcd's client port (the CA the members' certificates chain to, and a client certificate for
    ``--client-cert-auth``); None: plaintext. ``prefix``: where the keys live (one
    deployment per prefix). ``timeout``: seconds for each etcd call. ``keepalive``: refresh each
    registration's lease in the background (every TTL/3); with False the owner keeps it alive only by
    calling :meth:`update_load` or :meth:`register` within each TTL. ``retry``: the first delay before
    retrying after etcd failed to answer (doubles up to ``max_retry``).

    Use one registry per process, close it with :meth:`close` (or ``async with``). :meth:`watch` needs a
    running event loop.
    """

    def __init__(
        self,
        endpoints: str | Sequence[str] = "127.0.0.1:2379",
        *,
        tls: ClientTls | None = None,
        prefix: str = "/im/services/",
        timeout: float = 5.0,
        keepalive: bool = True,
        retry: float = 0.05,
        max_retry: float = 2.0,
    ) -> None:
        members = parse_endpoints(endpoints)
        if not prefix.endswith("/"):
            raise ValueError(f"etcd registry prefix must end with '/': {prefix!r}")
        self.prefix = prefix
        self._timeout = timeout
        self._keepalive = keepalive
        self._retry = retry
        self._max_retry = max_retry
        options = {
            # gRPC backs off reconnecting up to 120 s by default: after a long etcd outage, calls would
            # keep failing that long once etcd is back. Retry at least every max_retry seconds.
            "grpc.initial_reconnect_backoff_ms": max(1, int(retry * 1000)),
            "grpc.min_reconnect_backoff_ms": max(1, int(retry * 1000)),
            "grpc.max_reconnect_backoff_ms": max(1, int(max_retry * 1000)),
            # Notice a silently dead connection under an open watch (etcd accepts pings every 5 s or more).
            "grpc.keepalive_time_ms": 10_000,
            "grpc.keepalive_timeout_ms": 5_000,
        }
        self.client = _Client(members, tls=tls, timeout=timeout, options=options)
        self._registrations: dict[str, _Registration] = {}
        self._views: dict[str, _View] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    def _key(self, role: str, node: str) -> bytes:
        return f"{self.prefix}{role}/{node}".encode()

    def _role_prefix(self, role: str) -> bytes:
        if not role or "/" in role:
            raise ValueError(f"a role is a non-empty name without '/': {role!r}")
        return f"{self.prefix}{role}/".encode()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        if self._closed:
            coro.close()
            raise RuntimeError("the etcd registry is closed")
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- registrations ----------------------------------------------------------------------------------

    @_failing_over
    async def register(self, instance: ServiceInstance, ttl: float) -> None:
        """Put the instance under a new lease of ``ttl`` (rounded up to whole seconds) and keep it alive.

        Registering a node again replaces its entry (and its TTL); the previous lease is revoked.
        """
        key = self._key(instance.role, instance.node)
        self._role_prefix(instance.role)  # validates the role
        old = self._registrations.get(instance.node)
        reg = _Registration(instance, ttl, key)
        if old is not None:
            await self._stop_keepalive(old)
            reg.lock = old.lock
        async with reg.lock:
            try:
                await self._grant_and_put(reg)
            except BaseException:
                if old is not None and self._keepalive and not self._closed:
                    old.keepalive = self._spawn(self._keep_alive(old), f"etcd-keepalive-{instance.node}")
                raise
            self._registrations[instance.node] = reg
            if old is not None and old.lease != reg.lease:
                # The key moved to the new lease (or, for a new role, to a new key): this drops what is left.
                with contextlib.suppress(aetcd.ClientError):
                    await self.client.revoke_lease(old.lease)
        if self._keepalive:
            reg.keepalive = self._spawn(self._keep_alive(reg), f"etcd-keepalive-{instance.node}")

    @_failing_over
    async def update_load(self, node: str, load: int, *, ready: bool | None = None) -> None:
        """Put the new load (and readiness) under the same lease, after renewing it. Unknown nodes:
        nothing happens."""
        reg = self._registrations.get(node)
        if reg is None:
            return
        async with reg.lock:
            i = reg.instance
            reg.instance = dataclasses.replace(i, load=load, ready=i.ready if ready is None else ready)
            if await self._refresh(reg):
                try:
                    await self.client.put(reg.key, reg.value, lease=reg.lease)
                    return
                except aetcd.ClientError as e:
                    if "lease not found" not in str(e):
                        raise
            log.warning("etcd lease of %s was lost: registering it again", node)
            self._registration_lost(node)
            await self._grant_and_put(reg)

    async def deregister(self, node: str) -> None:
        """Revoke the node's lease: its entry is gone at once. Only nodes this registry registered;
        unknown ones are ignored. If etcd cannot be reached the error is raised, and the entry goes
        when its TTL runs out (its keepalive is stopped either way)."""
        reg = self._registrations.pop(node, None)
        if reg is None:
            return
        await self._stop_keepalive(reg)
        await self._revoke(reg)

    @_failing_over
    async def _revoke(self, reg: _Registration) -> None:
        async with reg.lock:
            try:
                await self.client.revoke_lease(reg.lease)
            except aetcd.ClientError as e:
                if "lease not found" not in str(e):
                    raise

    async def _grant_and_put(self, reg: _Registration) -> None:
        lease = await self.client.lease(max(1, math.ceil(reg.ttl)))
        reg.lease = int(lease.id)
        await self.client.put(reg.key, reg.value, lease=reg.lease)

    async def _refresh(self, reg: _Registration) -> bool:
        """Renew the lease; False if etcd no longer has it."""
        reply = await self.client.refresh_lease(reg.lease, within=reg.ttl / 3)
        return reply is not None and int(reply.TTL) > 0

    async def _keep_alive(self, reg: _Registration) -> None:
        delay = reg.ttl / 3
        failures = 0
        while True:
            await asyncio.sleep(delay)
            raise_if_cancelling()  # a stop that the last renewal's library call swallowed
            epoch = self.client.epoch
            try:
                async with reg.lock:
                    with closed_channel_fails():
                        if not await self._refresh(reg):
                            log.warning("etcd lease of %s was lost: registering it again", reg.instance.node)
                            self._registration_lost(reg.instance.node)
                            await self._grant_and_put(reg)
            except Exception as e:  # etcd unreachable, or anything else: never let the keepalive die
                raise_if_cancelling(e)
                METRICS.engine_error(e, "etcd")
                failures += 1
                await self.client.failed(e, epoch)
                delay = min(reg.ttl / 3, self._retry * 2 ** min(failures, 10), self._max_retry)
                log.log(
                    logging.WARNING if failures == 1 else logging.DEBUG,
                    "etcd keepalive of %s failed (%r): retrying in %.2fs",
                    reg.instance.node,
                    e,
                    delay,
                )
            else:
                if failures:
                    log.info("etcd keepalive of %s renewed after %d failures", reg.instance.node, failures)
                failures = 0
                delay = reg.ttl / 3

    async def _stop_keepalive(self, reg: _Registration) -> None:
        task, reg.keepalive = reg.keepalive, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @_failing_over
    async def ping(self) -> None:
        """A read of one key (the prefix itself, never written): linearizable, so it proves the cluster
        has a leader and answers, not only that a member is up. Moves to the next member on failure."""
        await self.client.get(self.prefix.encode())

    # --- discovery --------------------------------------------------------------------------------------

    @_failing_over
    async def instances(self, role: str) -> list[ServiceInstance]:
        """The live instances of ``role``, read from etcd (ordered by node)."""
        got = await self.client.get_prefix(self._role_prefix(role))
        out: list[ServiceInstance] = []
        for kv in got:
            try:
                out.append(_instance(kv.value))
            except msgspec.DecodeError:
                log.warning("ignoring an unreadable registry entry %r", kv.key)
        return out

    def watch(self, role: str, callback: Callback) -> Callable[[], None]:
        """Call ``callback`` with the live list of ``role`` once the view has it (at once if it has),
        then after every change. The returned function unsubscribes; the last one out stops the view."""
        prefix = self._role_prefix(role)
        view = self._views.get(role)
        if view is None:
            view = _View(role)
            view.task = self._spawn(self._run_view(view, prefix), f"etcd-watch-{role}")
            self._views[role] = view

        def subscriber(live: list[ServiceInstance]) -> None:  # one object per subscription
            callback(live)

        view.subscribers.append(subscriber)
        if view.synced:
            subscriber(view.live())

        def unsubscribe() -> None:
            if subscriber in view.subscribers:
                view.subscribers.remove(subscriber)
            if not view.subscribers and self._views.get(role) is view:
                del self._views[role]
                if view.task is not None:
                    view.task.cancel()

        return unsubscribe

    async def _run_view(self, view: _View, prefix: bytes) -> None:
        def reset(kvs: Sequence[Any]) -> None:
            entries: dict[bytes, ServiceInstance] = {}
            for kv in kvs:
                with contextlib.suppress(msgspec.DecodeError):
                    entries[bytes(kv.key)] = _instance(kv.value)
            changed = entries != view.entries or not view.synced
            view.entries, view.synced = entries, True
            if changed:
                view.notify()

        def event(e: aetcd.Event) -> None:
            if _apply(view.entries, e):
                view.notify()

        await self._follow(prefix, reset, event, f"registry watch of {view.role!r}")

    def follow(
        self, prefix: bytes, reset: Callable[[Sequence[Any]], None], event: Callable[[aetcd.Event], None], label: str
    ) -> Callable[[], None]:
        """Keep up with every key under ``prefix`` on this registry's client (for other key spaces of the
        cluster, e.g. the configuration centre): ``reset(kvs)`` with the whole listing first and whenever
        the watch cannot resume, then ``event(e)`` for each change in revision order; the watch reopens
        after an etcd restart from the last revision seen + 1. Returns a function that stops following."""
        task = self._spawn(self._follow(prefix, reset, event, label), f"etcd-follow-{label}")

        def stop() -> None:
            task.cancel()

        return stop

    async def _follow(
        self,
        prefix: bytes,
        reset: Callable[[Sequence[Any]], None],
        event: Callable[[aetcd.Event], None],
        label: str,
    ) -> None:
        revision: int | None = None  # the last revision seen; None: list again
        failures = 0
        while True:
            epoch = self.client.epoch
            try:
                with closed_channel_fails():
                    if revision is None:
                        got = await self.client.get_prefix(prefix)
                        revision = int(got.header.revision)
                        reset(list(got))
                    async with self._watch(prefix, revision + 1) as events:
                        if failures:
                            log.info("etcd %s reopened from revision %d", label, revision + 1)
                        failures = 0
                        async for e in events:
                            revision = int(e.kv.mod_revision)
                            event(e)
                # The stream ended without an error: the client was shut down under us. Reopen.
                raise aetcd.ConnectionFailedError("etcd watch stream ended")
            except aetcd.RevisionCompactedError:
                log.warning("etcd %s: revision %s compacted, listing again", label, revision)
                revision = None
            except Exception as e:  # etcd restarted or unreachable (ConnectionFailedError, ...): reopen
                METRICS.engine_error(e, "etcd")
                failures += 1
                await self.client.failed(e, epoch)
                delay = min(self._retry * 2 ** min(failures - 1, 10), self._max_retry)
                log.log(
                    logging.WARNING if failures == 1 else logging.DEBUG,
                    "etcd %s broke (%r): reopening in %.2fs",
                    label,
                    e,
                    delay,
                )
                await retry_pause(delay, e)

    @contextlib.asynccontextmanager
    async def _watch(self, prefix: bytes, start_revision: int) -> AsyncIterator[AsyncIterator[aetcd.Event]]:
        """A prefix watch from ``start_revision``, cancelled on the way out (whatever the way)."""
        watch = await asyncio.wait_for(
            self.client.watch_prefix(prefix, start_revision=start_revision),
            self._timeout,
        )
        try:
            async with contextlib.aclosing(aiter(watch)) as events:
                yield events
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(watch.cancel(), self._timeout)

    # --- lifecycle --------------------------------------------------------------------------------------

    async def _release(self) -> None:
        """Stop every keepalive and watch, and close the connection. Registrations are not revoked
        (call :meth:`deregister` first for a clean stop): they expire within their TTL."""
        self._closed = True
        self._views.clear()
        self._registrations.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.client.close()


def _apply(entries: dict[bytes, ServiceInstance], event: aetcd.Event) -> bool:
    """Apply one watch event to the view's entries; True if the live list changed."""
    key = bytes(event.kv.key)
    if event.kind == aetcd.EventKind.DELETE:
        return entries.pop(key, None) is not None
    try:
        instance = _instance(event.kv.value)
    except msgspec.DecodeError:
        log.warning("ignoring an unreadable registry entry %r", key)
        return entries.pop(key, None) is not None
    if entries.get(key) == instance:
        return False
    entries[key] = instance
    return True


def parse_endpoints(endpoints: str | Sequence[str]) -> list[tuple[str, int]]:
    """``host:port`` members, from a list or a comma-separated string; at least one."""
    items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
    out = [_parse_endpoint(item) for item in items if item.strip()]
    if not out:
        raise ValueError(f"no etcd endpoint given: {endpoints!r}")
    return out


def _parse_endpoint(endpoint: str) -> tuple[str, int]:
    host, sep, port = endpoint.strip().removeprefix("http://").removeprefix("https://").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"etcd endpoint must be host:port: {endpoint!r}")
    return host.strip("[]"), int(port)


class _Client(aetcd.Client):  # type: ignore[misc]  # aetcd ships no type hints
    """aetcd's client over a TLS channel when asked, and over several members.

    aetcd 1.0.0 dials ``insecure_channel(host:port)`` and nothing else (no TLS options, one endpoint), so
    :meth:`connect` is its own here: the same stubs on a ``secure_channel`` with ``tls``'s CA and client
    certificate (gRPC checks the member's certificate against the CA and the host name dialled), on the
    current member. :meth:`failed` moves to the next member after a connection error; the registry's
    retry loops call it, and the next call connects there.
    """

    # aetcd's own state, which connect() below sets as aetcd's does
    _connected: asyncio.Event
    _is_connecting: bool
    _connect_wait_timeout: float
    _options: dict[str, Any]
    _timeout: float | None

    def __init__(
        self,
        members: list[tuple[str, int]],
        *,
        tls: ClientTls | None,
        timeout: float,
        options: dict[str, Any],
    ) -> None:
        host, port = members[0]
        # aetcd's `timeout` is typed int but passed to gRPC as seconds: a float works.
        super().__init__(host=host, port=port, timeout=timeout, options=options)
        self.members = members
        #: How many times the client moved on to the next member: it talks to ``members[current]``. A
        #: caller reads it before a call and hands it to :meth:`failed` with the call's error.
        self.epoch = 0
        self._tls = tls

    @property
    def current(self) -> int:
        return self.epoch % len(self.members)

    @property
    def target(self) -> str:
        host, port = self.members[self.current]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        if self._is_connecting:
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        try:
            self._is_connecting = True
            options = list(self._options.items())
            if self._tls is None:
                self.channel = grpc.aio.insecure_channel(self.target, options=options)
            else:
                ca, key, cert = self._tls.read()
                credentials = grpc.ssl_channel_credentials(ca, key, cert)
                self.channel = grpc.aio.secure_channel(self.target, credentials, options=options)
            self.kvstub = aetcd.rpc.KVStub(self.channel)
            self.clusterstub = aetcd.rpc.ClusterStub(self.channel)
            self.leasestub = aetcd.rpc.LeaseStub(self.channel)
            self.maintenancestub = aetcd.rpc.MaintenanceStub(self.channel)
            self._watcher = aetcd.watcher.Watcher(
                aetcd.rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata
            )
            self._connected.set()
        finally:
            self._is_connecting = False

    async def refresh_lease(self, lease_id: int, *, within: float | None = None) -> Any:
        """One keepalive of lease ``lease_id``: etcd's reply (``TTL`` 0 or below: the lease is gone), or
        None if the stream ended without one. Errors as aetcd's (``aetcd.ClientError`` and subclasses);
        no answer within ``within`` seconds (at most the client's timeout; a keepalive gives its TTL/3,
        so that a retry still comes in time) is ``aetcd.ConnectionTimeoutError``.

        aetcd's own ``refresh_lease`` returns from inside ``async for`` over a LeaseKeepAlive stream: the
        response generator stays suspended, in a reference cycle with its call, so every refresh leaves
        its gRPC call behind (about 18 KiB, most of it in gRPC's C core, outside Python's allocator)
        until a full garbage collection finds the cycle and the loop closes the generator. A node
        refreshes two or three leases every ``ttl / 3``; in a process that allocates little (an API
        node) full collections are minutes apart, and thousands of dead calls piled up. Here the stream
        is read to its end (etcd ends it once our side is done writing): the call finishes and is freed
        as soon as this returns."""
        timeout = self._timeout if within is None else min(within, self._timeout or within)
        await self.connect()
        call = self.leasestub.LeaseKeepAlive(timeout=timeout, metadata=self.metadata)
        try:
            # The whole exchange is bounded here too: a stream whose channel another task closed before
            # it started (the client moving on) waits for its start forever, deadline or not (grpcio 1.x).
            async with asyncio.timeout(timeout):
                with closed_channel_fails():
                    await call.write(aetcd.rpc.LeaseKeepAliveRequest(ID=lease_id))
                    await call.done_writing()
                    reply = await call.read()
                    while (await call.read()) is not grpc.aio.EOF:  # etcd answers each request once
                        pass
        except aetcd.rpc.AioRpcError as e:
            aetcd.exceptions._handle_exception(e)  # raises the matching aetcd.ClientError
        except TimeoutError:
            raise aetcd.ConnectionTimeoutError(f"no lease keepalive answer within {timeout}s") from None
        finally:
            call.cancel()  # a no-op once the stream ended; otherwise (an error, a cancellation) ends it
        return None if reply is grpc.aio.EOF else reply

    async def failed(self, exc: BaseException, epoch: int) -> bool:
        """A call begun at ``epoch`` (:attr:`epoch` read before the call) failed with ``exc``: if its member
        did not answer and there are others, use the next member from the next call on and close the old
        channel. True if the call may be made again at once: on the next member, or on this one when it
        answered that the leader changed under the call (it is up, and has or soon has a new leader:
        moving would only break every stream on it).

        A dead member fails every call and stream on it at once, and each reports it: only a report of
        the current epoch moves the client. Without that, three reports of one dead member moved a client
        of three members round to the dead one again, and closed the live channel under the calls that
        had just moved to it, whose failures then moved it again."""
        if len(self.members) < 2 or not isinstance(exc, aetcd.ConnectionFailedError | aetcd.ConnectionTimeoutError):
            return False
        if "etcdserver: leader changed" in str(exc):
            return True
        if epoch != self.epoch:
            return True  # the client already moved on since this call began
        self.epoch += 1
        log.warning("etcd member unreachable (%r): moving to %s", exc, self.target)
        # Detach the old channel before closing it: a call made while it closes connects to the next
        # member rather than borrowing the closing channel (whose failure would then move us once more).
        channel, watcher = self.channel, self._watcher
        self._init_channel_attrs()
        self._connected.clear()
        with contextlib.suppress(Exception):
            if watcher is not None:
                await watcher.shutdown()
            if channel is not None:
                await channel.close()
        return True
