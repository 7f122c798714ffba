"""The composition root: configuration in, backends and services out.

This is the one place that chooses implementations (``store.kind`` -> store class, ...) and turns settings
into keyword arguments. The core and the transports receive what they need as arguments and never look
at the configuration themselves. Nothing here runs anything: the roles (:mod:`im.server` for ``im serve``,
:mod:`im.roles` for the distributed ones) start and stop what these functions build, through
:mod:`im.lifecycle`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import ssl
import sys
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeGuard

from im.backends.accounts import AccountStore
from im.backends.accounts.sqlite import SqliteAccountStore
from im.backends.blobs import BlobStorage
from im.backends.blobs.encrypted import EncryptedBlobStorage, FileKeys
from im.backends.blobs.local import LocalBlobStorage
from im.backends.chat import ChatStore, ConversationKeys, StoredBodies
from im.backends.chat.encrypted import EncryptedChatStore, MigrationProgress, PlaintextMigration
from im.backends.chat.sqlite import SqliteChatStore, SqliteConversationKeys, SqliteStoredBodies
from im.backends.config import ConfigStore
from im.backends.dedupe import Dedupe
from im.backends.dedupe.memory import MemoryDedupe
from im.backends.files import FileStore
from im.backends.files.ids import FileIdConversion, FileIds, IdConversionProgress, StoredFileIds
from im.backends.files.sqlite import SqliteFileStore
from im.backends.keys.keyring import Keyring, conv_key_name
from im.backends.lifecycle import Service
from im.backends.node_ids import NodeIdClaims
from im.backends.node_ids.memory import MemoryNodeIds
from im.backends.presence import Presence
from im.backends.presence.memory import MemoryPresence
from im.backends.rate_limit import FailOpen, RateLimiter, Rule
from im.backends.rate_limit.memory import MemoryRateLimiter
from im.backends.registry import Registry
from im.backends.registry.memory import MemoryRegistry
from im.backends.routing import Router
from im.backends.routing.memory import MemoryRouter
from im.backends.sql.sqlite_db import SqliteDatabase
from im.backends.tls import redis_client
from im.cancel import raise_if_cancelling
from im.compose_security import (
    ProcessTls,
    client_tls,
    load_secret,
    master_key_provider,
    private_dir,
    redis_tls,
)
from im.config import Config, ConfigError, RateConfig
from im.core.accounts import AccountService
from im.core.committer import Committer, SubmitSend
from im.core.consent import Consent
from im.core.groups import Groups
from im.core.ids import Snowflake
from im.core.passwords import HashSlots, LoginGuard
from im.core.reads import ChatReads
from im.core.states import ConversationStates
from im.files import FileService
from im.gateway.hub import Hub
from im.gateway.rates import HubRates
from im.gateway.tcp_connection import serve_tcp
from im.gateway.ws_connection import WS_PATH, serve_websocket
from im.lifecycle import Lifecycle, Loop, close_all
from im.model.chat import ConversationState
from im.model.cluster import ServiceInstance
from im.net import Admission, Listener, connection_budget, raise_open_file_limit
from im.observability.health import PROCESS_STARTED, Readiness, im_version
from im.observability.memory import collect_every, malloc_trim
from im.protocol.session import Limits

# The engines' modules (and their drivers: redis, asyncpg, aio-pika, aetcd, obstore) and the HTTP API's
# (fastapi, uvicorn) are imported by the functions that build them: a process imports only the engines
# its configuration uses (each costs tenths of a second at start; tests/test_startup_imports.py).
if TYPE_CHECKING:
    from im.api.server import GatewayPicker, HttpServer
    from im.backends.blobs.s3 import S3BlobStorage
    from im.backends.registry.etcd import EtcdRegistry
    from im.events.push import PushConsumer

log = logging.getLogger("im")
_NO_CONV = ConversationState("", "", 0, {})
#: Seconds every Redis client waits to connect and for each reply: a hung Redis raises instead of stalling.
REDIS_TIMEOUT = 5.0


@dataclass
class Backends:
    """The engines of one process, chosen by :func:`build_backends`; ``start`` before use, ``close`` after."""

    chat_store: ChatStore
    account_store: AccountStore
    presence: Presence
    router: Router
    registry: Registry
    file_store: FileStore
    #: The shared rate limits: in memory, or in the presence Redis (one budget per user for the cluster).
    rate_limiter: RateLimiter = field(default_factory=MemoryRateLimiter)
    #: The data keys (None when encryption is off and no master key exists): the chat store seals
    #: bodies with it, the file service may too. Started before the chat store, closed after it.
    keyring: Keyring | None = None
    #: In-place rewrites of stored bodies (the plaintext migration), on the chat store's database.
    bodies: StoredBodies | None = None

    def services(self) -> list[Service]:
        """In start order (closed in reverse). The file store is not here: it opens with its FileService."""
        first: list[Service] = [] if self.keyring is None else [self.keyring]
        bodies: list[Service] = [] if self.bodies is None else [self.bodies]
        return [
            *first,
            self.chat_store,
            *bodies,
            self.account_store,
            self.presence,
            self.rate_limiter,
            self.registry,
            self.router,
        ]

    async def start(self) -> None:
        """Start every backend in order; one that fails closes those already started, then raises."""
        started: list[Service] = []
        try:
            for service in self.services():
                await service.start()
                started.append(service)
        except BaseException:
            await close_all(*(s.close for s in reversed(started)))
            raise

    async def close(self) -> None:
        """Close every backend in reverse order, each even when another failed (closing is idempotent and
        safe on one never started, so this suits a failed start too)."""
        await close_all(*(s.close for s in reversed(self.services())))


def build_backends(config: Config) -> Backends:
    """Map configuration to backend implementations (the only switch on kinds in the code base)."""
    st = config.store
    outbox = config.events.kind == "rabbitmq"  # the commit records events for the relay
    private_dir(config.data_dir)
    key_store: ConversationKeys
    if st.kind == "postgres":
        from im.backends.accounts.postgres import PostgresAccountStore
        from im.backends.chat.postgres import PostgresChatStore, PostgresConversationKeys, PostgresStoredBodies
        from im.backends.files.postgres import PostgresFileStore
        from im.backends.sql.postgres_db import PostgresDatabase, postgres_ssl

        assert st.postgres_dsn is not None  # validated by StoreConfig
        try:
            pg_ssl = postgres_ssl(
                st.postgres_sslmode, rootcert=st.postgres_sslrootcert, cert=st.postgres_sslcert, key=st.postgres_sslkey
            )
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise ConfigError(f"store.postgres_ssl*: {exc}") from None
        pg = PostgresDatabase(
            st.postgres_dsn, schema=st.postgres_schema, min_size=st.pool_min, max_size=st.pool_max, ssl=pg_ssl
        )
        chat_store: ChatStore = PostgresChatStore(pg, outbox=outbox)
        account_store: AccountStore = PostgresAccountStore(pg)

        def files_on(ids: FileIds) -> FileStore:
            return PostgresFileStore(pg, ids=ids)

        key_store = PostgresConversationKeys(pg)
        bodies: StoredBodies = PostgresStoredBodies(pg)
    else:
        db = SqliteDatabase(config.data_dir / "im.sqlite3")
        chat_store = SqliteChatStore(db, outbox=outbox)
        account_store = SqliteAccountStore(db)

        def files_on(ids: FileIds) -> FileStore:
            return SqliteFileStore(db, ids=ids)

        key_store = SqliteConversationKeys(db)
        bodies = SqliteStoredBodies(db)
    # On: bodies sealed. Off: new bodies in clear, and those sealed while it was on still open when the
    # master key is there (else they read as "undecryptable", never as raw bytes).
    enc = config.encryption
    provider = master_key_provider(config, create=enc.enabled)
    keyring = (
        None
        if provider is None
        else Keyring(provider, key_store, cache_size=enc.key_cache, refresh_interval=enc.key_refresh)
    )
    # Keyed file ids in the file tables (and the chat commit's file refs) as the blobs are sealed.
    file_ids = FileIds(keyring, keyed=files_encrypted(config) and keyring is not None)
    file_store = files_on(file_ids)
    chat_store = EncryptedChatStore(chat_store, keyring, seal=enc.enabled, file_ids=file_ids)
    presence: Presence
    rate_limiter: RateLimiter
    if config.presence.kind == "redis":
        from im.backends.presence.redis import RedisPresence
        from im.backends.rate_limit.redis import RedisRateLimiter

        redis_presence = RedisPresence(
            config.presence.redis_url, prefix=config.presence.redis_prefix, timeout=REDIS_TIMEOUT, tls=redis_tls(config)
        )
        presence = redis_presence  # owns the Redis client; the rate limiter below borrows it
        # Its connection pool too; fail open: Redis away must not refuse every send and login.
        rate_limiter = FailOpen(RedisRateLimiter(prefix=config.presence.redis_prefix, client=redis_presence.client))
    else:
        presence = MemoryPresence()
        rate_limiter = MemoryRateLimiter()
    registry = build_registry(config)
    return Backends(
        chat_store, account_store, presence, MemoryRouter(), registry, file_store, rate_limiter, keyring, bodies
    )


def build_registry(config: Config, *, keepalive: bool = True) -> Registry:
    """The configured registry (not started). ``keepalive`` False: a reader that registers nothing."""
    if config.registry.kind == "etcd":
        from im.backends.registry.etcd import EtcdRegistry

        rc = config.registry
        etcd_tls = client_tls(rc.etcd_ca_file, rc.etcd_cert_file, rc.etcd_key_file)
        return EtcdRegistry(rc.endpoints(), tls=etcd_tls, prefix=rc.prefix, keepalive=keepalive)
    return MemoryRegistry()


def _is_etcd(registry: Registry) -> TypeGuard[EtcdRegistry]:
    """``isinstance(registry, EtcdRegistry)``, without importing the etcd client into a process that never
    made an etcd registry: no object of the class exists before its module was imported."""
    etcd = sys.modules.get("im.backends.registry.etcd")
    return etcd is not None and isinstance(registry, etcd.EtcdRegistry)


def build_centre(config: Config, registry: Registry) -> ConfigStore | None:
    """The configuration centre beside an etcd registry, on its client (im.live_config); None otherwise."""
    if not _is_etcd(registry):
        return None
    from im.backends.config.etcd import EtcdConfigStore

    rc = config.registry
    return EtcdConfigStore(registry, rc.config_root(), history_limit=rc.config_history)


class KeyReloader:
    """Re-reads the master key source of a running process (a rotation by ``im keys rotate``): every
    ``interval`` seconds (0: never by the clock) and at once on :meth:`poke` (the SIGHUP hook). A source
    that does not load is logged and the keys held stay."""

    def __init__(self, keyring: Keyring, *, interval: float) -> None:
        self.keyring = keyring
        self.interval = interval
        self._poked = asyncio.Event()

    def poke(self) -> None:
        self._poked.set()

    async def loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poked.wait(), self.interval or None)
            raise_if_cancelling()  # a stop that wait_for or the reload's engine client swallowed
            self._poked.clear()
            try:
                await self.keyring.reload()
            except Exception as exc:
                raise_if_cancelling(exc)
                log.error(
                    "the master key source does not load (%s: %s); keeping the keys held", type(exc).__name__, exc
                )


def plaintext_migration(config: Config, b: Backends) -> PlaintextMigration | None:
    """The plaintext-body migration of this configuration's store (None when encryption is off)."""
    if not config.encryption.enabled or b.keyring is None or b.bodies is None:
        return None
    assert isinstance(b.chat_store, EncryptedChatStore)
    enc = config.encryption
    return PlaintextMigration(b.chat_store, b.bodies, batch=enc.migrate_batch, pause=enc.migrate_pause)


