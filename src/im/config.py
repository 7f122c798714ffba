"""Configuration: defaults < config file (YAML) < ``IM_...`` environment variables < command-line flags.

Nested fields use ``__`` in environment variables: ``IM_LIMITS__MAX_FRAME_BYTES=65536``. An invalid value
fails at start with a message naming the field (see :func:`load_config`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict


class _Section(BaseModel):
    """A configuration section: a misspelt key is an error, never silently a default."""

    model_config = ConfigDict(extra="forbid")


class HttpConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    #: The address clients are told to use, when it differs from the bind address (proxies, NAT).
    public_url: str | None = None
    #: This API process's id (``im api``): seeds its message ids, names it to the transfer nodes.
    node_id: str = "api-1"
    # Request limits (docs/security.md, "Listeners"): bodies are counted as they arrive, chunked too.
    #: Largest request body accepted, except uploads (``files.max_upload_bytes``): 413 ``too_large``.
    max_body_bytes: int = Field(1024 * 1024, ge=1024)
    #: Seconds a client has to send a complete request head, from the connection's start or the end of
    #: the previous response (slow heads, "slowloris"): the connection is closed.
    head_timeout: float = Field(10.0, gt=0)
    #: Seconds without a byte of a request body the server is waiting for: the connection is closed.
    body_timeout: float = Field(30.0, gt=0)
    #: Whole seconds an idle keep-alive connection stays open after a response.
    keepalive_timeout: int = Field(5, ge=1)
    #: Largest request head (request line and headers): 400 and close.
    max_head_bytes: int = Field(16 * 1024, ge=1024)
    #: Most header fields in one request: 431 ``too_large``.
    max_headers: int = Field(100, ge=8)


class GatewayConfig(_Section):
    host: str = "127.0.0.1"
    ws_port: int = Field(8081, ge=0, le=65535)
    public_ws_url: str | None = None
    #: The TCP listener (length-prefixed frames); None turns it off.
    tcp_port: int | None = Field(8082, ge=0, le=65535)
    public_tcp_url: str | None = None

    @field_validator("tcp_port", mode="before")
    @classmethod
    def _off(cls, value: object) -> object:
        """``--set gateway.tcp_port=off`` (or none, null, empty) turns the TCP listener off."""
        if isinstance(value, str) and value.strip().lower() in ("", "off", "none", "null"):
            return None
        return value

    node_id: str = "gw-1"
    #: Seconds a connection may take to send its auth frame.
    auth_timeout: float = Field(10.0, gt=0)
    #: Seconds of client silence after which the server closes (clients ping more often than this).
    idle_timeout: float = Field(60.0, gt=0)
    #: Replayed messages per store read while a device catches up.
    replay_page: int = Field(500, ge=1, le=10_000)
    #: Seconds a device's own result, come ahead of the live messages of the same commit that precede it
    #: (a commit is answered before it is routed), waits for them before the gap is read from the store.
    live_wait: float = Field(0.05, ge=0, le=5)
    #: Bytes queued for a client beyond which it is disconnected (policy "disconnect": it resumes later
    #: from its cursors, nothing is lost).
    max_send_buffer: int = Field(4 * 1024 * 1024, ge=64 * 1024)


class TransferConfig(_Section):
    """``im transfer``: the gRPC endpoint gateways send through (docs/transfer.md)."""

    host: str = "127.0.0.1"
    port: int = Field(8083, ge=0, le=65535)
    #: The ``host:port`` gateways dial, when it differs from the bind address.
    public_address: str | None = None
    node_id: str = "tr-1"
    #: Items of one kind per gRPC frame (sends, results, deliveries).
    max_frame_items: int = Field(4096, ge=1)
    #: Deliveries queued for one slow gateway beyond which new ones are dropped (recovered from the log).
    max_pending: int = Field(100_000, ge=1)
    #: Seconds the answers of a committed batch wait for its routing (the presence lookup), so that both
    #: reach a gateway in one frame; a slower lookup does not hold them longer. 0: answered first.
    answer_wait: float = Field(0.02, ge=0, le=1)
    #: Only batches of at most this many messages wait so (larger ones are answered first: the frame they
    #: save is a small share of their cost, and the wait would lengthen the link's cycle under load).
    answer_wait_max_batch: int = Field(64, ge=0, le=1_000_000)
    #: Seconds a stopping gateway waits for answers to sends already on a link.
    drain_timeout: float = Field(5.0, ge=0)
    #: Seconds between HTTP/2 keepalive pings on every gRPC link, at both ends (gateways and API nodes
    #: read it too); 0: no pings. A peer that answers none within ``keepalive_timeout`` is taken as gone:
    #: the link breaks and a gateway hands its unanswered sends to the next transfer node, as when the
    #: node dies, instead of waiting on a silent partition until TCP gives up (docs/transfer.md).
    keepalive: float = Field(10.0, ge=0, le=3600)
    #: Seconds to wait for the answer to a keepalive ping.
    keepalive_timeout: float = Field(5.0, gt=0, le=300)


class OpsConfig(_Section):
    """The operations listener of ``im gateway`` and ``im transfer`` (docs/operations.md): plain HTTP with
    ``/metrics``, ``/health/live`` and ``/health/ready``. The API role (and ``im serve``) serves the same
    paths on its HTTP port instead. Keep it on a private interface: it is not authenticated."""

    host: str = "127.0.0.1"
    #: None: no operations listener; 0: a free port (logged, and registered in the registry).
    port: int | None = Field(None, ge=0, le=65535)


class MetricsConfig(_Section):
    """Prometheus metrics (docs/operations.md, "Metrics"). Labels never hold user ids or addresses."""

    enabled: bool = True


class TlsConfig(_Section):
    """TLS on every client listener of a process (HTTP, WebSocket, TCP): on when ``cert_file`` and
    ``key_file`` are set (both or neither), and then those ports speak TLS only (a plaintext client fails
    the handshake; nothing is served in clear). The files are read again when they change (checked every
    ``reload_interval`` seconds) and on SIGHUP: new connections get the new certificate, open ones keep
    theirs, and a broken replacement is logged while the previous certificate stays in use."""

    #: PEM certificate chain (the server's certificate first, then intermediates); ``im certs node``.
    cert_file: Path | None = None
    #: PEM private key of that certificate (keep it 0600).
    key_file: Path | None = None
    #: Oldest TLS version accepted: ``1.2`` or ``1.3``.
    min_version: Literal["1.2", "1.3"] = "1.2"
    #: Seconds a new connection has to finish its TLS handshake; then it is dropped (its descriptor freed).
    #: Also bounds the TLS close (waiting for the client's close_notify).
    handshake_timeout: float = Field(10.0, gt=0, le=300)
    #: Seconds between checks of the files' modification times; 0: reload on SIGHUP only.
    reload_interval: float = Field(30.0, ge=0)
    #: ``Strict-Transport-Security: max-age=`` on HTTPS responses, seconds (default one year); 0: no header.
    hsts_max_age: int = Field(365 * 24 * 3600, ge=0)
    #: TLS handshakes in progress in the process, all listeners together; more are closed at once. They hold
    #: descriptors before admission counts them, so the connection cap leaves this many free besides
    #: ``limits.fd_reserve``.
    max_handshakes: int = Field(256, ge=1)
    #: TLS handshakes in progress from one address (IPv4, IPv6 /64); 0: no cap.
    max_handshakes_per_address: int = Field(32, ge=0)

    @model_validator(mode="after")
    def _both_or_neither(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("tls.cert_file and tls.key_file go together: set both (TLS on) or neither (off)")
        return self

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None and self.key_file is not None


class LimitsConfig(_Section):
    #: Largest client frame accepted; larger ones get a ``too_large`` error (and beyond 4x, a close).
    max_frame_bytes: int = Field(64 * 1024, ge=1024, le=16 * 1024 * 1024)
    #: Largest message body (encoded as JSON).
    max_body_bytes: int = Field(32 * 1024, ge=16, le=16 * 1024 * 1024)
    max_cmid_length: int = Field(64, ge=8, le=256)
    max_device_length: int = Field(64, ge=1, le=256)
    #: Unacked sends one connection may have in flight.
    max_in_flight: int = Field(1024, ge=1)
    #: Sends per second per connection (token bucket, burst = 2x).
    send_rate: float = Field(2000.0, gt=0)
    typing_rate: float = Field(5.0, gt=0)
    max_group_members: int = Field(2000, ge=2)
    #: Users one user may block (rows a user makes the server keep, and load into every consent check).
    max_blocks: int = Field(10_000, ge=1)
    history_page_max: int = Field(200, ge=1, le=10_000)
    #: WebSocket frames one message may be split into (first frame and continuations); more: close
    #: 1009. Each fragment after the first also counts 64 bytes toward the 4 x max_frame_bytes limit.
    max_fragments: int = Field(256, ge=1, le=65_536)
    #: Bytes queued for a connection that has not authenticated (its pongs and error frames) beyond which
    #: it is closed as a slow consumer; once authenticated, gateway.max_send_buffer applies.
    preauth_send_buffer: int = Field(64 * 1024, ge=4096)
    # Connections, all listeners of a process together (im.net.Admission).
    #: Open client connections per process; None: the open-file limit minus ``fd_reserve``, and never
    #: more than that. Past it: HTTP 503, WebSocket close 1013, TCP ``bye unavailable``.
    max_connections: int | None = Field(None, ge=1)
    #: Open connections from one address (IPv4 address, IPv6 /64); 0: no cap. Behind a reverse proxy
    #: every client has the proxy's address: raise it or set 0 and cap at the proxy.
    max_connections_per_address: int = Field(128, ge=0)
    #: Descriptors kept back from client connections for the stores, Redis, etcd, RabbitMQ, logs, uploads
    #: and gRPC links; a quarter of it also bounds refusals in progress.
    fd_reserve: int = Field(128, ge=16)
    # Logins per gateway process (im.protocol.logins; docs/protocol.md, "Login admission"): the auth step
    # (token check, presence claim, sync points, replay) starts at most this often; a reconnect storm is
    # spread out instead of queued without bound. Measured on a shared 2-core box (tests/faults/test_storm.py
    # with no limit): one gateway process took 1,600 reconnecting clients, replays included, in 3.7 s
    # (about 430 logins/s, the clients on the same cores); the default is of that order.
    #: Logins started per second.
    auth_rate: float = Field(500.0, gt=0, le=1_000_000)
    #: Logins that may start at once (the burst of the token bucket).
    auth_burst: int = Field(200, ge=1, le=1_000_000)
    #: Seconds a login may wait for its turn; a later one is refused at once with ``retry_after``
    #: (``error unavailable`` + ``bye unavailable``). Kept under ``gateway.auth_timeout``.
    auth_max_wait: float = Field(2.0, ge=0, le=60)
    # Sender order (im.model.send_order; docs/protocol.md section 8): once a send is refused with a retryable
    # code, the device's later sends of that conversation are refused until it is resent.
    #: Seconds such a barrier holds at most (a client that gave the refused send up is not blocked for
    #: longer); 0: no barrier (a device's sends may then be stored out of its order after a refusal).
    send_order_hold: float = Field(30.0, ge=0, le=3600)
    #: Barriers one committer keeps at most (the oldest goes first); each gateway connection keeps at
    #: most ``max_in_flight``.
    send_order_entries: int = Field(100_000, ge=1, le=10_000_000)


class AuthConfig(_Section):
    #: HMAC key for access tokens; generated and kept in the data directory when not set.
    secret: str | None = Field(None, min_length=16)
    access_ttl: float = Field(900.0, gt=0)
    #: Idle session lifetime: a refresh token unused this long stops working (each refresh moves it on).
    refresh_ttl: float = Field(14 * 24 * 3600.0, gt=0)
    #: Absolute session lifetime: seconds after the login when the session ends, refreshed or not.
    session_max_age: float = Field(60 * 24 * 3600.0, gt=0)
    #: argon2id cost; lower only for tests.
    argon2_time_cost: int = Field(3, ge=1)
    argon2_memory_kib: int = Field(65536, ge=8)
    argon2_parallelism: int = Field(4, ge=1)
    min_password_length: int = Field(8, ge=1)

    @model_validator(mode="after")
    def _argon2_memory_fits(self) -> AuthConfig:
        if self.argon2_memory_kib < 8 * self.argon2_parallelism:
            raise ValueError("argon2_memory_kib must be at least 8 x argon2_parallelism")
        return self


class StoreConfig(_Section):
    #: ``sqlite`` (a file in the data directory) or ``postgres`` (``postgres_dsn``).
    kind: Literal["sqlite", "postgres"] = "sqlite"
    #: Largest number of sends written in one transaction (group commit).
    max_batch: int = Field(2048, ge=1)
    postgres_dsn: str | None = None
    #: Tables live in this schema (created when missing); None: the connection's default.
    postgres_schema: str | None = Field(None, pattern=r"^[a-z_][a-z0-9_]{0,62}$")
    pool_min: int = Field(2, ge=1)
    pool_max: int = Field(10, ge=1)
    # TLS to PostgreSQL (libpq's meanings). None: what the DSN says (its ``sslmode``, else ``prefer``).
    #: ``disable``; ``prefer`` (TLS if the server offers it, unverified); ``require`` (TLS, unverified
    #: unless ``postgres_sslrootcert`` is set, then as verify-ca); ``verify-ca`` (the server's certificate
    #: must chain to ``postgres_sslrootcert``); ``verify-full`` (and name the host dialled).
    postgres_sslmode: Literal["disable", "prefer", "require", "verify-ca", "verify-full"] | None = None
    #: CA file the server's certificate is verified against (verify-ca, verify-full; None: system CAs).
    postgres_sslrootcert: Path | None = None
    #: Client certificate and key, for servers that authenticate clients by certificate (``cert``).
    postgres_sslcert: Path | None = None
    postgres_sslkey: Path | None = None

    @model_validator(mode="after")
    def _dsn_for_postgres(self) -> StoreConfig:
        if self.kind == "postgres" and not self.postgres_dsn:
            raise ValueError("store.kind postgres needs store.postgres_dsn")
        _pair(self.postgres_sslcert, self.postgres_sslkey, "store.postgres_sslcert", "store.postgres_sslkey")
        if self.postgres_sslmode in ("disable", "prefer") and (self.postgres_sslcert or self.postgres_sslrootcert):
            raise ValueError(
                "store.postgres_sslrootcert/sslcert need store.postgres_sslmode require, verify-ca or verify-full"
            )
        return self


class PresenceConfig(_Section):
    #: ``memory`` (one process) or ``redis`` (gateways in several processes).
    kind: Literal["memory", "redis"] = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    #: Key prefix: one per cluster sharing a Redis.
    redis_prefix: str = "im:"
    #: Seconds an entry lives without a refresh (gateways refresh every ttl/3).
    ttl: float = Field(60.0, ge=1.0)
    # TLS to Redis: use a ``rediss://`` URL (the server's certificate is verified and its host name
    # checked). Presence, the shared rate limits and the push dedupe all use these.
    #: CA file for the server's certificate (None: the system's CAs).
    redis_ca_file: Path | None = None
    #: Client certificate and key, for a Redis with ``tls-auth-clients yes`` (its default).
    redis_cert_file: Path | None = None
    redis_key_file: Path | None = None

    @model_validator(mode="after")
    def _tls_needs_rediss(self) -> PresenceConfig:
        _pair(self.redis_cert_file, self.redis_key_file, "presence.redis_cert_file", "presence.redis_key_file")
        if (self.redis_ca_file or self.redis_cert_file) and not self.redis_url.startswith("rediss://"):
            raise ValueError("presence.redis_ca_file/redis_cert_file need a rediss:// presence.redis_url")
        return self


class EventsConfig(_Section):
    #: ``none``, or ``rabbitmq``: committed messages go out through a transactional outbox to RabbitMQ,
    #: and recipients with no device online get a content-free push webhook.
    kind: Literal["none", "rabbitmq"] = "none"
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    exchange: str = "im.events"
    queue: str = "im.push"
    #: Where push webhooks are POSTed ({mid, conv, seq, recipients}); None: events only, no push.
    webhook_url: str | None = Field(None, pattern=r"^https?://[^/\s]+(/\S*)?$")
    #: ``memory`` (one consumer, forgets on restart) or ``redis`` (presence.redis_url; survives restarts).
    dedupe: Literal["memory", "redis"] = "memory"
    max_attempts: int = Field(5, ge=1)
    # TLS to RabbitMQ: use an ``amqps://`` URL (certificate verified, host name checked).
    #: CA file for the broker's certificate (None: the system's CAs).
    amqp_ca_file: Path | None = None
    #: Client certificate and key, for a broker that requires them (``fail_if_no_peer_cert``).
    amqp_cert_file: Path | None = None
    amqp_key_file: Path | None = None

    @model_validator(mode="after")
    def _tls_needs_amqps(self) -> EventsConfig:
        _pair(self.amqp_cert_file, self.amqp_key_file, "events.amqp_cert_file", "events.amqp_key_file")
        if (self.amqp_ca_file or self.amqp_cert_file) and not self.amqp_url.startswith("amqps://"):
            raise ValueError("events.amqp_ca_file/amqp_cert_file need an amqps:// events.amqp_url")
        return self


class RegistryConfig(_Section):
    #: ``memory`` (one process) or ``etcd``.
    kind: Literal["memory", "etcd"] = "memory"
    #: One etcd member, ``host:port`` (kept for older configurations; ``etcd_endpoints`` wins when set).
    etcd_endpoint: str = "127.0.0.1:2379"
    #: The etcd members, ``host:port`` each (``--set registry.etcd_endpoints=a:2379,b:2379``); the client
    #: talks to one and moves to the next when it stops answering. Empty: ``[etcd_endpoint]``.
    etcd_endpoints: Annotated[list[str], NoDecode] = Field(default_factory=list)
    prefix: str = Field("/im/services/", pattern=r"/$")
    #: Where the configuration centre keeps the dynamic settings (``im config set``); None: the sibling
    #: ``config/`` of ``prefix`` (``/im/services/`` -> ``/im/config/``). Every node of a cluster reads the same.
    config_prefix: str | None = Field(None, pattern=r"^/.*/$")
    #: Changes kept in the configuration centre's history (``im config history``); older ones are dropped.
    config_history: int = Field(200, ge=1, le=10_000)
    #: Lease TTL in whole seconds: a crashed node disappears from the registry within it.
    ttl: int = Field(10, ge=2)
    #: Seconds of message ids a transfer or API node may mint ahead of its last write to etcd: how long it
    #: keeps committing while etcd does not answer (at least ``ttl``). After a crash, the next holder of the
    #: node's id starts its ids' time part up to this far ahead of its clock (still unique, increasing).
    node_id_reserve: float = Field(30.0, ge=1, le=3600)
    #: The node id (0..1023) in the message ids of a process on the in-memory registry (``im serve``).
    #: With etcd every process that mints ids claims a free one instead (docs/operations.md, "Node ids").
    fixed_node_id: int = Field(0, ge=0, le=1023)
    # TLS to etcd (``--cert-file``/``--key-file`` on etcd's client port): on when ``etcd_ca_file`` is set.
    #: CA file for the members' certificates; the host name dialled is checked.
    etcd_ca_file: Path | None = None
    #: Client certificate and key, for etcd with ``--client-cert-auth``.
    etcd_cert_file: Path | None = None
    etcd_key_file: Path | None = None

    @field_validator("etcd_endpoints", mode="before")
    @classmethod
    def _endpoint_list(cls, value: object) -> object:
        if isinstance(value, str):  # a flag or an environment variable: comma-separated, or JSON
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _etcd_tls(self) -> RegistryConfig:
        _pair(self.etcd_cert_file, self.etcd_key_file, "registry.etcd_cert_file", "registry.etcd_key_file")
        if self.etcd_cert_file and not self.etcd_ca_file:
            raise ValueError("registry.etcd_cert_file needs registry.etcd_ca_file (TLS to etcd)")
        return self

    def endpoints(self) -> list[str]:
        """The etcd members to dial, in order."""
        return list(self.etcd_endpoints) or [self.etcd_endpoint]

    def config_root(self) -> str:
        """The configuration centre's key space: ``config_prefix``, or ``config/`` beside ``prefix``."""
        if self.config_prefix:
            return self.config_prefix
        parent = self.prefix.rstrip("/").rpartition("/")[0]
        return f"{parent}/config/"


