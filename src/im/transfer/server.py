"""The transfer side of the link: a grpc.aio servicer in front of a :class:`~im.core.committer.Committer`.

Per ``Link`` stream: the first gateway frame names the gateway node (``hello``) and the users it holds;
the node is registered in the :class:`GrpcRouter`, so the committer's routing (``router.holders``, then
``router.publish(node, ...)``) lands in that stream's :class:`LinkOutbox`. Later frames' ``holdings``
change that node's table, and the outbox tells the gateway how many it has applied. Incoming send
batches go to ``committer.submit``; the results, deliveries and events gathered while the stream was
writing (at least everything of one loop turn) leave as one :class:`TransferFrame`.

What this layer cannot do: it keeps no state across streams. When a stream ends, results of sends still
in the committer are dropped (the gateway already failed them as ``unavailable``; the client resends
with the same cmid and gets the stored message back as a duplicate), and so are undelivered deliveries
(sessions recover from the log).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from typing import Any, Protocol

import grpc

from im.backends.routing import DeliverySink, Router, holders_in
from im.core.committer import SendCallback, SendRequest
from im.model.chat import StoredMessage
from im.model.cluster import DeviceLocation
from im.model.errors import ImError
from im.observability import tracing
from im.observability.metrics import METRICS
from im.protocol.codec import Encoding, decode_server, encode
from im.throttled_log import ThrottledLog
from im.transfer.gen import transfer_pb2 as pb
from im.transfer.tls import LinkTls
from im.transfer.wire import SENT_WINDOW, SERVICE_NAME, link_options, message_from_pb, message_to_pb, send_from_pb

log = logging.getLogger(__name__)
#: Without cluster_tls anyone reaching the port can open a stream: a broken one is counted, not traced each.
_read_failures = ThrottledLog(log, "transfer streams whose read failed", level=logging.INFO)


#: Answers queued for a stream: (rid, stored message, dup, error), as the core gave them.
_Results = list[tuple[int, StoredMessage | None, bool, ImError | None]]
#: Deliveries queued for a stream: a message and the recipients that gateway holds.
_Deliveries = list[tuple[StoredMessage, Sequence[int]]]


class Submitter(Protocol):
    """What the servicer needs of the core (``Committer`` has it)."""

    def submit(self, req: SendRequest, done: SendCallback) -> None: ...


def encode_event(frame: object) -> bytes:
    """Ephemeral frames (typing, receipts) cross the link msgpack-encoded, as a gateway would send them."""
    return encode(frame, Encoding.MSGPACK)


class LinkOutbox:
    """What one stream still has to write. Appends never block; :meth:`take` drains into one frame.

    Slow-gateway policy ("drop deliveries"): beyond ``max_pending`` queued deliveries and events, new
    ones are dropped and counted in ``dropped``, and the next frame says so (``dropped``): the gateway's
    sessions check the log for what they missed. Results are never dropped: the gateway bounds them
    with its in-flight window.
    """

    def __init__(
        self,
        node: str,
        *,
        max_frame_items: int,
        max_pending: int,
        columns: bool = False,
        held: set[int] | None = None,
    ) -> None:
        """``columns``: the gateway reads ``fresh`` and ``sent`` (its hello said so). ``held``: the users
        the gateway holds, from its hello (None: it does not report them; Presence has them)."""
        self.node = node
        self.columns = columns
        self.held = held
        #: How many of the stream's ``holdings`` changes are applied to ``held``, and the count last
        #: written (the next frame carries the count when it grew: ``holdings_applied``).
        self.holdings_applied = 0
        self._applied_written = 0
        #: mid -> number of the fresh result that carried it on this stream (while ``columns``): its
        #: delivery here within the gateway's window is sent as a reference (``TransferFrame.sent``)
        self._fresh_at: dict[int, int] = {}
        self._fresh_written = 0
        self.results: _Results = []
        self.deliveries: _Deliveries = []
        self.traces: dict[int, str] = {}  # mid -> traceparent of a sampled message's commit span
        self.events: list[tuple[bytes, Sequence[int], tuple[int, str] | None]] = []
        self.revoked: list[str] = []
        self.replaced: list[DeviceLocation] = []
        self.ready = asyncio.Event()
        self.closed = False
        self.dropped = 0
        self.overflowed = False  # dropped something since the last frame: the next one says so
        self._max_frame_items = max_frame_items
        self._max_pending = max_pending

    def add_result(self, rid: int, m: StoredMessage | None, dup: bool, err: ImError | None) -> None:
        if not self.closed:
            self.results.append((rid, m, dup, err))
            self.ready.set()

    def add_deliveries(self, messages: Sequence[StoredMessage], recipients: Sequence[Sequence[int]]) -> None:
        if self.closed:
            return
        if len(self.deliveries) + len(self.events) >= self._max_pending:
            self.dropped += len(messages)
            self.overflowed = True
            return
        self.deliveries.extend(zip(messages, recipients, strict=True))
        if tracing.ROUTING:  # sampled messages among them (tracing on): carry their contexts
            for m in messages:
                c = tracing.ROUTING.get(m.mid)
                if c is not None:
                    self.traces[m.mid] = tracing.format_traceparent(c)
        self.ready.set()

    def add_event(self, frame: bytes, uids: Sequence[int], skip: tuple[int, str] | None) -> None:
        if self.closed:
            return
        if len(self.deliveries) + len(self.events) >= self._max_pending:
            self.dropped += 1
            self.overflowed = True
            return
        self.events.append((frame, uids, skip))
        self.ready.set()

    def add_revoked(self, sid: str) -> None:
        if not self.closed:
            self.revoked.append(sid)
            self.ready.set()

    def add_replaced(self, connections: Sequence[DeviceLocation]) -> None:
        if not self.closed:
            self.replaced.extend(connections)
            self.ready.set()

    def apply_holdings(self, holdings: Any) -> None:
        """Apply a frame's ``holdings`` to ``held`` in their order, and have the next frame say so."""
        held = self.held
        if held is None:  # changes without a hello that announced the table: nothing routes by them
            return
        for h in holdings:
            if h.held:
                held.add(h.uid)
            else:
                held.discard(h.uid)
        self.holdings_applied += len(holdings)
        if not self.closed:
            self.ready.set()

    def close(self) -> None:
        self.closed = True
        self.ready.set()

    def take(self) -> pb.TransferFrame | None:
        """Up to ``max_frame_items`` of each kind as one frame (None when empty); re-arms when more remain
        or when closed (the writer then takes until None and ends the stream)."""
        n = self._max_frame_items
        results, self.results = self.results[:n], self.results[n:]
        deliveries, self.deliveries = self.deliveries[:n], self.deliveries[n:]
        events, self.events = self.events[:n], self.events[n:]
        revoked, self.revoked = self.revoked, []
        replaced, self.replaced = self.replaced, []
        if self.results or self.deliveries or self.events or self.closed:  # closed: wake the writer to end
            self.ready.set()
        else:
            self.ready.clear()
        dropped, self.overflowed = self.overflowed, False
        applied = self.holdings_applied
        if applied == self._applied_written:
            applied = 0
        else:
            self._applied_written = applied
        if not (results or deliveries or events or revoked or replaced or dropped or applied):
            return None
        frame = pb.TransferFrame(revoked_sessions=revoked, dropped=dropped, holdings_applied=applied)
        for r in replaced:
            frame.replaced.add(uid=r.uid, device=r.device, conn=r.conn)
        if self.columns:
            self._columns(frame, results, deliveries)
        else:
            self._rows(frame, results, deliveries)
        for data, uids, skip in events:
            e = frame.events.add(frame=data, uids=uids)
            if skip is not None:
                e.has_skip = True
                e.skip_uid, e.skip_device = skip
        return frame

    def _rows(self, frame: pb.TransferFrame, results: _Results, deliveries: _Deliveries) -> None:
        """Results and deliveries a protobuf message each (a gateway that does not read columns)."""
        add_result = frame.results.add
        for rid, m, dup, err in results:
            _add_result(add_result, rid, m, dup, err)
        for m, uids in deliveries:
            self._add_delivery(frame, m, uids)

    def _add_delivery(self, frame: pb.TransferFrame, m: StoredMessage, uids: Sequence[int]) -> None:
        d = frame.deliveries.add(uids=uids)
        message_to_pb(m, d.message)
        if self.traces:
            tp = self.traces.pop(m.mid, None)
            if tp is not None:
                d.traceparent = tp

    def _columns(self, frame: pb.TransferFrame, results: _Results, deliveries: _Deliveries) -> None:
        """Fresh results as columns (``fresh``), and deliveries of messages whose fresh results this
        stream carried within the gateway's window as references (``sent``): a protobuf message per item
        and the message's fields once more cost more than the rest of the frame. The others as rows;
        ``result_order``/``delivery_order`` say how the two interleave when a frame has both."""
        rids: list[int] = []
        convs: list[str] = []
        seqs: list[int] = []
        mids: list[int] = []
        tss: list[int] = []
        order = bytearray()
        add_result = frame.results.add
        fresh_at, n = self._fresh_at, self._fresh_written
        for rid, m, dup, err in results:
            if err is None and m is not None and not dup:
                rids.append(rid)
                convs.append(m.conv)
                seqs.append(m.seq)
                mids.append(m.mid)
                tss.append(m.ts)
                fresh_at[m.mid] = n
                n += 1
                order.append(1)
            else:
                _add_result(add_result, rid, m, dup, err)
                order.append(0)
        self._fresh_written = n
        if rids:
            fresh = frame.fresh
            fresh.rid.extend(rids)
            fresh.conv.extend(convs)
            fresh.seq.extend(seqs)
            fresh.mid.extend(mids)
            fresh.ts.extend(tss)
            if len(rids) < len(results):
                frame.result_order = bytes(order)
        if deliveries:
            traces = self.traces
            oldest = n - SENT_WINDOW  # the gateway keeps the last SENT_WINDOW fresh results
            ref_mids: list[int] = []
            counts: list[int] = []
            ref_uids: list[int] = []
            order.clear()
            for m, uids in deliveries:
                at = fresh_at.pop(m.mid, -1)
                if at >= oldest and at >= 0 and not (traces and m.mid in traces):
                    ref_mids.append(m.mid)
                    counts.append(len(uids))
                    ref_uids.extend(uids)
                    order.append(1)
                else:
                    self._add_delivery(frame, m, uids)
                    order.append(0)
            if ref_mids:
                refs = frame.sent
                refs.mid.extend(ref_mids)
                refs.count.extend(counts)
                refs.uids.extend(ref_uids)
                if len(ref_mids) < len(deliveries):
                    frame.delivery_order = bytes(order)
        if len(fresh_at) > 2 * SENT_WINDOW:  # results whose messages were not delivered here: forget them
            self._fresh_at = {mid: at for mid, at in fresh_at.items() if at >= n - SENT_WINDOW}