def memory_loops(config: Config) -> list[Loop]:
    """The timed full collection and trim (``memory``), for every role; none with ``collect_interval`` 0."""
    mc = config.memory
    if not mc.collect_interval:
        return []
    return [("im-memory", collect_every(mc.collect_interval, malloc_trim() if mc.trim else None))]


async def _resumed_next_start(work: Coroutine[Any, Any, object], what: str) -> None:
    """Run a background migration; a failure is logged, never raised: it must not stop the server, and
    the next start resumes the migration."""
    try:
        await work
    except Exception:
        log.exception("%s failed; the next start resumes it", what)


def encryption_loops(config: Config, b: Backends) -> list[Loop]:
    """The migrations of encryption at rest, each one run in the background, logged every 5 s: message
    bodies in clear sealed (``encryption.migrate_plaintext``), file ids in clear keyed
    (``files.migrate_plaintext``). For the roles that run a committer."""
    loops: list[Loop] = []
    migration = plaintext_migration(config, b) if config.encryption.migrate_plaintext else None
    if migration is not None:

        def sealing(p: MigrationProgress) -> None:
            if p.total and not p.finished:
                log.info("sealing plaintext message bodies: %s", p.line())
            elif p.total:
                log.info("plaintext message bodies sealed: %s, %d changed meanwhile", p.line(), p.skipped)
                if not p.scrubbed:
                    log.warning("old plaintext versions remain until a full checkpoint: run `im keys scrub`")

        loops.append(
            ("im-seal-plaintext", _resumed_next_start(migration.run(sealing), "the plaintext message migration"))
        )
    conversion = file_id_conversion(config, b) if config.files.migrate_plaintext else None
    if conversion is not None:

        def keying(p: IdConversionProgress) -> None:
            if p.total and not p.finished:
                log.info("keying file ids: %s", p.line())
            elif p.total:
                log.info("file ids keyed: %s", p.line())
                if not p.complete:
                    log.warning("file ids in clear were written meanwhile: the next start keys them")
                if not p.scrubbed:
                    log.warning("old file ids remain until a full checkpoint: run `im keys scrub`")

        loops.append(("im-key-file-ids", _resumed_next_start(conversion.run(keying), "the file id conversion")))
    return loops


