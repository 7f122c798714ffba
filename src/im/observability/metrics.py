"""Every Prometheus metric of im, in one place (docs/operations.md, "Metrics").

Why not prometheus-client's ``Counter``/``Histogram`` objects: each ``inc()`` takes a lock and costs about
0.8 µs here, against 0.1 µs for adding to an int attribute, and the send path counts several things per
message. So the values live in plain attributes of one object, :data:`METRICS` (ints, dicts of ints over
a fixed label set, :class:`Buckets` for histograms), changed by the event loop that owns them, and one
collector turns them into metric families when ``/metrics`` is scraped (on the same loop, so no lock is
needed). Only prometheus-client's exposition, its default registry and its process collector
(``process_open_fds``, ``process_max_fds``, ...) are used.

Rules for call sites:

- a per-message count is an int add (``METRICS.sends += 1``), done whether or not metrics are on (it
  costs less than testing a flag); a batch adds its length once;
- anything costlier (a clock read, a histogram) is behind ``if METRICS.enabled:``;
- labels come from the fixed tuples below (never a user, device, conversation or address).

With ``metrics.enabled=false`` (:func:`install` with False) the collector is not registered and the
listeners answer ``/metrics`` with 404.

This module imports nothing but the standard library at import time (the protocol layer and the SDK's
processes import it); prometheus-client is imported by :func:`install` and :func:`render`.
"""

from __future__ import annotations

import bisect
import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, Final

#: Client transports of a gateway.
TRANSPORTS: Final = ("ws", "tcp")
LINK_DIRECTIONS: Final = ("sent", "received")
#: Rate limits that refuse work: the per-connection token buckets of a session, then the shared rules by
#: their names (im.compose: rates.*; im.files: upload quotas).
RATE_LIMITS: Final = (
    "session-send",
    "session-typing",
    "send-user",
    "send-conv",
    "typing",
    "receipts",
    "login-pair",
    "login-account",
    "login-address",
    "register",
    "upload-bytes",
    "upload-files",
    "other",
)
#: What became of one event at the push consumer.
WEBHOOK_OUTCOMES: Final = ("pushed", "duplicate", "nobody_offline", "failed", "dropped", "undecodable")
#: What became of one login (``auth`` frame) at a gateway's admission (im.protocol.logins).
LOGIN_RESULTS: Final = ("admitted", "queued", "refused")
#: The engine behind a failed call (from the exception's module, see :func:`engine_of`).
ENGINES: Final = ("sqlite", "postgres", "redis", "rabbitmq", "etcd", "grpc", "http", "other")

#: Exception module prefixes -> engine label.
_ENGINE_MODULES: Final = (
    ("asyncpg", "postgres"),
    ("psycopg", "postgres"),
    ("sqlite3", "sqlite"),
    ("aiosqlite", "sqlite"),
    ("redis", "redis"),
    ("aio_pika", "rabbitmq"),
    ("aiormq", "rabbitmq"),
    ("pamqp", "rabbitmq"),
    ("aetcd", "etcd"),
    ("grpc", "grpc"),
    ("httpx", "http"),
    ("httpcore", "http"),
)

