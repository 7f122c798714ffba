"""Admission of client connections on every listener (HTTP, WebSocket, TCP), and the accept loop.

Two things keep one client, or many, from taking a process's listeners down:

- :class:`Admission` (sans-I/O: no sockets, no event loop) counts the connections open in the process
  and per client address, and answers each new one with a :class:`Ticket`: admitted, refused (the
  transport writes its documented refusal and waits, briefly, for the client to read it before closing)
  or shed (the refusal is written and the connection closed at once: enough refusals are already waiting,
  and each holds a descriptor). IPv4 addresses count one by one; IPv6 ones by
  their /64 prefix, the block one subscriber usually gets (counting single IPv6 addresses would let one
  host take 2**64 of them).
- :class:`Listener` accepts on a listening socket itself instead of ``loop.create_server``: uvloop's
  server closes its listening handle for good on the first ``EMFILE`` (no log line, nothing accepted
  again), which is how 600 idle sockets took every listener down. Here an accept that fails for lack of
  descriptors pauses accepting for ``retry_delay`` seconds (pending clients wait in the kernel's backlog),
  then tries again; one throttled log line reports it, never one per accept.

The process-wide cap is derived from the open-file limit (:func:`connection_budget`): connections may use
all descriptors but ``fd_reserve``, kept for the database, Redis, etcd, RabbitMQ, log files, uploads being
written and the gRPC links, so those never starve because clients took every descriptor.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import json
import logging
import resource
import socket
import ssl
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from enum import Enum

log = logging.getLogger(__name__)

#: Errors of ``accept()`` that mean "no descriptor or buffer left right now": pause, then retry.
_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: At most this many connections are accepted per readiness event: fairness with established ones, and
#: a bound on descriptors taken before admission runs (each accepted socket reaches its protocol, and a
#: shed one is closed, one loop iteration later): 2 x 16 per listener, inside ``fd_reserve``.
_ACCEPT_BATCH = 16


#: Seconds a refused client is told to wait before it tries again (HTTP ``Retry-After``).
RETRY_AFTER = 5


def refusal_503(reason: str) -> bytes:
    """The whole HTTP response refusing a connection over a cap: 503 ``unavailable``, ``Retry-After``."""
    body = json.dumps({"code": "unavailable", "message": reason}).encode()
    head = (
        f"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        f"retry-after: {RETRY_AFTER}\r\ncache-control: no-store\r\nconnection: close\r\n\r\n"
    ).encode()
    return head + body


class Verdict(Enum):
    ADMIT = "admit"
    #: Over a cap: answer with the listener's refusal (HTTP 503, WebSocket close 1013, TCP ``bye``), close.
    REFUSE = "refuse"
    #: Over a cap while ``max_refusing`` refusals are already waiting: write the refusal, close at once.
    SHED = "shed"


@dataclass(slots=True)
class Ticket:
    """One connection's place in the counts; give it back with :meth:`Admission.release` exactly once
    (a second release is ignored)."""

    key: str
    verdict: Verdict
    #: Why it was refused, for the refusal message ("" when admitted).
    reason: str = ""
    released: bool = False

    @property
    def admitted(self) -> bool:
        return self.verdict is Verdict.ADMIT


def address_key(peer: object, *, ipv6_prefix: int = 64) -> str:
    """The counting key of a peer address (``transport.get_extra_info("peername")`` or a host string):
    the IPv4 address, or the IPv6 network of ``ipv6_prefix`` bits (IPv4-mapped IPv6 counts as IPv4)."""
    host = peer[0] if isinstance(peer, tuple) and peer else peer
    if not isinstance(host, str):
        return ""  # no IP peer (a Unix socket): one shared key
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, ipv6_prefix), strict=False))
    return str(ip)


class Admission:
    """Process-wide counts of open client connections, all listeners together.

    Guarantees: at most ``max_connections`` admitted connections are open at once, at most
    ``max_per_address`` of them from one address key (0: no per-address cap), and at most
    ``max_refusing`` refused ones wait for their client to read the refusal; past that, refusals are
    written and closed at once (shed).
    Counts change only through :meth:`admit` and :meth:`release`, so they are exact as long as every
    transport releases its ticket when its connection is lost.
    """

    def __init__(self, *, max_connections: int, max_per_address: int, max_refusing: int, ipv6_prefix: int = 64) -> None:
        if max_connections < 1 or max_per_address < 0 or max_refusing < 0:
            raise ValueError("max_connections must be >= 1, max_per_address and max_refusing >= 0")
        self.max_connections = max_connections
        self.max_per_address = max_per_address
        self.max_refusing = max_refusing
        self.ipv6_prefix = ipv6_prefix
        self.open = 0
        self.refusing = 0
        self.refused_total = 0
        self.shed_total = 0
        self._by_key: dict[str, int] = {}

    def admit(self, peer: object) -> Ticket:
        """Count a new connection from ``peer`` (a peername tuple or host), or say why it is refused."""
        key = sys.intern(address_key(peer, ipv6_prefix=self.ipv6_prefix))  # one string per address, not per connection
        reason = ""
        if self.open >= self.max_connections:
            reason = "the server is at its connection limit, retry later"
        elif self.max_per_address and self._by_key.get(key, 0) >= self.max_per_address:
            reason = f"too many connections from this address (limit {self.max_per_address})"
        if not reason:
            self.open += 1
            self._by_key[key] = self._by_key.get(key, 0) + 1
            return Ticket(key, Verdict.ADMIT)
        if self.refusing >= self.max_refusing:
            self.shed_total += 1
            return Ticket(key, Verdict.SHED, reason, released=True)  # holds nothing
        self.refusing += 1
        self.refused_total += 1
        return Ticket(key, Verdict.REFUSE, reason)

    def release(self, ticket: Ticket) -> None:
        """The ticket's connection is closed."""
        if ticket.released:
            return
        ticket.released = True
        if ticket.verdict is Verdict.REFUSE:
            self.refusing -= 1
            return
        self.open -= 1
        left = self._by_key[ticket.key] - 1
        if left:
            self._by_key[ticket.key] = left
        else:
            del self._by_key[ticket.key]

    def open_from(self, peer: object) -> int:
        """Admitted connections open from ``peer``'s address key."""
        return self._by_key.get(address_key(peer, ipv6_prefix=self.ipv6_prefix), 0)


