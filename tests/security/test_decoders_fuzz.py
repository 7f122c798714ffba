"""Property-based tests (Hypothesis) of every decoder a client's bytes reach.

- JSON and MessagePack client frames (``decode_client``), and ``ServerSession.receive`` before and after
  authentication;
- the TCP framing (``TcpConnection`` behind an in-memory transport), in arbitrary chunkings;
- the WebSocket opening handshake and frame parser (``ServerProtocol``): arbitrary bytes, mutated
  requests and mutated valid frames, in arbitrary chunkings.

The properties: arbitrary input gives a documented error code or close code and never an exception out
of the connection; the outcome does not depend on how the bytes were split into reads; well-formed input
round-trips. Runs are derandomized with a bounded number of examples and no deadline, so they are
repeatable and fit a loaded 2-core machine; ``IM_FUZZ_EXAMPLES`` raises the count for a longer hunt.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
from pathlib import Path
from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from im.gateway.tcp_connection import TcpConnection
from im.gateway.ws_protocol import (
    CloseCode,
    Closed,
    Message,
    Opened,
    Oversized,
    Rejected,
    ServerProtocol,
    State,
    WsSettings,
)
from im.model.chat import SyncPoint
from im.model.errors import ErrorCode, ImError
from im.net import Admission
from im.protocol import commands as cmd
from im.protocol.codec import Encoding, decode_client, decode_server, encode
from im.protocol.frames import Auth, Bye, Error, Ping, Pong, Read, Recv, Send, Typing
from im.protocol.messages import EncodedCache
from im.protocol.session import Limits, ServerSession
from im.protocol.tcp_framing import encode_frame
from tests.support.pump import PumpHub
from tests.test_ws_protocol import frame as ws_frame
from tests.test_ws_protocol import request, server_frames

FUZZ = settings(
    max_examples=int(os.environ.get("IM_FUZZ_EXAMPLES", "150")),
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

#: What docs/protocol.md section 13 lets a decoder answer arbitrary input with.
DECODE_ERRORS = {ErrorCode.BAD_FRAME, ErrorCode.UNKNOWN_TYPE, ErrorCode.TOO_LARGE, ErrorCode.INVALID}
#: Every error code a connection may send (section 13) and bye code (section 14).
SESSION_CODES = {c.value for c in ErrorCode}
#: Close codes the WebSocket layer fails a connection with (section 14).
WS_FAIL_CODES = {CloseCode.PROTOCOL_ERROR, CloseCode.INVALID_DATA, CloseCode.MESSAGE_TOO_BIG}
TAGS = ["auth", "send", "recv", "read", "typing", "ping"]

# --- strategies --------------------------------------------------------------------------------------


def json_values(max_int: int, finite: bool = False) -> st.SearchStrategy[Any]:
    """JSON-like values; integers up to ``max_int`` in size (MessagePack stops at 64 bits); ``finite``:
    no NaN or infinity (JSON has no spelling for them)."""
    floats = st.floats(allow_nan=not finite, allow_infinity=not finite)
    scalars = st.none() | st.booleans() | st.integers(-max_int, max_int) | floats | st.text(max_size=20)
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
        max_leaves=12,
    )


small_values, big_values, plain_values = json_values(2**63), json_values(2**70), json_values(2**63 - 1, finite=True)
frame_keys = st.sampled_from(["t", "token", "device", "cursors", "cmid", "body", "conv", "to", "type", "seq", "id"])
#: Objects shaped like client frames: a known or unknown ``t`` and fields of any type.
tags = st.sampled_from([*TAGS, "bogus", None]) | st.text(max_size=6)


def _with_tag(t: str | None, fields: dict[str, Any]) -> dict[str, Any]:
    return {**fields, "t": t} if t is not None else fields


#: Objects shaped like client frames: a known or unknown ``t`` and fields of any type.
frame_like = st.builds(_with_tag, tags, st.dictionaries(frame_keys, small_values, max_size=6))
big_frame_like = st.builds(_with_tag, tags, st.dictionaries(frame_keys, big_values, max_size=6))


def encoded(obj: Any, binary: bool) -> bytes:
    if binary:
        return msgspec.msgpack.encode(obj)
    return json.dumps(obj, allow_nan=True).encode()


client_payloads = st.one_of(
    st.binary(max_size=200),
    st.builds(encoded, frame_like, st.booleans()),
    st.builds(lambda obj: json.dumps(obj).encode(), big_frame_like),
)


def _text(max_size: int) -> st.SearchStrategy[str]:
    """Text a store keeps: no NUL (frames refuse it in cmid, type and device)."""
    return st.text(alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=max_size)


#: Frames inside every documented range (docs/protocol.md section 1): they decode to themselves.
valid_frames = st.one_of(
    st.builds(
        Auth,
        token=st.text(max_size=30),
        device=_text(10),
        cursors=st.dictionaries(st.text(max_size=10), st.integers(0, 2**63 - 1), max_size=3),
    ),
    st.builds(
        Send,
        cmid=_text(10),
        body=plain_values,
        conv=st.none() | st.text(max_size=12),
        to=st.none() | st.integers(1, 2**63 - 1),
        type=_text(8),
    ),
    st.builds(Recv, conv=st.text(max_size=12), seq=st.integers(0, 2**63 - 1)),
    st.builds(Read, conv=st.text(max_size=12), seq=st.integers(0, 2**63 - 1)),
    st.builds(Typing, conv=st.text(max_size=12)),
    st.builds(Ping, id=st.none() | st.integers(0, 2**63 - 1)),
)


def chunkings(data: bytes, split: int | list[int]) -> list[bytes]:
    """``data`` cut into reads: every ``split`` bytes, or at the listed points (modulo its length)."""
    if isinstance(split, int):
        return [data[i : i + split] for i in range(0, len(data), split)]
    points = sorted({c % (len(data) + 1) for c in split} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


#: How a stream is cut into reads: small fixed steps (cuts inside every header and masking key) or a
#: few cuts anywhere.
cut_lists = st.integers(1, 9) | st.lists(st.integers(min_value=0, max_value=10**6), max_size=12)


# --- JSON and MessagePack client frames --------------------------------------------------------------


@FUZZ
@given(data=client_payloads, binary=st.booleans())
def test_decode_client_answers_anything_with_a_frame_or_a_documented_error(data: bytes, binary: bool) -> None:
    try:
        decode_client(data, Encoding.MSGPACK if binary else Encoding.JSON)
    except ImError as exc:
        assert exc.code in DECODE_ERRORS and exc.message


@FUZZ
@given(f=valid_frames, binary=st.booleans())
def test_well_formed_client_frames_round_trip(f: Any, binary: bool) -> None:
    encoding = Encoding.MSGPACK if binary else Encoding.JSON
    assert decode_client(encode(f, encoding), encoding) == f


def _check_output(session: ServerSession, encoding: Encoding) -> list[Any]:
    """Every frame the session queued decodes as a server frame with a documented code."""
    out = [decode_server(raw, encoding) for raw in session.data_to_send()]
    for f in out:
        assert isinstance(f, Error | Pong | Bye), f
        if isinstance(f, Error | Bye):
            assert f.code in SESSION_CODES, f
    return out


@FUZZ
@given(messages=st.lists(st.tuples(client_payloads, st.booleans()), min_size=1, max_size=8))
def test_session_before_auth_takes_anything(messages: list[tuple[bytes, bool]]) -> None:
    session = ServerSession(EncodedCache(), limits=Limits(max_frame_bytes=1024), clock=lambda: 0.0)
    first_binary = messages[0][1]
    for data, binary in messages:
        commands = session.receive(data, binary)
        assert all(isinstance(c, cmd.Authenticate) for c in commands), commands
        _check_output(session, Encoding.MSGPACK if first_binary else Encoding.JSON)


@FUZZ
@given(messages=st.lists(st.tuples(client_payloads, st.booleans()), min_size=1, max_size=8), binary=st.booleans())
def test_session_after_auth_takes_anything(messages: list[tuple[bytes, bool]], binary: bool) -> None:
    session = ServerSession(EncodedCache(), clock=lambda: 0.0)
    encoding = Encoding.MSGPACK if binary else Encoding.JSON
    session.receive(encode(Auth(token="t", device="d"), encoding), binary)
    session.auth_succeeded(7, "d", [SyncPoint("d:1:7", 0, 0), SyncPoint("g:3", 0, 0)], {})
    session.data_to_send()
    for data, _ in messages:
        commands = session.receive(data, binary)
        allowed = (cmd.Submit, cmd.SaveCursor, cmd.MarkRead, cmd.SendTyping)
        assert all(isinstance(c, allowed) for c in commands), commands
        _check_output(session, encoding)


# --- TCP framing -------------------------------------------------------------------------------------


class MemoryTransport:
    """What :class:`TcpConnection` uses of an asyncio transport, kept in memory."""

    def __init__(self, unread: bool = False) -> None:
        self.unread = unread  # the peer reads nothing: all that was written stays buffered
        self.written = bytearray()
        self.eof = self.aborted = self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.eof and not self.closed, "written after close"
        self.written += data

    def is_closing(self) -> bool:
        return self.eof or self.closed or self.aborted

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def get_write_buffer_size(self) -> int:
        return len(self.written) if self.unread else 0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def _admission() -> Admission:
    """Admission that lets every connection in: the framing, not the caps, is under test here."""
    return Admission(max_connections=1_000, max_per_address=0, max_refusing=0)


def tcp_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(encoding byte, payload) of the server's TCP frames; the bytes must be whole frames."""
    out, pos = [], 0
    while pos < len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        assert length >= 1 and pos + 4 + length <= len(data), "a partial frame"
        out.append((data[pos + 4], bytes(data[pos + 5 : pos + 4 + length])))
        pos += 4 + length
    return out


