"""The seam between the SDK and the network: the :class:`Transport` interface and its implementations.

A transport carries whole protocol frames (already encoded bytes) in both directions and knows nothing of
their meaning; :class:`~im.client.session.ClientSession` does. The interface is five abstract methods --
:meth:`~Transport.connect`, :meth:`~Transport.send`, :meth:`~Transport.recv`, :meth:`~Transport.close`,
:meth:`~Transport.abort` -- plus :meth:`~Transport.send_many` (one frame at a time unless overridden), the
``encoding`` attribute and ``async with``. Implementations:

- :class:`WebSocketTransport` -- RFC 6455 via picows (the client side; the server has its own sans-I/O
  protocol); one frame per WebSocket message, text for JSON, binary for MessagePack (docs/protocol.md
  section 3). ``ws://`` or, with TLS, ``wss://``.
- :class:`TcpTransport` -- TCP with the 5-byte header of docs/protocol.md "TCP framing"; the framing
  itself is the sans-I/O :class:`~im.protocol.tcp_framing.TcpFramer` the TCP gateway uses too, in its
  strict form (frames over ``max_frame`` or with an unknown encoding byte abort the connection).
  ``tcp://`` or, with TLS, ``tls://``.
- :class:`MemoryTransport` -- an in-process pair, for tests (``a, b = MemoryTransport.pair()``).

TLS (``wss://``, ``tls://``): the server's certificate and host name are verified against the system CA
store, or only against ``ca_file`` when given; ``ssl_context`` replaces both with your own context (client
certificates, pinning). ``insecure_skip_verify=True`` verifies nothing and logs a warning at every
connection. A refused certificate raises :class:`~im.client.tls.TlsVerificationError` from
:meth:`~Transport.connect`; a secure URL is never tried in plaintext (see :mod:`im.client.tls`).

Example::

    async with TcpTransport("tcp://127.0.0.1:8082") as t:
        t.send(b'{"t":"ping","id":1}')
        print(await t.recv())          # b'{"t":"pong","id":1}'

Received frames wait in a small in-memory queue; past ``max_queue`` frames the transport stops reading the
socket until the consumer catches up (the server then applies its own slow-consumer policy).
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import msgspec
from picows import WSCloseCode, WSFrame, WSInvalidStatusError, WSListener, WSMsgType, WSTransport, ws_connect

from im.client.tls import TlsVerificationError, client_context, trust_of, verification_error, warn_insecure
from im.protocol.codec import Encoding
from im.protocol.tcp_framing import DEFAULT_MAX_FRAME, TcpFramer, TcpFramingError, encode_frame, encode_frames

__all__ = [
    "GatewayRefused",
    "MemoryTransport",
    "TcpFramer",
    "TcpFramingError",
    "TcpTransport",
    "Transport",
    "TransportClosed",
    "WebSocketTransport",
    "tcp_frame",
]


class TransportClosed(ConnectionError):
    """Raised by :meth:`Transport.send` when the connection is gone."""


class GatewayRefused(ConnectionError):
    """The gateway answered the WebSocket upgrade with an HTTP error instead of ``101``: 503 when it is
    over a connection cap (docs/protocol.md section 3, "Connection caps"), with ``Retry-After``.
    ``retry_after``: the seconds it asked for (None: it did not say, or not in seconds). A
    :class:`Client` waits at least that long before its next attempt."""

    def __init__(self, status: int, retry_after: float | None, message: str) -> None:
        super().__init__(f"the gateway refused the connection: HTTP {status} {message}".rstrip())
        self.status = status
        self.retry_after = retry_after


def _refused(exc: WSInvalidStatusError) -> GatewayRefused:
    """The HTTP answer to an upgrade as a :class:`GatewayRefused` (its ``Retry-After`` in seconds, and the
    ``message`` of an im error body when it has one)."""
    response = exc.response
    if response is None:
        return GatewayRefused(0, None, str(exc))
    header = str(response.headers.get("retry-after", "")).strip()
    try:
        message = str(msgspec.json.decode(exc.raw_body or b"{}").get("message", ""))
    except (msgspec.DecodeError, AttributeError):
        message = ""
    return GatewayRefused(int(response.status), float(header) if header.isdigit() else None, message[:200])


class _Tls:
    """The TLS options of one transport: the context is built once, at the first secure connect."""

    __slots__ = ("_ctx", "ca_file", "insecure_skip_verify", "ssl_context")

    def __init__(
        self,
        ssl_context: ssl.SSLContext | None,
        ca_file: str | os.PathLike[str] | None,
        insecure_skip_verify: bool,
    ) -> None:
        if ssl_context is not None and (ca_file is not None or insecure_skip_verify):
            raise ValueError("give ssl_context or ca_file/insecure_skip_verify, not both")
        if ca_file is not None and insecure_skip_verify:
            raise ValueError("ca_file and insecure_skip_verify contradict each other: give one")
        self.ssl_context = ssl_context
        self.ca_file = ca_file
        self.insecure_skip_verify = insecure_skip_verify
        self._ctx = ssl_context

    def context(self, url: str) -> ssl.SSLContext:
        ctx = self._ctx
        if ctx is None:
            ctx = self._ctx = client_context(ca_file=self.ca_file, insecure_skip_verify=self.insecure_skip_verify)
        warn_insecure(ctx, url)
        return ctx

    def refused(self, url: str, exc: BaseException) -> TlsVerificationError | None:
        """The clear error for a refused certificate behind ``exc``, or None for other failures."""
        cause = verification_error(exc)
        if cause is None or self._ctx is None:
            return None
        return TlsVerificationError(url, cause.verify_message or str(cause), trust_of(self._ctx, self.ca_file))

    def raise_if_refused(self, url: str, exc: BaseException) -> None:
        """Raise the clear error when ``exc`` is a refused certificate (the caller re-raises ``exc`` else)."""
        refused = self.refused(url, exc)
        if refused is not None:
            raise refused from exc


class Transport(ABC):
    """One connection carrying encoded frames. Close it with ``async with`` or :meth:`close`.

    Guarantees: frames arrive whole and in order; :meth:`recv` returns ``None`` once, and ever after, when
    the connection is closed (by either side or by a failure). :meth:`send` never blocks: it queues the
    bytes in the OS/event-loop buffers and raises :class:`TransportClosed` if the connection is gone.
    """

    encoding: Encoding
    #: Whether the connection is encrypted (``wss://``, ``tls://``).
    secure: bool = False
    #: Set when the server ended the connection asking to be left alone for a while (a WebSocket close
    #: 1013, "try again later": over a connection cap): the seconds to wait at least before the next
    #: attempt (docs/protocol.md section 3, "Connection caps", :data:`TRY_AGAIN_AFTER`). None: no such request.
    retry_after: float | None = None

    @abstractmethod
    async def connect(self) -> None:
        """Open the connection (raises ``OSError`` or ``asyncio.TimeoutError`` when it cannot)."""

    @abstractmethod
    def send(self, data: bytes) -> None:
        """Write one encoded frame."""

    def send_many(self, frames: list[bytes]) -> None:
        """Write several frames, in order (implementations may join them into one write)."""
        for data in frames:
            self.send(data)

    @abstractmethod
    async def recv(self) -> bytes | None:
        """The next frame, or ``None`` when the connection is closed."""

    @abstractmethod
    async def close(self) -> None:
        """Close gracefully (idempotent)."""

    @abstractmethod
    def abort(self) -> None:
        """Drop the connection at once, without a closing handshake (tests use it to simulate a failure)."""

    async def __aenter__(self) -> Transport:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


class _Inbox:
    """Received frames, waiting for :meth:`get`; pauses the producer past ``high`` frames."""

    __slots__ = ("_paused", "_waiter", "closed", "frames", "high", "pause", "resume")

    def __init__(self, high: int, pause: Callable[[], None] | None = None, resume: Callable[[], None] | None = None):
        self.frames: deque[bytes] = deque()
        self.closed = False
        self.high = high
        self.pause = pause
        self.resume = resume
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None

    def put(self, data: bytes) -> None:
        self.frames.append(data)
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)
        if len(self.frames) >= self.high and not self._paused and self.pause is not None:
            self._paused = True
            self.pause()

    def close(self) -> None:
        self.closed = True
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def get(self) -> bytes | None:
        frames = self.frames
        while not frames:
            if self.closed:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = frames.popleft()
        if self._paused and len(frames) <= self.high // 2:
            self._paused = False
            if self.resume is not None and not self.closed:
                self.resume()
        return data


# --- WebSocket ----------------------------------------------------------------------------------------


#: Seconds to wait at least after a WebSocket close 1013 (a close frame carries no Retry-After; the
#: protocol's caps ask for the HTTP refusal's 5 s in every case: docs/protocol.md section 3).
TRY_AGAIN_AFTER = 5.0


class _WsListener(WSListener):
    def __init__(self, inbox: _Inbox, max_frame: int, try_again_later: Callable[[], None]) -> None:
        super().__init__()
        self.inbox = inbox
        self.max_frame = max_frame
        self._parts: list[bytes] = []
        self._size = 0
        self.try_again_later = try_again_later  # called when the server closes with 1013

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind is WSMsgType.TEXT or kind is WSMsgType.BINARY:
            if frame.fin:
                self.inbox.put(frame.get_payload_as_bytes())
            else:
                self._parts = [frame.get_payload_as_bytes()]
                self._size = len(self._parts[0])
        elif kind is WSMsgType.CONTINUATION:
            if not self._parts:
                return
            self._size += frame.payload_size
            if self._size > self.max_frame:  # RFC 6455 section 10.4: the endpoint may close with 1009
                transport.send_close(WSCloseCode.MESSAGE_TOO_BIG)
                transport.disconnect()
                return
            self._parts.append(frame.get_payload_as_bytes())
            if frame.fin:
                data = b"".join(self._parts)
                self._parts = []
                self.inbox.put(data)
        elif kind is WSMsgType.CLOSE:
            code = frame.get_close_code()
            if code == WSCloseCode.TRY_AGAIN_LATER:
                self.try_again_later()
            transport.send_close(code, frame.get_close_message())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.inbox.close()


class WebSocketTransport(Transport):
    """A WebSocket connection (picows client) to a gateway URL such as ``ws://127.0.0.1:8081/ws`` or
    ``wss://chat.example.com/ws``.

    JSON frames travel as text messages, MessagePack ones as binary messages; the first message fixes the
    connection's encoding on the server, so one transport uses one ``encoding``. TLS options: see the
    module docstring. A ``wss://`` handshake follows no HTTP redirect (one could lead to ``ws://``).
    """

    def __init__(
        self,
        url: str,
        *,
        encoding: Encoding = Encoding.JSON,
        connect_timeout: float = 10.0,
        max_frame: int = DEFAULT_MAX_FRAME,
        max_queue: int = 65536,
        local_addr: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        insecure_skip_verify: bool = False,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        scheme = urlsplit(url).scheme.lower()
        if scheme not in ("ws", "wss"):
            raise ValueError(f"not a ws:// or wss:// URL: {url!r}")
        self.url = url
        self.secure = scheme == "wss"
        self._tls = _Tls(ssl_context, ca_file, insecure_skip_verify)
        self.encoding = encoding
        self.connect_timeout = connect_timeout
        self.max_frame = max_frame
        #: Source address to connect from (many client connections need several 127.0.0.x addresses).
        self.local_addr = local_addr
        self._kind = WSMsgType.TEXT if encoding is Encoding.JSON else WSMsgType.BINARY
        self._ws: WSTransport | None = None
        self._inbox = _Inbox(max_queue, self._pause, self._resume)

    def _pause(self) -> None:
        if self._ws is not None:
            self._ws.underlying_transport.pause_reading()

    def _resume(self) -> None:
        if self._ws is not None and not self._ws.is_disconnected:
            self._ws.underlying_transport.resume_reading()

    async def connect(self) -> None:
        inbox, max_frame = self._inbox, self.max_frame
        ctx = self._tls.context(self.url) if self.secure else None
        try:
            ws, _ = await asyncio.wait_for(
                ws_connect(
                    lambda: _WsListener(inbox, max_frame, self._told_to_wait),
                    self.url,
                    ssl_context=ctx,
                    max_redirects=0 if self.secure else 5,
                    websocket_handshake_timeout=self.connect_timeout,
                    max_frame_size=max_frame,
                    enable_auto_pong=True,
                    read_buffer_init_size=4096,
                    socket_factory=self._bound_socket if self.local_addr else None,
                ),
                self.connect_timeout,
            )
        except WSInvalidStatusError as exc:
            raise _refused(exc) from None
        except OSError as exc:
            if self.secure:
                self._tls.raise_if_refused(self.url, exc)
            raise
        self._ws = ws
        sock = ws.underlying_transport.get_extra_info("socket")
        if sock is not None and not ws.is_disconnected:  # a refusal (close 1013) may have closed it already
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _told_to_wait(self) -> None:
        self.retry_after = TRY_AGAIN_AFTER

    def _bound_socket(self, url: Any) -> socket.socket:
        """An unconnected socket bound to ``local_addr`` (picows connects it)."""
        family = socket.AF_INET6 if ":" in (self.local_addr or "") else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.bind((self.local_addr, 0))
        return sock

    def send(self, data: bytes) -> None:
        ws = self._ws
        if ws is None or ws.is_disconnected:
            raise TransportClosed("the WebSocket is closed")
        ws.send(self._kind, data)

    async def recv(self) -> bytes | None:
        return await self._inbox.get()

    async def close(self) -> None:
        ws = self._ws
        if ws is None:
            self._inbox.close()
            return
        if not ws.is_disconnected:
            ws.send_close(WSCloseCode.OK)
            ws.disconnect()
            try:
                await asyncio.wait_for(ws.wait_disconnected(), 5.0)
            except TimeoutError:
                ws.disconnect(graceful=False)
        self._inbox.close()

    def abort(self) -> None:
        if self._ws is not None and not self._ws.is_disconnected:
            self._ws.disconnect(graceful=False)
        self._inbox.close()


# --- TCP ----------------------------------------------------------------------------------------------

# The framing is im.protocol.tcp_framing's; TcpFramer and TcpFramingError are re-exported from here, where
# the SDK has always offered them (docs/sdk.md), with tcp_frame, its encoder by Encoding.


def tcp_frame(payload: bytes, encoding: Encoding) -> bytes:
    """One TCP frame: length ``L`` (u32 big-endian) = 1 + payload size, the encoding byte, the payload."""
    return encode_frame(payload, encoding is Encoding.MSGPACK)


class _TcpProtocol(asyncio.Protocol):
    def __init__(self, inbox: _Inbox, framer: TcpFramer) -> None:
        self.inbox = inbox
        self.framer = framer
        self.transport: asyncio.Transport | None = None
        #: Done when the connection is gone (after a TLS close, once the close_notify exchange ended).
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.framer.feed(data)
        except TcpFramingError:
            assert self.transport is not None
            self.transport.abort()
            return
        put = self.inbox.put
        for payload in frames:
            put(payload)

    def connection_lost(self, exc: Exception | None) -> None:
        self.inbox.close()
        if not self.closed.done():
            self.closed.set_result(None)


class TcpTransport(Transport):
    """A TCP connection with length-prefixed frames to an address such as ``tcp://127.0.0.1:8082``, or the
    same over TLS: ``tls://chat.example.com:8082``.

    Every frame this side writes carries the transport's ``encoding`` byte (the server answers in the
    encoding of the first frame). TLS options: see the module docstring.
    """

    def __init__(
        self,
        url: str,
        *,
        encoding: Encoding = Encoding.JSON,
        connect_timeout: float = 10.0,
        max_frame: int = DEFAULT_MAX_FRAME,
        max_queue: int = 65536,
        local_addr: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        insecure_skip_verify: bool = False,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("tcp", "tls") or not parts.hostname or parts.port is None:
            raise ValueError(f"not a tcp://host:port or tls://host:port address: {url!r}")
        self.url = url
        self.secure = parts.scheme == "tls"
        self._tls = _Tls(ssl_context, ca_file, insecure_skip_verify)
        self.host, self.port = parts.hostname, parts.port
        self.encoding = encoding
        self.connect_timeout = connect_timeout
        self._binary = encoding is Encoding.MSGPACK
        self._transport: asyncio.Transport | None = None
        self._protocol: _TcpProtocol | None = None
        self._inbox = _Inbox(max_queue, self._pause, self._resume)
        self._framer = TcpFramer(max_frame)
        self.local_addr = local_addr  # source address to connect from, as for WebSocketTransport

    def _pause(self) -> None:
        if self._transport is not None:
            self._transport.pause_reading()

    def _resume(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        inbox, framer = self._inbox, self._framer
        ctx = self._tls.context(self.url) if self.secure else None
        try:
            transport, protocol = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _TcpProtocol(inbox, framer),
                    self.host,
                    self.port,
                    local_addr=(self.local_addr, 0) if self.local_addr else None,
                    ssl=ctx,
                    server_hostname=self.host if ctx is not None else None,
                    ssl_handshake_timeout=self.connect_timeout if ctx is not None else None,
                ),
                self.connect_timeout,
            )
        except OSError as exc:
            if self.secure:
                self._tls.raise_if_refused(self.url, exc)
            raise
        self._transport = transport
        self._protocol = protocol

    def send(self, data: bytes) -> None:
        t = self._transport
        if t is None or t.is_closing():
            raise TransportClosed("the TCP connection is closed")
        t.write(encode_frame(data, self._binary))

    def send_many(self, frames: list[bytes]) -> None:
        t = self._transport
        if t is None or t.is_closing():
            raise TransportClosed("the TCP connection is closed")
        t.write(encode_frames(frames, self._binary))

    async def recv(self) -> bytes | None:
        return await self._inbox.get()

    async def close(self) -> None:
        """Close and wait (at most 5 s, then abort) until the connection is gone: over TLS the close_notify
        exchange takes a round trip, and a transport left closing when its event loop ends leaks."""
        t, protocol = self._transport, self._protocol
        if t is not None and not t.is_closing():
            t.close()
        if t is not None and protocol is not None:
            try:
                await asyncio.wait_for(asyncio.shield(protocol.closed), 5.0)
            except TimeoutError:
                t.abort()
        self._inbox.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()
        self._inbox.close()


# --- in memory ----------------------------------------------------------------------------------------


class MemoryTransport(Transport):
    """One end of an in-process connection; :meth:`pair` makes both ends.

    What one end sends, the other receives, in order. Closing or aborting either end closes both. Tests
    use it to drive a :class:`~im.client.session.ClientSession` pump against a scripted "server".

    >>> client_end, server_end = MemoryTransport.pair()
    """

    def __init__(self, *, encoding: Encoding = Encoding.JSON) -> None:
        self.encoding = encoding
        self.peer: MemoryTransport | None = None
        self._inbox = _Inbox(1 << 30)
        self.connected = False

    @classmethod
    def pair(cls, *, encoding: Encoding = Encoding.JSON) -> tuple[MemoryTransport, MemoryTransport]:
        a, b = cls(encoding=encoding), cls(encoding=encoding)
        a.peer, b.peer = b, a
        return a, b

    async def connect(self) -> None:
        if self._inbox.closed:
            raise ConnectionRefusedError("memory transport already closed")
        self.connected = True

    def send(self, data: bytes) -> None:
        if self.peer is None or self._inbox.closed:
            raise TransportClosed("the memory transport is closed")
        self.peer._inbox.put(data)

    async def recv(self) -> bytes | None:
        return await self._inbox.get()

    async def close(self) -> None:
        self.abort()

    def abort(self) -> None:
        self._inbox.close()
        if self.peer is not None:
            self.peer._inbox.close()
