"""Start-up failures as one line: what is wrong and what to do about it.

A process that cannot start (a port taken, PostgreSQL or etcd away, a missing database, a file it cannot
read) exits with status 1 and one line on stderr naming the problem and the fix, instead of a traceback
through asyncpg or grpc. ``cli.py`` runs every role through :func:`run_start`, the one place that turns
the exceptions of a failed start into those lines (README, "Troubleshooting").

What is recognised: bind errors (address in use, not an address of this machine, a privileged port),
the engines' connection and login failures (PostgreSQL, etcd, Redis, RabbitMQ: told apart by the library
and backend modules the exception came through, so the message names the engine and its setting), a
missing PostgreSQL database, and file-system errors on a named path. Anything else is a bug or a case not
foreseen: its traceback is printed as before. ``--log-level debug`` prints the traceback of a recognised
failure too.

Exit statuses: 0 after a clean stop, 1 when the start failed, 2 for an invalid configuration, 130 when
interrupted (Ctrl-C) before the start finished.
"""

from __future__ import annotations

import errno
import ssl
import sys
import traceback
from collections.abc import Callable, Iterator
from types import TracebackType
from urllib.parse import urlsplit

from im.config import Config, ConfigError

__all__ = ["EXIT_CONFIG", "EXIT_START", "StartupError", "explain", "run_start"]

#: The process could not start (the line on stderr says why).
EXIT_START = 1
#: A configuration value is invalid (the line names it).
EXIT_CONFIG = 2
#: Interrupted before the start finished (SIGINT).
EXIT_INTERRUPTED = 130


class StartupError(Exception):
    """A start that cannot succeed until the operator changes something: ``problem``, then ``fix``."""

    def __init__(self, problem: str, fix: str = "") -> None:
        super().__init__(f"{problem}: {fix}" if fix else problem)
        self.problem = problem
        self.fix = fix


#: Module prefixes (of the frames an exception passed through) -> the engine it came from.
_ENGINES: tuple[tuple[str, str], ...] = (
    ("im.backends.registry.etcd", "etcd"),
    ("aetcd", "etcd"),
    ("asyncpg", "postgres"),
    ("im.backends.sql.postgres", "postgres"),
    ("redis", "redis"),
    ("im.backends.presence.redis", "redis"),
    ("im.backends.rate_limit.redis", "redis"),
    ("im.backends.dedupe.redis", "redis"),
    ("aio_pika", "rabbitmq"),
    ("aiormq", "rabbitmq"),
    ("im.events", "rabbitmq"),
)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, the leaves of exception groups, and what each was raised from or during (once each)."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        if isinstance(e, BaseExceptionGroup):
            todo.extend(e.exceptions)
        for linked in (e.__cause__, e.__context__):
            if linked is not None:
                todo.append(linked)


def _modules(tb: TracebackType | None) -> Iterator[str]:
    while tb is not None:
        yield str(tb.tb_frame.f_globals.get("__name__", ""))
        tb = tb.tb_next


def _engine(exc: BaseException) -> str | None:
    """The engine whose client raised ``exc`` (or what it was raised from), by the modules it crossed;
    the innermost frame decides."""
    for e in _chain(exc):
        for module in reversed(list(_modules(e.__traceback__))):
            for prefix, engine in _ENGINES:
                if module == prefix or module.startswith(prefix + "."):
                    return engine
    return None


def _where_postgres(config: Config) -> tuple[str, str]:
    """(host:port, database) of ``store.postgres_dsn``, without the password."""
    dsn = urlsplit(config.store.postgres_dsn or "")
    host = dsn.hostname or "localhost"
    port = dsn.port or 5432
    database = dsn.path.lstrip("/") or dsn.username or "postgres"
    return f"{host}:{port}", database