def _add_result(add_result: Any, rid: int, m: StoredMessage | None, dup: bool, err: ImError | None) -> None:
    """One result as a row of ``TransferFrame.results`` (``add_result``: its ``add``)."""
    if err is not None:
        add_result(rid=rid, error_code=err.code.value, error_message=err.message)
    elif m is None:
        add_result(rid=rid)
    elif dup:
        message_to_pb(m, add_result(rid=rid, dup=True).message)
    else:  # fresh: the gateway has the rest of the message in its request
        add_result(rid=rid, conv=m.conv, seq=m.seq, mid=m.mid, ts=m.ts)


class GrpcRouter(Router):
    """A :class:`Router` whose gateway nodes are linked streams (and, optionally, local sinks). The users
    each linked node reports holding (:meth:`holders`) are what the committer routes by.

    Guarantee: per gateway node, batches leave in publish order on that node's current stream; at most
    once (nothing is kept for a node without a stream, nor across streams). Never blocks.
    """

    def __init__(self, *, encode_event: Callable[[object], bytes] = encode_event) -> None:
        self._sinks: dict[str, DeliverySink] = {}
        self._links: dict[str, LinkOutbox] = {}
        self._encode_event = encode_event
        self.unroutable = 0  # messages published to a node with neither a sink nor a stream
        #: Every linked node reports the users it holds and no sink is local: :meth:`holders` answers.
        self._tabled = True

    # local gateway nodes in this process (an all-in-one transfer + gateway): called directly
    def attach(self, node: str, sink: DeliverySink) -> None:
        self._sinks[node] = sink
        self._retable()

    def detach(self, node: str) -> None:
        self._sinks.pop(node, None)
        self._retable()

    def register(self, outbox: LinkOutbox) -> None:
        """A stream from ``outbox.node`` is up; it replaces any older stream of the same node (and the
        table of users the older one reported)."""
        old = self._links.get(outbox.node)
        self._links[outbox.node] = outbox
        if old is not None and old is not outbox:
            old.close()
        self._retable()

    def unregister(self, outbox: LinkOutbox) -> None:
        if self._links.get(outbox.node) is outbox:
            del self._links[outbox.node]
            self._retable()

    def _retable(self) -> None:
        self._tabled = not self._sinks and all(o.held is not None for o in self._links.values())

    def holders(self, uids: Collection[int]) -> dict[int, set[str]] | None:
        """The linked nodes holding each of ``uids`` by the tables they report (their hellos and
        ``holdings``): a node's table changes in the order of its stream, and a gateway reads where a
        new user stands only once its change is applied here (``holdings_applied``), so a message
        routed by an older table was committed before that read. None while a linked node reports no
        table (an older gateway) or a gateway node is local."""
        if not self._tabled:
            return None
        return holders_in([(node, outbox.held) for node, outbox in self._links.items()], uids)  # type: ignore[misc]

    def linked(self) -> list[str]:
        return sorted(self._links)

    def publish(self, node: str, messages: Sequence[StoredMessage], recipients: Sequence[Sequence[int]]) -> None:
        sink = self._sinks.get(node)
        if sink is not None:
            sink.deliver(messages, recipients)
            return
        outbox = self._links.get(node)
        if outbox is not None:
            outbox.add_deliveries(messages, recipients)
        else:
            self.unroutable += len(messages)

    def publish_event(self, node: str, frame: object, uids: Sequence[int], skip: tuple[int, str] | None) -> None:
        sink = self._sinks.get(node)
        if sink is not None:
            sink.deliver_event(frame, uids, skip)
            return
        outbox = self._links.get(node)
        if outbox is not None:
            outbox.add_event(self._encode_event(frame), uids, skip)

    def publish_encoded_event(self, node: str, data: bytes, uids: Sequence[int], skip: tuple[int, str] | None) -> None:
        """A forwarded event, already encoded (see :meth:`publish_event`)."""
        sink = self._sinks.get(node)
        if sink is not None:
            sink.deliver_event(decode_server(data, Encoding.MSGPACK), uids, skip)
            return
        outbox = self._links.get(node)
        if outbox is not None:
            outbox.add_event(data, uids, skip)

    def publish_replaced(self, node: str, connections: Sequence[DeviceLocation]) -> None:
        sink = self._sinks.get(node)
        if sink is not None:
            sink.close_replaced(connections)
            return
        outbox = self._links.get(node)
        if outbox is not None:
            outbox.add_replaced(connections)

    def broadcast_revoked(self, sid: str) -> None:
        """Tell every linked gateway node that login session ``sid`` ended."""
        for outbox in self._links.values():
            outbox.add_revoked(sid)