def run_tcp(chunks: list[bytes], max_frame: int = 1024) -> tuple[bytes, bool]:
    """Feed ``chunks`` to a fresh TCP connection; what it wrote, and whether it closed its side."""

    async def main() -> tuple[bytes, bool]:
        hub = PumpHub(Limits(max_frame_bytes=max_frame))
        conn = TcpConnection(hub, _admission())  # type: ignore[arg-type]
        transport = MemoryTransport()
        conn.connection_made(transport)  # type: ignore[arg-type]
        for chunk in chunks:
            conn.data_received(chunk)
            for _ in range(3):  # let a spawned authentication finish
                await asyncio.sleep(0)
        conn.connection_lost(None)
        assert hub.added == []
        return bytes(transport.written), transport.eof

    return asyncio.run(main())


def check_tcp_output(written: bytes) -> list[Any]:
    frames = []
    for kind, payload in tcp_frames(written):
        assert kind in (1, 2)
        f = decode_server(payload, Encoding.MSGPACK if kind == 2 else Encoding.JSON)
        assert isinstance(f, Error | Pong | Bye), f
        if isinstance(f, Error | Bye):
            assert f.code in SESSION_CODES
        frames.append(f)
    return frames


tcp_streams = st.one_of(
    st.binary(max_size=300),
    st.lists(st.tuples(st.sampled_from([1, 2, 3, 0]), client_payloads), max_size=5).map(
        lambda fs: b"".join((len(p) + 1).to_bytes(4, "big") + bytes([k]) + p for k, p in fs)
    ),
    st.lists(st.integers(0, 5000), max_size=4).map(  # headers with lengths around the limits
        lambda ns: b"".join(n.to_bytes(4, "big") + b"\x01" + b"{" * min(n, 300) for n in ns)
    ),
)


