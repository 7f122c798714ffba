"""The TCP framing with no I/O: one encoder and one parser, shared by the TCP gateway and the SDK.

Wire format (docs/protocol.md, "TCP framing"), both directions::

    +-----------------------+-----------+-------------------------+
    | length L (u32, BE)    | encoding  | payload (L - 1 bytes)   |
    +-----------------------+-----------+-------------------------+
                              0x01 JSON, 0x02 MessagePack

The parser is fed bytes as they arrive and hands back events, in stream order::

    framer = TcpFramer(max_frame, hard_limit=4 * max_frame)     # the server's limits
    for event in framer.receive_data(chunk):   # Frame, Oversized, UnknownEncoding, Broken
        ...

What it does with a payload of ``n`` bytes:

- ``n`` <= ``max_frame``: buffered until whole, then :class:`Frame` (or :class:`UnknownEncoding` when the
  encoding byte is neither 0x01 nor 0x02: that frame is dropped, the stream stays in step).
- ``max_frame`` < ``n`` <= ``hard_limit``: :class:`Oversized` as soon as the header is read; its bytes
  are dropped as they arrive, never buffered, and the stream stays in step.
- ``n`` > ``hard_limit``, or ``L`` = 0: :class:`Broken`. A stream this far off cannot be trusted to
  resynchronise, so the framer reads nothing more; the pump says so and closes.

The SDK uses the strict form: ``hard_limit`` = ``max_frame`` (nothing is skipped) and :meth:`TcpFramer.feed`,
which returns payloads and raises :class:`TcpFramingError` on anything else. What this layer cannot do:
tell a client's bug from an attack, or bound the time a peer takes to send a frame (the pump owns the clock).
What it holds: at most one incomplete frame (``max_frame`` + 4 bytes) while one is arriving, nothing between
frames.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from im.model.errors import ErrorCode

__all__ = [
    "DEFAULT_MAX_FRAME",
    "HEADER_SIZE",
    "JSON_KIND",
    "MSGPACK_KIND",
    "Broken",
    "Event",
    "Frame",
    "Oversized",
    "TcpFramer",
    "TcpFramingError",
    "UnknownEncoding",
    "encode_frame",
    "encode_frames",
]

JSON_KIND = 0x01
MSGPACK_KIND = 0x02
#: The length (4 bytes) and the encoding byte.
HEADER_SIZE = 5
#: Payload bytes a :class:`TcpFramer` accepts by default: what the SDK takes from a server (the server's
#: own limit, ``limits.max_frame_bytes``, is far lower).
DEFAULT_MAX_FRAME = 16 * 1024 * 1024

_HEADER = struct.Struct(">IB")
_pack_header = _HEADER.pack


def encode_frame(payload: bytes, binary: bool) -> bytes:
    """One frame: ``L`` = 1 + payload size, the encoding byte (0x02 when ``binary``, else 0x01), the payload."""
    return _pack_header(len(payload) + 1, MSGPACK_KIND if binary else JSON_KIND) + payload


def encode_frames(payloads: list[bytes], binary: bool) -> bytes:
    """Several frames of one encoding, concatenated (one write for a batch)."""
    kind = MSGPACK_KIND if binary else JSON_KIND
    if len(payloads) == 1:
        data = payloads[0]
        return _pack_header(len(data) + 1, kind) + data
    parts: list[bytes] = []
    for data in payloads:
        parts.append(_pack_header(len(data) + 1, kind))
        parts.append(data)
    return b"".join(parts)


# --- events -----------------------------------------------------------------------------------------
# Small tuples, as in im.gateway.ws_protocol: one is made per frame on the hot path.


class Frame(NamedTuple):
    """A whole frame: its payload, and whether the encoding byte said MessagePack."""

    payload: bytes
    binary: bool


class Oversized(NamedTuple):
    """A payload over ``max_frame`` (and within ``hard_limit``): dropped as it arrives; the stream is fine."""

    size: int


class UnknownEncoding(NamedTuple):
    """A whole frame whose encoding byte is neither 0x01 nor 0x02: dropped; the stream is fine."""

    kind: int

    @property
    def reason(self) -> str:
        return f"unknown encoding byte {self.kind:#04x}"


class Broken(NamedTuple):
    """``L`` = 0 (``bad_frame``) or a payload over ``hard_limit`` (``too_large``): the framer reads nothing
    more. Emitted once, last."""

    code: ErrorCode
    reason: str


Event = Frame | Oversized | UnknownEncoding | Broken

_tuple_new = tuple.__new__


class TcpFramingError(ConnectionError):
    """The byte stream does not follow the TCP framing: it cannot be resynchronised, so close."""


class TcpFramer:
    """Sans-I/O parser of the TCP framing: feed bytes, get events (or, with :meth:`feed`, payloads).

    ``max_frame`` is the largest payload delivered; payloads up to ``hard_limit`` (default: ``max_frame``,
    so none) are skipped as :class:`Oversized`, larger ones break the stream.

    >>> f = TcpFramer()
    >>> data = encode_frame(b'{"t":"pong","id":1}', binary=False)
    >>> f.feed(data[:3]), f.feed(data[3:])
    ([], [b'{"t":"pong","id":1}'])
    """

    __slots__ = ("_broken", "_buf", "_skip", "hard_limit", "max_frame")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME, *, hard_limit: int | None = None) -> None:
        self.max_frame = max_frame
        self.hard_limit = max_frame if hard_limit is None else max(hard_limit, max_frame)
        self._buf = bytearray()
        self._skip = 0  # bytes of an oversized frame still to drop
        self._broken = False

    @property
    def broken(self) -> bool:
        """True once :class:`Broken` was returned: everything fed since is ignored."""
        return self._broken

    @property
    def buffered(self) -> int:
        """Bytes held for a frame not yet whole (never more than ``max_frame`` + 4)."""
        return len(self._buf)

    def receive_data(self, data: bytes) -> list[Event]:
        """The events completed by ``data``, in stream order (none after :class:`Broken`)."""
        if self._broken:
            return []
        if self._skip:
            dropped = min(self._skip, len(data))
            self._skip -= dropped
            data = data[dropped:]
            if not data:
                return []
        buf = self._buf
        buf += data
        events: list[Event] = []
        max_frame, hard_limit = self.max_frame, self.hard_limit
        pos = 0
        end = len(buf)
        while end - pos >= 4:
            length = int.from_bytes(buf[pos : pos + 4], "big")
            if length == 0 or length - 1 > hard_limit:
                self._broken = True
                buf.clear()
                if length == 0:
                    events.append(Broken(ErrorCode.BAD_FRAME, "empty frame"))
                else:
                    events.append(Broken(ErrorCode.TOO_LARGE, f"frame of {length} bytes is far over the limit"))
                return events
            if length - 1 > max_frame:
                # Skip it without buffering: what is here now, and the rest as it arrives.
                available = min(end - pos - 4, length)
                self._skip = length - available
                pos += 4 + available
                events.append(Oversized(length - 1))
                continue
            if end - pos < 4 + length:
                break
            kind = buf[pos + 4]
            payload = bytes(buf[pos + HEADER_SIZE : pos + 4 + length])
            pos += 4 + length
            if kind == JSON_KIND:
                events.append(_tuple_new(Frame, (payload, False)))  # Frame(payload, False), without its __new__
            elif kind == MSGPACK_KIND:
                events.append(_tuple_new(Frame, (payload, True)))
            else:
                events.append(UnknownEncoding(kind))
        if pos:
            del buf[:pos]
        return events

    def feed(self, data: bytes) -> list[bytes]:
        """The payloads completed by ``data``; raises :class:`TcpFramingError` if ``data`` completes anything
        else (an unknown encoding byte, an oversized or empty frame): the strict form the SDK uses."""
        payloads: list[bytes] = []
        for event in self.receive_data(data):
            if isinstance(event, Frame):
                payloads.append(event.payload)
            elif isinstance(event, Oversized):  # only with a hard_limit over max_frame
                raise TcpFramingError(f"frame of {event.size} bytes is over the limit")
            else:
                raise TcpFramingError(event.reason)
        return payloads