def file_id_conversion(config: Config, b: Backends) -> FileIdConversion | None:
    """The conversion of the file tables' ids in clear to keyed ids (None when the ids are not keyed)."""
    store = b.file_store
    if not isinstance(store, StoredFileIds) or not store.ids.keyed:
        return None
    enc = config.encryption
    scrub = None if b.bodies is None else b.bodies.scrub
    return FileIdConversion(store, batch=enc.migrate_batch, pause=enc.migrate_pause, scrub=scrub)


@dataclass(frozen=True, slots=True)
class Reloads:
    """What a running process re-reads: the certificate files of its listeners (TLS on) and its master key
    source (encryption at rest), each on SIGHUP and by its own clock."""

    tls: ProcessTls | None
    keys: KeyReloader | None

    def loops(self) -> list[Loop]:
        keys: list[Loop] = [] if self.keys is None else [("im-key-reload", self.keys.loop())]
        return [*(self.tls.loops() if self.tls is not None else []), *keys]


def build_reloads(config: Config, b: Backends, tls: ProcessTls | None, lifecycle: Lifecycle) -> Reloads:
    """The process's reloads, with their SIGHUP hooks registered on ``lifecycle``."""
    keys = None if b.keyring is None else KeyReloader(b.keyring, interval=config.encryption.key_reload_interval)
    if tls is not None:
        lifecycle.on_reload(tls.files.reload)
    if keys is not None:
        lifecycle.on_reload(keys.poke)
    return Reloads(tls, keys)