@FUZZ
@given(data=tcp_streams, cuts=cut_lists)
def test_tcp_framing_takes_anything_in_any_chunking(data: bytes, cuts: Any) -> None:
    whole = run_tcp([data] if data else [])
    check_tcp_output(whole[0])
    assert run_tcp(chunkings(data, cuts)) == whole  # reads split anywhere change nothing


def test_what_a_stranger_makes_the_server_queue_is_capped() -> None:
    """Before auth, answers pile up only to limits.preauth_send_buffer (64 KiB), not the 4 MiB of
    gateway.max_send_buffer: then ``bye slow_consumer`` and the connection is closed."""

    async def main() -> None:
        hub = PumpHub(Limits())
        conn = TcpConnection(hub, _admission())  # type: ignore[arg-type]
        transport = MemoryTransport(unread=True)
        conn.connection_made(transport)  # type: ignore[arg-type]
        ping = encode_frame(b'{"t":"ping","id":1}', False)
        for _ in range(20_000):
            conn.data_received(ping * 10)
            if transport.eof:
                break
        assert transport.eof and 64 * 1024 < len(transport.written) < 70 * 1024
        *_, last = check_tcp_output(bytes(transport.written))
        assert last == Bye(code="slow_consumer", message="too far behind; resume from cursors")
        conn.connection_lost(None)

    asyncio.run(main())


