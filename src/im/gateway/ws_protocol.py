"""The server side of RFC 6455 as a state machine with no I/O: the opening handshake, then framing.

The pump feeds it bytes and reads back events and bytes to write, as in python-websockets' core::

    proto = ServerProtocol(settings)
    proto.receive_data(chunk)
    for event in proto.events_received():   # Opened, Message, Oversized, Closed, Rejected
        ...
    transport.write(proto.data_to_send())

Messages the server sends are framed by :func:`encode_frames` and written by the pump directly (one
write for many frames); the pump must stop writing them once it has seen :class:`Closed` or called
:meth:`ServerProtocol.close`. After the state is ``CLOSED`` the pump should half-close the TCP connection
(RFC 6455 section 7.1.1: the server closes the TCP connection first) and drop it if the client does not.

What this layer does not do: extensions (permessage-deflate is never accepted, section 9), subprotocols
(section 1.9), or keepalive pings of its own. It enforces no timeouts: the pump owns the clock. A text
message's fragments are checked for UTF-8 as they arrive, so a message whose prefix is already invalid
fails at once (section 8.1); an unfragmented one is checked whole.

Memory: an idle connection holds this object's slots and nothing else; the receive buffer exists only
while a frame is incomplete, and the handshake's request is dropped once the upgrade is answered. What a
client can make this object hold is bounded by the settings, whatever it sends: the request head
(``max_request_bytes``), one incomplete frame (``max_message`` plus a 14-byte header: larger frames are
dropped as they arrive), and one message being reassembled, kept in one growing ``bytearray`` (never a
list of fragments) of at most ``max_message`` bytes. A message may come in at most ``max_fragments``
frames, and each fragment after the first is charged ``FRAGMENT_COST`` bytes toward ``limit``, so that
floods of empty or tiny continuation frames cost the sender as much as they cost the server.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import NamedTuple

__all__ = [
    "FRAGMENT_COST",
    "GUID",
    "CloseCode",
    "Closed",
    "Event",
    "Message",
    "Opened",
    "Oversized",
    "Rejected",
    "ServerProtocol",
    "State",
    "WsSettings",
    "accept_value",
    "encode_close",
    "encode_frames",
    "unmask",
]

#: RFC 6455 section 1.3: appended to the client's key before hashing.
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

# Opcodes (section 5.2)
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

#: Bytes each fragment after a message's first counts toward ``WsSettings.limit``, on top of its
#: payload: roughly what parsing a frame costs, so empty continuation frames are not free.
FRAGMENT_COST = 64

_Utf8Decoder = codecs.getincrementaldecoder("utf-8")


class CloseCode(IntEnum):
    """Status codes of section 7.4.1 (and 1012-1014 from the IANA registry)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    NO_STATUS = 1005  # never sent: reported when a close frame carries no code
    ABNORMAL = 1006  # never sent: the TCP connection ended without a close frame
    INVALID_DATA = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013


# Section 7.4.1/7.4.2: what a peer may put in a close frame (1004-1006 and 1015 are reserved).
_VALID_CLOSE = frozenset({1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014})


class State(Enum):
    HANDSHAKE = "handshake"  # reading the HTTP upgrade request
    OPEN = "open"
    CLOSING = "closing"  # we sent a close frame; waiting for the client's
    CLOSED = "closed"  # nothing more is read or sent; the pump closes the TCP connection


_HANDSHAKE, _OPEN, _CLOSING, _CLOSED = State.HANDSHAKE, State.OPEN, State.CLOSING, State.CLOSED


# --- events -----------------------------------------------------------------------------------------
# Small tuples: one is made per message on the hot path, and a tuple is the cheapest object to build.


class Opened(NamedTuple):
    """The upgrade was accepted (the 101 response is in :meth:`ServerProtocol.data_to_send`)."""

    target: str  # request target as sent, query included
    headers: dict[str, str]  # lower-cased names; repeated headers joined with ", "


