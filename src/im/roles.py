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
(Redis); the composition root refuses to start a role on engines that one process owns. Each role lists
its parts in start order and runs them through :class:`im.lifecycle.Lifecycle`, which stops them in
reverse.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from im.backends.routing import DeliverySink
from im.compose import (
    GatewayListeners,
    build_accounts,
    build_admission,
    build_backends,
    build_chat_caches,
    build_committer,
    build_files,
    build_groups,
    build_http,
    build_hub,
    build_node_ids,
    build_readiness,
    build_reads,
    build_reloads,
    encryption_loops,
    event_workers,
    listed,
    memory_loops,
    require_shared_engines,
)
from im.compose_security import ProcessTls, build_link_tls, build_tls
from im.config import Config
from im.lifecycle import Lifecycle, Loop, Part, registration, report_load, tracing_part
from im.live_config import follow_push, live_config
from im.model.chat import StoredMessage
from im.observability import metrics
from im.observability.health import Readiness
from im.observability.ops_http import OpsServer
from im.transfer.pool import GRPC_ADDRESS, LinkRouter, TransferPool
from im.transfer.server import GrpcRouter, TransferServicer, serve_transfer

if TYPE_CHECKING:  # RabbitMQ's client: imported by im.compose.event_workers when events go there
    from im.events.push import PushConsumer

log = logging.getLogger("im")

#: How long a gateway or API process trusts a cached conversation state (members) that other
#: processes may change; the committer on a transfer node needs none (the store refuses stale heads).
#: Also how long any role trusts cached blocks and settings: a block takes effect everywhere within it.
SHARED_STATE_TTL = 2.0


class _NoDeliveries(DeliverySink):
    """The sink of a process that holds no client connections (an API process): nothing is routed to it."""

    def deliver(self, messages: Sequence[StoredMessage], recipients: Sequence[Sequence[int]]) -> None:
        log.warning("deliveries for %d messages reached a process without connections", len(messages))

    def deliver_event(self, frame: object, uids: Iterable[int], skip: tuple[int, str] | None) -> None:
        pass

    def held_users(self) -> Collection[int]:
        """None held, reported as such: transfer nodes then route by the gateways' tables alone."""
        return ()


class _Role:
    """What every role shares: its configuration, the one lifecycle that runs its parts, its metrics and
    (gateway and transfer nodes, with ``ops.port`` set) the operations listener."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.lifecycle = Lifecycle()
        metrics.install(config.metrics.enabled)
        self.ops: OpsServer | None = None

    def _listen_for_ops(self, readiness: Readiness, tls: ProcessTls | None) -> None:
        """With ``ops.port`` set: the operations listener, answering ``/health/ready`` from ``readiness``;
        HTTPS with the process's certificate (``tls``, reloaded with it) when it has one."""
        op = self.config.ops
        if op.port is not None:
            context = None if tls is None else (lambda: tls.files.context)
            self.ops = OpsServer(
                op.host, op.port, metrics=self.config.metrics.enabled, ready=readiness.check, tls=context
            )

    def _ops_first(self) -> list[Part]:
        """The operations listener starts first and stops last: it answers (503 ready) while draining."""
        return [] if self.ops is None else [Part("operations listener", self.ops.start, self.ops.stop)]

    def request_stop(self) -> None:
        self.lifecycle.request_stop()


