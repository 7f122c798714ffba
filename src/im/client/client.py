"""The high-level SDK: :class:`Client`, an asyncio pump around :class:`~im.client.session.ClientSession`.

It finds the gateway through the HTTP API, connects (WebSocket or TCP), authenticates with its cursors,
and keeps doing so: after a dropped connection, a ``bye`` that allows it, or a server restart, it
reconnects with jittered exponential back-off and resumes from its cursors. The application sees every
message once and in order, and every send is acked once -- resent with its original cmid until it is.

Example::

    async with await Client.login("http://127.0.0.1:8080", "alice", "correct horse", device="laptop") as c:
        ack = await c.send({"text": "hi bob"}, to=bob_uid)      # returns once the server stored it
        async for event in c.events():
            match event:
                case Message(conv=conv, seq=seq, sender=uid, body=body):
                    print(conv, seq, uid, body)
                    c.read(conv, seq)
                case Synced():
                    print("caught up")

Delivery (``recv``) is reported to the server for messages the application has *taken*: when it asks
for the next event (or returns from ``on_event``), the previous message counts as handled; reports are
batched every ``recv_delay`` seconds. With ``cursor_file`` the handled cursors and the outbox are also
saved to a JSON file (atomically: written aside, fsynced, renamed) at most every ``persist_interval``
seconds and on close, so a new process resumes where the last one stopped.

Built for load generation too: no task per message (one reader task and a few timer handles per
connection), frames encoded by msgspec, writes coalesced once per event-loop iteration, and
``post()`` / ``on_event=`` to skip the per-send future and the event queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import ssl
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import httpx
import msgspec
from picows import WSError

from im.client.api import ApiClient, ApiError, Gateway
from im.client.session import ClientSession, Event, SendFailed
from im.client.tls import PlaintextRefused, TlsError, is_secure
from im.client.transport import GatewayRefused, TcpTransport, Transport, WebSocketTransport
from im.protocol.codec import Encoding
from im.protocol.frames import Ack, AuthOk, Bye, Msg, Send, Synced

__all__ = ["Client", "ClientClosed", "ClientEvent", "Disconnected", "SendError"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Disconnected:
    """A connection ended. ``reconnect``: the client is reconnecting (False: it has stopped)."""

    reason: str
    reconnect: bool


ClientEvent = Event | Disconnected


class SendError(Exception):
    """A send was refused for good (the code is one of the final ones of docs/protocol.md section 7)."""

    def __init__(self, failed: SendFailed) -> None:
        super().__init__(f"{failed.code}: {failed.message}")
        self.send = failed.send
        self.code = failed.code
        self.message = failed.message


class ClientClosed(Exception):
    """The client was closed (or stopped for good) before the operation completed."""


class _Fatal(Exception):
    """Stop reconnecting: the cause needs the application (another connection took over, bad login)."""


_RETRYABLE_ERRORS = (OSError, TimeoutError, httpx.TransportError, WSError)


class _SavedState(msgspec.Struct):
    """The cursor file: handled cursors and unacked sends of one (uid, device)."""

    uid: int
    device: str
    cursors: dict[str, int] = {}
    outbox: list[Send] = []
    version: int = 1


class Client:
    """A connected chat device. Build with :meth:`login` (or construct around an :class:`ApiClient` and
    :meth:`start`); close with ``async with`` or :meth:`close`.

    Options (keyword-only): ``device`` (stable per installation: the server deduplicates sends and keeps delivery
    cursors per device name); ``transport`` ``"ws"`` or ``"tcp"``; ``encoding``; ``cursor_file``;
    ``backoff_base``/``backoff_max`` (seconds; the n-th reconnect waits a random 50-100 % of ``min(max, base *
    2**n)``, and never less than what the server asked: a refused login's ``retry_after``, or the ``Retry-After`` of
    an HTTP 503 from the API or from a gateway over its connection cap (:class:`GatewayRefused`), plus up to 20 %
    jitter); ``retry_delay`` (before resending a send refused with a retryable code); ``max_in_flight`` (unanswered
    sends written at once); ``recv_delay`` (batching of delivery reports); ``persist_interval``; ``on_event``
    (called with each event instead of queueing it for :meth:`events`); ``transport_factory`` (build the
    :class:`Transport` for a gateway, for tests or custom networks).

    TLS: the gateway connection uses the :class:`ApiClient`'s TLS options (``ca_file``,
    ``insecure_skip_verify``, ``ssl_context``; :meth:`login` takes them). A certificate the client refuses
    stops it for good (:class:`~im.client.tls.TlsVerificationError` in ``error``; retrying would meet the
    same certificate). When the API is reached over ``https://``, a gateway address without TLS (``ws://``,
    ``tcp://``) is refused the same way (:class:`~im.client.tls.PlaintextRefused`), never used: the login
    token would cross the network in clear.
    """

    def __init__(
        self,
        api: ApiClient,
        *,
        device: str = "python-sdk",
        transport: Literal["ws", "tcp"] = "ws",
        encoding: Encoding = Encoding.JSON,
        cursor_file: str | os.PathLike[str] | None = None,
        backoff_base: float = 0.1,
        backoff_max: float = 10.0,
        retry_delay: float = 0.2,
        max_in_flight: int = 1024,
        recv_delay: float = 0.05,
        persist_interval: float = 1.0,
        on_event: Callable[[ClientEvent], None] | None = None,
        transport_factory: Callable[[Gateway], Transport] | None = None,
        close_api: bool = False,
    ) -> None:
        self.api = api
        self.device = device
        self.transport_kind = transport
        self.encoding = encoding
        self.cursor_file = Path(cursor_file) if cursor_file is not None else None
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.retry_delay = retry_delay
        self.recv_delay = recv_delay
        self.persist_interval = persist_interval
        self.on_event = on_event
        self.transport_factory = transport_factory or self._default_transport
        self._close_api = close_api
        saved = self._load()
        self.session = ClientSession(
            device,
            encoding=encoding,
            cursors=saved.cursors if saved else None,
            outbox=saved.outbox if saved else (),
            max_in_flight=max_in_flight,
        )
        #: Connections made so far (tests and load generators read it).
        self.connections = 0
        #: Connection attempts started (the gateway lookup onwards), and how many of them the server
        #: answered with a wait (a refused login's ``retry_after``, or an HTTP 503's ``Retry-After``).
        self.attempts = 0
        self.told_to_wait = 0
        self.transport: Transport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._queue: deque[ClientEvent] = deque()
        self._queue_waiter: asyncio.Future[None] | None = None
        self._last_taken: ClientEvent | None = None
        self._waiters: dict[str, asyncio.Future[Ack]] = {}
        self._connected = asyncio.Event()
        self._synced = asyncio.Event()
        self._closing = False
        self._stopped = False
        self.error: BaseException | None = None  # why the client stopped on its own, if it did
        self._write_handle: asyncio.Handle | None = None
        self._flush_handle: asyncio.TimerHandle | None = None
        self._retry_handle: asyncio.TimerHandle | None = None
        self._tick_handle: asyncio.TimerHandle | None = None
        self._rx = 0  # frames received on this connection (for the liveness check)
        self._tx = False  # something written since the last heartbeat tick
        self._rx_at_tick = -1
        self._pinged = False
        self._refresh_token = False  # set by "bye auth_failed": refresh before the next auth
        self._dirty_state = saved is None and self.cursor_file is not None
        self._persisted_at = 0.0

    # --- construction and lifecycle -------------------------------------------------------------------

    @classmethod
    async def login(
        cls,
        base_url: str,
        username: str,
        password: str,
        *,
        device: str = "python-sdk",
        transport: Literal["ws", "tcp"] = "ws",
        cursor_file: str | os.PathLike[str] | None = None,
        connect_timeout: float = 30.0,
        ca_file: str | os.PathLike[str] | None = None,
        insecure_skip_verify: bool = False,
        ssl_context: ssl.SSLContext | None = None,
        **options: Any,
    ) -> Client:
        """Log in over HTTP(S), connect to the gateway and return once authenticated (``auth_ok``).
        ``ca_file``, ``insecure_skip_verify`` and ``ssl_context`` are the TLS options of :class:`ApiClient`
        (used for the gateway too)."""
        api = ApiClient(base_url, ca_file=ca_file, insecure_skip_verify=insecure_skip_verify, ssl_context=ssl_context)
        try:
            await api.login(username, password)
            client = cls(api, device=device, transport=transport, cursor_file=cursor_file, close_api=True, **options)
        except BaseException:
            await api.aclose()
            raise
        client.start()
        try:
            await client.wait_connected(connect_timeout)
        except BaseException:
            await client.close()
            raise
        return client

    def start(self) -> None:
        """Start connecting (and reconnecting) in the background; returns at once."""
        if self._task is not None:
            raise RuntimeError("already started")
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._run(), name=f"im-client-{self.device}")

    async def __aenter__(self) -> Client:
        if self._task is None:
            self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Report delivery of what the application took, save the cursor file, close the connection."""
        if self._closing:
            return
        self._closing = True
        self._take(None)
        session, transport = self.session, self.transport
        if transport is not None:
            session.flush_recv()
            if session.has_data_to_send:
                with contextlib.suppress(ConnectionError):
                    transport.send_many(session.data_to_send())
            with contextlib.suppress(Exception):
                await transport.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._stop()
        self.save()
        if self._close_api:
            await self.api.aclose()

    def _stop(self) -> None:
        self._stopped = True
        for handle in (self._write_handle, self._flush_handle, self._retry_handle, self._tick_handle):
            if handle is not None:
                handle.cancel()
        waiters, self._waiters = self._waiters, {}
        for fut in waiters.values():
            if not fut.done():
                fut.set_exception(ClientClosed("the client stopped before the send was acked"))
        self._connected.set()  # wake wait_connected() so it can raise
        self._wake_consumer()

    # --- application API ------------------------------------------------------------------------------

    @property
    def uid(self) -> int:
        return self.api.uid

    @property
    def cursors(self) -> dict[str, int]:
        """conv -> highest seq received (the application may not have taken all of them yet)."""
        return self.session.cursors

    @property
    def outbox(self) -> dict[str, Send]:
        """cmid -> send not acked yet, in order."""
        return self.session.outbox

    async def send(
        self, body: Any, *, conv: str | None = None, to: int | None = None, type: str = "text", cmid: str | None = None
    ) -> Ack:
        """Send a message and return its ``Ack`` once the server has stored it.

        Give exactly one of ``conv`` and ``to``. The send is retried with the same cmid across
        reconnects until acked; a final refusal raises :class:`SendError`. Cancelling the wait does not
        withdraw the send (it stays in the outbox and its ``Ack`` still arrives as an event).
        """
        if self._stopped:
            raise ClientClosed("the client is closed")
        send = self.session.send(body, conv=conv, to=to, type=type, cmid=cmid)
        fut = self._waiters.get(send.cmid)
        if fut is None or fut.done():
            assert self._loop is not None, "start() the client first"
            fut = self._waiters[send.cmid] = self._loop.create_future()
        self._sent()
        return await fut

    async def send_file(
        self,
        data: bytes | str | os.PathLike[str],
        filename: str | None = None,
        *,
        conv: str | None = None,
        to: int | None = None,
        caption: str | None = None,
    ) -> Ack:
        """Upload a file (skipped when the server has the bytes) and send it as an ``image`` message
        (for image types the server recognised) or a ``file`` message; body ``{file_id, name, size,
        content_type, width, height[, caption]}`` (docs/protocol.md, "Image and file messages")."""
        info = await self.api.upload(data, filename)
        body: dict[str, Any] = {
            "file_id": info.file_id,
            "name": info.name or filename,
            "size": info.size,
            "content_type": info.content_type,
            "width": info.width,
            "height": info.height,
        }
        if caption is not None:
            body["caption"] = caption
        kind = "image" if info.content_type.startswith("image/") and info.width is not None else "file"
        return await self.send(body, conv=conv, to=to, type=kind)

    def post(
        self, body: Any, *, conv: str | None = None, to: int | None = None, type: str = "text", cmid: str | None = None
    ) -> str:
        """Send without waiting: return the cmid; the ``Ack`` (or ``SendFailed``) arrives as an event."""
        if self._stopped:
            raise ClientClosed("the client is closed")
        send = self.session.send(body, conv=conv, to=to, type=type, cmid=cmid)
        self._sent()
        return send.cmid

    def read(self, conv: str, seq: int) -> None:
        """Mark ``conv`` read up to ``seq`` (other members get a ``read`` receipt). Dropped if offline."""
        self.session.read(conv, seq)
        self._schedule_write()

    def typing(self, conv: str) -> None:
        """Tell the other members the user is typing in ``conv``. Dropped if offline."""
        self.session.typing(conv)
        self._schedule_write()

    async def events(self) -> AsyncIterator[ClientEvent]:
        """Events in arrival order: ``Msg`` (each message once, in seq order per conversation), ``Ack``
        (each send once), ``SendFailed``, ``AuthOk``, ``Synced``, ``Receipt``, ``TypingEvent``, ``Error``,
        ``Bye``, ``Disconnected``. Ends when the client is closed or stops for good."""
        queue = self._queue
        while True:
            self._take(None)
            while not queue:
                if self._stopped:
                    return
                assert self._loop is not None
                self._queue_waiter = self._loop.create_future()
                try:
                    await self._queue_waiter
                finally:
                    self._queue_waiter = None
            event = queue.popleft()
            self._last_taken = event
            yield event

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait for the current (or next) connection's ``auth_ok``; raise if the client stopped."""
        await asyncio.wait_for(self._connected.wait(), timeout)
        if self._stopped:
            raise ClientClosed("the client stopped") from self.error

    async def wait_synced(self, timeout: float | None = None) -> None:
        """Wait until the current connection's replay is complete (``synced``)."""
        await asyncio.wait_for(self._synced.wait(), timeout)
        if self._stopped and not self._synced.is_set():
            raise ClientClosed("the client stopped") from self.error

    def save(self) -> None:
        """Write the cursor file now (handled cursors and the outbox), atomically."""
        if self.cursor_file is None or self.api.tokens is None:
            return
        state = _SavedState(
            uid=self.api.uid,
            device=self.device,
            cursors=dict(self.session.handled_cursors),
            outbox=list(self.session.outbox.values()),
        )
        path = self.cursor_file
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(msgspec.json.encode(state))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        self._dirty_state = False
        if self._loop is not None:
            self._persisted_at = self._loop.time()

    def _load(self) -> _SavedState | None:
        if self.cursor_file is None or not self.cursor_file.exists():
            return None
        state = msgspec.json.decode(self.cursor_file.read_bytes(), type=_SavedState)
        tokens = self.api.tokens
        if state.device != self.device or (tokens is not None and state.uid != tokens.uid):
            raise ValueError(
                f"{self.cursor_file} belongs to uid {state.uid} device {state.device!r}, "
                f"not uid {tokens.uid if tokens else '?'} device {self.device!r}"
            )
        return state

    # --- the pump ---------------------------------------------------------------------------------------

    def _default_transport(self, gateway: Gateway) -> Transport:
        api = self.api
        tls: dict[str, Any] = {"ca_file": api.ca_file, "insecure_skip_verify": api.insecure_skip_verify}
        if api.ssl_context is not None:
            tls = {"ssl_context": api.ssl_context}
        if self.transport_kind == "tcp":
            if gateway.tcp is None:
                raise _Fatal(f"gateway {gateway.node} has no TCP listener")
            url = gateway.tcp
        else:
            url = gateway.ws
        if is_secure(api.base_url) and not is_secure(url):
            raise PlaintextRefused(url, api.base_url)
        if self.transport_kind == "tcp":
            return TcpTransport(url, encoding=self.encoding, **tls)
        return WebSocketTransport(url, encoding=self.encoding, **tls)

    async def _run(self) -> None:
        attempt = 0
        try:
            while not self._closing:
                reason = "connection closed"
                self.session.auth_ok = None  # set again only if this attempt gets as far as auth_ok
                self.session.reconnect_after = None
                wait: float | None = None  # what the server asked this attempt to wait
                self.attempts += 1
                try:
                    reason = await self._connection()
                    wait = self.session.reconnect_after
                except (_Fatal, TlsError) as exc:
                    self._fail(exc, str(exc))
                    return
                except ApiError as exc:
                    if exc.status == 401:  # even after a refresh: the session is gone, log in again
                        self._fail(exc, f"API refused the tokens: {exc}")
                        return
                    reason = f"API: {exc}"
                    wait = exc.retry_after if exc.status in (429, 503) else None
                except GatewayRefused as exc:  # over a cap: what it asked, else our own backoff
                    reason = str(exc)
                    wait = exc.retry_after
                except _RETRYABLE_ERRORS as exc:
                    reason = f"{type(exc).__name__}: {exc}"
                if self._closing:
                    return
                if self.session.auth_ok is not None:  # this connection got as far as auth_ok
                    attempt = 0
                self._deliver(Disconnected(reason, reconnect=True))
                delay = min(self.backoff_max, self.backoff_base * 2**attempt) * random.uniform(0.5, 1.0)
                if wait is not None:  # the server's retry_after, plus up to 20 % jitter: never sooner
                    self.told_to_wait += 1
                    delay = max(delay, wait * random.uniform(1.0, 1.2))
                attempt = min(attempt + 1, 32)
                log.debug("im client %s: %s; reconnecting in %.2fs", self.device, reason, delay)
                await asyncio.sleep(delay)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # a bug: stop visibly rather than spin
            log.exception("im client %s stopped", self.device)
            self._fail(exc, f"internal error: {exc!r}")

    def _fail(self, exc: BaseException, reason: str) -> None:
        self.error = exc
        self._deliver(Disconnected(reason, reconnect=False))
        self._stop()

    async def _connection(self) -> str:
        """One connection, from finding the gateway to its end; returns why it ended."""
        if self.api.tokens is None:
            raise _Fatal("logged out")
        if self._refresh_token:
            await self.api.refresh()
            token = self.api.access_token
        else:
            token = await self.api.ensure_fresh()
        gateway = await self.api.gateway()
        transport = self.transport_factory(gateway)
        await transport.connect()
        session = self.session
        self.transport = transport
        self.connections += 1
        self._rx, self._rx_at_tick, self._tx, self._pinged = 0, -1, False, False
        self._connected.clear()
        self._synced.clear()
        try:
            try:
                transport.send(session.connect(token))
                reason = await self._pump(transport)
            except ConnectionError as exc:  # closed under the auth frame: a cap's 1013 can come that soon
                if transport.retry_after is None:
                    raise
                reason = f"{type(exc).__name__}: {exc}"
            if transport.retry_after is not None:  # closed "try again later"
                # A refused login said when in its error (retry_after), and the gateway spreads those
                # times out; only a close that said nothing (a connection cap) waits the protocol's 5 s.
                if session.reconnect_after is None:
                    session.reconnect_after = transport.retry_after
                reason = f"{reason}: the gateway asked to try again later"
            return reason
        finally:
            self.transport = None
            session.connection_lost()
            if self._tick_handle is not None:
                self._tick_handle.cancel()
            transport.abort()

    async def _pump(self, transport: Transport) -> str:
        session, recv, receive, deliver = self.session, transport.recv, self.session.receive, self._deliver
        while True:
            data = await recv()
            if data is None:
                return "connection closed"
            self._rx += 1
            event = receive(data)
            if event is not None:
                if type(event) is Msg:
                    deliver(event)
                elif type(event) is Ack:
                    fut = self._waiters.pop(event.cmid, None)
                    if fut is not None and not fut.done():
                        fut.set_result(event)
                    deliver(event)
                    self._dirty_state = True
                else:
                    reason = self._on_control(event)
                    if reason is not None:
                        return reason
            if session.has_data_to_send:
                self._schedule_write()
            if session.reconnect_reason is not None:
                return session.reconnect_reason
            if session.wants_retry and self._retry_handle is None:
                assert self._loop is not None
                # The server's retry_after (rate limits) when it asks for longer than our own delay.
                delay = min(max(self.retry_delay, session.retry_after), self.backoff_max * 6)
                self._retry_handle = self._loop.call_later(delay, self._retry)

    def _on_control(self, event: Event) -> str | None:
        """The less frequent events; returns a reason when the connection must end."""
        if type(event) is AuthOk:
            self._refresh_token = False
            self._connected.set()
            self._schedule_tick(event.heartbeat / 2)
        elif type(event) is Synced:
            self._synced.set()
        elif type(event) is SendFailed:
            fut = self._waiters.pop(event.send.cmid, None)
            if fut is not None and not fut.done():
                fut.set_exception(SendError(event))
            self._dirty_state = True
        self._deliver(event)
        if type(event) is Bye:
            if event.reconnect:
                return f"bye {event.code}"
            if event.code == "auth_failed" and not self._refresh_token:
                self._refresh_token = True  # the next connection refreshes first; a second failure is fatal
                return "bye auth_failed"
            raise _Fatal(f"the server closed the connection: bye {event.code} ({event.message})")
        return None

    # --- writes and timers ----------------------------------------------------------------------------

    def _sent(self) -> None:
        self._schedule_write()
        if self.cursor_file is not None:
            self._dirty_state = True
            self._schedule_flush()

    def _schedule_write(self) -> None:
        if self._write_handle is None and self._loop is not None and not self._stopped:
            self._write_handle = self._loop.call_soon(self._write)

    def _write(self) -> None:
        """Write everything the session queued since the last loop iteration, in one call."""
        self._write_handle = None
        session, transport = self.session, self.transport
        if transport is None or not session.has_data_to_send:
            return
        try:
            transport.send_many(session.data_to_send())
            self._tx = True
        except ConnectionError:
            transport.abort()  # the reader sees the end and reconnects

    def _retry(self) -> None:
        self._retry_handle = None
        self.session.retry()
        self._schedule_write()

    def _schedule_tick(self, interval: float) -> None:
        assert self._loop is not None
        self._tick_handle = self._loop.call_later(interval, self._tick, interval)

    def _tick(self, interval: float) -> None:
        """Every heartbeat/2: ping if nothing was written or nothing received since the last tick; drop
        the connection if a ping got no frame at all back within one tick (docs/protocol.md section 12)."""
        transport = self.transport
        if transport is None:
            return
        if self._pinged and self._rx == self._rx_at_tick:
            log.info("im client %s: no answer to ping; reconnecting", self.device)
            transport.abort()
            return
        self._pinged = False
        if not self._tx or self._rx == self._rx_at_tick:  # keep the server's idle timer, or probe a silence
            self.session.ping()
            self._pinged = True
            self._write()
        self._tx = False
        self._rx_at_tick = self._rx
        self._schedule_tick(interval)

    def _flush(self) -> None:
        """Batched delivery reports (``recv``) and cursor-file saves."""
        self._flush_handle = None
        self.session.flush_recv()
        self._write()
        if self._dirty_state and self.cursor_file is not None and self._loop is not None:
            if self._loop.time() - self._persisted_at >= self.persist_interval:
                self.save()
            else:
                self._schedule_flush()

    def _schedule_flush(self) -> None:
        if self._flush_handle is None and self._loop is not None and not self._stopped:
            self._flush_handle = self._loop.call_later(self.recv_delay, self._flush)

    # --- handing events to the application ------------------------------------------------------------

    def _deliver(self, event: ClientEvent) -> None:
        if self.on_event is not None:
            self.on_event(event)
            self._take(event)
            return
        self._queue.append(event)
        self._wake_consumer()

    def _wake_consumer(self) -> None:
        w = self._queue_waiter
        if w is not None and not w.done():
            w.set_result(None)

    def _take(self, event: ClientEvent | None) -> None:
        """The application is done with the previously taken event (``on_event``: with ``event``)."""
        taken = event if event is not None else self._last_taken
        self._last_taken = None
        if taken is None:
            return
        kind = type(taken)
        if kind is Msg or kind is Ack:
            self.session.handled(taken.conv, taken.seq)  # type: ignore[union-attr]
            self._dirty_state = True
            self._schedule_flush()
