"""A TCP fault proxy: put it on one path (a listening port -> ``target``) and make that path bad at will.

Tests put a :class:`FaultProxy` between clients and a gateway, between a gateway and a transfer node, or
between a node and an engine (PostgreSQL, Redis, RabbitMQ, etcd), point the client side at
:attr:`FaultProxy.address`, and change the link while connections are open::

    with FaultProxy(("127.0.0.1", 5432)) as proxy:         # listening on a free port
        dsn = f"postgresql://postgres@{proxy.address}/test"
        proxy.set(latency=0.3, jitter=0.2, bandwidth=8192, slice=1)   # both directions
        proxy.set(latency=1.0, direction="down")           # only target -> client
        proxy.reset_after(4096)                            # each connection: RST after 4 KiB more
        proxy.blackhole()                                  # forward nothing, hold every connection open
        proxy.cut()                                        # refuse new connections, RST every open one
        proxy.heal()                                       # a clean link again

What each fault does, per direction (``"up"``: client -> target, ``"down"``: target -> client, ``"both"``):

- **latency** and **jitter** (seconds): every chunk read from one side is written to the other after
  ``latency`` plus a uniform random ``[-jitter, +jitter]`` (never below zero). Order within a connection is
  kept: a chunk never overtakes the one before it (as TCP would), so jitter spreads gaps, not bytes.
- **bandwidth** (bytes per second, 0: unlimited): the pace of each connection in that direction, like a
  slow link per flow (it is not shared between connections). Bytes go out in pieces of at most 10 ms of
  the rate, in bursts of at most :data:`PACE_SLACK` seconds' worth.
- **slice** (bytes, 0: whole chunks): at most that many bytes per write, each its own ``send`` and so its
  own TCP segment (``TCP_NODELAY`` on both sockets): protocol framing is cut at every byte boundary.
  Slices written back to back can still be read together by a receiver slower than the writes; with a
  bandwidth limit they are paced apart (``slice=1, bandwidth=8192``: a byte every 122 µs, in bursts of
  about 16 bytes), and a receiver that keeps up reads them one by one.
- **resets**: :meth:`reset_all` resets every open connection now; :meth:`reset_after` resets each
  connection once it has forwarded ``nbytes`` more bytes in one direction (each direction counts its own;
  with ``"both"`` whichever gets there first; counted from when the setting was made for open connections
  and from their start for new ones), again for every new connection until cleared. A reset is a real
  RST on both sockets (``SO_LINGER`` 0): the peers see ``ConnectionResetError`` (``ECONNRESET``), not an
  orderly end of stream.
- **blackhole** (drop): nothing is forwarded in that direction, and connections stay open (as on a link
  that silently drops every packet). What was read before is held, not discarded, and the proxy stops
  reading once it holds :data:`HOLD_BYTES` per connection and direction, so the sender's buffers fill as
  they would when TCP gets no acknowledgements; after :meth:`heal` the held bytes go on in order. (A TCP
  byte stream cannot lose bytes in the middle and go on, so "dropping" stalls; the sender's own timeouts
  decide whether the connection survives.) New connections are accepted, and while the up direction is
  blackholed the proxy does not even dial the target (its SYN would be lost), so they stay silent.
- **cut**: the proxy stops listening (new connects get ``ConnectionRefusedError``) and resets every open
  connection: the target died or the network went down. :meth:`start` listens again on the same port and
  :meth:`heal` does too.

:meth:`heal` clears every fault. Counters: :attr:`accepted` (connections accepted), :attr:`bytes_up` and
:attr:`bytes_down` (bytes forwarded), :attr:`resets` (connections reset by the proxy), :attr:`open`
(connections open now).

The proxy runs its own event loop in a daemon thread, so it keeps forwarding while the caller's thread
or loop is blocked (``LocalCluster.start`` is synchronous), and every method is a plain call, safe from
any thread, sync or async code (each waits a few milliseconds at most for the proxy's loop). Latency timers
and random jitter use the proxy's own loop clock and ``random.Random(seed)``: pass ``seed`` for a
reproducible sequence of delays.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import threading
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, replace
from typing import Any, Literal, Self, TypeVar

T = TypeVar("T")
Direction = Literal["up", "down", "both"]

#: The most bytes held per connection and direction (read but not yet forwarded) before the proxy stops
#: reading that side: back-pressure on the sender, as a full TCP window would be.
HOLD_BYTES = 256 * 1024
#: With a bandwidth limit, how far (seconds) a flow may run ahead of its pace before it sleeps: pieces
#: go out in bursts of at most this long at the set rate, and timers stay coarser than one per byte.
PACE_SLACK = 0.002


@dataclass(frozen=True)
class LinkFaults:
    """The faults of one direction of the link (see the module docstring)."""

    latency: float = 0.0
    jitter: float = 0.0
    bandwidth: int = 0
    slice: int = 0
    blackhole: bool = False
    reset_after: int | None = None


def _directions(direction: Direction) -> tuple[str, ...]:
    if direction == "both":
        return ("up", "down")
    if direction in ("up", "down"):
        return (direction,)
    raise ValueError(
        f"direction must be 'up' (client -> target), 'down' (target -> client) or 'both', not {direction!r}"
    )


def _rst(transport: asyncio.Transport | None) -> None:
    """Close ``transport`` with a RST (SO_LINGER 0), not a FIN."""
    if transport is None or transport.is_closing():
        if transport is not None:
            transport.abort()
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class _Side(asyncio.Protocol):
    """One socket of a proxied connection: what it receives goes into its :class:`_Flow` toward the other."""

    def __init__(self, conn: _Conn, flow: _Flow | None) -> None:
        self.conn = conn
        self.flow = flow  # the direction that carries what this socket receives
        self.transport: asyncio.Transport | None = None
        self.paused_reading = False
        self.can_write = asyncio.Event()
        self.can_write.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self.flow is not None:
            self.flow.push(data)

    def eof_received(self) -> bool:
        if self.flow is not None:
            self.flow.push(b"")  # an end of stream, passed on in order as a half close
        return True  # keep the write side open: the other direction may still flow

    def connection_lost(self, exc: Exception | None) -> None:
        self.can_write.set()
        self.conn.lost(self, exc)

    def pause_writing(self) -> None:
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()

    def pause(self) -> None:
        if not self.paused_reading and self.transport is not None and not self.transport.is_closing():
            self.paused_reading = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused_reading and self.transport is not None and not self.transport.is_closing():
            self.paused_reading = False
            self.transport.resume_reading()


class _Flow:
    """One direction of one connection: chunks read from ``src``, delayed, paced, sliced, written to ``dst``."""

    def __init__(self, proxy: FaultProxy, conn: _Conn, name: str) -> None:
        self.proxy = proxy
        self.conn = conn
        self.name = name  # "up" or "down"
        self.src: _Side | None = None
        self.dst: _Side | None = None
        self.queue: deque[tuple[float, bytes]] = deque()  # (due time, chunk); b"" is an end of stream
        self.held = 0
        self.last_due = 0.0
        self.wake = asyncio.Event()
        self.pace_at = 0.0  # bandwidth: the earliest time the next byte may go
        self.budget: int | None = None  # reset_after: bytes left before a reset
        self.task: asyncio.Task[None] | None = None

    @property
    def faults(self) -> LinkFaults:
        return self.proxy._faults[self.name]

    def push(self, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        f = self.faults
        delay = f.latency + (self.proxy._random.uniform(-f.jitter, f.jitter) if f.jitter else 0.0)
        due = max(loop.time() + max(delay, 0.0), self.last_due)  # never overtake the chunk before
        self.last_due = due
        self.queue.append((due, data))
        self.held += len(data)
        if self.held >= HOLD_BYTES and self.src is not None:
            self.src.pause()
        self.wake.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.queue:
                self.wake.clear()
                await self.wake.wait()
            due, data = self.queue[0]
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            if not data:  # end of stream from the source: half close the destination
                self.queue.popleft()
                await self._flowing()
                dst = self.dst.transport if self.dst else None
                if dst is not None and not dst.is_closing() and dst.can_write_eof():
                    dst.write_eof()
                self.conn.half_closed(self)
                return
            if not await self._send(data):
                return  # reset_after: the connection was reset
            self.queue.popleft()
            self.held -= len(data)
            if self.held < HOLD_BYTES // 2 and self.src is not None:
                self.src.resume()

    async def _flowing(self) -> None:
        """Wait while this direction is blackholed."""
        while self.faults.blackhole:
            await self.proxy._changed_event().wait()

    async def _send(self, data: bytes) -> bool:
        """Write ``data`` under the faults in force; False when the connection was reset instead."""
        loop = asyncio.get_running_loop()
        view = memoryview(data)
        while view:
            await self._flowing()
            f = self.faults
            size = min(len(view), f.slice) if f.slice > 0 else len(view)
            if self.budget is not None:
                size = min(size, max(self.budget, 0))
                if size == 0:
                    self.conn.reset(by_proxy=True)
                    return False
            if f.bandwidth > 0:
                size = min(size, max(1, f.bandwidth // 100))  # pieces of 10 ms at most: a smooth pace
                now = loop.time()
                if self.pace_at - now > PACE_SLACK:  # ahead of the pace: wait for it
                    await asyncio.sleep(self.pace_at - now)
                    continue  # the faults may have changed while waiting
                self.pace_at = max(self.pace_at, now) + size / f.bandwidth
            piece, view = view[:size], view[size:]
            dst = self.dst.transport if self.dst is not None else None
            if dst is None or dst.is_closing():
                return False  # the connection is going away
            self.proxy._count(self.name, size)  # first: the peer may read it before this thread runs again
            dst.write(bytes(piece))  # one send (a TCP segment: TCP_NODELAY) per slice while the socket takes it
            if self.budget is not None:
                self.budget -= size
            if self.dst is not None and not self.dst.can_write.is_set():
                await self.dst.can_write.wait()
        return True


class _Conn:
    """A proxied connection: the accepted client socket, the dialled target socket, a flow each way."""

    def __init__(self, proxy: FaultProxy) -> None:
        self.proxy = proxy
        self.up = _Flow(proxy, self, "up")
        self.down = _Flow(proxy, self, "down")
        self.client = _Side(self, self.up)
        self.target: _Side | None = None
        self.up.src = self.client
        self.down.dst = self.client
        self.closed = False
        self.done_flows: set[str] = set()
        self.tasks: list[asyncio.Task[None]] = []
        for flow in (self.up, self.down):
            flow.budget = proxy._faults[flow.name].reset_after

    async def dial(self) -> None:
        """Wait while the up direction is blackholed, then connect to the target and start both flows."""
        try:
            while self.proxy._faults["up"].blackhole and not self.closed:
                await self.proxy._changed_event().wait()
            if self.closed:
                return
            loop = asyncio.get_running_loop()
            target = _Side(self, self.down)
            try:
                await loop.create_connection(lambda: target, *self.proxy.target)
            except OSError:
                self.reset(by_proxy=False)  # the target is not there: the client sees a reset
                return
            if self.closed:
                _rst(target.transport)
                return
            self.target = target
            self.down.src = target
            self.up.dst = target
            self.tasks = [asyncio.create_task(self.up.run()), asyncio.create_task(self.down.run())]
        except asyncio.CancelledError:
            self.reset(by_proxy=False)
            raise

    def half_closed(self, flow: _Flow) -> None:
        self.done_flows.add(flow.name)
        if self.done_flows == {"up", "down"}:
            self.close(rst=False)

    def lost(self, side: _Side, exc: Exception | None) -> None:
        """One socket went away. After an error (a reset) the other gets a reset too; after a clean close
        once both directions ended, nothing more to do; otherwise the other side is closed too."""
        if self.closed:
            return
        self.close(rst=exc is not None or self.done_flows != {"up", "down"})

    def reset(self, *, by_proxy: bool) -> None:
        if not self.closed and by_proxy:
            self.proxy.resets += 1
        self.close(rst=True)

    def close(self, *, rst: bool) -> None:
        if self.closed:
            return
        self.closed = True
        self.proxy._conns.discard(self)
        for side in (self.client, self.target):
            if side is not None and side.transport is not None:
                if rst:
                    _rst(side.transport)
                else:
                    side.transport.close()
        current = asyncio.current_task()
        for task in self.tasks:
            if task is not current:
                task.cancel()
        self.proxy._wake()  # a dial waiting on a blackhole sees the connection closed


class FaultProxy:
    """A TCP proxy from a local port to ``target`` that injects latency, jitter, bandwidth limits, slicing,
    resets, blackholes and cuts (see the module docstring). ``port=0``: a free port, chosen at the first
    :meth:`start` and kept across cuts."""

    def __init__(
        self, target: tuple[str, int], host: str = "127.0.0.1", port: int = 0, *, seed: int | None = None
    ) -> None:
        self.target = target
        self.host = host
        self.port = port
        self.accepted = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.resets = 0
        self._faults: dict[str, LinkFaults] = {"up": LinkFaults(), "down": LinkFaults()}
        self._random = random.Random(seed)
        self._conns: set[_Conn] = set()
        self._server: asyncio.Server | None = None
        self._changed: asyncio.Event | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy", daemon=True)
        self._thread.start()

    # -- the caller's side: plain calls from any thread --------------------------------------------------

    @property
    def address(self) -> str:
        """``host:port`` where the proxy listens."""
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        """Listening (not cut)."""
        return self._server is not None

    @property
    def open(self) -> int:
        """Connections open now."""
        return len(self._conns)

    def faults(self, direction: Literal["up", "down"]) -> LinkFaults:
        """The faults set now in ``direction``."""
        return self._faults[_directions(direction)[0]]

    def start(self) -> Self:
        """Listen (again, after a :meth:`cut`) on the proxy's port; the other faults stay as they are."""
        self._call(self._start())
        return self

    def set(
        self,
        *,
        latency: float | None = None,
        jitter: float | None = None,
        bandwidth: int | None = None,
        slice: int | None = None,
        direction: Direction = "both",
    ) -> Self:
        """Change the named faults in ``direction`` (the others stay): they apply to open connections at
        once (latency and jitter to bytes read from now on). ``0`` turns one off."""
        for name, value in (("latency", latency), ("jitter", jitter), ("bandwidth", bandwidth), ("slice", slice)):
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, not {value}")
        changes = {
            k: v
            for k, v in {"latency": latency, "jitter": jitter, "bandwidth": bandwidth, "slice": slice}.items()
            if v is not None
        }
        dirs = _directions(direction)
        self._run(lambda: self._update(dirs, changes))
        return self

    def blackhole(self, direction: Direction = "both") -> Self:
        """Forward nothing in ``direction`` and keep every connection open; new ones are accepted and held."""
        self._run(lambda: self._update(_directions(direction), {"blackhole": True}))
        return self

    def reset_after(self, nbytes: int | None, direction: Direction = "both") -> Self:
        """Reset each connection once it forwarded ``nbytes`` more bytes in ``direction`` (every new
        connection too, from its start); ``None`` clears it."""
        if nbytes is not None and nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, not {nbytes}")
        dirs = _directions(direction)

        def apply() -> None:
            self._update(dirs, {"reset_after": nbytes})
            for conn in self._conns:
                for flow in (conn.up, conn.down):
                    if flow.name in dirs:
                        flow.budget = nbytes

        self._run(apply)
        return self

    def reset_all(self) -> int:
        """Reset every open connection now (the proxy keeps listening); how many were reset."""

        def apply() -> int:
            conns = list(self._conns)
            for conn in conns:
                conn.reset(by_proxy=True)
            return len(conns)

        return self._run(apply)

    def cut(self) -> Self:
        """Stop listening (connects are refused) and reset every open connection, until :meth:`start` or
        :meth:`heal`."""
        self._call(self._cut())
        return self

    def heal(self) -> Self:
        """Clear every fault and listen again: a clean link."""

        def apply() -> None:
            self._update(("up", "down"), {f: getattr(LinkFaults(), f) for f in LinkFaults.__dataclass_fields__})
            for conn in self._conns:
                conn.up.budget = conn.down.budget = None

        self._run(apply)
        return self.start()

    def close(self) -> None:
        """Cut, and end the proxy's thread."""
        if self._loop.is_closed():
            return
        self.cut()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"FaultProxy({self.address} -> {self.target[0]}:{self.target[1]}, up={self._faults['up']}, "
            f"down={self._faults['down']}, running={self.running}, open={self.open}, accepted={self.accepted}, "
            f"bytes_up={self.bytes_up}, bytes_down={self.bytes_down}, resets={self.resets})"
        )

    # -- the proxy's loop ----------------------------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _run(self, fn: Callable[[], T]) -> T:
        async def call() -> T:
            return fn()

        return self._call(call())

    def _changed_event(self) -> asyncio.Event:
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    def _wake(self) -> None:
        """Wake everything waiting for a change (a blackholed flow, a held dial) to look again; later
        waits use a fresh event, so a waiter that finds nothing changed sleeps again instead of spinning."""
        old, self._changed = self._changed_event(), asyncio.Event()
        old.set()

    def _update(self, dirs: tuple[str, ...], changes: dict[str, Any]) -> None:
        for d in dirs:
            self._faults[d] = replace(self._faults[d], **changes)
        self._wake()

    def _count(self, direction: str, n: int) -> None:
        if direction == "up":
            self.bytes_up += n
        else:
            self.bytes_down += n

    async def _start(self) -> None:
        if self._server is not None:
            return
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        self._server = await self._loop.create_server(self._accept, sock=sock)

    def _accept(self) -> _Side:
        conn = _Conn(self)
        self._conns.add(conn)
        self.accepted += 1
        conn.tasks = []
        task = asyncio.get_running_loop().create_task(conn.dial())
        conn.tasks.append(task)
        return conn.client

    async def _cut(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        conns = list(self._conns)
        for conn in conns:
            conn.reset(by_proxy=True)
        if tasks := [t for conn in conns for t in conn.tasks if not t.done()]:
            await asyncio.wait(tasks, timeout=5)  # let the cancelled flows end
        if server is not None:
            await server.wait_closed()