class TransferNode(_Role):
    """``im transfer``: the committer behind the gRPC Transfer service."""

    def __init__(self, config: Config) -> None:
        require_shared_engines(config, "transfer")
        super().__init__(config)
        tc = config.transfer
        self.backends = b = build_backends(config)
        # The send path checks attachments; the API nodes serve uploads and migrate old blobs.
        self.files = build_files(config, b.file_store, keys=b.keyring, migrate_blobs=False)
        self.router = GrpcRouter()
        caches = build_chat_caches(b, privacy_ttl=SHARED_STATE_TTL)
        self.committer = build_committer(
            config,
            b,
            caches,
            self.files,
            self.router,
            answer_wait=tc.answer_wait,
            answer_wait_max_batch=tc.answer_wait_max_batch,
        )
        self.node_ids = build_node_ids(config, b.registry, tc.node_id, self.committer.ids)
        self.servicer = TransferServicer(
            self.committer,
            self.router,
            node=tc.node_id,
            max_frame_items=tc.max_frame_items,
            max_pending=tc.max_pending,
            tls=build_link_tls(config, tc.node_id),  # cluster_tls: TLS only, cluster client certificates
        )
        self._grpc_server: Any = None
        self.address = ""
        self.tls = build_tls(config)  # serves no clients: only the operations listener's HTTPS
        self.reloads = build_reloads(config, b, self.tls, self.lifecycle)  # its certificate, the master key file
        #: Engines (RabbitMQ too: the relay runs here), registered, not draining.
        self.readiness = build_readiness(config, b, self.lifecycle, events=True)
        self._listen_for_ops(self.readiness, self.tls)
        #: Dynamic settings from the configuration centre (log level, trace sampling, the send-order hold).
        self.live, self._live_parts = live_config(config, b.registry, self.lifecycle, committer=self.committer)

    def parts(self) -> list[Part]:
        """In start order; the stop runs backwards: leave the registry first (gateways stop choosing
        this node), then finish what is queued (every send already taken is committed and answered, or
        refused), end the streams once those answers left on them, then stop gRPC and close."""
        cfg, tc, b = self.config, self.config.transfer, self.backends
        return [
            tracing_part(cfg.tracing, "im-transfer", tc.node_id),
            *self._ops_first(),
            Part("stores", b.start, b.close),
            Part("node id", self.node_ids.start, self.node_ids.close),  # none free: the node does not start
            *self._live_parts,
            Part("files", self.files.start, self.files.close),
            Part("grpc", self._serve, self._stop_serving),
            Part("committer", self.committer.start, self.committer.stop),
            registration(
                b.registry,
                lambda: listed("transfer", tc.node_id, {GRPC_ADDRESS: self.address}),
                float(cfg.registry.ttl),
                self.readiness,
            ),
        ]

    async def _serve(self) -> None:
        tc = self.config.transfer
        self._grpc_server, port = await serve_transfer(
            self.servicer, f"{tc.host}:{tc.port}", keepalive=tc.keepalive, keepalive_timeout=tc.keepalive_timeout
        )
        self.address = tc.public_address or f"{tc.host}:{port}"

    async def _stop_serving(self) -> None:
        # The committer has stopped: its last answers are in the streams' outboxes. Each stream writes
        # what its outbox holds and ends; then gRPC stops (cancelling a stream that is still stuck).
        await self.servicer.close_streams(timeout=1.0)
        await self._grpc_server.stop(grace=1.0)

    def loops(self) -> list[Loop]:
        cfg, b = self.config, self.backends
        tc = cfg.transfer
        load = report_load(
            b.registry,
            tc.node_id,
            lambda: self.servicer.streams,
            interval=cfg.registry.ttl / 3,
            readiness=self.readiness,
        )
        consumers: list[PushConsumer] = []
        events = [("im-events", worker) for worker in event_workers(cfg, b, consumers)]
        follow_push(self.live, consumers)  # the webhook URL changes live
        return [*events, ("im-load", load), *self.reloads.loops(), *encryption_loops(cfg, b), *memory_loops(cfg)]

    async def run(self, ready: Callable[[TransferNode], None] | None = None) -> None:
        await self.lifecycle.run(
            self.parts(),
            loops=self.loops,
            ready=None if ready is None else lambda: ready(self),
            stopping="stopping: finishing queued sends",
        )