def session_limits(config: Config) -> Limits:
    lim, gw = config.limits, config.gateway
    return Limits(
        max_frame_bytes=lim.max_frame_bytes,
        max_body_bytes=lim.max_body_bytes,
        max_cmid_length=lim.max_cmid_length,
        max_device_length=lim.max_device_length,
        max_in_flight=lim.max_in_flight,
        send_rate=lim.send_rate,
        typing_rate=lim.typing_rate,
        auth_timeout=gw.auth_timeout,
        idle_timeout=gw.idle_timeout,
        auth_rate=lim.auth_rate,
        auth_burst=lim.auth_burst,
        auth_max_wait=min(lim.auth_max_wait, gw.auth_timeout / 2),
        send_order_hold=lim.send_order_hold,
    )


#: Seconds a readiness answer is reused: probes from every load balancer cost the engines one round per window.
READINESS_CACHE = 1.0
#: Seconds each engine has to answer a readiness check.
READINESS_TIMEOUT = 2.0


def build_readiness(config: Config, b: Backends, lifecycle: Lifecycle, *, events: bool = False) -> Readiness:
    """The readiness of a process on these backends: the store, presence and the registry answer (and
    RabbitMQ, when ``events`` and events go there: the roles that run the outbox relay); it turns to
    draining when ``lifecycle``'s stop begins."""
    r = Readiness(cache_for=READINESS_CACHE)
    r.add("store", b.chat_store.ping, timeout=READINESS_TIMEOUT)
    r.add("presence", b.presence.ping, timeout=READINESS_TIMEOUT)
    r.add("registry", b.registry.ping, timeout=READINESS_TIMEOUT)
    ev = config.events
    if events and ev.kind == "rabbitmq":
        from im.events.relay import broker_ping

        amqp_tls = client_tls(ev.amqp_ca_file, ev.amqp_cert_file, ev.amqp_key_file)

        async def broker() -> None:
            await broker_ping(ev.amqp_url, tls=amqp_tls, timeout=READINESS_TIMEOUT)

        r.add("events", broker, timeout=READINESS_TIMEOUT)
    lifecycle.on_stop(r.start_draining)
    return r