class Message(NamedTuple):
    """A whole message (fragments joined, unmasked; text already checked to be UTF-8)."""

    data: bytes
    binary: bool


class Oversized(NamedTuple):
    """A message over ``max_message`` (and within ``hard_limit``): its bytes were read and dropped."""

    size: int
    binary: bool


class Closed(NamedTuple):
    """The connection is closed at the WebSocket level: the client's close frame arrived (its code), or
    this side failed the connection (section 7.1.7, our code). Emitted once."""

    code: int
    reason: str


class Rejected(NamedTuple):
    """The opening handshake was refused with an HTTP error (the response is in data_to_send)."""

    status: int
    reason: str


Event = Opened | Message | Oversized | Closed | Rejected


@dataclass(frozen=True, slots=True)
class WsSettings:
    """The tunables, shared by every connection of a listener (one reference per connection)."""

    #: Request path accepted for the upgrade (the query string is ignored); other paths get 404.
    path: str = "/ws"
    #: Largest message delivered as :class:`Message`; larger ones become :class:`Oversized`.
    max_message: int = 64 * 1024
    #: Messages over this are not read at all: close 1009 (section 7.4.1). Default: 4 x max_message.
    #: Fragments after the first count ``FRAGMENT_COST`` bytes each toward it.
    hard_limit: int = 0
    #: Frames one message may be split into (a first frame and its continuations); more: close 1009.
    #: Real clients fragment rarely, and then in KiB-sized pieces (gorilla/websocket: 4 KiB).
    max_fragments: int = 256
    #: Request line plus headers, in bytes (what h11 allows by default), and the number of headers.
    max_request_bytes: int = 16 * 1024
    max_headers: int = 100
    #: Called with the ``Origin`` header (None when absent); False refuses with 403 (section 10.2).
    check_origin: Callable[[str | None], bool] | None = None

    @property
    def limit(self) -> int:
        return self.hard_limit or 4 * self.max_message


_DEFAULT_SETTINGS = WsSettings()


# --- pure helpers -----------------------------------------------------------------------------------


def accept_value(key: str) -> str:
    """``Sec-WebSocket-Accept`` for a ``Sec-WebSocket-Key`` (section 4.2.2, step 5.4)."""
    return base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()


_XOR_TABLES = [bytes(b ^ k for b in range(256)) for k in range(256)]
_REPEAT = [sum(1 << (32 * i) for i in range(k)) for k in range(257)]  # x * _REPEAT[k]: k copies of 32-bit x
_tuple_new = tuple.__new__


def unmask(data: bytes | bytearray, mask: bytes | bytearray) -> bytes:
    """Apply a 4-byte masking key (section 5.3).

    Pure Python, two ways: small payloads as one big-integer XOR (about 0.5 us for 150 bytes), large
    ones as four strided ``bytes.translate`` passes (about 60 us for 64 KiB, twice as fast as the
    integer way there).
    """
    n = len(data)
    if n <= 1024:
        k = (n + 3) >> 2
        key = int.from_bytes(mask, "little") * _REPEAT[k]  # the mask repeated k times
        return (int.from_bytes(data, "little") ^ key).to_bytes(k << 2, "little")[:n]
    out = bytearray(n)
    tables = _XOR_TABLES
    out[0::4] = data[0::4].translate(tables[mask[0]])
    out[1::4] = data[1::4].translate(tables[mask[1]])
    out[2::4] = data[2::4].translate(tables[mask[2]])
    out[3::4] = data[3::4].translate(tables[mask[3]])
    return bytes(out)


try:  # the C implementation that ships with the websockets package: about 0.08 us for 160 bytes
    from websockets.speedups import apply_mask as _c_apply_mask

    def _apply_mask(data: bytes | bytearray, mask: bytes | bytearray) -> bytes:
        return _c_apply_mask(data, mask)

except ImportError:  # pragma: no cover - a build of websockets without its C extension
    _apply_mask = unmask