class GatewayNode(_Role):
    """``im gateway``: client connections, sends through the transfer nodes."""

    def __init__(self, config: Config) -> None:
        require_shared_engines(config, "gateway")
        super().__init__(config)
        node = config.gateway.node_id
        self.backends = b = build_backends(config)
        self.accounts = build_accounts(config, b.account_store)
        tc = config.transfer  # the link's keepalive, read at both ends
        self.pool = TransferPool(
            b.registry,
            node,
            on_revoked=self._revoked,
            tls=build_link_tls(config, node),
            keepalive=tc.keepalive,
            keepalive_timeout=tc.keepalive_timeout,
        )
        self.router = LinkRouter(self.pool)
        # Reads only (sync points, replays, members for typing and receipts): no committer runs here.
        caches = build_chat_caches(b, state_ttl=SHARED_STATE_TTL, privacy_ttl=SHARED_STATE_TTL)
        self.reads = build_reads(config, b, caches)
        self.hub = build_hub(config, b, self.reads, self.accounts, self.router, self.pool.submit)
        self.admission = build_admission(config)
        self.tls = build_tls(config)  # the client listeners' TLS (None: plaintext)
        self.listeners = GatewayListeners(config, self.hub, self.admission, self.tls)
        # Certificate files, and the master key file (replays open sealed bodies).
        self.reloads = build_reloads(config, b, self.tls, self.lifecycle)
        #: Published with the load: the API hands out only ready gateways (im.api.server.GatewayPicker).
        self.readiness = build_readiness(config, b, self.lifecycle)
        self._listen_for_ops(self.readiness, self.tls)
        #: Dynamic settings from the configuration centre: limits, rates, log level, trace sampling.
        self.live, self._live_parts = live_config(config, b.registry, self.lifecycle, hub=self.hub, reads=self.reads)
        # A registration found lost (lease expired while paused or cut off): clients are moved, not served on.
        b.registry.on_lost(lambda lost: self.hub.relocate_all() if lost == node else None)

    @property
    def addresses(self) -> dict[str, str]:
        return self.listeners.addresses

    def _revoked(self, sid: str) -> None:
        self.accounts.revoked_elsewhere(sid)
        self.hub.revoked(sid)

    def parts(self) -> list[Part]:
        """In start order; the stop runs backwards: leave the registry (the API stops handing this node
        out), stop accepting and reading; sends already on a link get their answer (acked or refused,
        within ``transfer.drain_timeout``) before clients are told to move; bye to everyone, flush
        cursors; close."""
        cfg, b = self.config, self.backends
        node = cfg.gateway.node_id
        return [
            tracing_part(cfg.tracing, "im-gateway", node),
            *self._ops_first(),
            Part("stores", b.start, b.close),
            *self._live_parts,
            Part("transfer links", lambda: self.pool.start(self.hub), self.pool.close),
            Part("hub", self.hub.start, self.hub.drain_and_close),
            Part("answers on the links", _nothing, self._wait_answered),
            Part("listeners", self.listeners.start, self.listeners.stop),
            registration(
                b.registry,
                lambda: listed("gateway", node, self.listeners.addresses),
                float(cfg.registry.ttl),
                self.readiness,
            ),
        ]

    async def _wait_answered(self) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.config.transfer.drain_timeout):
                await self.pool.wait_answered()

    def loops(self) -> list[Loop]:
        cfg, b = self.config, self.backends
        node = cfg.gateway.node_id
        load = report_load(
            b.registry, node, lambda: self.hub.connections, interval=cfg.registry.ttl / 3, readiness=self.readiness
        )
        return [("im-load", load), *self.reloads.loops(), *memory_loops(cfg)]

    async def run(self, ready: Callable[[GatewayNode], None] | None = None) -> None:
        await self.lifecycle.run(
            self.parts(),
            loops=self.loops,
            ready=None if ready is None else lambda: ready(self),
            stopping="stopping: waiting for answers to sends on the links",
        )