@FUZZ
@given(ids=st.lists(st.integers(0, 2**53), min_size=1, max_size=6), binary=st.booleans(), cuts=cut_lists)
def test_tcp_well_formed_frames_round_trip(ids: list[int], binary: bool, cuts: Any) -> None:
    encoding = Encoding.MSGPACK if binary else Encoding.JSON
    data = b"".join(encode_frame(encode(Ping(id=i), encoding), binary) for i in ids)
    written, closed = run_tcp(chunkings(data, cuts))
    assert check_tcp_output(written) == [Pong(id=i) for i in ids] and not closed


# --- the WebSocket frame parser ----------------------------------------------------------------------


def feed(
    p: ServerProtocol, chunks: list[bytes], max_buffered: int, *, plus_read: bool = False
) -> tuple[list[Any], bytes, State]:
    """Feed ``chunks`` read by read: the events, the bytes answered, the end state. After every read the
    protocol holds at most ``max_buffered`` bytes (plus that read's, with ``plus_read``)."""
    events: list[Any] = []
    out = bytearray()
    for chunk in chunks:
        p.receive_data(chunk)
        events += p.events_received()
        out += p.data_to_send()
        assert p.buffered <= max_buffered + (len(chunk) if plus_read else 0)
    return events, bytes(out), p.state


def run_ws(chunks: list[bytes], settings: WsSettings) -> tuple[list[Any], bytes, State]:
    p = ServerProtocol(settings)
    p.receive_data(request())
    assert isinstance(p.events_received()[0], Opened)
    p.data_to_send()
    return feed(p, chunks, settings.max_message + 14)


def check_ws_outcome(events: list[Any], out: bytes, state: State) -> None:
    for e in events[:-1]:
        assert isinstance(e, Message | Oversized), events
    if events and isinstance(events[-1], Closed):
        closed = events[-1]
        assert closed.code in WS_FAIL_CODES or 1000 <= closed.code <= 4999, closed
        assert state is State.CLOSED
        assert server_frames(out)[-1][0] == 0x8  # a close frame went out (echo or failure)
    else:
        assert state is State.OPEN
        assert all(op == 0xA for op, _, _ in server_frames(out))  # only pongs


SMALL = WsSettings(max_message=64, hard_limit=256, max_fragments=8)

message_parts = st.lists(st.binary(max_size=40), min_size=1, max_size=5)
ws_messages = st.lists(
    st.tuples(st.booleans(), message_parts, st.lists(st.binary(max_size=20), max_size=2)), max_size=5
)


def encode_ws(messages: list[tuple[bool, list[bytes], list[bytes]]]) -> bytes:
    """Masked client frames: each message in the given fragments, pings between the fragments."""
    out = []
    for binary, parts, pings in messages:
        for i, part in enumerate(parts):
            out.append(ws_frame(0x0 if i else (0x2 if binary else 0x1), part, fin=i == len(parts) - 1))
            if i < len(pings):
                out.append(ws_frame(0x9, pings[i]))
    return b"".join(out)