def open_file_limit() -> int:
    """This process's soft ``RLIMIT_NOFILE`` (a large number when unlimited)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1 << 20 if soft == resource.RLIM_INFINITY else int(soft)


def raise_open_file_limit() -> int:
    """Raise the soft open-file limit to the hard one (what a server is allowed to use; shells often
    start processes with a soft limit of 1024); return the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit from %s to %s: %s", soft, hard, exc)
    return open_file_limit()


def connection_budget(*, fd_limit: int, fd_reserve: int, configured: int | None) -> int:
    """The process-wide connection cap: ``configured`` (None: derived), never more than the descriptors
    left once ``fd_reserve`` is kept back. Raises ValueError when nothing is left for connections."""
    budget = fd_limit - fd_reserve
    if budget < 1:
        raise ValueError(
            f"the open-file limit ({fd_limit}) leaves no descriptor for connections after "
            f"limits.fd_reserve={fd_reserve}: raise `ulimit -n` or lower limits.fd_reserve"
        )
    if configured is not None and configured > budget:
        log.warning(
            "limits.max_connections=%d exceeds the open-file limit %d minus limits.fd_reserve %d: using %d",
            configured,
            fd_limit,
            fd_reserve,
            budget,
        )
    return budget if configured is None else min(configured, budget)


@dataclass(frozen=True, slots=True)
class TlsAccept:
    """How a :class:`Listener` wraps its connections in TLS.

    ``context`` is called for each new connection (a reloading certificate hands out its current
    context). ``handshake_timeout`` seconds after the accept an unfinished handshake is aborted and its
    descriptor freed; ``shutdown_timeout`` bounds the TLS close (waiting for the client's close_notify).
    ``slots`` counts handshakes in progress, per process and per address; its refusals are all sheds
    (make it with ``max_refusing=0``): the socket is closed at once.
    """

    context: Callable[[], ssl.SSLContext]
    slots: Admission
    handshake_timeout: float = 10.0
    shutdown_timeout: float = 10.0


class BindError(OSError):
    """A listening socket that could not be made, naming the address (the errno is the socket's)."""

    def __init__(self, errno: int, strerror: str, host: str, port: int) -> None:
        super().__init__(errno, f"{strerror}: {host}:{port}")
        self.reason = strerror
        self.host = host
        self.port = port