class ApiNode(_Role):
    """``im api``: the HTTP API; stateless, any number of them."""

    def __init__(self, config: Config) -> None:
        from im.api.server import GatewayPicker  # the HTTP API's modules (fastapi, uvicorn): this role only

        require_shared_engines(config, "api")
        super().__init__(config)
        node = config.http.node_id
        self.backends = b = build_backends(config)
        self.accounts = build_accounts(config, b.account_store, b.rate_limiter)
        self.files = build_files(config, b.file_store, b.rate_limiter, keys=b.keyring)
        tc = config.transfer  # the link's keepalive, read at both ends
        self.pool = TransferPool(
            b.registry,
            node,
            tls=build_link_tls(config, node),
            keepalive=tc.keepalive,
            keepalive_timeout=tc.keepalive_timeout,
        )
        self.router = LinkRouter(self.pool)
        # Membership changes are committed here (the store judges between writers) and routed through
        # a transfer node; reads check membership on a state at most SHARED_STATE_TTL old.
        caches = build_chat_caches(b, state_ttl=SHARED_STATE_TTL, privacy_ttl=SHARED_STATE_TTL)
        self.committer = build_committer(config, b, caches, self.files, self.router)
        self.node_ids = build_node_ids(config, b.registry, node, self.committer.ids)
        self.groups = build_groups(config, b, caches, self.committer)
        self.reads = build_reads(config, b, caches)
        self.accounts.on_revoke(self.pool.revoke)
        self.accounts.on_privacy_change(caches.consent.forget)
        self.picker = GatewayPicker(b.registry)
        self.admission = build_admission(config)
        self.tls = build_tls(config)  # HTTPS (None: plain HTTP)
        #: /api/v1/health and /api/v1/health/ready answer it.
        self.readiness = build_readiness(config, b, self.lifecycle)
        self.http = build_http(
            config,
            self.accounts,
            self.groups,
            self.reads,
            self.picker,
            self.files,
            self.admission,
            self.tls,
            self.readiness,
        )
        self.reloads = build_reloads(config, b, self.tls, self.lifecycle)
        #: Dynamic settings from the configuration centre: history pages, login budgets, log level, tracing.
        self.live, self._live_parts = live_config(
            config,
            b.registry,
            self.lifecycle,
            reads=self.reads,
            api_limits=config.limits,
            accounts=self.accounts,
            files=self.files,
        )

    @property
    def url(self) -> str:
        return self.http.url

    def parts(self) -> list[Part]:
        """In start order; the stop runs backwards: stop watching gateways, stop serving HTTP (requests
        under way are finished), drain the committer (membership changes), then close. Registered (role
        ``api``, for ``im status``) once HTTP serves; nobody picks API nodes from the registry."""
        b, cfg = self.backends, self.config
        return [
            tracing_part(self.config.tracing, "im-api", self.config.http.node_id, self.http.app),
            Part("stores", b.start, b.close),
            Part("node id", self.node_ids.start, self.node_ids.close),  # none free: the node does not start
            *self._live_parts,
            Part("files", self.files.start, self.files.close),
            Part("transfer links", lambda: self.pool.start(_NoDeliveries()), self.pool.close),
            Part("committer", self.committer.start, self.committer.stop),
            Part("http", self.http.start, self.http.stop),
            Part("gateway picker", self.picker.start, self.picker.stop),
            registration(
                b.registry,
                lambda: listed("api", cfg.http.node_id, {"http": self.http.url}),
                float(cfg.registry.ttl),
                self.readiness,
            ),
        ]

    def loops(self) -> list[Loop]:
        cfg, b = self.config, self.backends
        load = report_load(
            b.registry, cfg.http.node_id, lambda: 0, interval=cfg.registry.ttl / 3, readiness=self.readiness
        )
        return [("im-load", load), *self.reloads.loops(), *memory_loops(cfg)]

    async def run(self, ready: Callable[[ApiNode], None] | None = None) -> None:
        await self.lifecycle.run(
            self.parts(),
            loops=self.loops,
            ready=None if ready is None else lambda: ready(self),
        )


def _nothing() -> None:
    """The start of a part that only has a stop step."""


ROLES: dict[str, type[TransferNode] | type[GatewayNode] | type[ApiNode]] = {
    "transfer": TransferNode,
    "gateway": GatewayNode,
    "api": ApiNode,
}
