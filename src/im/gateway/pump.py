"""What the TCP and WebSocket pumps share: one hub :class:`Connection` on one accepted TCP socket.

A pump is an :class:`asyncio.Protocol`: the event loop hands it each read as ``bytes``, and it writes to
the loop's transport. :class:`SocketConnection` holds the plumbing that does not depend on the wire
format; the subclasses (:class:`~im.gateway.tcp_connection.TcpConnection`,
:class:`~im.gateway.ws_connection.WsConnection`) turn bytes into ``on_data`` calls through their
sans-I/O framing core and frames back into bytes:

- admission: a :class:`~im.net.Ticket` taken when the connection is made and given back exactly once when
  it is lost; a shed connection gets the subclass's refusal (:meth:`SocketConnection.shed`) and is closed
  at once;
- ``TCP_NODELAY`` on every connection not shed (frames are small and latency-bound);
- one timer (the subclass's handshake timer, then the close timer) that aborts a peer that stalls;
- the closing half-close (:meth:`SocketConnection.half_close`): FIN after what is queued, then read and
  drop until the client closes its side, at most ``close_timeout`` seconds. Closing at once with unread
  client data would make the kernel reset the connection, and a reset can destroy the last frames (the
  ``bye``, the close frame) before the client reads them;
- ``buffered``/``pause_reading`` for the hub's slow-consumer and shutdown rules; asyncio's own
  ``pause_writing``/``resume_writing`` are ignored, since the hub's buffer check decides about slow
  consumers.

Over TLS (a :class:`~im.net.TlsAccept` listener) the same code runs on the TLS transport, which is made
only once the handshake is done: admission counts the connection from then on (the listener caps
handshakes in progress). ``TCP_NODELAY`` is set on the socket underneath (``get_extra_info("socket")``
passes through). ``buffered`` counts the plaintext not yet encrypted and the ciphertext not yet handed to
the socket's transport: uvloop stops handing ciphertext over while that transport is above its own
high-water mark (64 KiB), so the slow-consumer limit keeps its meaning, give or take those 64 KiB. TLS
has no half-close (``can_write_eof`` is False), so :meth:`SocketConnection.half_close` closes instead:
the TLS close sends close_notify after what is queued and then reads and drops until the client's
close_notify or EOF, at most the listener's ``shutdown_timeout`` seconds, which keeps the same promise
(no reset under the client's last unread bytes).
"""

from __future__ import annotations

import abc
import asyncio
import socket

from im.gateway.hub import Connection, ConnectionHub
from im.net import Admission, Ticket, Verdict

#: Seconds a closing connection waits for the client to close its side before it is aborted.
CLOSE_TIMEOUT = 5.0


class SocketConnection(asyncio.Protocol, Connection):
    """A hub :class:`Connection` driven by asyncio's protocol callbacks on one TCP socket.

    Subclasses implement :meth:`data_received`, :meth:`shed` and :meth:`admitted`, and the
    :class:`Connection` methods ``write`` and ``close_transport``.
    """

    __slots__ = ("_admission", "_close_timeout", "_eof_sent", "_ticket", "_timer", "transport")

    def __init__(self, hub: ConnectionHub, admission: Admission, *, close_timeout: float = CLOSE_TIMEOUT) -> None:
        Connection.__init__(self, hub)
        self._admission = admission
        self._ticket: Ticket | None = None
        self._close_timeout = close_timeout
        self.transport: asyncio.Transport | None = None
        self._eof_sent = False  # we half-closed: what the client still sends is read and dropped
        self._timer: asyncio.TimerHandle | None = None

    # --- asyncio.Protocol --------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport subclass
        ticket = self._ticket = self._admission.admit(transport.get_extra_info("peername"))
        if ticket.verdict is Verdict.SHED:  # the refusal, and close at once
            self.cancel_timer()
            self.shed(ticket.reason)
            transport.close()
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.admitted(ticket)

    def eof_received(self) -> bool | None:
        return None  # the client closed its side: close ours (what is queued is still written)

    def connection_lost(self, exc: Exception | None) -> None:
        self.cancel_timer()
        if self._ticket is not None:
            self._admission.release(self._ticket)
        self.on_closed()

    def pause_writing(self) -> None:  # the hub's buffer check handles slow consumers
        pass

    def resume_writing(self) -> None:
        pass

    # --- what a subclass adds ------------------------------------------------------------------------

    @abc.abstractmethod
    def shed(self, reason: str) -> None:
        """Write the wire format's refusal (the connection is closed right after, with no handshake)."""

    @abc.abstractmethod
    def admitted(self, ticket: Ticket) -> None:
        """The connection is set up and not shed; ``ticket`` says whether it is admitted or refused."""

    # --- Connection ----------------------------------------------------------------------------------

    def buffered(self) -> int:
        return self.transport.get_write_buffer_size() if self.transport is not None else 0

    def pause_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    # --- closing -------------------------------------------------------------------------------------

    def write_raw(self, data: bytes) -> None:
        """Write bytes as they are, unless the transport is gone or closing."""
        t = self.transport
        if t is not None and not t.is_closing():
            t.write(data)

    def half_close(self, *, resume_reading: bool = False) -> None:
        """Half-close after what is queued (once), then abort if the client has not closed its side within
        ``close_timeout`` seconds. ``resume_reading`` also undoes a ``pause_reading`` (a stopping server
        paused reads), so the client's last bytes are drained and its FIN is seen. Without half-close
        support (TLS), close: the TLS close flushes what is queued, sends close_notify and drains the
        client's last bytes itself, bounded by the listener's ``shutdown_timeout``."""
        t = self.transport
        if t is None or t.is_closing() or self._eof_sent:
            return
        self._eof_sent = True
        self.cancel_timer()
        if not t.can_write_eof():
            t.close()
            return
        t.write_eof()
        if resume_reading:
            t.resume_reading()
        self.start_timer(self._close_timeout)

    def start_timer(self, delay: float) -> None:
        """Abort the connection in ``delay`` seconds, unless :meth:`cancel_timer` is called first."""
        self._timer = asyncio.get_running_loop().call_later(delay, self._expire)

    def cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        if self.transport is not None:
            self.transport.abort()
