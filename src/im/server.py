"""``im serve``: the whole server in one process, on embedded backends (or any configured ones).

The composition root (:mod:`im.compose`) builds the parts; :class:`EmbeddedServer` lists them in start
order, and :class:`im.lifecycle.Lifecycle` starts them in that order and stops them in reverse
(docs/architecture.md, "Graceful shutdown").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from im.api.server import GatewayPicker
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
)
from im.compose_security import build_tls
from im.config import Config
from im.lifecycle import Lifecycle, Loop, Part, registration, report_load, tracing_part
from im.live_config import follow_push, live_config
from im.observability import metrics

if TYPE_CHECKING:  # RabbitMQ's client: imported by im.compose.event_workers when events go there
    from im.events.push import PushConsumer


class EmbeddedServer:
    """``im serve``: HTTP API, file service and the WebSocket and TCP gateways in one process, on
    embedded backends."""

    def __init__(self, config: Config, *, reload: Callable[[], Config] | None = None) -> None:
        """``reload``: how SIGHUP reads the configuration again (its dynamic settings apply; with an etcd
        registry the configuration centre is followed instead)."""
        self.config = config
        self.lifecycle = Lifecycle()
        metrics.install(config.metrics.enabled)  # one registry for every role of this process (/metrics)
        self.backends = b = build_backends(config)
        self.accounts = build_accounts(config, b.account_store, b.rate_limiter)
        self.files = build_files(config, b.file_store, b.rate_limiter, keys=b.keyring)
        caches = build_chat_caches(b)
        self.committer = build_committer(config, b, caches, self.files, b.router)
        self.node_ids = build_node_ids(config, b.registry, config.gateway.node_id, self.committer.ids)
        self.groups = build_groups(config, b, caches, self.committer)
        self.reads = build_reads(config, b, caches)
        self.hub = build_hub(config, b, self.reads, self.accounts, b.router, self.committer.submit)
        self.accounts.on_privacy_change(caches.consent.forget)  # a block takes effect at once
        self.picker = GatewayPicker(b.registry)
        self.admission = build_admission(config)
        #: TLS on every listener (HTTP, WebSocket, TCP) when configured; the files are re-read on SIGHUP.
        self.tls = build_tls(config)
        self.listeners = GatewayListeners(config, self.hub, self.admission, self.tls)
        #: The store (and RabbitMQ when events go there) answers, registered, not draining: /api/v1/health.
        self.readiness = build_readiness(config, b, self.lifecycle, events=True)
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
        #: Certificate files and the master key file, re-read on SIGHUP and by the clock.
        self.reloads = build_reloads(config, b, self.tls, self.lifecycle)
        #: Dynamic settings: the configuration centre with an etcd registry, else the file on SIGHUP.
        self.live, self._live_parts = live_config(
            config,
            b.registry,
            self.lifecycle,
            reload=reload,
            hub=self.hub,
            reads=self.reads,
            api_limits=config.limits,
            accounts=self.accounts,
            files=self.files,
            committer=self.committer,
        )

    @property
    def http_url(self) -> str:
        return self.http.url

    @property
    def ws_url(self) -> str:
        return self.listeners.addresses.get("ws", "")

    @property
    def tcp_url(self) -> str:
        return self.listeners.addresses.get("tcp", "")

    def request_stop(self) -> None:
        self.lifecycle.request_stop()

    def parts(self) -> list[Part]:
        """In start order; the stop runs backwards (docs/architecture.md, "Graceful shutdown"):

        1. take no new work: stop watching gateways, leave the registry, stop accepting, stop reading;
        2. drain the committer: every queued send is committed and acked, or refused (never acked
           without being stored); its stop returns once the last answers are handed to the connections;
        3. say goodbye: the hub writes what is due (those acks), then ``bye shutdown`` to every
           connection, flushes cursors and read marks, and returns once the connections closed;
        4. close: uvicorn (the HTTP API answered until now, refusing group operations with 503), then
           the file service and the stores.
        """
        cfg, b = self.config, self.backends
        node = cfg.gateway.node_id
        return [
            tracing_part(cfg.tracing, "im", node, self.http.app),
            Part("stores", b.start, b.close),
            Part("node id", self.node_ids.start, self.node_ids.close),  # none free: the node does not start
            *self._live_parts,
            Part("files", self.files.start, self.files.close),
            Part("http", self.http.start, self.http.stop),
            Part("hub", self.hub.start, self.hub.drain_and_close),
            Part("committer", self.committer.start, self.committer.stop),
            Part("listeners", self.listeners.start, self.listeners.stop),
            registration(
                b.registry,
                lambda: listed("gateway", node, self.listeners.addresses),
                float(cfg.registry.ttl),
                self.readiness,
            ),
            Part("gateway picker", self.picker.start, self.picker.stop),
        ]

    def loops(self) -> list[Loop]:
        cfg, b = self.config, self.backends
        load = report_load(
            b.registry,
            cfg.gateway.node_id,
            lambda: self.hub.connections,
            interval=cfg.registry.ttl / 3,
            readiness=self.readiness,
        )
        consumers: list[PushConsumer] = []
        events = [("im-events", worker) for worker in event_workers(cfg, b, consumers)]
        follow_push(self.live, consumers)  # the webhook URL changes live
        return [("im-load", load), *events, *self.reloads.loops(), *encryption_loops(cfg, b), *memory_loops(cfg)]

    async def run(self, ready: Callable[[EmbeddedServer], None] | None = None) -> None:
        await self.lifecycle.run(
            self.parts(),
            loops=self.loops,
            ready=None if ready is None else lambda: ready(self),
            stopping="stopping: draining in-flight sends",
        )