def _texts_valid(messages: list[tuple[bool, list[bytes], list[bytes]]]) -> list[tuple[bool, list[bytes], list[bytes]]]:
    """Text messages made valid UTF-8 (their bytes decoded with replacement, then cut across parts)."""
    fixed = []
    for binary, parts, pings in messages:
        if not binary:
            text = b"".join(parts).decode(errors="replace").encode()
            size = -(-len(text) // len(parts)) or 1
            parts = [text[i : i + size] for i in range(0, len(text), size)] or [b""]
        fixed.append((binary, parts, pings))
    return fixed


@FUZZ
@given(messages=ws_messages.map(_texts_valid), cuts=cut_lists, max_message=st.sampled_from([40, 100, 1000]))
def test_websocket_well_formed_messages_round_trip(messages: list[Any], cuts: Any, max_message: int) -> None:
    """Whole messages are delivered; those over max_message are reported (and dropped) with their size."""
    settings = WsSettings(max_message=max_message, hard_limit=10_000, max_fragments=8)
    events, out, state = run_ws(chunkings(encode_ws(messages), cuts), settings)
    joined = [(b"".join(parts), binary) for binary, parts, _ in messages]
    assert events == [Message(m, b) if len(m) <= max_message else Oversized(len(m), b) for m, b in joined]
    assert server_frames(out) == [(0xA, True, p) for _, parts, pings in messages for p in pings[: len(parts)]]
    assert state is State.OPEN


@FUZZ
@given(data=st.binary(max_size=400), cuts=cut_lists)
def test_websocket_parser_takes_arbitrary_bytes_in_any_chunking(data: bytes, cuts: Any) -> None:
    whole = run_ws([data], SMALL)
    check_ws_outcome(*whole)
    assert run_ws(chunkings(data, cuts), SMALL) == whole


@FUZZ
@given(
    messages=ws_messages,
    edits=st.lists(
        st.tuples(st.integers(0, 10**6), st.integers(0, 255), st.sampled_from(["xor", "set", "del"])),
        min_size=1,
        max_size=3,
    ),
    cuts=cut_lists,
)
def test_websocket_parser_takes_mutated_frames(messages: list[Any], edits: list[Any], cuts: Any) -> None:
    data = bytearray(encode_ws(messages) or b"\x81\x80mask")
    for where, value, how in edits:
        i = where % len(data)
        if how == "xor":
            data[i] ^= value or 1
        elif how == "set":
            data[i] = value
        elif len(data) > 1:
            del data[i]
    whole = run_ws([bytes(data)], SMALL)
    check_ws_outcome(*whole)
    assert run_ws(chunkings(bytes(data), cuts), SMALL) == whole


def run_handshake(chunks: list[bytes]) -> tuple[list[Any], bytes, State]:
    p = ServerProtocol(WsSettings(max_request_bytes=2048, max_headers=10, max_message=64))
    return feed(p, chunks, 2048, plus_read=True)  # the head's bound, plus the read that completes it


header_lines = st.lists(
    st.sampled_from(
        [
            b"Host: x",
            b"Upgrade: websocket",
            b"Connection: Upgrade",
            b"Sec-WebSocket-Version: 13",
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            b"Origin: o",
            b"X: y",
            b"bad line",
            b":",
            b"Sec-WebSocket-Version: 8",
            b"Host: y",
            b"",
        ]
    )
    | st.binary(max_size=30),
    max_size=12,
)
requests = st.one_of(
    st.binary(max_size=300),
    st.builds(
        lambda first, lines, tail: first + b"\r\n" + b"\r\n".join(lines) + b"\r\n\r\n" + tail,
        st.sampled_from(
            [
                b"GET /ws HTTP/1.1",
                b"GET /ws?x HTTP/1.1",
                b"GET /other HTTP/1.1",
                b"POST /ws HTTP/1.1",
                b"GET /ws HTTP/1.0",
                b"GET  /ws HTTP/1.1",
            ]
        )
        | st.binary(max_size=20),
        header_lines,
        st.binary(max_size=40),
    ),
    st.builds(
        lambda edit, tail: bytes(request()).replace(*edit) + tail,
        st.tuples(st.binary(min_size=1, max_size=4), st.binary(max_size=4)),
        st.binary(max_size=40),
    ),
)


@FUZZ
@given(data=requests, cuts=cut_lists)
def test_handshake_takes_anything_in_any_chunking(data: bytes, cuts: Any) -> None:
    """An upgrade request is answered 101 or refused with a documented status (400, 404, 426), or more
    bytes are awaited; what follows an accepted one is framing, under the properties above."""
    whole = run_handshake([data])
    events, out, state = whole
    if events and isinstance(events[0], Rejected):
        assert events[0].status in (400, 404, 426) and len(events) == 1 and state is State.CLOSED
        assert out.startswith(f"HTTP/1.1 {events[0].status} ".encode())
    elif events:
        assert isinstance(events[0], Opened) and out.startswith(b"HTTP/1.1 101 ")
        rest = out[out.index(b"\r\n\r\n") + 4 :]
        check_ws_outcome(events[1:], rest, state)
    else:
        assert out == b"" and state is State.HANDSHAKE
    assert run_handshake(chunkings(data, cuts)) == whole


def test_every_decode_error_code_is_documented() -> None:
    """The codes the properties accept are the ones docs/protocol.md section 13 lists."""
    text = (Path(__file__).parents[2] / "docs" / "protocol.md").read_text(encoding="utf-8")
    for code in SESSION_CODES - {"internal"}:
        assert f"`{code}`" in text, code