def _safe_url(url: str) -> str:
    """``url`` without its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[-1]
    user = parts.username or ""
    return parts._replace(netloc=f"{user}:***@{netloc}").geturl()


def _unreachable(engine: str, config: Config, reason: str) -> StartupError:
    if engine == "postgres":
        where, _ = _where_postgres(config)
        return StartupError(
            f"PostgreSQL at {where} does not answer ({reason})",
            "start PostgreSQL, or point store.postgres_dsn at a running one",
        )
    if engine == "etcd":
        where = ",".join(config.registry.endpoints())
        return StartupError(
            f"etcd at {where} does not answer ({reason})",
            "start etcd (Debian: apt-get install etcd-server), or list running members in registry.etcd_endpoints",
        )
    if engine == "redis":
        return StartupError(
            f"Redis at {_safe_url(config.presence.redis_url)} does not answer ({reason})",
            "start Redis, or point presence.redis_url at a running one",
        )
    return StartupError(
        f"RabbitMQ at {_safe_url(config.events.amqp_url)} does not answer ({reason})",
        "start RabbitMQ, or point events.amqp_url at a running one (events.kind=none turns events off)",
    )


#: The setting that chooses each listener's port, for the hint of a bind failure.
def _port_settings(config: Config) -> dict[int, str]:
    out: dict[int, str] = {}
    if config.ops.port:
        out[config.ops.port] = "--set ops.port=PORT"
    out[config.transfer.port] = "--set transfer.port=PORT"
    if config.gateway.tcp_port:
        out[config.gateway.tcp_port] = "--tcp-port"
    out[config.gateway.ws_port] = "--ws-port"
    out[config.http.port] = "--http-port"
    return out


def _bind_failure(exc: OSError, config: Config) -> StartupError | None:
    """A listener that could not bind: which address, and the flag or setting that moves it."""
    host = getattr(exc, "host", None)
    port = getattr(exc, "port", None)
    where = f"{host}:{port}" if host is not None else "a listening address"
    flag = _port_settings(config).get(port, "the port setting") if isinstance(port, int) else "the port setting"
    if exc.errno == errno.EADDRINUSE:
        return StartupError(
            f"cannot listen on {where}: the address is already in use (another im, or another program)",
            f"stop that process, or choose another port with {flag} (0 picks a free one)",
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return StartupError(
            f"cannot listen on {where}: {host} is not an address of this machine",
            "set --host (or http.host, gateway.host, transfer.host) to one of its addresses, or 0.0.0.0 for all",
        )
    if exc.errno is not None and exc.errno < 0 and host is not None:  # getaddrinfo: an unknown host name
        return StartupError(
            f"cannot listen on {where}: {getattr(exc, 'reason', exc.strerror)}",
            "set --host to an address or host name of this machine",
        )
    if exc.errno == errno.EACCES and host is not None:
        return StartupError(
            f"cannot listen on {where}: permission denied",
            "ports below 1024 need root or CAP_NET_BIND_SERVICE: choose a port above 1023",
        )
    return None


def explain(exc: BaseException, config: Config) -> StartupError | None:
    """The one-line account of a failed start, or None when ``exc`` is not a failure this module knows
    (a bug: its traceback is worth more than a guess)."""
    for e in _chain(exc):
        if isinstance(e, StartupError):
            return e
    engine = _engine(exc)
    for e in _chain(exc):
        name = type(e).__name__
        if name in _SAYS_WHAT_TO_DO:
            return StartupError(str(e))
        if name == "InvalidCatalogNameError":  # asyncpg: the database does not exist
            where, database = _where_postgres(config)
            host, _, port = where.rpartition(":")
            return StartupError(
                f"PostgreSQL at {where} has no database {database!r}",
                f"create it (createdb -h {host} -p {port} -U postgres {database}), or name an existing one "
                "in store.postgres_dsn",
            )
        if name in ("InvalidPasswordError", "InvalidAuthorizationSpecificationError"):
            where, database = _where_postgres(config)
            return StartupError(
                f"PostgreSQL at {where} refused the login to {database!r} ({e})",
                "fix the user and password in store.postgres_dsn, or the server's pg_hba.conf",
            )
        if name in ("AuthenticationError", "ProbableAuthenticationError", "UnauthenticatedError") and engine:
            return StartupError(
                f"{_ENGINE_NAMES[engine]} refused the login ({e})", f"fix the credentials in {_SETTING[engine]}"
            )
        if isinstance(e, OSError) and hasattr(e, "port"):
            bound = _bind_failure(e, config)
            if bound is not None:
                return bound
        if isinstance(e, RuntimeError) and str(e).startswith("Failed to bind to address"):  # grpc
            address = str(e).removeprefix("Failed to bind to address ").split(";")[0]
            return StartupError(
                f"cannot listen on {address}: the address is in use or not an address of this machine",
                "stop the other process, or choose another transfer.port (0 picks a free one) or transfer.host",
            )
    if engine is not None:
        for e in _chain(exc):
            if isinstance(e, ssl.SSLError) or " ssl " in f" {e} ".lower():  # also a connection failure
                reason = getattr(e, "reason", None) or e
                return StartupError(
                    f"TLS to {_ENGINE_NAMES[engine]} failed ({reason})",
                    f"check that it speaks TLS with a certificate trusted through {_TLS_SETTINGS[engine]}",
                )
            if _is_connection_failure(e):
                return _unreachable(engine, config, _reason(e))
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno == errno.EADDRINUSE:  # asyncio.start_server: the ops listener
            return StartupError(
                f"cannot listen: {e.strerror or e}",
                "stop the other process, or choose another port (the operations listener: --set ops.port=PORT; "
                "0 picks a free one)",
            )
        if isinstance(e, OSError) and e.filename is not None and e.errno in _FILE_ERRORS:
            return StartupError(
                f"cannot use {e.filename}: {e.strerror}",
                "fix the path or its permissions (data_dir, tls.*, encryption.key_file, files.storage_dir, ...)",
            )
    return None


#: Exceptions of im whose message is already one line saying why and what to do.
_SAYS_WHAT_TO_DO = {"MasterKeyMismatch", "NodeIdUnavailable"}
_ENGINE_NAMES = {"postgres": "PostgreSQL", "etcd": "etcd", "redis": "Redis", "rabbitmq": "RabbitMQ"}
_SETTING = {
    "postgres": "store.postgres_dsn",
    "etcd": "registry.etcd_ca_file/etcd_cert_file/etcd_key_file",
    "redis": "presence.redis_url",
    "rabbitmq": "events.amqp_url",
}
_TLS_SETTINGS = {
    "postgres": "store.postgres_sslmode and store.postgres_sslrootcert",
    "etcd": "registry.etcd_ca_file",
    "redis": "presence.redis_ca_file",
    "rabbitmq": "events.amqp_ca_file",
}
_FILE_ERRORS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.EROFS, errno.ENOSPC}


def _is_connection_failure(e: BaseException) -> bool:
    names = {cls.__name__ for cls in type(e).__mro__}
    return bool(
        isinstance(e, ConnectionError | TimeoutError)
        or (isinstance(e, OSError) and e.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ECONNREFUSED))
        or names & {"ConnectionFailedError", "ConnectionTimeoutError", "AMQPConnectionError", "gaierror"}
        or (type(e).__name__ == "AioRpcError" and "UNAVAILABLE" in str(getattr(e, "code", lambda: "")()))
    )


def _reason(e: BaseException) -> str:
    """The short cause: "Connection refused" rather than a repr of a gRPC status."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e).strip() or type(e).__name__
    for known in ("Connection refused", "Name or service not known", "No route to host", "timed out"):
        if known.lower() in text.lower():
            return known
    return text.splitlines()[0][:200]


def run_start(command: str, config: Config, start: Callable[[], None]) -> int:
    """Run ``start`` (which builds the role and runs it until it stops); a failure to start becomes one
    line on stderr, ``im <command>: <problem>: <fix>``, and exit status 1 (2 for configuration)."""
    debug = config.log_level == "debug"
    try:
        start()
    except KeyboardInterrupt:
        print(f"im {command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ConfigError as exc:  # found only at start (e.g. limits.fd_reserve against the open-file limit)
        if debug:
            traceback.print_exc()
        print(f"im {command}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except Exception as exc:
        why = explain(exc, config)
        if why is None:
            raise
        if debug:
            traceback.print_exc()
        print(f"im {command}: {why}", file=sys.stderr)
        return EXIT_START
    return 0