def listed(role: str, node: str, addresses: dict[str, str]) -> ServiceInstance:
    """This process's registry entry: its addresses, im's version and when it started."""
    return ServiceInstance(role, node, addresses, version=im_version(), started_at=PROCESS_STARTED)


def build_http(
    config: Config,
    accounts: AccountService,
    groups: Groups,
    reads: ChatReads,
    picker: GatewayPicker,
    files: FileService,
    admission: Admission,
    tls: ProcessTls | None = None,
    readiness: Readiness | None = None,
) -> HttpServer:
    """The HTTP API server of ``im serve`` and ``im api``: the app on the given services, behind the
    process's admission; HTTPS only (with HSTS) when ``tls`` is given."""
    from im.api.app import create_app
    from im.api.server import HttpServer

    app = create_app(
        accounts,
        groups,
        reads,
        picker.pick,
        config.limits,
        files=files,
        max_request_bytes=config.http.max_body_bytes,
        refusal_delay=config.rates.refusal_delay,
        hsts_max_age=tls.hsts_max_age if tls is not None else 0,
        readiness=readiness,
    )
    return HttpServer(config, app, admission, tls=tls.accept if tls is not None else None)


def build_admission(config: Config) -> Admission:
    """One admission per process, shared by all its listeners; raises the soft open-file limit to the
    hard one first, and derives the connection cap from it (``limits.fd_reserve`` kept back)."""
    lim = config.limits
    fd_limit = raise_open_file_limit()
    # TLS handshakes in progress hold descriptors before admission counts them: keep those back too.
    reserve = lim.fd_reserve + (config.tls.max_handshakes if config.tls.enabled else 0)
    try:
        cap = connection_budget(fd_limit=fd_limit, fd_reserve=reserve, configured=lim.max_connections)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    log.info(
        "connections: at most %d per process (open-file limit %d, %d kept back), %s per address",
        cap,
        fd_limit,
        reserve,
        lim.max_connections_per_address or "no cap",
    )
    return Admission(
        max_connections=cap,
        max_per_address=lim.max_connections_per_address,
        max_refusing=max(8, lim.fd_reserve // 4),
    )


def rate_rule(name: str, rate: RateConfig) -> Rule:
    """The rule's parameters are part of its name (its keys): a rule changed live (im.live_config) starts
    from a full budget instead of state measured at the old rate (a loosened limit would wait that out)."""
    return Rule(f"{name}/{rate.limit}/{rate.period:g}", rate.limit, rate.period)


def login_rules(config: Config) -> dict[str, Rule]:
    """The login and registration budgets (``rates.login_*``, ``rates.register_per_address``)."""
    rt = config.rates
    return {
        "login_per_account_address": rate_rule("login-pair", rt.login_per_account_address),
        "login_per_account": rate_rule("login-account", rt.login_per_account),
        "login_per_address": rate_rule("login-address", rt.login_per_address),
        "register_per_address": rate_rule("register", rt.register_per_address),
    }


def build_accounts(config: Config, store: AccountStore, limiter: RateLimiter | None = None) -> AccountService:
    """``limiter`` None: no login or registration limits (a process that only checks tokens)."""
    auth, rt = config.auth, config.rates
    guard = None if limiter is None else LoginGuard(limiter, **login_rules(config))
    return AccountService(
        store,
        secret=load_secret(config),
        access_ttl=auth.access_ttl,
        refresh_ttl=auth.refresh_ttl,
        session_max_age=auth.session_max_age,
        argon2_time_cost=auth.argon2_time_cost,
        argon2_memory_kib=auth.argon2_memory_kib,
        argon2_parallelism=auth.argon2_parallelism,
        min_password_length=auth.min_password_length,
        guard=guard,
        max_blocks=config.limits.max_blocks,
        hash_slots=HashSlots(concurrency=rt.hash_concurrency, queue=rt.hash_queue, per_source=rt.hash_per_address),
    )


def files_encrypted(config: Config) -> bool:
    """``files.encrypt``, which defaults to ``encryption.enabled``: blobs sealed, file ids keyed."""
    fc = config.files
    return config.encryption.enabled if fc.encrypt is None else fc.encrypt


def build_blobs(config: Config, keys: FileKeys | None, *, migrate: bool = True) -> BlobStorage:
    """The blob storage of ``files``: sealed with ``keys`` when ``files.encrypt`` is on. ``migrate``:
    this process may seal plaintext blobs in the background (one that serves uploads, not a checker)."""
    fc = config.files
    if fc.storage == "s3":
        return build_s3_blobs(config, keys)
    root = fc.storage_dir or config.data_dir / "files"
    if not files_encrypted(config):
        return LocalBlobStorage(root)
    if keys is None:  # files.encrypt=true with encryption off and no master key there
        raise ConfigError("files.encrypt needs the master key: turn encryption.enabled on, or files.encrypt off")
    return EncryptedBlobStorage(
        root, keys, chunk_bytes=fc.encrypt_chunk_bytes, migrate=migrate and fc.migrate_plaintext
    )


def build_s3_blobs(config: Config, keys: FileKeys | None) -> S3BlobStorage:
    """``files.storage: s3``: the bucket of ``files.s3``, sealed with ``keys`` when ``files.encrypt`` is on."""
    from im.backends.blobs.s3 import S3BlobStorage, S3Settings

    fc, s3 = config.files, config.files.s3
    encrypt = files_encrypted(config)
    if encrypt and keys is None:
        raise ConfigError("files.encrypt needs the master key: turn encryption.enabled on, or files.encrypt off")
    settings = S3Settings(**{f.name: getattr(s3, f.name) for f in dataclasses.fields(S3Settings)})
    return S3BlobStorage(
        settings,
        s3.staging_dir or config.data_dir / "files-staging",
        keys=keys if encrypt else None,
        chunk_bytes=fc.encrypt_chunk_bytes,
        single_put_bytes=s3.single_put_bytes,
        part_bytes=s3.part_bytes,
        read_window_bytes=s3.read_window_bytes,
    )


def build_files(
    config: Config,
    store: FileStore,
    limiter: RateLimiter | None = None,
    *,
    keys: FileKeys | None = None,
    migrate_blobs: bool = True,
) -> FileService:
    """``limiter`` None: no upload quota (a process that only checks attachments). ``keys``: the keyring
    that seals the blobs (``files.encrypt``); ``migrate_blobs``: see :func:`build_blobs` (safe in several
    processes at once, but one is enough)."""
    fc, rt = config.files, config.rates
    return FileService(
        build_blobs(config, keys, migrate=migrate_blobs),
        store,
        max_upload_bytes=fc.max_upload_bytes,
        allowed_types=fc.allowed_types,
        max_image_pixels=fc.max_image_pixels,
        limiter=limiter,
        upload_bytes_per_day=rt.upload_bytes_per_day,
        upload_files_per_day=rt.upload_files_per_day,
    )


@dataclass(frozen=True, slots=True)
class ChatCaches:
    """What the committer and the read side of one process share, so that each sees the other's view:
    the conversation states (members, heads) and consent (blocks, settings)."""

    states: ConversationStates
    consent: Consent


def build_chat_caches(b: Backends, *, state_ttl: float | None = None, privacy_ttl: float | None = None) -> ChatCaches:
    """``state_ttl`` None: this process's committer is the only writer and its cache is the truth (im
    serve); a number: other processes write too, states older than that are read again. ``privacy_ttl``
    None: blocks and settings are cached until ``Consent.forget`` (im serve, whose AccountService
    announces every change); a number: read again when older (distributed mode)."""
    return ChatCaches(
        ConversationStates(b.chat_store, ttl=state_ttl),
        Consent(b.account_store, b.chat_store, ttl=privacy_ttl),
    )


def build_committer(
    config: Config,
    b: Backends,
    caches: ChatCaches,
    files: FileService | None,
    router: Router,
    *,
    answer_wait: float = 0.0,
    answer_wait_max_batch: int = 64,
) -> Committer:
    """The committer, holding no node id yet: :func:`build_node_ids` on its ``ids`` assigns one.
    ``answer_wait``, ``answer_wait_max_batch``: see :attr:`Committer.answer_wait` (a transfer node's, from
    ``transfer.answer_wait`` and ``transfer.answer_wait_max_batch``)."""
    return Committer(
        b.chat_store,
        b.account_store,
        router,
        b.presence,
        caches.states,
        caches.consent,
        files=files,
        ids=Snowflake(None),
        max_batch=config.store.max_batch,
        max_group_members=config.limits.max_group_members,
        order_hold=config.limits.send_order_hold,
        order_entries=config.limits.send_order_entries,
        answer_wait=answer_wait,
        answer_wait_max_batch=answer_wait_max_batch,
    )


def build_node_ids(config: Config, registry: Registry, owner: str, ids: Snowflake) -> NodeIdClaims:
    """The node id claim of a process that mints message ids (``owner``: its node name): on etcd with the
    etcd registry (a free id, shared by the cluster), else the fixed ``registry.fixed_node_id``. Start it
    after the registry and before the committer; it drives ``ids``."""
    if _is_etcd(registry):
        from im.backends.node_ids.etcd import EtcdNodeIds

        return EtcdNodeIds(registry, owner, ids, ttl=config.registry.ttl, reserve=config.registry.node_id_reserve)
    return MemoryNodeIds(owner, ids, prefer=config.registry.fixed_node_id)


def build_groups(config: Config, b: Backends, caches: ChatCaches, committer: Committer) -> Groups:
    keyring, accounts = b.keyring, b.account_store
    shred = deleted_users = None
    if keyring is not None:

        async def shred(convs: Sequence[str]) -> int:  # crypto-shredding: a group left empty, a deleted account
            return await keyring.shred([conv_key_name(c) for c in convs])

        async def deleted_users(uids: Sequence[int]) -> set[int]:
            return {uid for uid, p in (await accounts.privacy(uids)).items() if p.deleted}

    return Groups(
        committer,
        b.chat_store,
        b.account_store,
        caches.consent,
        max_group_members=config.limits.max_group_members,
        shred=shred,
        deleted_users=deleted_users,
    )


def build_reads(config: Config, b: Backends, caches: ChatCaches) -> ChatReads:
    return ChatReads(
        b.chat_store,
        b.account_store,
        b.presence,
        caches.states,
        caches.consent,
        history_page_max=config.limits.history_page_max,
    )


def hub_rates(config: Config) -> HubRates:
    """The shared limits a gateway applies (``rates.*``), at start and when they change live."""
    rt = config.rates
    return HubRates(
        sends_per_user=rate_rule("send-user", rt.sends_per_user),
        sends_per_conversation=rate_rule("send-conv", rt.sends_per_conversation),
        typing_per_user=rate_rule("typing", rt.typing_per_user),
        receipts_per_user=rate_rule("receipts", rt.receipts_per_user),
    )


def build_hub(
    config: Config, b: Backends, reads: ChatReads, accounts: AccountService, router: Router, submit: SubmitSend
) -> Hub:
    """The gateway hub: connections read through ``reads``, send through ``submit`` and attach to ``router``."""
    gw, rates = config.gateway, hub_rates(config)
    return Hub(
        gw.node_id,
        reads=reads,
        cursor_store=b.chat_store,
        presence=b.presence,
        router=router,
        accounts=accounts,
        submit=submit,
        limits=session_limits(config),
        replay_page=gw.replay_page,
        live_wait=gw.live_wait,
        max_send_buffer=gw.max_send_buffer,
        preauth_send_buffer=config.limits.preauth_send_buffer,
        presence_ttl=config.presence.ttl,
        limiter=b.rate_limiter,
        rates=rates,
    )


def build_push_dedupe(config: Config, *, timeout: float = REDIS_TIMEOUT) -> Dedupe:
    """What the push consumer remembers pushed events by (``events.dedupe``): in memory, or in Redis under
    the cluster's ``presence.redis_prefix``, with every reply bounded by ``timeout``, so a hung Redis
    fails the event's attempt (tried again in place) instead of stalling the consumer."""
    if config.events.dedupe != "redis":
        return MemoryDedupe()
    from im.backends.dedupe.redis import RedisDedupe

    client = redis_client(config.presence.redis_url, timeout=timeout, tls=redis_tls(config))
    return RedisDedupe(client, prefix=f"{config.presence.redis_prefix}push:", owns_client=True)


def event_workers(
    config: Config, b: Backends, consumers: list[PushConsumer] | None = None
) -> list[Coroutine[Any, Any, None]]:
    """The outbox relay and the push consumer, when events go to RabbitMQ. Any number of processes
    may run them: the store's outbox lock keeps one relay active, the queue one consumer. The consumer
    made is also appended to ``consumers`` (its webhook URL follows the configuration centre)."""
    ev = config.events
    if ev.kind != "rabbitmq":
        return []
    from im.events.push import PushConsumer
    from im.events.relay import OutboxRelay

    store = b.chat_store
    amqp_tls = client_tls(ev.amqp_ca_file, ev.amqp_cert_file, ev.amqp_key_file)
    workers = [OutboxRelay(store, ev.amqp_url, exchange=ev.exchange, queue=ev.queue, tls=amqp_tls).run()]
    if ev.webhook_url:
        dedupe = build_push_dedupe(config)

        async def members(conv: str) -> list[int]:
            return list((await store.load_conversations([conv])).get(conv, _NO_CONV).members)

        consumer = PushConsumer(
            ev.amqp_url,
            b.presence,
            members,
            ev.webhook_url,
            dedupe,
            exchange=ev.exchange,
            queue=ev.queue,
            max_attempts=ev.max_attempts,
            tls=amqp_tls,
        )

        if consumers is not None:
            consumers.append(consumer)

        async def push() -> None:
            async with dedupe:  # its Redis client is closed when the consumer is cancelled
                await consumer.run()

        workers.append(push())
    return workers


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


class GatewayListeners:
    """The WebSocket and (unless turned off) TCP listeners of a gateway, and the addresses clients are
    given (``wss://`` and ``tls://`` when ``tls`` is given: both listeners then speak TLS only). A
    lifecycle part: ``start`` binds and listens; ``stop`` takes no new work (stops accepting, waits for
    the accepts under way, then pauses reading on every connection so no new send is taken)."""

    def __init__(self, config: Config, hub: Hub, admission: Admission, tls: ProcessTls | None = None) -> None:
        self._config = config
        self._hub = hub
        self._admission = admission
        self._tls = tls.accept if tls is not None else None
        self._listeners: list[Listener] = []
        self.addresses: dict[str, str] = {}

    async def start(self) -> None:
        try:
            await self._listen()
        except BaseException:
            for server in self._listeners:
                server.close()
            raise

    async def _listen(self) -> None:
        gw, tls = self._config.gateway, self._tls
        ws_server = await serve_websocket(
            self._hub,
            gw.host,
            gw.ws_port,
            admission=self._admission,
            max_fragments=self._config.limits.max_fragments,
            tls=tls,
        )
        self._listeners.append(ws_server)
        ws_port = ws_server.sockets[0].getsockname()[1]
        ws_scheme, tcp_scheme = ("wss", "tls") if tls is not None else ("ws", "tcp")
        self.addresses["ws"] = gw.public_ws_url or f"{ws_scheme}://{gw.host}:{ws_port}{WS_PATH}"
        if gw.tcp_port is not None:
            tcp_server = await serve_tcp(self._hub, gw.host, gw.tcp_port, admission=self._admission, tls=tls)
            self._listeners.append(tcp_server)
            tcp_port = tcp_server.sockets[0].getsockname()[1]
            self.addresses["tcp"] = gw.public_tcp_url or f"{tcp_scheme}://{gw.host}:{tcp_port}"

    async def stop(self) -> None:
        for server in self._listeners:
            server.close()
        for server in self._listeners:
            await server.wait_closed()
        self._hub.pause_all()
