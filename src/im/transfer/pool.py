"""A process's links to every live transfer node, and the Router that routes through them.

:class:`TransferPool` watches the registry for ``transfer`` instances and keeps one
:class:`TransferLink` per node (opened when a node appears, closed when it leaves). Sends go to a node
chosen by conversation with rendezvous hashing, so one conversation goes through one node while the
set of nodes is stable, and only the conversations of a node that leaves move. Correctness never
depends on that choice: any node may commit to any conversation, the store refuses a batch whose heads
moved and dedupe makes resends safe; the choice only keeps the committers' caches warm and conflicts
rare.

:class:`LinkRouter` is the :class:`Router` of a process that holds no streams of its own (a gateway
node's typing and receipts, an API process's membership changes): local gateway nodes are called
directly, any other node is reached by asking a transfer node to forward.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections.abc import Callable, Collection, Sequence

from im.backends.registry import Registry
from im.backends.routing import DeliverySink
from im.backends.routing.memory import MemoryRouter
from im.core.committer import SendCallback, SendRequest
from im.model.chat import StoredMessage
from im.model.cluster import DeviceLocation, ServiceInstance
from im.model.errors import ErrorCode, ImError
from im.model.ids import direct_conv
from im.transfer.client import TransferLink
from im.transfer.server import encode_event
from im.transfer.tls import LinkTls

log = logging.getLogger(__name__)

#: The address key a transfer node registers (``ServiceInstance.addresses``).
GRPC_ADDRESS = "grpc"


def conversation_key(req: SendRequest) -> str:
    """What a send is hashed by: its conversation (a direct one named by ``to`` included)."""
    if req.conv is not None:
        return req.conv
    if req.to is not None and req.to > 0 and req.to != req.uid:
        return direct_conv(req.uid, req.to)
    return ""


def _score(node: str, key: str) -> int:
    return zlib.crc32(f"{node}\x00{key}".encode())


class TransferPool:
    """Links to the transfer nodes the registry lists. ``await start(sink)``; ``await close()``.

    Every task it makes (closing the link of a node that left) is its own, and ``close`` awaits them.
    """

    def __init__(
        self,
        registry: Registry,
        node: str,
        *,
        on_revoked: Callable[[str], None] | None = None,
        role: str = "transfer",
        link_factory: Callable[[str, str, DeliverySink], TransferLink] | None = None,  # the pool wires it
        tls: LinkTls | None = None,
        keepalive: float = 0.0,
        keepalive_timeout: float = 5.0,
    ) -> None:
        """``tls``: dial every transfer node over mutual TLS, and link only to a node whose certificate
        names the node its registry entry lists (:mod:`im.transfer.tls`). ``keepalive``,
        ``keepalive_timeout``: HTTP/2 pings on every link (:class:`~im.transfer.client.TransferLink`)."""
        self._registry = registry
        self._tls = tls
        self._keepalive = (keepalive, keepalive_timeout)
        self.node = node
        self._sink: DeliverySink | None = None  # where deliveries and events for this node go (start)
        self._on_revoked = on_revoked
        self._role = role
        self._make_link = link_factory or self._default_link
        self._links: dict[str, TransferLink] = {}  # transfer node id -> link
        self._ranking: dict[str, list[TransferLink]] = {}  # conversation -> links, best first
        #: conversation -> (the link its unanswered sends are on, how many): later sends follow them
        self._unanswered: dict[str, tuple[TransferLink, int]] = {}
        self._unwatch: Callable[[], None] | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()
        self._closed = False

    def _default_link(self, address: str, node: str, sink: DeliverySink) -> TransferLink:
        keepalive, timeout = self._keepalive
        return TransferLink(address, node, sink, tls=self._tls, keepalive=keepalive, keepalive_timeout=timeout)

    # --- lifecycle -----------------------------------------------------------------------------------

    async def start(self, sink: DeliverySink) -> None:
        """Link to the listed transfer nodes; deliveries and events for this node go to ``sink``."""
        self._sink = sink
        self._unwatch = self._registry.watch(self._role, self._on_instances)

    async def close(self) -> None:
        self._closed = True
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None
        links, self._links = list(self._links.values()), {}
        self._ranking.clear()
        await asyncio.gather(*(link.close() for link in links), *self._closing, return_exceptions=True)

    def _on_instances(self, instances: list[ServiceInstance]) -> None:
        wanted = {i.node: i.addresses[GRPC_ADDRESS] for i in instances if GRPC_ADDRESS in i.addresses}
        for node, link in list(self._links.items()):
            if wanted.get(node) != link.address:
                del self._links[node]
                log.info("transfer node %s left the registry: unlinking", node)
                link.abandon("the transfer node left; resend with the same cmid")
                task = asyncio.get_running_loop().create_task(link.close())
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
        for node, address in wanted.items():
            if node not in self._links:
                assert self._sink is not None, "the registry called back before start()"
                link = self._make_link(address, self.node, self._sink)
                link.peer = node  # the transfer node this registry entry names (checked over TLS)
                link.on_revoked = self._on_revoked
                link.on_lost = self.resubmit
                self._links[node] = link
                link.start()
                log.info("transfer node %s at %s: linking", node, address)
        self._ranking.clear()
        self._changed.set()
        self._changed = asyncio.Event()

    # --- state ---------------------------------------------------------------------------------------

    @property
    def links(self) -> dict[str, TransferLink]:
        return dict(self._links)

    def connected(self) -> list[TransferLink]:
        return [link for _, link in sorted(self._links.items()) if link.connected]

    async def wait_connected(self, count: int = 1, timeout: float | None = None) -> None:
        """Wait until at least ``count`` links are up."""
        async with asyncio.timeout(timeout):
            while len(self.connected()) < count:
                changed = self._changed
                waits: list[asyncio.Future[object]] = [
                    asyncio.ensure_future(link.wait_connected()) for link in self._links.values()
                ]
                waits.append(asyncio.ensure_future(changed.wait()))
                try:
                    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for w in waits:
                        w.cancel()

    async def wait_answered(self) -> None:
        """Return once no link has a send in flight: each was answered (acked or refused), or failed
        ``unavailable`` with its link. Sends a lost link hands to another are waited for there."""
        while busy := [link for link in self._links.values() if link.in_flight]:
            await asyncio.gather(*(link.wait_answered() for link in busy))

    # --- sends ---------------------------------------------------------------------------------------

    def link_for(self, key: str) -> TransferLink | None:
        """The connected link that ranks highest for ``key`` (None when no link is up)."""
        ranking = self._ranking.get(key)
        if ranking is None:
            if len(self._ranking) > 100_000:
                self._ranking.clear()
            ranking = [link for _, link in sorted(self._links.items(), key=lambda kv: -_score(kv[0], key))]
            self._ranking[key] = ranking
        for link in ranking:
            if link.connected:
                return link
        return None

    def submit(self, req: SendRequest, done: SendCallback) -> None:
        """``Committer.submit``'s contract, through the transfer node chosen for the conversation.

        While sends of a conversation are unanswered, later ones follow them to the same link even if
        another now ranks higher (a node that came back): over two links a later send could be committed
        before an earlier one still on its way. A lost link hands its sends back first (``resubmit``), so
        they and the later ones move together to the next node."""
        key = conversation_key(req)
        held = self._unanswered.get(key)
        link = held[0] if held is not None and held[0].connected else self.link_for(key)
        if link is None:
            err = ImError(ErrorCode.UNAVAILABLE, "no transfer node reachable; resend later", gateway=True)
            done(req, None, False, err)
            return
        self._unanswered[key] = (link, (held[1] if held is not None else 0) + 1)

        def answered(r: SendRequest, msg: StoredMessage | None, dup: bool, err: ImError | None) -> None:
            entry = self._unanswered.get(key)
            if entry is not None:
                if entry[1] <= 1:
                    del self._unanswered[key]
                else:
                    self._unanswered[key] = (entry[0], entry[1] - 1)
            done(r, msg, dup, err)

        link.submit(req, answered)

    def resubmit(self, sends: list[tuple[SendRequest, SendCallback]]) -> None:
        """Sends a lost link had not answered, in their submission order: submit them again (the dead
        node may have committed some: the store's dedupe answers those with their original seq). They go
        before anything submitted later, so one device's sends keep their order across the failover."""
        if self._closed:
            err = ImError(ErrorCode.UNAVAILABLE, "the gateway is stopping; resend with the same cmid", gateway=True)
            for req, done in sends:
                done(req, None, False, err)
            return
        if sends:
            log.info("resubmitting %d unanswered sends of a lost transfer link", len(sends))
        for req, done in sends:
            self.submit(req, done)

    def announce(self, uid: int, held: bool) -> list[asyncio.Future[None]]:
        """Tell every linked transfer node that this node now holds ``uid`` or no longer does
        (:meth:`TransferLink.announce`); the futures of those that route by it once applied."""
        futures = []
        for link in self._links.values():
            done = link.announce(uid, held)
            if done is not None:
                futures.append(done)
        return futures

    # --- forwarding ----------------------------------------------------------------------------------

    def _any(self) -> TransferLink | None:
        """One link for forwards: the same one while it stays up, so forwards keep their order."""
        up = self.connected()
        return up[0] if up else None

    def forward(self, node: str, messages: Sequence[StoredMessage], recipients: Sequence[Sequence[int]]) -> bool:
        link = self._any()
        return link is not None and link.forward(node, messages, recipients)

    def forward_event(self, node: str, frame: bytes, uids: Sequence[int], skip: tuple[int, str] | None) -> bool:
        link = self._any()
        return link is not None and link.forward_event(node, frame, uids, skip)

    def replace(self, node: str, connections: Sequence[DeviceLocation]) -> bool:
        """Have gateway ``node`` close these connections of its own (through one transfer node)."""
        link = self._any()
        return link is not None and link.replace(node, connections)

    def revoke(self, sid: str) -> None:
        """Tell every gateway (through one transfer node) that login session ``sid`` ended."""
        link = self._any()
        if link is None or not link.revoke(sid):
            log.warning("no transfer node reachable: revocation of a session not broadcast (tokens still refused)")


class LinkRouter(MemoryRouter):
    """A :class:`Router` for a process without streams: local sinks first, else forward through the pool.

    Guarantee: at most once, like every Router; per target node, batches keep their publish order while
    the forwarding link stays up (one link carries all forwards).
    """

    def __init__(self, pool: TransferPool, *, encode_event: Callable[[object], bytes] = encode_event) -> None:
        super().__init__()
        self._pool = pool
        self._encode_event = encode_event
        self.dropped = 0  # items with no link to forward them

    def elsewhere(self, node: str, messages: Sequence[StoredMessage], recipients: Sequence[Sequence[int]]) -> None:
        if not self._pool.forward(node, messages, recipients):
            self.dropped += len(messages)

    def event_elsewhere(self, node: str, frame: object, uids: Sequence[int], skip: tuple[int, str] | None) -> None:
        if not self._pool.forward_event(node, self._encode_event(frame), uids, skip):
            self.dropped += 1

    def replaced_elsewhere(self, node: str, connections: Sequence[DeviceLocation]) -> None:
        if not self._pool.replace(node, connections):
            self.dropped += len(connections)

    def announce(self, uid: int, held: bool) -> list[asyncio.Future[None]]:
        """Through every link (:meth:`TransferPool.announce`): the transfer nodes route by it."""
        return self._pool.announce(uid, held)

    def holders(self, uids: Collection[int]) -> dict[int, set[str]] | None:
        """None: the nodes this router reaches are mostly elsewhere (an API process's committer looks
        its recipients up in presence)."""
        return None