_pack7 = struct.Struct("!BB").pack
_pack16 = struct.Struct("!BBH").pack
_pack64 = struct.Struct("!BBQ").pack


def _header(first: int, n: int) -> bytes:
    if n < 126:
        return _pack7(first, n)
    if n < 65536:
        return _pack16(first, 126, n)
    return _pack64(first, 127, n)


def encode_frames(payloads: list[bytes], binary: bool) -> bytes:
    """Unmasked server-to-client frames (section 5.2, FIN set), one message each, concatenated."""
    first = 0x82 if binary else 0x81
    if len(payloads) == 1:
        data = payloads[0]
        n = len(data)
        return (_pack7(first, n) if n < 126 else _pack16(first, 126, n) if n < 65536 else _pack64(first, 127, n)) + data
    parts: list[bytes] = []
    for data in payloads:
        parts.append(_header(first, len(data)))
        parts.append(data)
    return b"".join(parts)


def encode_close(code: int, reason: str = "") -> bytes:
    """A close frame (section 5.5.1); the reason is cut to fit the 125-byte control payload."""
    if code == CloseCode.NO_STATUS:
        return b"\x88\x00"
    text = reason.encode()
    if len(text) > 123:  # cut on a character boundary: the reason must stay valid UTF-8
        text = text[:123].decode(errors="ignore").encode()
    payload = code.to_bytes(2, "big") + text
    return _header(0x88, len(payload)) + payload


def _utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


class _Fail(Exception):
    """Section 7.1.7, "Fail the WebSocket Connection", with this close code."""

    def __init__(self, code: int, reason: str) -> None:
        self.code = code
        self.reason = reason


_PHRASES = {400: "Bad Request", 403: "Forbidden", 404: "Not Found", 426: "Upgrade Required"}


def _http_error(status: int, reason: str, extra: str = "") -> bytes:
    body = (reason + "\n").encode()
    return (
        f"HTTP/1.1 {status} {_PHRASES[status]}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n{extra}\r\n"
    ).encode() + body


# --- the state machine ------------------------------------------------------------------------------