class _Stream:
    """One Link stream's send bookkeeping: request ids of sends still in the core."""

    def __init__(self, outbox: LinkOutbox) -> None:
        self.outbox = outbox
        self.rids: dict[int, int] = {}  # id(SendRequest) -> rid; the request lives until ``done``

    def done(self, req: SendRequest, m: StoredMessage | None, dup: bool, err: ImError | None) -> None:
        rid = self.rids.pop(id(req), None)
        if rid is not None:
            self.outbox.add_result(rid, m, dup, err)


class TransferServicer:
    """The ``im.transfer.v1.Transfer`` service over a core; register it with :func:`serve_transfer`."""

    def __init__(
        self,
        committer: Submitter,
        router: GrpcRouter,
        *,
        node: str = "transfer-1",
        max_frame_items: int = 4096,
        max_pending: int = 100_000,
        tls: LinkTls | None = None,
    ) -> None:
        """``tls``: serve on a TLS port that requires a cluster client certificate, and accept a stream
        only from the node its certificate names (:mod:`im.transfer.tls`); None: plaintext, anyone."""
        self.committer = committer
        self.router = router
        self.node = node
        self.tls = tls
        self._max_frame_items = max_frame_items
        self._max_pending = max_pending
        self.frames_received = 0
        self.frames_sent = 0
        self.sends_received = 0
        self.streams = 0  # streams currently open
        self.refused = 0  # streams whose certificate named another node than their hello
        self._outboxes: set[LinkOutbox] = set()
        self._no_streams = asyncio.Event()  # set while no stream is open
        self._no_streams.set()
        self._closing = False

    async def close_streams(self, timeout: float) -> None:
        """End every stream once it has written what its outbox holds, and refuse new ones (stop the
        committer first: then the answers of its last batch are in the outboxes and leave before the
        stream ends). Returns when every stream has ended, or after ``timeout`` seconds."""
        self._closing = True
        for outbox in list(self._outboxes):
            outbox.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._no_streams.wait()

    async def link(self, requests: AsyncIterator[pb.GatewayFrame], context: Any) -> None:
        """One gateway's stream: its frames read by :meth:`_read`, this node's written from its outbox
        (``context.write``: a handler that is a coroutine, not an async generator, which mypyc compiles)."""
        it = requests.__aiter__()
        try:
            first = await it.__anext__()
        except StopAsyncIteration:
            return
        self.frames_received += 1
        METRICS.link_frames["received"] += 1
        if not first.HasField("hello") or not first.hello.node:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first frame must be a hello with a node id")
            return
        if self.tls is not None:
            certified = self.tls.peer_node(context)
            if certified != first.hello.node:
                self.refused += 1
                log.warning(
                    "refused a stream claiming node %r from %s: its certificate names %r",
                    first.hello.node,
                    context.peer(),
                    certified,
                )
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"the client certificate names node {certified!r}, not {first.hello.node!r}",
                )
                return
        if self._closing:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the transfer node is stopping")
            return
        hello = first.hello
        outbox = LinkOutbox(
            hello.node,
            max_frame_items=self._max_frame_items,
            max_pending=self._max_pending,
            columns=hello.columns,
            held=set(hello.held) if hello.holds_users else None,
        )
        stream = _Stream(outbox)
        self.router.register(outbox)
        self._outboxes.add(outbox)
        self.streams += 1
        self._no_streams.clear()
        log.info("gateway %s linked", outbox.node)
        # The stream's reader: this handler owns it and cancels it when the stream ends (and waits for it
        # when the stream ends cleanly).
        reader = asyncio.create_task(self._read(stream, first, it), name=f"im-transfer-read-{outbox.node}")
        try:
            await context.write(pb.TransferFrame(welcome=pb.Welcome(node=self.node, routes_by_held=True)))
            while True:
                await outbox.ready.wait()
                frame = outbox.take()
                if frame is not None:
                    self.frames_sent += 1
                    METRICS.link_frames["sent"] += 1
                    await context.write(frame)
                elif outbox.closed:
                    break
        except BaseException:  # the stream broke or was cancelled: the reader ends without being waited for
            self._unlinked(outbox, reader)
            raise
        # Not in a ``finally``: compiled by mypyc 2.4, the task ended cancelled after the awaits of one.
        self._unlinked(outbox, reader)
        await asyncio.wait([reader])

    def _unlinked(self, outbox: LinkOutbox, reader: asyncio.Task[None]) -> None:
        outbox.close()
        reader.cancel()
        self.router.unregister(outbox)
        self._outboxes.discard(outbox)
        self.streams -= 1
        if not self.streams:
            self._no_streams.set()
        log.info("gateway %s unlinked", outbox.node)

    async def _read(self, stream: _Stream, first: pb.GatewayFrame, it: AsyncIterator[pb.GatewayFrame]) -> None:
        try:
            self._submit(stream, first)
            async for frame in it:
                self.frames_received += 1
                METRICS.link_frames["received"] += 1
                self._submit(stream, frame)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the stream broke (or a peer sent what does not decode); the writer ends too
            _read_failures.hit(f"gateway {stream.outbox.node[:80]}: {type(exc).__name__}: {exc}", exc)
        finally:
            stream.outbox.close()

    def _submit(self, stream: _Stream, frame: pb.GatewayFrame) -> None:
        if frame.holdings:  # first: a send in the same frame from a user just held is routed back here
            stream.outbox.apply_holdings(frame.holdings)
        submit, done, rids = self.committer.submit, stream.done, stream.rids
        self.sends_received += len(frame.sends)
        for s in frame.sends:
            req = send_from_pb(s)
            rids[id(req)] = s.rid
            submit(req, done)
        router = self.router
        for route in frame.routes:  # forwarded on behalf of a process without a stream to that node
            router.publish(
                route.node,
                [message_from_pb(d.message) for d in route.deliveries],
                [list(d.uids) for d in route.deliveries],
            )
        for ne in frame.events:
            e = ne.event
            router.publish_encoded_event(
                ne.node, e.frame, list(e.uids), (e.skip_uid, e.skip_device) if e.has_skip else None
            )
        for sid in frame.revoked_sessions:
            router.broadcast_revoked(sid)
        if frame.replaced:  # older connections to close, each on the gateway node that holds it
            by_node: dict[str, list[DeviceLocation]] = {}
            for r in frame.replaced:
                by_node.setdefault(r.node, []).append(DeviceLocation(r.uid, r.device, r.node, r.conn))
            for node, connections in by_node.items():
                router.publish_replaced(node, connections)


async def serve_transfer(
    servicer: TransferServicer,
    address: str = "127.0.0.1:0",
    *,
    keepalive: float = 0.0,
    keepalive_timeout: float = 5.0,
) -> tuple[Any, int]:
    """Start a grpc.aio server with the Transfer service on ``address``; returns (server, bound port).
    A servicer with ``tls`` is served on a TLS port that requires a cluster client certificate (and no
    plaintext port); without, on a plaintext port. ``keepalive``/``keepalive_timeout``: HTTP/2 pings to
    each linked node, and the clients' pings accepted that often (:func:`~im.transfer.wire.link_options`):
    a silently dead gateway's stream ends, which frees what was queued for it."""
    server = grpc.aio.server(options=link_options(keepalive, keepalive_timeout, server=True))
    handler = grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {
            "Link": grpc.stream_stream_rpc_method_handler(
                servicer.link,
                request_deserializer=pb.GatewayFrame.FromString,
                response_serializer=pb.TransferFrame.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))
    if servicer.tls is not None:
        port = server.add_secure_port(address, servicer.tls.server_credentials())
    else:
        port = server.add_insecure_port(address)
    await server.start()
    return server, port