def bind(host: str, port: int, *, backlog: int = 4096) -> socket.socket:
    """A non-blocking listening TCP socket (IPv6 when ``host`` has a colon); :class:`BindError` when the
    address is taken or not this machine's."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        if exc.errno is None:
            raise
        raise BindError(exc.errno, exc.strerror or str(exc), host, port) from exc
    return sock


class Listener:
    """Accepts connections on a listening socket and hands each to ``protocol_factory``'s protocol.

    Stands in for ``asyncio.Server`` (``close()``, ``sockets``): closing stops accepting, aborts TLS
    handshakes still in progress, and leaves the open connections alone. Running out of descriptors
    pauses accepting for ``retry_delay`` seconds and logs at most one line per ``log_interval`` seconds;
    it never stops the listener.
    """

    def __init__(
        self,
        sock: socket.socket,
        protocol_factory: Callable[[], asyncio.BaseProtocol],
        *,
        name: str,
        retry_delay: float = 0.5,
        log_interval: float = 60.0,
        tls: TlsAccept | None = None,
    ) -> None:
        self.sockets = [sock]
        self.tls = tls
        self.handshakes_shed = 0  # sockets closed at once: too many TLS handshakes in progress
        self.handshakes_failed = 0  # handshakes that failed or timed out
        self.name = name
        self._sock = sock
        self._factory = protocol_factory
        self._retry_delay = retry_delay
        self._log_interval = log_interval
        self._loop: asyncio.AbstractEventLoop | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._pending: set[asyncio.Task[object]] = set()
        self._closed = False
        self._last_log = float("-inf")
        self.exhausted_total = 0  # accepts deferred for lack of descriptors
        self._exhausted_since_log = 0

    def start(self) -> Listener:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._sock.fileno(), self._accept)
        return self

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
        elif self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        if self.tls is not None:
            for task in self._pending:  # handshakes in progress: their protocols never saw a connection
                task.cancel()

    async def wait_closed(self) -> None:
        """Like ``asyncio.Server.wait_closed`` (uvicorn's shutdown awaits it): returns once the connections
        accepted before :meth:`close` are set up (their protocols made), so whoever stops next sees them.
        The listening socket is closed by :meth:`close`; connections are their owners' to wait for."""
        if self._pending:
            await asyncio.wait(list(self._pending))

    def _accept(self) -> None:
        loop = self._loop
        assert loop is not None
        for _ in range(_ACCEPT_BATCH):
            try:
                conn, addr = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _EXHAUSTED:
                    self._pause(exc)
                    return
                # ECONNABORTED, EPROTO, ...: that one connection is gone; the listener carries on.
                log.debug("%s: accept failed: %s", self.name, exc)
                continue
            conn.setblocking(False)
            coro = self._connect(conn) if self.tls is None else self._handshake(conn, self.tls, addr)
            if coro is None:
                continue
            task: asyncio.Task[object] = loop.create_task(coro)
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _connect(self, conn: socket.socket) -> object:
        assert self._loop is not None
        try:
            return await self._loop.connect_accepted_socket(self._factory, conn)
        except OSError as exc:  # out of descriptors or memory while setting it up: drop this one
            conn.close()
            log.debug("%s: could not set up an accepted connection: %s", self.name, exc)
            return None

    def _handshake(self, conn: socket.socket, tls: TlsAccept, peer: object) -> Coroutine[object, object, object] | None:
        """The TLS setup of ``conn``, or None (and ``conn`` closed) when no handshake slot is free."""
        ticket = tls.slots.admit(peer)
        if not ticket.admitted:
            self.handshakes_shed += 1
            conn.close()
            return None
        return self._connect_tls(conn, tls, ticket)

    async def _connect_tls(self, conn: socket.socket, tls: TlsAccept, ticket: Ticket) -> object:
        assert self._loop is not None
        try:
            return await self._loop.connect_accepted_socket(
                self._factory,
                conn,
                ssl=tls.context(),
                ssl_handshake_timeout=tls.handshake_timeout,
                ssl_shutdown_timeout=tls.shutdown_timeout,
            )
        except OSError as exc:  # ssl.SSLError (a plaintext client, ...), the handshake timeout, a reset
            self.handshakes_failed += 1
            conn.close()
            log.debug("%s: TLS handshake failed: %s", self.name, exc)
            return None
        finally:
            tls.slots.release(ticket)

    def _pause(self, exc: OSError) -> None:
        assert self._loop is not None
        self.exhausted_total += 1
        self._exhausted_since_log += 1
        now = time.monotonic()
        if now - self._last_log >= self._log_interval:
            log.warning(
                "%s: cannot accept (%s); pausing accepts for %.1fs at a time (%d such pauses since the "
                "last report); existing connections are unaffected",
                self.name,
                errno.errorcode.get(exc.errno or 0, exc),
                self._retry_delay,
                self._exhausted_since_log,
            )
            self._last_log = now
            self._exhausted_since_log = 0
        self._loop.remove_reader(self._sock.fileno())
        self._retry = self._loop.call_later(self._retry_delay, self._resume)

    def _resume(self) -> None:
        self._retry = None
        if not self._closed and self._loop is not None:
            self._loop.add_reader(self._sock.fileno(), self._accept)
            self._accept()