class ServerProtocol:
    """One server-side WebSocket connection: bytes in, events and bytes out."""

    __slots__ = (
        "_buf",
        "_events",
        "_frags",
        "_msg_op",
        "_msg_size",
        "_nfrags",
        "_out",
        "_settings",
        "_skip",
        "_skip_fin",
        "_utf8",
        "state",
    )

    def __init__(self, settings: WsSettings = _DEFAULT_SETTINGS) -> None:
        self._settings = settings
        self.state = _HANDSHAKE
        self._buf: bytearray | None = None  # an incomplete request or frame; None when there is none
        self._events: list[Event] | None = None
        self._out: list[bytes] | None = None
        # The message being received in fragments: opcode (0: none), payload size so far, frames so
        # far, the payload reassembled in one buffer (None while the message is over max_message and
        # dropped), and for text the UTF-8 check of what came so far.
        self._msg_op = 0
        self._msg_size = 0
        self._nfrags = 0
        self._frags: bytearray | None = None
        self._utf8: codecs.IncrementalDecoder | None = None
        self._skip = 0  # payload bytes of the current frame still to drop
        self._skip_fin = False

    # --- the three calls ---------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Take bytes from the network (an empty ``data`` is ignored; EOF is the pump's business)."""
        state = self.state
        if state is not _OPEN and state is not _CLOSING:
            if state is _HANDSHAKE:
                self._receive_request(data)
            return
        buf = self._buf
        pending: bytes | bytearray = data
        if buf is not None:
            buf += data
            pending = buf
        try:
            pos = self._parse(pending)
        except _Fail as exc:
            self._fail(exc.code, exc.reason)
            return
        if pos == len(pending) or self.state is _CLOSED:
            self._buf = None
        elif buf is not None:
            del buf[:pos]
        else:
            self._buf = bytearray(memoryview(data)[pos:])

    def events_received(self) -> list[Event]:
        """What happened since the last call, in order."""
        events = self._events
        if events is None:
            return []
        self._events = None
        return events

    def data_to_send(self) -> bytes:
        """Bytes to write: the handshake response, pongs, close frames (b"" when there are none)."""
        out = self._out
        if out is None:
            return b""
        self._out = None
        return out[0] if len(out) == 1 else b"".join(out)

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete request or frame (at most one frame of ``max_message``)."""
        return len(self._buf) if self._buf is not None else 0

    # --- what the server starts --------------------------------------------------------------------

    def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Start the closing handshake (section 7.1.2); the client's close frame then ends it."""
        if self.state is _OPEN:
            self._send(encode_close(code, reason))
            self.state = _CLOSING
        elif self.state is _HANDSHAKE:
            self.state = _CLOSED
            self._buf = None

    # --- the opening handshake (section 4.2) -------------------------------------------------------

    def _receive_request(self, data: bytes) -> None:
        buf = self._buf
        start = 0
        if buf is None:
            buf = self._buf = bytearray(data)
        else:
            start = max(0, len(buf) - 3)
            buf += data
        end = buf.find(b"\r\n\r\n", start)
        limit = self._settings.max_request_bytes
        if end < 0:
            if len(buf) > limit:
                self._reject(400, "request headers too large")
            return
        if end > limit:
            self._reject(400, "request headers too large")
            return
        head, rest = bytes(buf[:end]), bytes(buf[end + 4 :])
        self._buf = None
        refused = self._handshake(head)
        if refused is not None:
            self._reject(*refused)
        elif rest:  # frames the client sent right behind its request
            self.receive_data(rest)

    def _handshake(self, head: bytes) -> tuple[int, str, str] | None:
        """Check the request (section 4.2.1); queue the 101 response, or return (status, reason, headers)."""
        s = self._settings
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or parts[0] != b"GET" or parts[2] != b"HTTP/1.1" or b"\n" in lines[0]:
            return 400, "expected GET <path> HTTP/1.1", ""
        if len(lines) - 1 > s.max_headers:
            return 400, "too many headers", ""
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not name or b" " in name or b"\t" in name or b"\r" in line or b"\n" in line:
                return 400, "malformed header line", ""
            key = name.decode("latin-1").lower()
            text = value.strip(b" \t").decode("latin-1")
            if key in headers:
                if key in ("host", "sec-websocket-key", "sec-websocket-version"):
                    return 400, f"repeated {key} header", ""
                headers[key] += ", " + text
            else:
                headers[key] = text
        if "host" not in headers:
            return 400, "missing Host header", ""
        target = parts[1].decode("latin-1")
        if target.partition("?")[0] != s.path:
            return 404, f"no WebSocket endpoint at {target.partition('?')[0]}; use {s.path}", ""
        if "websocket" not in _tokens(headers.get("upgrade", "")) or "upgrade" not in _tokens(
            headers.get("connection", "")
        ):
            return 426, "this is a WebSocket endpoint: send Upgrade: websocket", "Upgrade: websocket\r\n"
        if headers.get("sec-websocket-version") != "13":
            return 426, "unsupported Sec-WebSocket-Version (13 is)", "Sec-WebSocket-Version: 13\r\n"
        key = headers.get("sec-websocket-key", "")
        try:
            valid_key = len(base64.b64decode(key, validate=True)) == 16
        except (binascii.Error, ValueError):
            valid_key = False
        if not valid_key:
            return 400, "invalid Sec-WebSocket-Key", ""
        if s.check_origin is not None and not s.check_origin(headers.get("origin")):
            return 403, "origin not allowed", ""
        self._send(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept_value(key).encode() + b"\r\n\r\n"
        )
        self.state = _OPEN
        self._event(Opened(target, headers))
        return None

    def _reject(self, status: int, reason: str, extra: str = "") -> None:
        self._send(_http_error(status, reason, extra))
        self._event(Rejected(status, reason))
        self.state = _CLOSED
        self._buf = None

    # --- framing (section 5) -----------------------------------------------------------------------

    def _parse(self, data: bytes | bytearray) -> int:
        """Handle every whole frame in ``data``; return where the first incomplete one starts."""
        end = len(data)
        pos = 0
        s = self._settings
        while pos < end:
            if self._skip:
                dropped = min(self._skip, end - pos)
                self._skip -= dropped
                pos += dropped
                if self._skip:
                    break
                self._dropped_frame()
                continue
            if end - pos < 2:
                break
            b0 = data[pos]
            b1 = data[pos + 1]
            if b0 & 0x70:
                raise _Fail(CloseCode.PROTOCOL_ERROR, "reserved bits set (no extension was agreed)")
            if not b1 & 0x80:
                raise _Fail(CloseCode.PROTOCOL_ERROR, "client frames must be masked")  # section 5.1
            n = b1 & 0x7F
            if n < 126:
                head = 6
            elif n == 126:
                head = 8
                if end - pos < head:
                    break
                n = data[pos + 2] << 8 | data[pos + 3]
                if n < 126:  # section 5.2: "the minimal number of bytes MUST be used"
                    raise _Fail(CloseCode.PROTOCOL_ERROR, "frame length not minimally encoded")
            else:
                head = 14
                if end - pos < head:
                    break
                n = int.from_bytes(data[pos + 2 : pos + 10], "big")
                if n >> 63:
                    raise _Fail(CloseCode.PROTOCOL_ERROR, "frame length has the high bit set")
                if n < 65536:
                    raise _Fail(CloseCode.PROTOCOL_ERROR, "frame length not minimally encoded")
            op = b0 & 0x0F
            fin = b0 & 0x80
            if op >= 8:  # control frame (section 5.5)
                if op > OP_PONG:
                    raise _Fail(CloseCode.PROTOCOL_ERROR, f"reserved opcode {op:#x}")
                if not fin:
                    raise _Fail(CloseCode.PROTOCOL_ERROR, "fragmented control frame")
                if n > 125:
                    raise _Fail(CloseCode.PROTOCOL_ERROR, "control frame payload over 125 bytes")
            else:
                if op > OP_BINARY:
                    raise _Fail(CloseCode.PROTOCOL_ERROR, f"reserved opcode {op:#x}")
                if self._msg_op:
                    if op != OP_CONT:
                        raise _Fail(CloseCode.PROTOCOL_ERROR, "new message inside a fragmented one")
                    frames = self._nfrags + 1
                elif op == OP_CONT:
                    raise _Fail(CloseCode.PROTOCOL_ERROR, "continuation frame without a message")
                else:
                    frames = 1
                size = self._msg_size + n
                # (A single frame within max_message cannot break a limit: the common case checks nothing.)
                if (frames > 1 or size > s.max_message) and self.state is _OPEN:
                    if frames > s.max_fragments:
                        raise _Fail(CloseCode.MESSAGE_TOO_BIG, f"message in more than {s.max_fragments} fragments")
                    if size + (frames - 1) * FRAGMENT_COST > s.limit:
                        raise _Fail(
                            CloseCode.MESSAGE_TOO_BIG,
                            f"message of {size} bytes or more > {s.limit}"
                            if frames == 1
                            else f"message of {size} bytes in {frames} fragments > {s.limit}",
                        )
                if self.state is _CLOSING or size > s.max_message:
                    if end - pos < head:  # the masking key has not all arrived yet
                        break
                    # Drop the payload as it arrives: it is never buffered (section 10.4).
                    if op != OP_CONT:
                        self._msg_op = op
                    self._msg_size = size
                    self._nfrags = frames
                    self._frags = self._utf8 = None
                    self._skip = n
                    self._skip_fin = bool(fin)
                    pos += head
                    if not n:
                        self._dropped_frame()
                    continue
            if end - pos < head + n:
                break
            start = pos + head
            pos = start + n
            payload = _apply_mask(data[start:pos], data[start - 4 : start])
            if op in (OP_TEXT, OP_BINARY):
                if fin:
                    if op == OP_TEXT and not payload.isascii() and not _utf8(payload):
                        raise _Fail(CloseCode.INVALID_DATA, "text message is not valid UTF-8")
                    event = _tuple_new(Message, (payload, op == OP_BINARY))
                    if self._events is None:
                        self._events = [event]
                    else:
                        self._events.append(event)
                else:
                    self._msg_op = op
                    self._msg_size = n
                    self._nfrags = 1
                    self._frags = bytearray(payload)
                    if op == OP_TEXT:
                        self._utf8 = _Utf8Decoder()
                        self._check_utf8(payload, False)
            elif op == OP_CONT:
                frags = self._frags
                assert frags is not None
                frags += payload
                self._msg_size += n
                self._nfrags += 1
                if self._utf8 is not None:
                    self._check_utf8(payload, bool(fin))
                if fin:
                    message = bytes(frags)
                    op = self._msg_op
                    self._frags = self._utf8 = None
                    self._msg_op = self._msg_size = self._nfrags = 0
                    self._event(Message(message, op == OP_BINARY))
            elif op == OP_PING:
                if self.state is _OPEN:
                    self._send(_header(0x8A, n) + payload)  # section 5.5.3: the same payload back
            elif op == OP_CLOSE:
                self._on_close(payload)
                return pos
            # OP_PONG: unsolicited or not, nothing to do (section 5.5.3)
        return pos

    def _dropped_frame(self) -> None:
        """The payload of a dropped data frame is through; a final one ends its message."""
        if self._skip_fin:
            size, binary, closing = self._msg_size, self._msg_op == OP_BINARY, self.state is _CLOSING
            self._msg_op = self._msg_size = self._nfrags = 0
            if not closing:
                self._event(Oversized(size, binary))

    def _check_utf8(self, part: bytes, final: bool) -> None:
        """Section 8.1: fail as soon as the text received so far cannot begin valid UTF-8."""
        assert self._utf8 is not None
        try:
            self._utf8.decode(part, final)
        except UnicodeDecodeError:
            raise _Fail(CloseCode.INVALID_DATA, "text message is not valid UTF-8") from None

    def _on_close(self, payload: bytes) -> None:
        """Section 5.5.1: echo the client's close (when we did not start it), and we are done."""
        if not payload:
            code, reason = int(CloseCode.NO_STATUS), ""
        else:
            code = int.from_bytes(payload[:2], "big")
            if len(payload) < 2 or not (code in _VALID_CLOSE or 3000 <= code <= 4999):
                raise _Fail(CloseCode.PROTOCOL_ERROR, "invalid close code")
            try:
                reason = payload[2:].decode()
            except UnicodeDecodeError:
                raise _Fail(CloseCode.INVALID_DATA, "close reason is not valid UTF-8") from None
        if self.state is _OPEN:
            self._send(encode_close(code))
        self.state = _CLOSED
        self._event(Closed(code, reason))

    def _fail(self, code: int, reason: str) -> None:
        if self.state is _OPEN:
            self._send(encode_close(code, reason))
            self._event(Closed(code, reason))
        elif self.state is _CLOSING:
            self._event(Closed(code, reason))
        self.state = _CLOSED
        self._buf = None
        self._frags = self._utf8 = None

    # --- queues ------------------------------------------------------------------------------------

    def _event(self, event: Event) -> None:
        if self._events is None:
            self._events = [event]
        else:
            self._events.append(event)

    def _send(self, data: bytes) -> None:
        if self._out is None:
            self._out = [data]
        else:
            self._out.append(data)


def _tokens(value: str) -> list[str]:
    return [t.strip().lower() for t in value.split(",")]
