"""The gateway side of the link: :class:`TransferLink`, a ``submit`` with ``Committer.submit``'s shape.

A gateway node keeps one link per transfer node. Sends submitted during one loop turn leave as one
:class:`GatewayFrame`; results come back to their ``done`` callbacks in commit order, deliveries and
events go to the node's :class:`DeliverySink` (the Hub). The link reconnects by itself with exponential
backoff. While it is down, and for every send it had not been answered for when it broke, ``done`` gets
``unavailable``: the client SDK resends with the same cmid, and dedupe in the core makes that safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import ssl
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import grpc

from im.backends.routing import DeliverySink
from im.core.committer import SendCallback, SendRequest
from im.model.chat import StoredMessage
from im.model.cluster import DeviceLocation
from im.model.errors import ErrorCode, ImError
from im.mypyc_options import mypyc_attr
from im.observability import tracing
from im.observability.metrics import METRICS
from im.protocol.codec import Encoding, decode_server
from im.transfer.gen import transfer_pb2 as pb
from im.transfer.tls import LinkTls
from im.transfer.wire import (
    LINK_METHOD,
    SENT_WINDOW,
    add_send,
    error_from_pb,
    link_options,
    message_from_pb,
    message_to_pb,
    stored_from_request,
)

log = logging.getLogger(__name__)

#: While a send the link has written is unanswered, sends submitted meanwhile wait at the gateway and go
#: out together once none is (one frame of sends in flight). A transfer node commits one batch at a
#: time, so such sends would mostly wait for the running commit there anyway. Idle, a send goes out at
#: once. One frame in flight measured better than two (fewer CPU-ms per message and a lower p99 in
#: im bench, in a closed loop and at a fixed rate alike).
#: Seconds a send waits at most that way: a stalled commit, or an answer that never comes, must not
#: stall the link; after this the waiting sends go out as they would without the hold.
LINK_HOLD_MAX = 0.5


def decode_event(data: bytes) -> object:
    return decode_server(data, Encoding.MSGPACK)


R = TypeVar("R")
C = TypeVar("C")


def _merge(order: bytes, rows: Sequence[R], columns: Sequence[C]) -> Sequence[R | C]:
    """A frame's rows and column items in the transfer node's order: ``order`` has a byte per item, 0
    for the next row and 1 for the next column item, and is set only when a frame has both. An order
    that does not add up is taken rows first (nothing is lost; only the order between the two)."""
    if not rows:
        return columns
    if not columns:
        return rows
    if len(order) != len(rows) + len(columns) or order.count(1) != len(columns):
        return [*rows, *columns]
    r, c = iter(rows), iter(columns)
    return [next(c) if kind else next(r) for kind in order]


def _call_done(done: SendCallback, req: SendRequest, m: StoredMessage | None, dup: bool, err: ImError | None) -> None:
    """Answer one send; a callback that raises is logged, and the others are still answered."""
    try:
        done(req, m, dup, err)
    except Exception:
        log.exception("send callback failed")


@mypyc_attr(allow_interpreted_subclasses=True)  # the tests' links subclass it to see or spoil frames
class TransferLink:
    """One gateway node's stream to one transfer node. ``start()`` it on the loop; ``await close()``."""

    def __init__(
        self,
        address: str,
        node: str,
        sink: DeliverySink,
        *,
        decode_event: Callable[[bytes], object] = decode_event,
        on_revoked: Callable[[str], None] | None = None,
        on_lost: Callable[[list[tuple[SendRequest, SendCallback]]], None] | None = None,
        max_frame_items: int = 4096,
        backoff_initial: float = 0.05,
        backoff_max: float = 2.0,
        tls: LinkTls | None = None,
        peer: str | None = None,
        keepalive: float = 0.0,
        keepalive_timeout: float = 5.0,
    ) -> None:
        """``tls``: dial with this node's certificate over TLS (:mod:`im.transfer.tls`); ``peer``: the
        transfer node expected at ``address`` (the registry entry): with ``tls``, a server whose
        certificate or welcome names another node is not linked to (retried with backoff).
        ``keepalive``/``keepalive_timeout``: HTTP/2 pings (:func:`~im.transfer.wire.link_options`), so a
        silently dead transfer node breaks the stream (its unanswered sends go to ``on_lost``)."""
        self.address = address
        self._options = link_options(keepalive, keepalive_timeout, server=False)
        self.tls = tls
        self.peer = peer
        self.node = node
        self.sink = sink
        self._decode_event = decode_event
        self.on_revoked = on_revoked  # login sessions that ended elsewhere
        self.on_lost = on_lost  # unanswered sends of a lost stream (else they fail)
        self._max_frame_items = max_frame_items
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._rids = itertools.count(1)
        self._pending: dict[int, tuple[SendRequest, SendCallback]] = {}  # rid -> submitted, unanswered
        self._answered = asyncio.Event()  # set while nothing is pending
        self._answered.set()
        self._unsent: list[tuple[int, SendRequest]] = []  # (rid, send), made into protobuf in the frame
        #: This stream's last SENT_WINDOW fresh results, oldest first (the transfer node counts the same
        #: ones), and the stored message of each of them whose send was still pending: a delivery of one
        #: of those back to this gateway comes as a reference (``TransferFrame.sent``).
        self._fresh_mids: deque[int] = deque()
        self._sent: dict[int, StoredMessage] = {}
        self.missed_references = 0  # references to a message not kept (the sessions then check the log)
        self._forwards = pb.GatewayFrame()  # routes, events and revocations for the next frame
        self._has_forwards = False
        self._wake = asyncio.Event()
        #: Whether sends wait in ``_unsent`` for the ones written before to be answered (:meth:`_next_frame`).
        self._holding = False
        #: The users the sink holds, as the transfer node's table of them (``holds_users``): True from a
        #: hello that carried the table until its stream is lost. Changes since that hello: not written
        #: yet, issued on this stream (a running count), applied by the transfer node (its count), and
        #: what waits for a count to be applied (a future, or None: every session catches up then).
        self._reports_held = False
        self._holdings: list[tuple[int, bool]] = []
        self._holdings_issued = 0
        self._holdings_applied = 0
        self._holding_waiters: list[tuple[int, asyncio.Future[None] | None]] = []
        self._epoch = 0  # one per stream: a stale stream's writer stops when it changes
        self._connected = asyncio.Event()
        self._closing = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._channel: Any = None  # the open stream's channel (close() closes it when _run was cancelled)
        self.transfer_node = ""  # the node id the transfer side sent in its welcome
        self.frames_sent = 0
        self.frames_received = 0
        self.connects = 0
        self.refusals = 0  # attempts that failed the identity check (certificate or welcome)
        self.last_error = ""  # why the last attempt failed ("" once linked)

    # --- lifecycle -----------------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"im-transfer-link-{self.node}")

    async def close(self) -> None:
        self._closing.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        channel, self._channel = self._channel, None  # the one a cancelled stream left open
        if channel is not None:
            await channel.close()
        self._lost("the transfer link is closed")

    def abandon(self, why: str) -> None:
        """Stop using this link at once (its node left): unanswered sends go to ``on_lost`` now, before
        anything submitted after this call; then ``close()`` it."""
        self._lost(why)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self) -> None:
        await self._connected.wait()

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    async def wait_answered(self) -> None:
        """Return once no send is in flight on this link (each answered, or handed on when it broke)."""
        await self._answered.wait()

    # --- the send path -------------------------------------------------------------------------------

    def submit(self, req: SendRequest, done: SendCallback) -> None:
        """Forward a send; ``done`` is called with the core's answer, or ``unavailable`` (see SendCallback)."""
        if not self._connected.is_set():
            err = ImError(ErrorCode.UNAVAILABLE, "no link to the message core; resend later", gateway=True)
            done(req, None, False, err)
            return
        rid = next(self._rids)
        self._pending[rid] = (req, done)
        self._answered.clear()
        self._unsent.append((rid, req))
        if not self._holding:
            self._wake.set()

    # --- forwarding (at most once: dropped while the link is down) ------------------------------------

    def forward(self, node: str, messages: Sequence[StoredMessage], recipients: Sequence[Sequence[int]]) -> bool:
        """Have the transfer node deliver stored messages to gateway ``node`` (``Router.publish``)."""
        if not self._connected.is_set():
            return False
        route = self._forwards.routes.add(node=node)
        for m, uids in zip(messages, recipients, strict=True):
            d = route.deliveries.add(uids=uids)
            message_to_pb(m, d.message)
        self._queued_forward()
        return True

    def forward_event(self, node: str, frame: bytes, uids: Sequence[int], skip: tuple[int, str] | None) -> bool:
        """Have the transfer node pass an encoded ephemeral frame to gateway ``node``."""
        if not self._connected.is_set():
            return False
        e = self._forwards.events.add(node=node).event
        e.frame = frame
        e.uids.extend(uids)
        if skip is not None:
            e.has_skip = True
            e.skip_uid, e.skip_device = skip
        self._queued_forward()
        return True

    def revoke(self, sid: str) -> bool:
        """Have the transfer node tell every gateway it links that login session ``sid`` ended."""
        if not self._connected.is_set():
            return False
        self._forwards.revoked_sessions.append(sid)
        self._queued_forward()
        return True

    def replace(self, node: str, connections: Sequence[DeviceLocation]) -> bool:
        """Have the transfer node ask gateway ``node`` to close these connections of its own."""
        if not self._connected.is_set():
            return False
        add = self._forwards.replaced.add
        for c in connections:
            add(node=node, uid=c.uid, device=c.device, conn=c.conn)
        self._queued_forward()
        return True

    def _queued_forward(self) -> None:
        self._has_forwards = True
        self._wake.set()

    # --- the table of users the transfer node routes by ------------------------------------------------

    def announce(self, uid: int, held: bool) -> asyncio.Future[None] | None:
        """The sink now holds ``uid`` (``held``) or no longer does: tell the transfer node, after what
        this stream said before. For ``held``, a future done once the transfer node routes by it (or
        once the stream is lost: the next hello carries the table); cancelled by a waiter that gives up,
        it makes every session catch up once the change is applied. None when no stream carries the
        table now: the next hello's has the change (:meth:`_write_frames`)."""
        if not self._reports_held:
            return None
        self._holdings.append((uid, held))
        self._holdings_issued += 1
        self._queued_forward()
        if not held:
            return None
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._holding_waiters.append((self._holdings_issued, done))
        return done

    def _holdings_applied_up_to(self, count: int) -> None:
        """The transfer node has applied ``count`` of this stream's changes: release their waiters."""
        if count <= self._holdings_applied:
            return
        self._holdings_applied = count
        waiting: list[tuple[int, asyncio.Future[None] | None]] = []
        catch_up = False
        for at, done in self._holding_waiters:
            if at > count:
                waiting.append((at, done))
            elif done is None or done.cancelled():
                catch_up = True
            elif not done.done():
                done.set_result(None)
        self._holding_waiters = waiting
        if catch_up:
            self._catch_up()

    def _linked(self) -> None:
        """The welcome came: what the transfer node routed here while this node was unlinked was
        dropped, so every session checks the log, once the changes written after the hello are applied
        there too (the welcome follows the hello's table only): no delivery routed by an older table can
        then pass a session by."""
        if self._reports_held and self._holdings_issued > self._holdings_applied:
            self._holding_waiters.append((self._holdings_issued, None))
        else:
            self._catch_up()

    def _release_holding_waiters(self) -> None:
        waiters, self._holding_waiters = self._holding_waiters, []
        for _, done in waiters:
            if done is not None and not done.done():
                done.set_result(None)

    # --- the stream ----------------------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = self._backoff_initial
        while not self._closing.is_set():
            if self.tls is not None and not await self._check_identity():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), backoff)
                backoff = min(backoff * 2, self._backoff_max)
                continue
            if self.tls is not None:
                try:
                    credentials = self.tls.channel_credentials()  # read at each attempt: rotated files apply
                except OSError as exc:
                    self.last_error = f"cannot read the link certificate: {exc}"
                    log.error("transfer link: %s", self.last_error)
                    credentials = None
                if credentials is None:  # waited for here, not in the except (see the end of the stream)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._closing.wait(), self._backoff_max)
                    continue
                channel = grpc.aio.secure_channel(self.address, credentials, options=self._options)
            else:
                channel = grpc.aio.insecure_channel(self.address, options=self._options)
            self._channel = channel
            link = channel.stream_stream(
                LINK_METHOD,
                request_serializer=pb.GatewayFrame.SerializeToString,
                response_deserializer=pb.TransferFrame.FromString,
            )
            self._epoch += 1
            call: Any = None
            writer: asyncio.Task[None] | None = None
            try:
                call = link()
                writing = self._write_frames(call, self._epoch)
                writer = asyncio.create_task(writing, name=f"im-transfer-write-{self.node}")
                while True:
                    frame = await call.read()
                    if frame is grpc.aio.EOF:
                        break
                    self.frames_received += 1
                    METRICS.link_frames["received"] += 1
                    if frame.HasField("welcome"):
                        if self.tls is not None and self.peer is not None and frame.welcome.node != self.peer:
                            self._refused(f"the transfer node at {self.address} says it is {frame.welcome.node!r}")
                            break
                        self.transfer_node = frame.welcome.node
                        if not frame.welcome.routes_by_held:  # an older transfer node: presence routes
                            self._reports_held = False
                            self._holdings.clear()
                            self._release_holding_waiters()
                        self.last_error = ""
                        self.connects += 1
                        self._connected.set()
                        backoff = self._backoff_initial
                        log.info("linked to transfer node %s at %s", self.transfer_node, self.address)
                        self._linked()
                    self._dispatch(frame)
                log.warning("transfer node %s ended the link", self.address)
            except grpc.aio.AioRpcError as exc:
                METRICS.engine_error(exc, "grpc")
                self.last_error = f"{exc.code().name} {exc.details()}"
                log.warning("transfer link to %s: %s %s", self.address, exc.code().name, exc.details())
            except Exception as exc:  # a frame that could not be taken (malformed): end this stream, relink
                self.last_error = f"a frame from {self.address} could not be taken: {type(exc).__name__}: {exc}"
                log.exception("transfer link: %s", self.last_error)
            except BaseException:  # cancelled (close): end the stream without waiting; close() closes the channel
                self._end_stream(call, writer)
                raise
            # Not in a ``finally``: compiled by mypyc 2.4, the task ended cancelled after the awaits of one.
            self._end_stream(call, writer)
            if writer is not None:
                await asyncio.wait([writer])
            self._channel = None
            await channel.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), backoff)
            backoff = min(backoff * 2, self._backoff_max)

    def _end_stream(self, call: Any, writer: asyncio.Task[None] | None) -> None:
        self._lost("the link to the message core broke; resend with the same cmid")
        if call is not None:
            call.cancel()
        if writer is not None:
            writer.cancel()

    async def _check_identity(self) -> bool:
        """With TLS and an expected ``peer``: does the certificate at ``address`` name that node?"""
        assert self.tls is not None
        if self.peer is None:
            return True
        try:
            named = await self.tls.server_node(self.address)
        except (OSError, ssl.SSLError, TimeoutError, ValueError) as exc:
            self.last_error = f"TLS handshake with {self.address} failed: {type(exc).__name__}: {exc}"
            log.warning("transfer link: %s", self.last_error)
            return False
        if named != self.peer:
            self._refused(f"the certificate at {self.address} names node {named!r}, not {self.peer!r}")
            return False
        return True

    def _refused(self, why: str) -> None:
        self.refusals += 1
        self.last_error = why
        log.error("transfer link: %s (the registry lists %r there): not linking", why, self.peer)

    async def _write_frames(self, call: Any, epoch: int) -> None:
        """Write one stream's frames: its hello, then what :meth:`_next_frame` makes, until the stream's
        epoch ends (then the stream is half-closed) or the call does. A write that fails because the call
        ended is the reader's to report; anything else cancels the call, so that the link reconnects."""
        try:
            if epoch != self._epoch:
                return
            hello = pb.Hello(node=self.node, columns=True)
            held = self.sink.held_users()
            # The table and the changes after it: taken together, before the first await.
            self._holdings.clear()
            self._holdings_issued = self._holdings_applied = 0
            self._release_holding_waiters()
            self._reports_held = held is not None
            if held is not None:
                hello.holds_users = True
                hello.held.extend(held)
            await call.write(pb.GatewayFrame(hello=hello))
            while True:
                frame = await self._next_frame(epoch)
                if frame is None:
                    await call.done_writing()
                    return
                await call.write(frame)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            return  # the call ended: the reader sees why
        except Exception:
            log.exception("transfer link to %s: writing a frame failed; relinking", self.address)
            call.cancel()

    async def _next_frame(self, epoch: int) -> pb.GatewayFrame | None:
        """The next frame of sends and forwards, once there is one to write (None: the stream's epoch
        ended). While sends written before are unanswered, new ones wait to leave together
        (:data:`LINK_HOLD_MAX`)."""
        overdue = False
        while True:
            if self._holding:
                try:  # woken when no written send is unanswered, or by a forward
                    await asyncio.wait_for(self._wake.wait(), LINK_HOLD_MAX)
                except TimeoutError:
                    overdue = True
            else:
                await self._wake.wait()
            if epoch != self._epoch:
                return None
            # _pending holds every unanswered send, _unsent those not written yet: more means some in flight.
            if not overdue and len(self._pending) > len(self._unsent) and not self._has_forwards:
                self._holding = True
                self._wake.clear()
                continue
            self._holding = overdue = False
            n = self._max_frame_items
            sends, self._unsent = self._unsent[:n], self._unsent[n:]
            if not self._unsent:
                self._wake.clear()
            frame = pb.GatewayFrame()
            if sends:
                out = frame.sends
                for rid, req in sends:
                    add_send(out, rid, req)
            if self._has_forwards:
                frame.MergeFrom(self._forwards)
                self._forwards.Clear()
                self._has_forwards = False
            if self._holdings:
                add_holding = frame.holdings.add
                for uid, held in self._holdings:
                    add_holding(uid=uid, held=held)
                self._holdings.clear()
            if sends or frame.routes or frame.events or frame.revoked_sessions or frame.replaced or frame.holdings:
                self.frames_sent += 1
                METRICS.link_frames["sent"] += 1
                return frame

    def _lost(self, why: str) -> None:
        """The stream is gone: every unanswered send goes to ``on_lost`` (in submission order) or else
        fails ``unavailable``; new sends fail until relinked."""
        self._connected.clear()
        self._epoch += 1
        self._unsent.clear()
        self._reports_held = False  # the next stream's hello carries the table, and its welcome a catch-up
        self._holdings.clear()
        self._release_holding_waiters()
        self._forwards.Clear()
        self._has_forwards = False
        self._holding = False
        self._fresh_mids.clear()  # the next stream's transfer node counts its fresh results from zero
        self._sent.clear()
        self._wake.set()  # a stale stream's writer wakes up and ends
        pending, self._pending = self._pending, {}
        self._answered.set()
        if self.on_lost is not None and pending:
            try:
                self.on_lost(list(pending.values()))  # in submission order
                return
            except Exception:
                log.exception("handing over the sends of a lost link failed")
        err = ImError(ErrorCode.UNAVAILABLE, why, gateway=True)
        for req, done in pending.values():
            _call_done(done, req, None, False, err)

    def _dispatch(self, frame: pb.TransferFrame) -> None:
        f = frame.fresh  # columns of equal length, or the frame is malformed (zip raises; see _run)
        fresh = list(zip(f.rid, f.conv, f.seq, f.mid, f.ts, strict=True))
        for item in _merge(frame.result_order, frame.results, fresh):
            if isinstance(item, tuple):
                self._answer_fresh(*item)
            else:
                self._answer(item)
        if frame.holdings_applied:
            self._holdings_applied_up_to(frame.holdings_applied)
        if not self._pending:
            self._answered.set()
        if self._holding and len(self._pending) <= len(self._unsent):  # every written send answered
            self._wake.set()
        if frame.deliveries or frame.sent.mid:
            messages, recipients, traced = self._deliveries(frame)
            if messages:
                if traced:
                    self._deliver_traced(traced, messages, recipients)
                else:
                    self.sink.deliver(messages, recipients)
        for e in frame.events:
            skip = (e.skip_uid, e.skip_device) if e.has_skip else None
            self.sink.deliver_event(self._decode_event(e.frame), list(e.uids), skip)
        if self.on_revoked is not None:
            for sid in frame.revoked_sessions:
                self.on_revoked(sid)
        if frame.replaced:
            node = self.node
            self.sink.close_replaced([DeviceLocation(r.uid, r.device, node, r.conn) for r in frame.replaced])
        if frame.dropped:  # the transfer node dropped deliveries for this node: sessions check the log
            self._catch_up()

    def _answer(self, r: pb.Result) -> None:
        """A result as a row: a refusal, a duplicate with its stored original, or (from a transfer node
        that does not send columns) a fresh send."""
        entry = self._pending.pop(r.rid, None)
        if entry is None:
            return
        req, done = entry
        if r.error_code:
            _call_done(done, req, None, False, error_from_pb(r))
        elif r.seq:  # fresh: what the core assigned, and the rest from the request
            _call_done(done, req, stored_from_request(req, r.conv, r.seq, r.mid, r.ts), False, None)
        else:
            _call_done(done, req, message_from_pb(r.message), r.dup, None)

    def _answer_fresh(self, rid: int, conv: str, seq: int, mid: int, ts: int) -> None:
        """A fresh result from the columns: the send's stored message is its request with what the core
        assigned, kept for a reference to it (every mid counts, known or not: the transfer node counts
        them all)."""
        order = self._fresh_mids
        order.append(mid)
        if len(order) > SENT_WINDOW:
            self._sent.pop(order.popleft(), None)
        entry = self._pending.pop(rid, None)
        if entry is None:
            return
        req, done = entry
        m = stored_from_request(req, conv, seq, mid, ts)
        self._sent[mid] = m
        _call_done(done, req, m, False, None)

    def _deliveries(
        self, frame: pb.TransferFrame
    ) -> tuple[list[StoredMessage], list[list[int]], list[tuple[int, str]]]:
        """A frame's deliveries in order: rows carry their message, references name one kept from a fresh
        result (``_answer_fresh``). A reference to a message not kept cannot be delivered: the sessions
        check the log for it (as after a ``dropped``). Also the (mid, traceparent) of traced rows."""
        traced: list[tuple[int, str]] = []
        if tracing.ON:
            traced = [(d.message.mid, d.traceparent) for d in frame.deliveries if d.HasField("traceparent")]
        rows = [(message_from_pb(d.message), list(d.uids)) for d in frame.deliveries]
        refs = frame.sent
        if not refs.mid:
            return [m for m, _ in rows], [to for _, to in rows], traced
        if sum(refs.count) != len(refs.uids):  # malformed (and a count per mid, or zip raises; see _run)
            raise ValueError(f"references name {sum(refs.count)} recipients and carry {len(refs.uids)}")
        kept, uids, start = self._sent, refs.uids, 0
        named: list[tuple[StoredMessage | None, list[int]]] = []
        for mid, count in zip(refs.mid, refs.count, strict=True):
            named.append((kept.pop(mid, None), list(uids[start : start + count])))
            start += count
        messages: list[StoredMessage] = []
        recipients: list[list[int]] = []
        missed = 0
        for m, to in _merge(frame.delivery_order, rows, named):
            if m is None:
                missed += 1
            else:
                messages.append(m)
                recipients.append(to)
        if missed:
            self.missed_references += missed
            log.warning("%d deliveries named messages this gateway no longer keeps: sessions check the log", missed)
            self._catch_up()
        return messages, recipients, traced

    def _catch_up(self) -> None:
        try:
            self.sink.catch_up()
        except Exception:  # the stream goes on; sessions still find gaps at their next message
            log.exception("the sink failed to start catching up")

    def _deliver_traced(
        self, traced: list[tuple[int, str]], messages: list[StoredMessage], recipients: list[list[int]]
    ) -> None:
        """Deliver with the commit contexts carried in the frame (mid, traceparent) in ``tracing.ROUTING``
        (the hub makes a delivery span of each), then forget them."""
        routing = []
        for mid, traceparent in traced:
            c = tracing.parse_traceparent(traceparent)
            if c is not None:
                tracing.ROUTING[mid] = c
                routing.append(mid)
        try:
            self.sink.deliver(messages, recipients)
        finally:
            for mid in routing:
                tracing.ROUTING.pop(mid, None)