#: One message in this many is timed for the ack and delivery latency histograms (a clock read, a dict
#: entry and a bisect cost about 0.5 µs; the rest of a message's metrics cost about 0.15 µs).
LATENCY_SAMPLE: Final = 8
#: Seconds: from a millisecond on loopback to a stalled disk or a partitioned link. (Its type is written
#: out: mypyc left a ``Final`` tuple of float literals without one unset at import.)
LATENCY_BOUNDS: Final[tuple[float, ...]] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
#: Messages per committed batch (the committer's max_batch defaults to 2048).
BATCH_BOUNDS: Final[tuple[int, ...]] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class Buckets:
    """A histogram as plain numbers: ``observe`` is a bisect and two adds (no lock, no allocation)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(float(b) for b in bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        """Prometheus buckets: (le, count of observations <= le), +Inf last."""
        out, total = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), float(total)))
        return out


def _zeros(labels: Sequence[str]) -> dict[str, int]:
    return dict.fromkeys(labels, 0)


class Metrics:
    """The values behind every ``im_*`` metric (see :data:`SPECS` for names and meanings)."""

    __slots__ = (
        "ack_seconds",
        "acks",
        "authenticated",
        "catch_up_fetches",
        "commit_batch",
        "commit_seconds",
        "committed",
        "connections",
        "deliveries",
        "delivery_seconds",
        "duplicates",
        "enabled",
        "engine_errors",
        "gap_fetches",
        "link_frames",
        "logins",
        "opened",
        "outbox_backlog",
        "outbox_published",
        "rate_limited",
        "refused",
        "relay_lag",
        "routed",
        "sends",
        "slow_consumers",
        "webhook",
    )

    def __init__(self) -> None:
        #: Whether metrics are collected and served (``metrics.enabled``); guards the costlier call sites.
        self.enabled = False
        self.connections = _zeros(TRANSPORTS)
        self.opened = _zeros(TRANSPORTS)
        self.authenticated = 0
        self.sends = 0
        self.acks = 0
        self.ack_seconds = Buckets(LATENCY_BOUNDS)
        self.refused = 0
        self.duplicates = 0
        self.deliveries = 0
        self.gap_fetches = 0
        self.catch_up_fetches = 0
        self.logins = _zeros(LOGIN_RESULTS)
        self.slow_consumers = 0
        self.rate_limited = _zeros(RATE_LIMITS)
        self.committed = 0
        self.commit_batch = Buckets(BATCH_BOUNDS)
        self.commit_seconds = Buckets(LATENCY_BOUNDS)
        self.delivery_seconds = Buckets(LATENCY_BOUNDS)
        self.routed = 0  # messages routed to this gateway (for the delivery latency's sampling)
        self.outbox_backlog = 0
        self.outbox_published = 0
        self.relay_lag = 0.0
        self.webhook = _zeros(WEBHOOK_OUTCOMES)
        self.engine_errors = _zeros(ENGINES)
        #: Frames on this process's transfer links (gateway or transfer node side), by direction.
        self.link_frames = _zeros(LINK_DIRECTIONS)

    def rate_refused(self, limit: str, n: int = 1) -> None:
        """Count refusals by one rate limit (an unknown name counts as ``other``: labels stay bounded)."""
        key = limit if limit in self.rate_limited else "other"
        self.rate_limited[key] += n

    def engine_error(self, exc: BaseException, engine: str | None = None) -> None:
        """Count one failed call to an engine: ``engine`` when the caller knows it, else from ``exc``."""
        key = engine if engine in self.engine_errors else engine_of(exc)
        assert key is not None
        self.engine_errors[key] += 1


def engine_of(exc: BaseException) -> str:
    """The engine an exception comes from, by the module of its class (or of its cause's)."""
    seen: BaseException | None = exc
    for _ in range(3):  # the exception, its cause, the cause's cause
        if seen is None:
            break
        module = type(seen).__module__ or ""
        for prefix, engine in _ENGINE_MODULES:
            if module == prefix or module.startswith(prefix + "."):
                return engine
        seen = seen.__cause__ or seen.__context__
    return "other"


#: Exception classes (by name, anywhere in the class hierarchy of the exception or its causes) that say an
#: engine could not be reached or went away mid-call: the builtin connection errors and timeouts, asyncpg's
#: connection and operator-intervention errors (a database starting up or shutting down), redis-py's own
#: ``ConnectionError``/``TimeoutError``. Names, not imports: this leaf imports no engine library.
_UNREACHABLE: Final = frozenset(
    {"ConnectionError", "TimeoutError", "PostgresConnectionError", "InterfaceError", "OperatorInterventionError"}
)


def engine_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` (or its cause) says an engine is away (an outage: retry later), not a bug."""
    seen: BaseException | None = exc
    for _ in range(3):  # the exception, its cause, the cause's cause
        if seen is None:
            break
        if any(klass.__name__ in _UNREACHABLE for klass in type(seen).__mro__):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


#: The one instance every role of a process shares (``im serve`` runs them all on one).
METRICS: Final = Metrics()

#: name -> (type, help, label name or None, how to read it). The help texts are what an operator sees.
SPECS: Final[dict[str, tuple[str, str, str | None, str]]] = {
    "im_connections": (
        "gauge",
        "Client connections open on this gateway (upgraded WebSocket or accepted TCP), by transport.",
        "transport",
        "connections",
    ),
    "im_connections_opened": (
        "counter",
        "Client connections accepted since start, by transport.",
        "transport",
        "opened",
    ),
    "im_sessions_authenticated": (
        "gauge",
        "Authenticated sessions (one user's device) held by this gateway.",
        None,
        "authenticated",
    ),
    "im_sends_received": (
        "counter",
        "Client sends that passed the session's checks and rate limits and were handed to the core.",
        None,
        "sends",
    ),
    "im_acks": (
        "counter",
        "Sends the core answered as stored (duplicates included): each is acked to its connection if open.",
        None,
        "acks",
    ),
    "im_ack_latency_seconds": (
        "histogram",
        "From a send taken at its gateway to its ack there (the client's wait minus the network): queueing, "
        f"the transfer link and the commit. One send in {LATENCY_SAMPLE} is timed.",
        None,
        "ack_seconds",
    ),
    "im_sends_refused": (
        "counter",
        "Sends the core answered with an error (refused, or storage down).",
        None,
        "refused",
    ),
    "im_duplicates_suppressed": (
        "counter",
        "Sends acked as duplicates of a message already stored (a client resending after a lost ack).",
        None,
        "duplicates",
    ),
    "im_deliveries": (
        "counter",
        "Messages written to a recipient's connection (live or fetched; the sender's own ack not included).",
        None,
        "deliveries",
    ),
    "im_gap_fetches": (
        "counter",
        "Fetches of stored messages for clients (history and gap fills after a missed or reordered message).",
        None,
        "gap_fetches",
    ),
    "im_catch_up_fetches": (
        "counter",
        "Conversations a device was missing messages of when a transfer link came up, when a transfer "
        "node reported deliveries it dropped for this gateway, or when presence had lost the device "
        "(what did not arrive), each then fetched from the log.",
        None,
        "catch_up_fetches",
    ),
    "im_gateway_logins": (
        "counter",
        "Logins (auth frames) by what admission did: admitted at once, queued for a turn (at most "
        "limits.auth_max_wait), or refused with retry_after (error and bye unavailable; limits.auth_rate).",
        "outcome",
        "logins",
    ),
    "im_slow_consumer_disconnects": (
        "counter",
        "Connections closed because the client read too slowly (send buffer over gateway.max_send_buffer).",
        None,
        "slow_consumers",
    ),
    "im_rate_limit_refusals": (
        "counter",
        "Commands and requests refused by a rate limit, by limit (session-* are per connection).",
        "limit",
        "rate_limited",
    ),
    "im_messages_committed": (
        "counter",
        "Messages (system messages included) written to conversation logs by this process's committer.",
        None,
        "committed",
    ),
    "im_transfer_link_frames": (
        "counter",
        "gRPC frames on this process's links between gateways and transfer nodes, by direction: sends or "
        "deliveries per frame is how well the link batches (each frame has a fixed cost at both ends).",
        "direction",
        "link_frames",
    ),
    "im_commit_batch_size": (
        "histogram",
        "Messages per committed batch (group commit): large batches mean the store is the bottleneck.",
        None,
        "commit_batch",
    ),
    "im_commit_seconds": (
        "histogram",
        "Duration of one successful store transaction of the committer (one batch).",
        None,
        "commit_seconds",
    ),
    "im_delivery_latency_seconds": (
        "histogram",
        "From a message's commit timestamp (its ts, stamped when its batch was prepared) to its delivery "
        f"write at a recipient's gateway; one message in {LATENCY_SAMPLE} per gateway is timed. Clocks of "
        "different hosts add their skew.",
        None,
        "delivery_seconds",
    ),
    "im_outbox_backlog": (
        "gauge",
        "Outbox rows the relay found waiting at its last fetch (capped at the relay's batch size).",
        None,
        "outbox_backlog",
    ),
    "im_outbox_published": ("counter", "Outbox events published to RabbitMQ and deleted.", None, "outbox_published"),
    "im_relay_lag_seconds": (
        "gauge",
        "Age of the oldest outbox row at the relay's last fetch (0 when empty): how late events are.",
        None,
        "relay_lag",
    ),
    "im_webhook_results": (
        "counter",
        "Events handled by the push consumer, by outcome (failed: a webhook call that will be retried).",
        "outcome",
        "webhook",
    ),
    "im_engine_errors": (
        "counter",
        "Failed calls to an engine (store, presence, registry, broker, links), by engine.",
        "engine",
        "engine_errors",
    ),
}


class _Collector:
    """Reads :data:`METRICS` at scrape time into metric families (prometheus-client's collector protocol)."""

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        m = METRICS
        for name, (kind, help_text, label, attr) in SPECS.items():
            value = getattr(m, attr)
            if kind == "histogram":
                h = HistogramMetricFamily(name, help_text)
                h.add_metric([], value.cumulative(), value.sum)
                yield h
                continue
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            f = family(name, help_text, labels=[label] if label else None)
            if label:
                for key, n in value.items():
                    f.add_metric([key], float(n))
            else:
                f.add_metric([], float(value))
            yield f
        tasks = asyncio_tasks()
        if tasks is not None:
            g = GaugeMetricFamily(
                "im_asyncio_tasks",
                "Asyncio tasks alive on the event loop that serves this scrape (a count that keeps growing "
                "under a steady load is a leak).",
            )
            g.add_metric([], float(tasks))
            yield g


def asyncio_tasks() -> int | None:
    """Tasks not done on the running event loop, or None when called off the loop (``im_asyncio_tasks``)."""
    import asyncio

    try:
        return len(asyncio.all_tasks())
    except RuntimeError:  # no running loop in this thread
        return None


_installed = False


def install(enabled: bool) -> None:
    """Turn metrics on or off for this process (every role calls it with ``metrics.enabled``). On: the
    collector and the process collector (open file descriptors and their limit) are on the default
    registry, once however many roles a process runs."""
    global _installed
    METRICS.enabled = enabled
    if not enabled or _installed:
        return
    from prometheus_client import PROCESS_COLLECTOR, REGISTRY

    REGISTRY.register(_Collector())
    with contextlib.suppress(ValueError):  # registered on import already (the default)
        REGISTRY.register(PROCESS_COLLECTOR)
    _installed = True


#: The media type of :func:`render`'s text.
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"


def render() -> bytes | None:
    """The exposition text of the default registry, or None when metrics are off (answer 404)."""
    if not METRICS.enabled:
        return None
    from prometheus_client import REGISTRY, generate_latest

    return generate_latest(REGISTRY)
