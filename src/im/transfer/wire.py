"""Conversions between the core's types and the transfer protocol's messages, and the method path.

No I/O here: the server and the client both build their frames with these.
"""

from __future__ import annotations

from typing import Any

from im.core.committer import SendRequest
from im.model.chat import StoredMessage
from im.model.errors import ErrorCode, ImError
from im.observability import tracing
from im.transfer.gen import transfer_pb2 as pb

#: The one RPC, as grpc names it (``/<package>.<service>/<method>``).
LINK_METHOD = "/im.transfer.v1.Transfer/Link"
SERVICE_NAME = "im.transfer.v1.Transfer"
#: How many of the latest fresh results of a stream a gateway keeps, so that a delivery of one of those
#: messages back to it can name the message by mid instead of carrying it (``TransferFrame.sent``).
SENT_WINDOW = 8192
#: gRPC's default 4 MiB message cap is too small for a batch of large bodies.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


def link_options(keepalive: float, keepalive_timeout: float, *, server: bool) -> list[tuple[str, int]]:
    """:data:`CHANNEL_OPTIONS` plus HTTP/2 keepalive for one end of the link: a PING every ``keepalive``
    seconds, and a peer that has not answered one within ``keepalive_timeout`` seconds is taken as gone
    (the connection is closed, the stream fails ``UNAVAILABLE``). That is how a silently dead peer (a
    partition, a dropped route: no RST ever comes) is noticed in seconds, not when TCP gives up. The
    server accepts its clients' pings at any rate, with or without data and calls (gRPC's default policy
    answers pings more frequent than every 5 minutes with GOAWAY ``too_many_pings``). ``keepalive`` 0:
    no pings (gRPC's defaults)."""
    if keepalive <= 0:
        return list(CHANNEL_OPTIONS)
    interval, timeout = max(1, int(keepalive * 1000)), max(1, int(keepalive_timeout * 1000))
    options = [
        *CHANNEL_OPTIONS,
        ("grpc.keepalive_time_ms", interval),
        ("grpc.keepalive_timeout_ms", timeout),
        ("grpc.http2.ping_timeout_ms", timeout),  # gRPC >= 1.60 times pings out by this one (default 60 s)
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    if server:
        options += [
            ("grpc.http2.min_recv_ping_interval_without_data_ms", interval),
            ("grpc.http2.min_ping_interval_without_data_ms", interval),
            ("grpc.http2.max_ping_strikes", 0),
        ]
    return options


GatewayFrame = pb.GatewayFrame
TransferFrame = pb.TransferFrame


def add_send(sends: Any, rid: int, req: SendRequest) -> None:
    """Add ``req`` to a frame's repeated ``sends`` (built in place: protobuf copies a message made apart)."""
    s = sends.add(rid=rid, uid=req.uid, device=req.device, cmid=req.cmid, type=req.type, body=req.body)
    if req.conv is not None:
        s.conv = req.conv
    if req.to is not None:
        s.to = req.to
    if req.trace is not None:
        s.traceparent = tracing.format_traceparent(req.trace.get_span_context())


def send_from_pb(s: pb.Send) -> SendRequest:
    return SendRequest(
        uid=s.uid,
        device=s.device,
        cmid=s.cmid,
        conv=s.conv if s.HasField("conv") else None,
        to=s.to if s.HasField("to") else None,
        type=s.type,
        body=s.body,
        trace=tracing.remote(s.traceparent) if tracing.ON and s.HasField("traceparent") else None,
    )


def message_to_pb(m: StoredMessage, out: pb.Message) -> None:
    """Fill ``out`` (a sub-message already in its parent: protobuf copies less that way)."""
    out.conv = m.conv
    out.seq = m.seq
    out.mid = m.mid
    out.sender = m.sender
    out.device = m.device
    out.cmid = m.cmid
    out.ts = m.ts
    out.type = m.type
    out.body = m.body


def stored_from_request(req: SendRequest, conv: str, seq: int, mid: int, ts: int) -> StoredMessage:
    """The stored message of a fresh send: the core stores the request's fields as they are, so a
    result needs to carry only what the core assigned."""
    return StoredMessage(
        conv=conv,
        seq=seq,
        mid=mid,
        sender=req.uid,
        device=req.device,
        cmid=req.cmid,
        ts=ts,
        type=req.type,
        body=req.body,
    )


def message_from_pb(p: pb.Message) -> StoredMessage:
    return StoredMessage(
        conv=p.conv,
        seq=p.seq,
        mid=p.mid,
        sender=p.sender,
        device=p.device,
        cmid=p.cmid,
        ts=p.ts,
        type=p.type,
        body=p.body,
    )


def error_from_pb(r: pb.Result) -> ImError:
    try:
        code = ErrorCode(r.error_code)
    except ValueError:
        code = ErrorCode.INTERNAL
    return ImError(code, r.error_message)
