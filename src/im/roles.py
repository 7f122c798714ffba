"""The distributed roles: ``im transfer``, ``im gateway`` and ``im api``, each one process.

The same core as ``im serve``, cut where the network goes (docs/architecture.md):

- a **transfer** node runs the committer (:class:`~im.core.committer.Committer`) behind the gRPC ``Transfer`` service;
  its router sends deliveries and events down the streams of the gateway nodes that hold recipients;
- a **gateway** node holds client connections (WebSocket, TCP); it sends each client send to the
  transfer node chosen for its conversation, reads replays and sync points straight from the store,
  and saves cursors and read marks there;
- an **api** process serves HTTP; membership changes are committed by its own committer (the store
  judges between writers) and routed through a transfer node.

Every role finds the others through the registry (etcd) and shares the store (PostgreSQL) and presence
(Redis); the composition root refuses to start a role on engines that one process owns.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence

from im.api.app import create_app
from im.backends.routing import DeliverySink
from im.config import Config, ConfigError
from im.model.chat import StoredMessage
from im.model.cluster import ServiceInstance
from im.server import (
    GatewayPicker,
    HttpServer,
    ServerProcessBase,
    build_accounts,
    build_admission,
    build_backends,
    build_chat_caches,
    build_committer,
    build_files,
    build_groups,
    build_hub,
    build_reads,
    close_all,
    deregister,
    event_workers,
    start_gateway_listeners,
)
from im.transfer.pool import GRPC_ADDRESS, LinkRouter, TransferPool
from im.transfer.server import GrpcRouter, TransferServicer, serve_transfer

log = logging.getLogger("im")

#: How long a gateway or API process trusts a cached conversation state (members) that other
#: processes may change; the committer on a transfer node needs none (the store refuses stale heads).
#: Also how long any role trusts cached blocks and settings: a block takes effect everywhere within it.
SHARED_STATE_TTL = 2.0


def require_shared_engines(config: Config, role: str) -> None:
    """A role process shares state with others only through real engines: say which is missing."""
    wrong = []
    if config.store.kind != "postgres":
        wrong.append("store.kind=postgres (with store.postgres_dsn)")
    if config.presence.kind != "redis":
        wrong.append("presence.kind=redis")
    if config.registry.kind != "etcd":
        wrong.append("registry.kind=etcd")
    if wrong:
        raise ConfigError(
            f"im {role} runs beside other processes and needs shared engines: set {', '.join(wrong)} "
            "(im serve runs everything in one process on embedded ones)"
        )


class _NoDeliveries(DeliverySink):
    """The sink of a process that holds no client connections (an API process): nothing is routed to it."""

    def deliver(self, messages: Sequence[StoredMessage], recipients: Sequence[Sequence[int]]) -> None:
        log.warning("deliveries for %d messages reached a process without connections", len(messages))

    def deliver_event(self, frame: object, uids: Iterable[int], skip: tuple[int, str] | None) -> None:
        pass


class TransferNode(ServerProcessBase):
    """``im transfer``: the committer behind the gRPC Transfer service."""

    def __init__(self, config: Config) -> None:
        require_shared_engines(config, "transfer")
        super().__init__(config)
        tc = config.transfer
        self.backends = b = build_backends(config)
        self.files = build_files(config, b.file_store)  # the send path checks attachments
        self.router = GrpcRouter()
        caches = build_chat_caches(b, privacy_ttl=SHARED_STATE_TTL)
        self.committer = build_committer(config, b, caches, self.files, self.router, tc.node_id)
        self.servicer = TransferServicer(
            self.committer, self.router, node=tc.node_id, max_frame_items=tc.max_frame_items, max_pending=tc.max_pending
        )
        self.address = ""

    async def run(self, ready: Callable[[TransferNode], None] | None = None) -> None:
        cfg, tc, b = self.config, self.config.transfer, self.backends
        await b.start()
        await self.files.start()
        self.committer.start()
        grpc_server, port = await serve_transfer(self.servicer, f"{tc.host}:{tc.port}")
        self.address = tc.public_address or f"{tc.host}:{port}"
        await b.registry.register(
            ServiceInstance("transfer", tc.node_id, {GRPC_ADDRESS: self.address}), ttl=float(cfg.registry.ttl)
        )
        self.install_signal_handlers()
        if ready is not None:
            ready(self)
        tasks = [asyncio.create_task(c, name="im-events") for c in event_workers(cfg, b)]
        tasks.append(
            asyncio.create_task(self.report_load(b.registry, tc.node_id, lambda: self.servicer.streams), name="im-load")
        )
        await self._stop.wait()
        log.info("stopping: finishing queued sends")
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # Leave the registry first (gateways stop choosing this node), then finish what is queued:
        # every send already taken is committed and answered on its stream, or refused.
        await deregister(b.registry, tc.node_id)
        await self.committer.stop()
        await asyncio.sleep(0.2)  # let the answers of the last batch leave on their streams
        await grpc_server.stop(grace=1.0)
        await close_all(self.files.close, b.close)
        log.info("stopped")


class GatewayNode(ServerProcessBase):
    """``im gateway``: client connections, sends through the transfer nodes."""

    def __init__(self, config: Config) -> None:
        require_shared_engines(config, "gateway")
        super().__init__(config)
        node = config.gateway.node_id
        self.backends = b = build_backends(config)
        self.accounts = build_accounts(config, b.account_store)
        self.pool = TransferPool(b.registry, node, None, on_revoked=self._revoked)  # the sink: the hub
        self.router = LinkRouter(self.pool)
        # Reads only (sync points, replays, members for typing and receipts): no committer runs here.
        caches = build_chat_caches(b, state_ttl=SHARED_STATE_TTL, privacy_ttl=SHARED_STATE_TTL)
        self.reads = build_reads(config, b, caches)
        self.hub = build_hub(config, b, self.reads, self.accounts, self.router, self.pool.submit)
        self.pool.sink = self.hub
        self.admission = build_admission(config)
        self.addresses: dict[str, str] = {}

    def _revoked(self, sid: str) -> None:
        self.accounts.revoked_elsewhere(sid)
        self.hub.revoked(sid)

    async def run(self, ready: Callable[[GatewayNode], None] | None = None) -> None:
        cfg, b = self.config, self.backends
        node = cfg.gateway.node_id
        await b.start()
        await self.pool.start()
        self.hub.start()
        listeners, self.addresses = await start_gateway_listeners(cfg, self.hub, self.admission)
        await b.registry.register(ServiceInstance("gateway", node, self.addresses), ttl=float(cfg.registry.ttl))
        self.install_signal_handlers()
        if ready is not None:
            ready(self)
        load_task = asyncio.create_task(
            self.report_load(b.registry, node, lambda: self.hub.connections), name="im-load"
        )
        await self._stop.wait()
        log.info("stopping: waiting for answers to sends on the links")
        load_task.cancel()
        # 1. No new work: leave the registry (the API stops handing this node out), stop accepting.
        await deregister(b.registry, node)
        for server in listeners:
            server.close()
        self.hub.pause_all()
        # 2. Sends already on a link get their answer (acked or refused) before clients are told to move.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + cfg.transfer.drain_timeout
        while any(link.in_flight for link in self.pool.links.values()) and loop.time() < deadline:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0)
        # 3. bye to everyone, flush cursors, close.
        await self.hub.drain_and_close()
        await asyncio.sleep(0.1)
        await close_all(self.pool.close, b.close)
        log.info("stopped")


class ApiNode(ServerProcessBase):
    """``im api``: the HTTP API; stateless, any number of them."""

    def __init__(self, config: Config) -> None:
        require_shared_engines(config, "api")
        super().__init__(config)
        node = config.http.node_id
        self.backends = b = build_backends(config)
        self.accounts = build_accounts(config, b.account_store, b.rate_limiter)
        self.files = build_files(config, b.file_store, b.rate_limiter)
        self.pool = TransferPool(b.registry, node, _NoDeliveries())
        self.router = LinkRouter(self.pool)
        # Membership changes are committed here (the store judges between writers) and routed through
        # a transfer node; reads check membership on a state at most SHARED_STATE_TTL old.
        caches = build_chat_caches(b, state_ttl=SHARED_STATE_TTL, privacy_ttl=SHARED_STATE_TTL)
        self.committer = build_committer(config, b, caches, self.files, self.router, node)
        self.groups = build_groups(config, b, caches, self.committer)
        self.reads = build_reads(config, b, caches)
        self.accounts.on_revoke(self.pool.revoke)
        self.accounts.on_privacy_change(caches.consent.forget)
        self.picker = GatewayPicker(b.registry)
        self.admission = build_admission(config)
        self.url = ""

    async def run(self, ready: Callable[[ApiNode], None] | None = None) -> None:
        cfg, b = self.config, self.backends
        await b.start()
        await self.files.start()
        await self.pool.start()
        self.committer.start()
        self.picker.start()
        http = HttpServer(
            cfg,
            create_app(
                self.accounts,
                self.groups,
                self.reads,
                self.picker.pick,
                cfg.limits,
                files=self.files,
                max_request_bytes=cfg.http.max_body_bytes,
                refusal_delay=cfg.rates.refusal_delay,
            ),
            self.admission,
        )
        await http.start()
        self.url = http.url
        self.install_signal_handlers()
        if ready is not None:
            ready(self)
        await self._stop.wait()
        log.info("stopping")
        self.picker.stop()
        await http.stop()
        await self.committer.stop()
        await close_all(self.pool.close, self.files.close, b.close)
        log.info("stopped")


ROLES: dict[str, type[TransferNode] | type[GatewayNode] | type[ApiNode]] = {
    "transfer": TransferNode,
    "gateway": GatewayNode,
    "api": ApiNode,
}
