"""One connection per device across gateway nodes (docs/protocol.md sections 5 and 14).

On one node the hub replaces an older connection of the same (user, device) itself, when the newer one
registers. Across nodes presence decides: every authenticated connection gets an id unique to its node
and process start, and is *claimed* in presence as its device's holder
(:meth:`~im.backends.presence.Presence.claim`), which hands back the previous holder wherever it is,
atomically with the write. A previous holder on another node is asked, through the router (on a gateway
node: a ``Replaced`` item on the transfer link, docs/transfer.md section 5b), to close exactly that
connection; its node closes it only if it still holds that very connection, so a late request never
closes a newer one. Of near-simultaneous connections on several nodes, the one whose claim presence
applied last survives. One held on this node is left alone: the hub's own order rules here.

At most once, like every router item: a request lost with its link is made good by the other node's next
presence refresh (every ``max(1 s, presence.ttl/3)``), which presence answers with the connections
displaced since, and the hub closes them (``Hub._tick``).

Claims are batched: those made while one is in flight go to presence together, in registration order,
as one call (one Redis round trip), so one node's claims are applied in the order its connections
registered, and a mass reconnect costs few round trips.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
from collections.abc import Sequence

from im.backends.presence import Presence
from im.backends.routing import Router
from im.model.cluster import DeviceLocation


class DeviceClaims:
    """A gateway node's claims of its new connections, batched, and the requests to close what they
    displaced on other nodes. Its one task is started by :meth:`claim` and stopped by :meth:`stop`."""

    def __init__(self, node: str, presence: Presence, router: Router, *, ttl: float) -> None:
        self.node = node
        self._presence = presence
        self._router = router
        self._ttl = ttl
        #: Ids must not repeat across restarts of the node (a holder written before a crash may linger in
        #: presence for its TTL): a random prefix per process start, then a counter.
        self._prefix = secrets.token_hex(4)
        self._ids = itertools.count(1)
        self._queue: list[tuple[DeviceLocation, asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None
        #: Older connections on other nodes this node asked to close.
        self.replaced_elsewhere = 0

    def new_id(self) -> str:
        """An id for a new connection: unique to this node and process start, without ``|``."""
        return f"{self._prefix}.{next(self._ids)}"

    async def claim(self, locations: Sequence[DeviceLocation]) -> None:
        """Claim each (uid, device) for the named connection (``conn`` set) and ask the nodes holding
        older connections of these devices to close them. Raises what presence raised."""
        loop = asyncio.get_running_loop()
        futures = []
        for location in locations:
            future: asyncio.Future[None] = loop.create_future()
            self._queue.append((location, future))
            futures.append(future)
        if self._task is None:
            self._task = loop.create_task(self._run(), name="im-hub-claims")
        await asyncio.gather(*futures)

    async def _run(self) -> None:
        batch: list[tuple[DeviceLocation, asyncio.Future[None]]] = []
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                try:
                    previous = await self._presence.claim([location for location, _ in batch], self._ttl)
                except Exception as exc:  # the callers log it (a hint: the refresh loop claims again)
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                self.close_elsewhere(previous)
                for _, future in batch:
                    if not future.done():
                        future.set_result(None)
        finally:
            self._task = None
            for _, future in [*batch, *self._queue]:  # stopped: nobody waits for these any more
                future.cancel()
            self._queue = []

    def close_elsewhere(self, previous: Sequence[DeviceLocation]) -> None:
        """Ask the nodes holding these older connections to close them (one request per node); those
        on this node are left to the hub, which closed them when the newer one registered."""
        by_node: dict[str, list[DeviceLocation]] = {}
        for p in previous:
            if p.node != self.node and p.conn:
                by_node.setdefault(p.node, []).append(p)
        for node, connections in by_node.items():
            self.replaced_elsewhere += len(connections)
            self._router.publish_replaced(node, connections)

    async def stop(self) -> None:
        """Cancel the claim in flight (its callers get CancelledError) and wait for the task to end."""
        task = self._task
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