class TracingConfig(_Section):
    """OpenTelemetry tracing exported to Zipkin (docs/operations.md, "Tracing"). Off: no span is made."""

    enabled: bool = False
    #: Zipkin's v2 span endpoint (JSON POSTs): an ``http://`` or ``https://`` URL with a host.
    zipkin_url: str = Field("http://127.0.0.1:9411/api/v2/spans", pattern=r"^https?://[^/\s]+(/\S*)?$")
    #: Share of new traces kept (a trace started elsewhere keeps its caller's decision).
    sample_ratio: float = Field(0.01, ge=0.0, le=1.0)
    #: Zipkin's ``localEndpoint.serviceName``; empty: by role (``im-gateway``, ``im-transfer``, ``im-api``,
    #: ``im`` for ``im serve``).
    service_name: str = ""
    #: Seconds one POST to Zipkin may take (also bounds the flush at shutdown).
    export_timeout: float = Field(5.0, gt=0.0, le=60.0)
    #: Finished spans waiting for export; beyond it new spans are dropped (never blocks the loop).
    queue_size: int = Field(8192, ge=16, le=1_000_000)
    #: Seconds between exports of what is queued.
    schedule_delay: float = Field(1.0, gt=0.0, le=60.0)


class LogsConfig(_Section):
    """How every log line is written (docs/operations.md, "Logs")."""

    #: ``text`` (one line per record) or ``json`` (one JSON object per line).
    format: Literal["text", "json"] = "text"
    #: Seconds between the counted lines of errors a client can cause at will (bad frames, malformed
    #: requests): the first of a quiet period is written at once, the rest counted into one line per window.
    client_error_interval: float = Field(10.0, gt=0, le=3600)


