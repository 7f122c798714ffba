"""Node id claims on etcd: one leased key per node id held, on the registry's connection.

Layout, under the registry's prefix (``registry.prefix``, one deployment per prefix):

- ``<prefix>node-ids/<n>``: the claim on node id ``n`` (0..1023), JSON ``{node, host, pid, claimed_at}``,
  attached to a lease of the registry's TTL that the holder keeps alive. It is created by a transaction
  "create if absent", so two processes never hold the same ``n``; it goes when the holder gives it back
  (at once) or when its lease expires (a crash: within the TTL).
- ``<prefix>node-id-marks/<n>``: JSON ``{node, ms}``, no lease: how far ``n`` has been used. The holder
  writes its *reservation* there (``ms`` = now + the reserve, at least the TTL) before minting up to it,
  extends it every TTL/3 with
  the lease, and writes the last millisecond it minted when it gives ``n`` back. Each write is a
  transaction that succeeds only while the holder's claim key is the one it created (same
  ``create_revision``), so a holder that lost its claim can never lower the mark. The next holder of
  ``n`` mints above the mark, whatever its own clock reads.

Why ids never repeat: a holder mints only up to the reservation it has written; a later holder starts
above the mark, which is at least that reservation. This holds across crashes, restarts, clock
differences between machines, and an operator deleting a claim key.

Why a lease of its own rather than the registration's: the claim must exist before the node starts
(a node that cannot claim does not start) and outlive the registration on the way out (the committer
drains after the node left the registry). Both leases have the registry's TTL and ride the same
connection (the registry's ``_Client``, with its failover between members).

A claim is found lost by its keepalive (every TTL/3, and at once when a watch on the claim key sees it
change): the lease expired (``refresh`` reports TTL 0) or the reservation write fails (the key was
deleted). The minter is revoked then and a new claim is made in the background (the old id first, if
free). While etcd does not answer, the holder mints until its
reservation runs out (``registry.node_id_reserve``, 30 s by default), then stops until etcd answers again.
The price of a long reserve: after a crash, the next holder of that id starts minting above the crashed
holder's reservation, so its ids' millisecond part runs up to the reserve ahead of its clock (they stay
unique and increasing).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import aetcd
import msgspec

from im.backends.node_ids import MAX_NODE_IDS, Minter, NodeIdClaims, NodeIdUnavailable
from im.backends.registry.etcd import EtcdRegistry, closed_channel_fails
from im.cancel import raise_if_cancelling, retry_pause
from im.observability.metrics import METRICS

log = logging.getLogger(__name__)


class _Claim(msgspec.Struct, frozen=True):
    """The value of a claim key: who holds the id (for an operator reading etcd)."""

    node: str
    host: str
    pid: int
    claimed_at: float


class _Mark(msgspec.Struct, frozen=True):
    """The value of a mark key: the last owner and the last millisecond used or reserved."""

    node: str
    ms: int


_encode = msgspec.json.Encoder().encode
_decode_mark = msgspec.json.Decoder(_Mark).decode


@dataclass(frozen=True)
class _Held:
    node_id: int
    lease: int
    #: The claim key's create_revision: the key is still this claim's while it has this revision. It is
    #: also the claim's fencing token (etcd revisions only grow, cluster-wide).
    revision: int


class EtcdNodeIds(NodeIdClaims):
    """:class:`NodeIdClaims` on the etcd of ``registry`` (its connection and prefix; started before and
    closed after this). ``ttl``: the lease TTL in seconds (the registry's, ``registry.ttl``), rounded up
    to whole seconds. ``reserve``: how far ahead a reservation reaches, in seconds (at least the TTL):
    how long the node keeps minting while etcd does not answer. ``size``: how many ids there are (tests
    shrink it). ``timeout``: seconds to open a watch. ``clock``: Unix seconds, for reservations."""

    def __init__(
        self,
        registry: EtcdRegistry,
        owner: str,
        minter: Minter,
        *,
        ttl: float,
        reserve: float = 0.0,
        size: int = MAX_NODE_IDS,
        timeout: float = 5.0,
        retry: float = 0.05,
        max_retry: float = 2.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.owner = owner
        self.minter = minter
        self.prefix = f"{registry.prefix}node-ids/"
        self.marks_prefix = f"{registry.prefix}node-id-marks/"
        self._client = registry.client
        self._ttl = max(1, math.ceil(ttl))
        self._reserve_ms = int(max(self._ttl, reserve) * 1000)
        self._size = size
        self._timeout = timeout
        self._retry = retry
        self._max_retry = max_retry
        self._clock = clock
        self._held: _Held | None = None
        self._task: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None  # watches the held claim key
        self._nudge = asyncio.Event()  # wakes the keepalive at once: the claim key changed
        self._refused: _Held | None = None  # a claim whose token a store refused (minter.on_refused)
        minter.on_refused = self._on_refused
        self._value = _encode(_Claim(owner, socket.gethostname(), os.getpid(), clock()))

    @property
    def node_id(self) -> int | None:
        return None if self._held is None else self._held.node_id

    def _key(self, n: int) -> bytes:
        return f"{self.prefix}{n}".encode()

    def _mark_key(self, n: int) -> bytes:
        return f"{self.marks_prefix}{n}".encode()

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    # --- start and stop ---------------------------------------------------------------------------------

    async def _acquire(self) -> None:
        """Claim an id, trying each etcd member once; then keep it alive in the background."""
        error: Exception | None = None
        for _ in range(len(self._client.members)):
            epoch = self._client.epoch
            try:
                await self._claim()
            except NodeIdUnavailable:
                raise
            except Exception as exc:
                error = exc
                await self._client.failed(exc, epoch)
                continue
            self._task = asyncio.get_running_loop().create_task(self._keep(), name=f"etcd-node-id-{self.owner}")
            return
        endpoints = ",".join(f"{h}:{p}" for h, p in self._client.members)
        first = (str(error).strip().splitlines() or [""])[0][:160]
        raise NodeIdUnavailable(
            f"cannot claim a node id for message ids: etcd at {endpoints} does not answer "
            f"({type(error).__name__}: {first}); start etcd or fix registry.etcd_endpoints"
        )

    async def _release(self) -> None:
        """Stop the keepalive, then give the id back: record the last millisecond minted and delete the
        claim (one transaction, only if the claim is still ours), revoke the lease. If etcd does not
        answer, the claim goes when its lease expires; the mark keeps the reservation."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._stop_watching()
        held, self._held = self._held, None
        if held is None:
            return
        self.minter.revoke()
        c, key = self._client, self._key(held.node_id)
        used = _encode(_Mark(self.owner, self.minter.last_ms))
        try:
            async with asyncio.timeout(3.0):
                await c.transaction(
                    compare=[c.transactions.create(key) == held.revision],
                    success=[
                        c.transactions.put(self._mark_key(held.node_id), used),
                        c.transactions.delete(key),
                    ],
                    failure=[],
                )
                await c.revoke_lease(held.lease)
        except Exception as exc:
            log.warning(
                "could not give node id %d back (%s: %s): it is free once its lease expires",
                held.node_id,
                type(exc).__name__,
                exc,
            )

    # --- claiming ---------------------------------------------------------------------------------------

    def _numbers(self, kvs: object, prefix: str) -> dict[int, bytes]:
        out: dict[int, bytes] = {}
        for kv in kvs:  # type: ignore[attr-defined]
            tail = bytes(kv.key)[len(prefix) :]
            if tail.isdigit() and int(tail) < self._size:
                out[int(tail)] = bytes(kv.value)
        return out

    def _after(self, value: bytes | None, n: int) -> int:
        """The millisecond a new holder of ``n`` mints after, from its mark (none: 0)."""
        if value is None:
            return 0
        try:
            return _decode_mark(value).ms
        except msgspec.DecodeError:  # unreadable: as if a holder had reserved up to a TTL from now
            log.warning("unreadable node id mark %d: minting after a full TTL from now", n)
            return self._now_ms() + self._reserve_ms

    def _reservation(self, after_ms: int) -> int:
        return max(self._now_ms(), after_ms, self.minter.last_ms) + self._reserve_ms

    async def _claim(self) -> None:
        """Claim a free id under a new lease (this owner's last one if free, else the lowest), reserve it,
        assign it to the minter. Raises NodeIdUnavailable when every id is held."""
        c = self._client
        lease = int((await c.lease(self._ttl)).id)
        try:
            for _ in range(8):  # another claimant may take the chosen id first: list again
                taken = self._numbers(await c.get_prefix(self.prefix.encode()), self.prefix)
                marks = self._numbers(await c.get_prefix(self.marks_prefix.encode()), self.marks_prefix)
                free = [n for n in range(self._size) if n not in taken]
                if not free:
                    raise NodeIdUnavailable(
                        f"all {self._size} node ids for message ids are claimed under {self.prefix} (each by a "
                        "running transfer or API node, or by a crashed one until its lease expires): stop one"
                    )
                mine = [n for n in free if self._owner_of(marks.get(n)) == self.owner]
                n = (mine or free)[0]
                key = self._key(n)
                ok, responses = await c.transaction(
                    compare=[c.transactions.create(key) == 0],
                    success=[c.transactions.put(key, self._value, lease=lease), c.transactions.get(self._mark_key(n))],
                    failure=[],
                )
                if not ok:
                    continue
                held = _Held(n, lease, int(responses[0].response_put.header.revision))
                mark = responses[1]
                after = self._after(bytes(mark[0][0]) if mark else None, n)
                until = self._reservation(after)
                if not await self._reserve(held, until):
                    continue  # deleted at once by someone: list again
                self._held = held
                self.minter.assign(n, after_ms=after, until_ms=until, token=held.revision)
                await self._stop_watching()
                self._watcher = asyncio.get_running_loop().create_task(
                    self._watch_claim(held), name=f"etcd-node-id-watch-{self.owner}"
                )
                log.info("node id %d claimed by %s (message ids after %d ms)", n, self.owner, after)
                return
            raise NodeIdUnavailable("could not claim a node id: other nodes kept taking the free ones; start again")
        except BaseException:
            with contextlib.suppress(Exception):  # nothing is held under it
                await c.revoke_lease(lease)
            raise

    @staticmethod
    def _owner_of(mark: bytes | None) -> str | None:
        if mark is None:
            return None
        try:
            return _decode_mark(mark).node
        except msgspec.DecodeError:
            return None

    async def _reserve(self, held: _Held, until_ms: int) -> bool:
        """Write the reservation of ``held`` while its claim key is still the one it created."""
        c, n = self._client, held.node_id
        ok, _ = await c.transaction(
            compare=[c.transactions.create(self._key(n)) == held.revision],
            success=[c.transactions.put(self._mark_key(n), _encode(_Mark(self.owner, until_ms)))],
            failure=[],
        )
        return bool(ok)

    # --- keeping it -------------------------------------------------------------------------------------

    async def _renew(self, held: _Held) -> None:
        """Refresh the lease and extend the reservation; a claim found lost is revoked at once."""
        reply = await self._client.refresh_lease(held.lease, within=self._ttl / 3)
        if reply is None or int(reply.TTL) <= 0:
            await self._lost(held, "its lease expired")
            return
        until = self._reservation(0)
        if not await self._reserve(held, until):
            await self._lost(held, "its key was deleted")
            return
        self.minter.extend(until)

    async def _lost(self, held: _Held, why: str) -> None:
        self._held = None
        self.minter.revoke()
        await self._stop_watching()
        log.warning(
            "node id %d of %s lost (%s): refusing sends until a node id is claimed again", held.node_id, self.owner, why
        )
        with contextlib.suppress(Exception):
            await self._client.revoke_lease(held.lease)

    def _on_refused(self) -> None:
        """The chat store refused a commit under this claim's token: a later claim of the id exists (this
        process was paused past its lease, say). The keepalive gives the claim up and claims again."""
        if self._held is not None:
            self._refused = self._held
            self._nudge.set()

    async def _keep(self) -> None:
        """Every TTL/3: renew the claim, or claim again after a loss (at once, then with backoff)."""
        delay = self._ttl / 3
        failures = 0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._nudge.wait(), delay)
            raise_if_cancelling()  # wait_for, or the last renewal's library call, may have swallowed a stop
            self._nudge.clear()
            epoch = self._client.epoch
            try:
                with closed_channel_fails():
                    refused, self._refused = self._refused, None
                    if refused is not None and refused == self._held:
                        await self._lost(refused, "the chat store refused its fencing token: another node holds it")
                    if self._held is None:
                        await self._claim()
                    else:
                        await self._renew(self._held)
            except Exception as exc:  # etcd unreachable, every id taken, ...: never let this task die
                raise_if_cancelling(exc)
                if not isinstance(exc, NodeIdUnavailable):
                    METRICS.engine_error(exc, "etcd")
                    await self._client.failed(exc, epoch)
                failures += 1
                delay = min(self._ttl / 3, self._retry * 2 ** min(failures, 10), self._max_retry)
                log.log(
                    logging.WARNING if failures == 1 else logging.DEBUG,
                    "node id keepalive of %s failed (%s: %s): retrying in %.2fs",
                    self.owner,
                    type(exc).__name__,
                    exc,
                    delay,
                )
                continue
            if failures:
                log.info("node id keepalive of %s got through after %d failures", self.owner, failures)
            failures = 0
            delay = self._ttl / 3 if self._held is not None else 0.0

    async def _stop_watching(self) -> None:
        task, self._watcher = self._watcher, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _watch_claim(self, held: _Held) -> None:
        """Wake the keepalive the moment the claim key changes (deleted by hand, its lease revoked or
        expired): the renewal that follows finds the loss, so minting stops at once rather than at the
        next renewal. A broken watch (etcd restarted, a member down) is reopened from the next revision."""
        c, key = self._client, self._key(held.node_id)
        start = held.revision + 1
        failures = 0
        while True:
            epoch = c.epoch
            try:
                with closed_channel_fails():
                    watch = await asyncio.wait_for(c.watch(key, start_revision=start), self._timeout)
                try:
                    async with contextlib.aclosing(aiter(watch)) as events:
                        failures = 0
                        async for event in events:
                            start = int(event.kv.mod_revision) + 1
                            if event.kind == aetcd.EventKind.DELETE or int(event.kv.create_revision) != held.revision:
                                self._nudge.set()
                                return
                finally:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(watch.cancel(), self._timeout)
                raise aetcd.ConnectionFailedError("etcd watch stream ended")
            except aetcd.RevisionCompactedError:  # changes may have been missed: let a renewal check
                self._nudge.set()
                return
            except Exception as exc:  # reopen; the keepalive still renews (and finds a loss) meanwhile
                failures += 1
                await c.failed(exc, epoch)
                delay = min(self._retry * 2 ** min(failures - 1, 10), self._max_retry)
                log.debug("watch of node id %d broke (%r): reopening in %.2fs", held.node_id, exc, delay)
                await retry_pause(delay, exc)