class ClusterTlsConfig(_Section):
    """Mutual TLS on the gRPC link between nodes (docs/transfer.md, "Security"): each node's
    certificate from the cluster CA (``im certs``), naming the node (its ``node_id``). All three set:
    ``im transfer`` serves TLS only and requires a cluster client certificate naming the node its stream
    claims; ``im gateway`` and ``im api`` dial with theirs and check the transfer node's certificate
    names the node its registry entry lists. None: plaintext and unauthenticated (a trusted network)."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    #: Seconds a dialing node's identity check of a transfer node may take.
    handshake_timeout: float = Field(5.0, gt=0)

    @model_validator(mode="after")
    def _all_or_none(self) -> ClusterTlsConfig:
        given = [self.ca_file is not None, self.cert_file is not None, self.key_file is not None]
        if any(given) and not all(given):
            raise ValueError("cluster_tls needs ca_file, cert_file and key_file together")
        return self

    @property
    def enabled(self) -> bool:
        return self.ca_file is not None


class S3StorageConfig(_Section):
    """The bucket of ``files.storage: s3`` (docs/operations.md, "File storage on S3"). Every API node names
    the same bucket and prefix. Credentials left unset come from ``AWS_ACCESS_KEY_ID`` and
    ``AWS_SECRET_ACCESS_KEY`` in the environment (and the other variables the AWS SDKs read)."""

    #: The store's URL (``http://127.0.0.1:8333``, ``https://s3.example.net``); unset: AWS S3 in ``region``.
    endpoint: str | None = None
    bucket: str = ""
    region: str = "us-east-1"
    #: Prepended to every object key as it is (``im/`` keeps the files in a folder of a shared bucket).
    prefix: str = ""
    access_key_id: str | None = None
    secret_access_key: str | None = None
    #: Allow an ``http://`` endpoint (a store on this machine or a private network); else HTTPS only.
    allow_http: bool = False
    #: Seconds to connect to the store.
    connect_timeout: float = Field(5.0, gt=0, le=300)
    #: Seconds one request may take, its body included (one read window, one PUT, one multipart part).
    request_timeout: float = Field(60.0, gt=0, le=3600)
    #: Retries of a request that failed for a connection error, a 5xx or a timeout; then 503 ``unavailable``.
    max_retries: int = Field(3, ge=0, le=20)
    #: Blobs up to this size go up in one conditional PUT (held in memory for it); larger ones as a
    #: multipart upload streamed from the staging file.
    single_put_bytes: int = Field(8 * 1024 * 1024, ge=0, le=5 * 1024**3)
    #: Part size of a multipart upload (S3's minimum is 5 MiB); two parts are in flight at a time.
    part_bytes: int = Field(8 * 1024 * 1024, ge=5 * 1024 * 1024, le=5 * 1024**3)
    #: Bytes of one ranged GET of a download (held in memory per download).
    read_window_bytes: int = Field(1024 * 1024, ge=4096, le=64 * 1024 * 1024)
    #: Local directory for uploads being received before they go to the bucket (at most
    #: ``files.max_upload_bytes`` per upload in progress); default ``<data_dir>/files-staging``.
    staging_dir: Path | None = None


class FilesConfig(_Section):
    #: Where the blobs live: ``local`` (``storage_dir``, one machine) or ``s3`` (``files.s3``, shared by API
    #: nodes on several machines).
    storage: Literal["local", "s3"] = "local"
    s3: S3StorageConfig = S3StorageConfig()
    #: Largest upload accepted, enforced while the bytes stream in (413 ``too_large``).
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1)
    #: Sniffed content types accepted (``image/*`` style wildcards allowed); empty: any type.
    allowed_types: list[str] = Field(default_factory=list)
    #: Images with more pixels than this are refused (decompression-bomb guard).
    max_image_pixels: int = Field(50_000_000, ge=1)
    #: Where blobs live; default ``<data_dir>/files``.
    storage_dir: Path | None = None
    #: Seal uploaded files at rest (AES-256-GCM, a key per file wrapped by the keyring, keyed names on
    #: disk; im.backends.blobs.encrypted) and key the file ids in the metadata tables (im.backends.files.ids).
    #: Off: stored as they are (blobs sealed before then stay unreadable until it is on again; keyed ids
    #: stay readable while the keyring is there). None (the default): as ``encryption.enabled``.
    encrypt: bool | None = None
    #: Plaintext bytes per sealed chunk: the unit a range read decrypts (16 bytes of tag each).
    encrypt_chunk_bytes: int = Field(64 * 1024, ge=4096, le=16 * 1024 * 1024)
    #: With ``encrypt``: seal the files stored in the clear before, and key the file ids stored in clear,
    #: in the background, from start-up.
    migrate_plaintext: bool = True

    @model_validator(mode="after")
    def _s3_needs_a_bucket(self) -> FilesConfig:
        if self.storage == "s3" and not self.s3.bucket:
            raise ValueError("files.storage is s3: set files.s3.bucket")
        return self


def _pair(cert: Path | None, key: Path | None, cert_name: str, key_name: str) -> None:
    if (cert is None) != (key is None):
        raise ValueError(f"{cert_name} and {key_name} go together")


class MemoryConfig(_Section):
    """Memory handed back on a timer (im.observability.memory): a full garbage collection, then glibc's
    ``malloc_trim``, so garbage of an engine outage does not wait for the next allocation-driven
    collection and the process shrinks back after it."""

    #: Seconds between two full collections, at most a day; 0: none (only the allocation-driven ones).
    collect_interval: float = Field(60.0, ge=0, le=86_400)
    #: After each, give freed heap pages back to the system (glibc only; elsewhere nothing happens).
    trim: bool = True


class EncryptionConfig(_Section):
    """Message bodies encrypted at rest (docs/security.md, "Encryption"): one AES-256 data key per
    conversation, stored wrapped by the master key. Every node of a cluster needs the same master key."""

    #: Seal message bodies in the store. Off: new bodies are stored in clear (what was sealed stays
    #: readable only with encryption on).
    enabled: bool = True
    #: The master key file; default ``<data_dir>/master.key``, created (0600) when missing. Back it up
    #: apart from the database: without it the messages cannot be read.
    key_file: Path | None = None
    #: Read the master key (base64 of 32 bytes) from this environment variable instead of a file, for
    #: example ``IM_MASTER_KEY``; the variable must then be set. None: use ``key_file``.
    key_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    #: Unwrapped data keys kept in memory (conversations), least recently used dropped first.
    key_cache: int = Field(100_000, ge=1)
    #: Seconds after which a conversation's current key version is read again from the database, so a
    #: conversation key rotated by another process (``im keys rotate-conversation``) is used here too.
    key_refresh: float = Field(60.0, ge=0)
    #: Seconds between two checks of the master key file for a rotation (``im keys rotate``); SIGHUP
    #: checks at once, and a key wrapped by a master key not held makes the file re-read too. 0: only
    #: on SIGHUP and on such a miss.
    key_reload_interval: float = Field(30.0, ge=0)
    #: With ``enabled``, seal the message bodies still stored in clear in the background at start
    #: (online, resumable; ``im keys migrate`` does the same in the foreground and shows progress).
    migrate_plaintext: bool = True
    #: Rows sealed per transaction by the plaintext migration.
    migrate_batch: int = Field(500, ge=1, le=10_000)
    #: Seconds the background migration pauses between two batches (leaves the writer to live traffic).
    migrate_pause: float = Field(0.01, ge=0, le=10)


class RateConfig(_Section):
    """``limit`` units per ``period`` seconds, bursts of up to ``limit`` (GCRA, im.backends.rate_limit).
    Written ``{limit: 20, period: 60}`` or ``"20/60"`` (``--set rates.login_per_address=20/60``)."""

    limit: int = Field(ge=1)
    period: float = Field(gt=0)

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, value: object) -> object:
        if isinstance(value, str) and value.lstrip().startswith("{"):
            return json.loads(value)  # an environment variable written as JSON
        if isinstance(value, str):
            limit, sep, period = value.partition("/")
            if not sep:
                raise ValueError(f"expected LIMIT/PERIOD_SECONDS, for example 20/60, not {value!r}")
            return {"limit": limit.strip(), "period": period.strip().removesuffix("s")}
        return value


#: A rule field; NoDecode: an environment variable ``IM_RATES__X=20/60`` reaches the parser above as text.
Rate = Annotated[RateConfig, NoDecode]


def _rate(limit: int, period: float) -> Any:
    return Field(default_factory=lambda: RateConfig(limit=limit, period=period))


class RatesConfig(_Section):
    """Rate limits per user, account and client address (docs/security.md section 5). In memory for
    ``im serve``; shared through Redis (``presence.redis_url``/``redis_prefix``) with ``presence.kind=redis``
    and in distributed mode, so one user has one budget on every gateway."""

    #: Login attempts for one account from one address (the strict rule: guessing from one place).
    login_per_account_address: Rate = _rate(10, 600.0)
    #: Login attempts for one account from anywhere (looser: many addresses cannot lock it out quickly).
    login_per_account: Rate = _rate(100, 3600.0)
    #: Login attempts from one address, any accounts.
    login_per_address: Rate = _rate(30, 60.0)
    #: Registrations from one address.
    register_per_address: Rate = _rate(20, 3600.0)
    #: Sends of one user, all devices and gateways together (each connection also has limits.send_rate).
    sends_per_user: Rate = _rate(6000, 2.0)
    #: Sends into one conversation, all members together.
    sends_per_conversation: Rate = _rate(10000, 2.0)
    #: Typing frames of one user, all devices (beyond: dropped silently).
    typing_per_user: Rate = _rate(20, 2.0)
    #: recv and read frames of one user, all devices (beyond: dropped, answered rate_limited).
    receipts_per_user: Rate = _rate(10000, 2.0)
    #: Uploads per user and day: bytes, and files (attempts count).
    upload_bytes_per_day: int = Field(1024**3, ge=1)
    upload_files_per_day: int = Field(1000, ge=1)
    #: Password hashes (argon2) computed at once, and waiting in the fair queue; beyond, 503 at once.
    hash_concurrency: int = Field(2, ge=1, le=64)
    hash_queue: int = Field(64, ge=0)
    #: Hashes one client address may have running or waiting (a flood from one address gets no more).
    hash_per_address: int = Field(2, ge=1)
    #: Seconds a login or registration from an address already refused is held before its 429 (at most its
    #: retry time): a flood that retries at once is slowed to one attempt per delay per connection.
    refusal_delay: float = Field(1.0, ge=0, le=60)


class Config(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IM_", env_nested_delimiter="__", extra="forbid")

    data_dir: Path = Path("./im-data")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    http: HttpConfig = HttpConfig()
    gateway: GatewayConfig = GatewayConfig()
    transfer: TransferConfig = TransferConfig()
    limits: LimitsConfig = LimitsConfig()
    auth: AuthConfig = AuthConfig()
    store: StoreConfig = StoreConfig()
    presence: PresenceConfig = PresenceConfig()
    registry: RegistryConfig = RegistryConfig()
    events: EventsConfig = EventsConfig()
    files: FilesConfig = FilesConfig()
    rates: RatesConfig = RatesConfig()
    tls: TlsConfig = TlsConfig()
    cluster_tls: ClusterTlsConfig = ClusterTlsConfig()
    encryption: EncryptionConfig = EncryptionConfig()
    memory: MemoryConfig = MemoryConfig()
    ops: OpsConfig = OpsConfig()
    metrics: MetricsConfig = MetricsConfig()
    tracing: TracingConfig = TracingConfig()
    logs: LogsConfig = LogsConfig()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # init (flags, already merged over the file) wins over environment variables, which win over
        # defaults; the file is folded into init below with lower precedence than flags.
        return (init_settings, env_settings)


class ConfigError(Exception):
    """An invalid configuration value; the message names the field."""


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _env_keys() -> set[str]:
    return {k[3:].lower().split("__")[0] for k in os.environ if k.startswith("IM_")}


def put_setting(overrides: dict[str, Any], key: str, value: Any) -> None:
    """Set dotted ``key`` (``limits.send_rate``) to ``value`` in the nested ``overrides`` of
    :func:`load_config`, as ``--set KEY=VALUE`` does."""
    node = overrides
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def load_config(file: Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Build the effective configuration. ``overrides`` are command-line flags as a nested dict."""
    file_values: dict[str, Any] = {}
    if file is not None:
        try:
            loaded = yaml.safe_load(file.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"config file {file}: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {file}: the top level must be a mapping")
        file_values = loaded
    # Environment beats the file: drop file sections that the environment sets, field by field, by
    # letting pydantic-settings merge env over init only where init is silent. Simplest faithful order:
    # build from env alone, then lay the file under it and the flags over both.
    try:
        from_env = Config().model_dump(exclude_unset=True)
        env_sections = _env_keys()
        merged = _deep_merge(file_values, {k: v for k, v in from_env.items() if k in env_sections})
        merged = _deep_merge(merged, overrides or {})
        return Config.model_validate(merged)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors())
        raise ConfigError(f"invalid configuration: {problems}") from None
