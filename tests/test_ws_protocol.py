"""The sans-I/O RFC 6455 server protocol: bytes in, events and bytes out, with no event loop."""

from __future__ import annotations

import os

import pytest
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

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
    accept_value,
    encode_close,
    encode_frames,
    unmask,
)

KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 section 1.3
MASK = b"\x37\xfa\x21\x3d"


def request(path: str = "/ws", **overrides: str | None) -> bytes:
    headers: dict[str, str | None] = {
        "Host": "server.example.com",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": KEY,
        "Sec-WebSocket-Version": "13",
    }
    headers.update({k.replace("_", "-"): v for k, v in overrides.items()})
    lines = [f"GET {path} HTTP/1.1"] + [f"{k}: {v}" for k, v in headers.items() if v is not None]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def state_of(p: ServerProtocol) -> State:
    """``p.state`` read through a call: mypy would carry an earlier ``is`` narrowing past the feed that changes it."""
    return p.state


def frame(
    op: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bytes | None = MASK,
    length_form: int | None = None,
) -> bytes:
    """A client frame; ``length_form`` forces the 7/16/64-bit length encoding."""
    n = len(payload)
    form = length_form or (7 if n < 126 else 16 if n < 65536 else 64)
    b0 = (0x80 if fin else 0) | rsv << 4 | op
    m = 0x80 if mask is not None else 0
    if form == 7:
        head = bytes((b0, m | n))
    elif form == 16:
        head = bytes((b0, m | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((b0, m | 127)) + n.to_bytes(8, "big")
    if mask is None:
        return head + payload
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def server_frames(data: bytes) -> list[tuple[int, bool, bytes]]:
    """(opcode, fin, payload) of unmasked server frames."""
    out = []
    pos = 0
    while pos < len(data):
        b0, b1 = data[pos], data[pos + 1]
        assert not b1 & 0x80, "server frames are not masked"
        n, pos = b1 & 0x7F, pos + 2
        if n == 126:
            n, pos = int.from_bytes(data[pos : pos + 2], "big"), pos + 2
        elif n == 127:
            n, pos = int.from_bytes(data[pos : pos + 8], "big"), pos + 8
        out.append((b0 & 0x0F, bool(b0 & 0x80), data[pos : pos + n]))
        pos += n
    return out


def close_frame(data: bytes) -> tuple[int, str]:
    [(op, fin, payload)] = server_frames(data)
    assert op == 0x8 and fin
    return int.from_bytes(payload[:2], "big"), payload[2:].decode()


def opened(settings: WsSettings | None = None) -> ServerProtocol:
    p = ServerProtocol(settings) if settings else ServerProtocol()
    p.receive_data(request())
    assert isinstance(p.events_received()[0], Opened)
    assert p.data_to_send().startswith(b"HTTP/1.1 101 ")
    return p


def feed(p: ServerProtocol, data: bytes, chunk: int | None = None) -> list[object]:
    if chunk is None:
        p.receive_data(data)
    else:
        for i in range(0, len(data), chunk):
            p.receive_data(data[i : i + chunk])
    return list(p.events_received())


def assert_failed(p: ServerProtocol, code: int) -> None:
    events = p.events_received()
    assert len(events) == 1 and isinstance(events[0], Closed) and events[0].code == code, events
    assert close_frame(p.data_to_send())[0] == code
    assert p.state is State.CLOSED
    p.receive_data(frame(0x1, b"after"))  # nothing is read any more
    assert p.events_received() == [] and p.data_to_send() == b""


# --- the opening handshake ---------------------------------------------------------------------------


def test_accept_value_of_the_rfc_example() -> None:
    assert accept_value(KEY) == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_handshake_accepts_and_ignores_the_query() -> None:
    p = ServerProtocol()
    p.receive_data(request("/ws?token=x&y=1", Origin="https://chat.example"))
    [event] = p.events_received()
    assert event == Opened(
        "/ws?token=x&y=1",
        {
            "host": "server.example.com",
            "upgrade": "websocket",
            "connection": "Upgrade",
            "sec-websocket-key": KEY,
            "sec-websocket-version": "13",
            "origin": "https://chat.example",
        },
    )
    assert p.data_to_send() == (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
    )
    assert p.state is State.OPEN and p.buffered == 0


def test_handshake_byte_by_byte_then_a_frame_in_the_same_read() -> None:
    p = ServerProtocol()
    data = request(Connection="keep-alive, Upgrade", Upgrade="WebSocket") + frame(0x1, b"hi")
    events = feed(p, data[:-3], chunk=1) + feed(p, data[-3:])
    assert [type(e) for e in events] == [Opened, Message]
    assert events[1] == Message(b"hi", False)


def test_interoperates_with_the_websockets_client() -> None:
    client = ClientProtocol(parse_uri("ws://server.example.com/ws"))
    server = ServerProtocol()
    client.send_request(client.connect())
    server.receive_data(b"".join(client.data_to_send()))
    client.receive_data(server.data_to_send())
    assert isinstance(client.events_received()[0], Response)
    assert isinstance(server.events_received()[0], Opened)
    client.send_text("héllo".encode())
    client.send_binary(b"\x00\x01" * 40_000, fin=False)  # 80 KB: over the default max_message, in fragments
    client.send_continuation(b"!", fin=True)
    server.receive_data(b"".join(client.data_to_send()))
    assert server.events_received() == [Message("héllo".encode(), False), Oversized(80_001, True)]
    client.receive_data(encode_frames([b"a", b"b" * 70_000], binary=False))
    received = client.events_received()
    assert all(isinstance(f, Frame) for f in received), received
    assert [(f.opcode, f.data[:1], len(f.data)) for f in received if isinstance(f, Frame)] == [
        (Opcode.TEXT, b"a", 1),
        (Opcode.TEXT, b"b", 70_000),
    ]
    client.send_close(1000, "done")
    server.receive_data(b"".join(client.data_to_send()))
    assert server.events_received() == [Closed(1000, "done")]
    client.receive_data(server.data_to_send())
    [echo] = client.events_received()
    assert isinstance(echo, Frame) and echo.opcode is Opcode.CLOSE


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\r\n\r\n", 400),  # TLS hello, or any garbage
        (b"POST /ws HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (request().replace(b"HTTP/1.1", b"HTTP/1.0", 1), 400),
        (request().replace(b"Host: server.example.com\r\n", b""), 400),
        (request().replace(b"Upgrade: websocket\r\n", b"Upgrade websocket\r\n"), 400),
        (request(Sec_WebSocket_Key="c2hvcnQ="), 400),
        (request(Sec_WebSocket_Key="not base64!!!!!!!!!!!!!="), 400),
        (request(Sec_WebSocket_Key=None), 400),
        (request("/chat"), 404),
        (request("/"), 404),
        (request("/ws/more?x"), 404),
        (request(Sec_WebSocket_Version=None), 426),
        (request(Sec_WebSocket_Version="8"), 426),
        (request(Upgrade=None), 426),
        (request(Connection="keep-alive"), 426),
    ],
)
def test_handshake_refusals(data: bytes, status: int) -> None:
    p = ServerProtocol()
    p.receive_data(data)
    [event] = p.events_received()
    assert isinstance(event, Rejected) and event.status == status
    response = p.data_to_send()
    assert response.startswith(f"HTTP/1.1 {status} ".encode()) and b"Connection: close\r\n" in response
    if status == 426 and b"Sec-WebSocket-Version: 13" not in data:
        assert b"\r\nSec-WebSocket-Version: 13\r\n" in response
    assert p.state is State.CLOSED
    p.receive_data(frame(0x1, b"x"))
    assert p.events_received() == [] and p.data_to_send() == b""


def test_request_size_and_header_count_limits() -> None:
    p = ServerProtocol(WsSettings(max_request_bytes=1024, max_headers=10))
    p.receive_data(b"GET /ws HTTP/1.1\r\n" + b"X-Pad: " + b"a" * 990)
    assert p.events_received() == []  # under the limit, still waiting for the end of the headers
    p.receive_data(b"a" * 10)
    assert [e.status for e in p.events_received() if isinstance(e, Rejected)] == [400]
    assert p.buffered == 0
    p = ServerProtocol(WsSettings(max_headers=10))
    p.receive_data(request().replace(b"\r\n\r\n", b"\r\n" + b"X-A: 1\r\n" * 6 + b"\r\n"))
    [event] = p.events_received()
    assert isinstance(event, Rejected) and event.status == 400 and "too many" in event.reason


def test_origin_hook() -> None:
    settings = WsSettings(check_origin=lambda origin: origin in {"https://chat.example", None})
    for origin, ok in [("https://chat.example", True), (None, True), ("https://evil.example", False)]:
        p = ServerProtocol(settings)
        p.receive_data(request(Origin=origin))
        [event] = p.events_received()
        assert isinstance(event, Opened) is ok
        if not ok:
            assert event == Rejected(403, "origin not allowed")


# --- framing -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 3, 4, 5, 100, 1023, 1024, 1025, 4097, 65536])
def test_unmask_matches_the_definition(n: int) -> None:
    data, mask = os.urandom(n), os.urandom(4)
    assert unmask(data, mask) == bytes(b ^ mask[i % 4] for i, b in enumerate(data))
    assert unmask(bytearray(data), mask) == unmask(data, mask)


def test_text_and_binary_messages() -> None:
    p = opened()
    events = feed(p, frame(0x1, '{"t":"ping"} ✓'.encode()) + frame(0x2, b"\x81\xa1t\xa4ping"))
    assert events == [Message('{"t":"ping"} ✓'.encode(), False), Message(b"\x81\xa1t\xa4ping", True)]
    assert all(type(e.data) is bytes for e in events if isinstance(e, Message))
    assert p.data_to_send() == b"" and p.buffered == 0


@pytest.mark.parametrize(("n", "form"), [(0, 7), (125, 7), (126, 16), (65535, 16), (65536, 64), (70_000, 64)])
def test_all_length_forms(n: int, form: int) -> None:
    p = opened(WsSettings(max_message=100_000))
    payload = os.urandom(n)
    assert feed(p, frame(0x2, payload, length_form=form)) == [Message(payload, True)]
    assert feed(p, frame(0x2, payload, length_form=form), chunk=4093) == [Message(payload, True)]
    assert p.buffered == 0


def test_many_frames_in_one_read_and_split_anywhere() -> None:
    p = opened()
    data = b"".join(frame(0x1, f"message {i}".encode()) for i in range(50))
    expected = [Message(f"message {i}".encode(), False) for i in range(50)]
    assert feed(p, data) == expected
    assert feed(p, data, chunk=1) == expected
    assert feed(p, data, chunk=7) == expected


def test_a_zero_mask_is_still_a_mask() -> None:
    p = opened()
    assert feed(p, frame(0x1, b"abc", mask=b"\0\0\0\0")) == [Message(b"abc", False)]


def test_fragmented_message_with_an_interleaved_ping() -> None:
    p = opened()
    data = (
        frame(0x1, b"he", fin=False)
        + frame(0x9, b"are you there")
        + frame(0x0, b"ll\xc3", fin=False)
        + frame(0xA, b"unsolicited pong")
        + frame(0x0, b"\xa9!")
    )  # "é" split across fragments
    for chunk in (None, 1, 5):
        assert feed(p, data, chunk) == [Message("hellé!".encode(), False)]
        assert server_frames(p.data_to_send()) == [(0xA, True, b"are you there")]
    assert feed(p, frame(0x2, b"a", fin=False) + frame(0x0, b"", fin=False) + frame(0x0, b"b")) == [
        Message(b"ab", True)
    ]


def test_unmasked_client_frame_is_a_protocol_error() -> None:
    p = opened()
    p.receive_data(frame(0x1, b"hello", mask=None))
    assert_failed(p, CloseCode.PROTOCOL_ERROR)


@pytest.mark.parametrize(
    "data",
    [
        frame(0x1, b"x", rsv=4),  # RSV1 without an extension
        frame(0x1, b"x", rsv=1),
        frame(0x3, b"x"),  # reserved data opcode
        frame(0xB, b"x"),  # reserved control opcode
        frame(0x9, b"x" * 126),  # control payload over 125
        frame(0x9, b"x", fin=False),  # fragmented control frame
        frame(0x0, b"x"),  # continuation with nothing to continue
        frame(0x1, b"x", fin=False) + frame(0x2, b"y"),  # a new message inside a fragmented one
        frame(0x8, b"\x03"),  # close payload of one byte
        frame(0x8, (1005).to_bytes(2, "big")),  # a code that must not be sent
        frame(0x8, (999).to_bytes(2, "big")),
        frame(0x8, (5000).to_bytes(2, "big")),
        bytes((0x82, 0xFF)) + (1 << 63).to_bytes(8, "big") + MASK,  # 64-bit length with the high bit set
    ],
)
def test_protocol_errors_close_1002(data: bytes) -> None:
    p = opened()
    p.receive_data(frame(0x1, b"before") + data)
    events = p.events_received()
    assert events[0] == Message(b"before", False)
    assert isinstance(events[1], Closed) and events[1].code == 1002
    assert close_frame(p.data_to_send())[0] == 1002
    assert p.state is State.CLOSED


@pytest.mark.parametrize(
    "data",
    [
        frame(0x1, b"caf\xe9"),
        frame(0x1, b"\xed\xa0\x80"),  # an encoded surrogate
        frame(0x1, b"ok \xc3", fin=False) + frame(0x0, b"("),
        frame(0x8, (1000).to_bytes(2, "big") + b"\xff"),  # close reason
    ],
)
def test_invalid_utf8_closes_1007(data: bytes) -> None:
    p = opened()
    p.receive_data(data)
    assert_failed(p, CloseCode.INVALID_DATA)


def test_binary_messages_are_not_checked_for_utf8() -> None:
    p = opened()
    assert feed(p, frame(0x2, b"\xff\xfe")) == [Message(b"\xff\xfe", True)]


def test_client_starts_the_closing_handshake() -> None:
    p = opened()
    events = feed(
        p,
        frame(0x1, b"last")
        + frame(0x8, (1000).to_bytes(2, "big") + "au revoir ✓".encode())
        + frame(0x1, b"after close"),
    )
    assert events == [Message(b"last", False), Closed(1000, "au revoir ✓")]
    assert close_frame(p.data_to_send()) == (1000, "")  # the code echoed (section 5.5.1)
    assert p.state is State.CLOSED and p.buffered == 0
    p.close(1001, "too late")
    assert p.data_to_send() == b""


def test_empty_close_is_echoed_empty() -> None:
    p = opened()
    assert feed(p, frame(0x8)) == [Closed(1005, "")]
    assert server_frames(p.data_to_send()) == [(0x8, True, b"")]


def test_application_close_codes_are_accepted() -> None:
    p = opened()
    assert feed(p, frame(0x8, (4000).to_bytes(2, "big"))) == [Closed(4000, "")]
    assert close_frame(p.data_to_send()) == (4000, "")


def test_server_starts_the_closing_handshake() -> None:
    p = opened()
    p.close(CloseCode.GOING_AWAY, "server is stopping" + "!" * 200)
    code, reason = close_frame(p.data_to_send())
    assert code == 1001 and reason.startswith("server is stopping") and len(reason) == 123
    assert p.state is State.CLOSING
    # While closing: data is read past (even over the limits), pings are not answered.
    events = feed(p, frame(0x1, b"late") + frame(0x9, b"p") + frame(0x2, b"x" * 300_000) + frame(0x8, b"\x03\xe8"))
    assert events == [Closed(1000, "")]
    assert p.data_to_send() == b"" and state_of(p) is State.CLOSED


def test_close_before_the_upgrade() -> None:
    p = ServerProtocol()
    p.receive_data(b"GET /ws HTTP/1.1\r\n")
    p.close()
    assert p.state is State.CLOSED and p.data_to_send() == b"" and p.buffered == 0


def test_oversized_message_is_reported_and_the_connection_stays_open() -> None:
    p = opened(WsSettings(max_message=1000))
    big = frame(0x1, b"x" * 1001)
    events = feed(p, big, chunk=100)
    assert events == [Oversized(1001, False)]
    assert p.buffered < 100  # dropped as it arrived
    assert feed(p, frame(0x2, b"y" * 4000) + frame(0x1, b"fine")) == [Oversized(4000, True), Message(b"fine", False)]
    assert p.data_to_send() == b""


def test_oversized_fragmented_message_with_a_ping() -> None:
    p = opened(WsSettings(max_message=1000))
    data = (
        frame(0x2, b"a" * 600, fin=False)
        + frame(0x0, b"b" * 600, fin=False)
        + frame(0x9, b"?")
        + frame(0x0, b"c" * 600)
        + frame(0x1, b"next")
    )
    assert feed(p, data, chunk=50) == [Oversized(1800, True), Message(b"next", False)]
    assert server_frames(p.data_to_send()) == [(0xA, True, b"?")]
    assert p.buffered == 0


def test_hard_limit_closes_1009_on_the_header_alone() -> None:
    p = opened(WsSettings(max_message=1000))  # hard limit 4000
    p.receive_data(frame(0x2, b"z" * 4001)[:14])  # the header and mask: the payload is never read
    assert_failed(p, CloseCode.MESSAGE_TOO_BIG)
    p = opened(WsSettings(max_message=1000, hard_limit=2000))
    assert feed(p, frame(0x2, b"z" * 2000)) == [Oversized(2000, True)]
    p.receive_data(frame(0x2, b"z" * 2001))
    assert_failed(p, CloseCode.MESSAGE_TOO_BIG)


def test_hard_limit_across_fragments() -> None:
    p = opened(WsSettings(max_message=1000))
    p.receive_data(b"".join(frame(0x0 if i else 0x1, b"f" * 900, fin=False) for i in range(4)))
    assert p.events_received() == []
    p.receive_data(frame(0x0, b"f" * 500))
    assert_failed(p, CloseCode.MESSAGE_TOO_BIG)


# --- what the server writes --------------------------------------------------------------------------


def test_encode_frames_uses_every_length_form() -> None:
    payloads = [b"", b"a" * 125, b"b" * 126, b"c" * 65535, b"d" * 65536]
    assert server_frames(encode_frames(payloads, binary=True)) == [(0x2, True, d) for d in payloads]
    assert encode_frames([b"hi"], binary=False) == b"\x81\x02hi"
    assert encode_frames([b"a" * 126], binary=True)[:4] == b"\x82\x7e\x00\x7e"
    assert encode_frames([b"a" * 65536], binary=True)[:10] == b"\x82\x7f" + (65536).to_bytes(8, "big")


def test_encode_close() -> None:
    assert encode_close(1000) == b"\x88\x02\x03\xe8"
    assert encode_close(1005) == b"\x88\x00"
    assert close_frame(encode_close(4001, "x" * 300)) == (4001, "x" * 123)
    assert close_frame(encode_close(1000, "x" + "é" * 100)) == (1000, "x" + "é" * 61)  # whole characters only


# --- RFC 6455 hard cases, in the spirit of the Autobahn test suite's case list ------------------------
# Each case: bytes after a good message; the connection must fail with the named close code, the good
# message before it must still be delivered, and nothing after the failing frame is read.


def _closes(p: ServerProtocol, data: bytes, code: int, chunk: int | None = None) -> list[object]:
    events = feed(p, data, chunk)
    assert events and isinstance(events[-1], Closed) and events[-1].code == code, events
    frames = server_frames(p.data_to_send())
    assert frames[-1][0] == 0x8 and int.from_bytes(frames[-1][2][:2], "big") == code
    assert p.state is State.CLOSED and p.buffered == 0
    return events[:-1]


@pytest.mark.parametrize("rsv", [1, 2, 3, 4, 5, 6, 7])
@pytest.mark.parametrize("op", [0x1, 0x2, 0x8, 0x9, 0xA])
def test_reserved_bits_on_every_kind_of_frame(rsv: int, op: int) -> None:  # Autobahn 3.x
    p = opened()
    payload = b"\x03\xe8" if op == 0x8 else b"x"
    assert _closes(p, frame(0x1, b"ok") + frame(op, payload, rsv=rsv) + frame(0x1, b"after"), 1002) == [
        Message(b"ok", False)
    ]


@pytest.mark.parametrize("op", [0x3, 0x4, 0x5, 0x6, 0x7, 0xB, 0xC, 0xD, 0xE, 0xF])
def test_reserved_opcodes(op: int) -> None:  # Autobahn 4.x
    p = opened()
    assert _closes(p, frame(0x1, b"ok") + frame(op, b"x") + frame(0x9, b"p"), 1002) == [Message(b"ok", False)]
    p = opened()
    _closes(p, frame(0x1, b"a", fin=False) + frame(op, b"") + frame(0x0, b"b"), 1002)


@pytest.mark.parametrize("op", [0x8, 0x9, 0xA])
def test_control_frames_over_125_bytes_and_fragmented(op: int) -> None:  # Autobahn 2.5, 5.1-5.2
    payload = b"\x03\xe8" + b"r" * 124 if op == 0x8 else b"p" * 126
    _closes(opened(), frame(op, payload), 1002)
    _closes(opened(), frame(op, payload)[:8], 1002)  # the header is enough: the payload is never read
    _closes(opened(), frame(op, b"\x03\xe8" if op == 0x8 else b"", fin=False), 1002)


@pytest.mark.parametrize("n", [0, 1, 10, 125])
@pytest.mark.parametrize("chunk", [None, 1, 3])
def test_ping_payload_is_echoed_in_the_pong(n: int, chunk: int | None) -> None:  # Autobahn 2.1-2.4, 2.6
    p = opened()
    payload = bytes(range(256))[-n:] if n else b""
    assert feed(p, frame(0x9, payload), chunk) == []
    assert server_frames(p.data_to_send()) == [(0xA, True, payload)]


def test_every_ping_is_answered_in_order_and_pongs_are_ignored() -> None:  # Autobahn 2.7-2.10
    p = opened()
    data = frame(0xA, b"unsolicited") + b"".join(frame(0x9, f"ping {i}".encode()) for i in range(10))
    assert feed(p, data, chunk=5) == []
    assert server_frames(p.data_to_send()) == [(0xA, True, f"ping {i}".encode()) for i in range(10)]


@pytest.mark.parametrize("chunk", [None, 1, 2])
def test_control_frames_between_fragments(chunk: int | None) -> None:  # Autobahn 5.6-5.20
    p = opened()
    data = (
        frame(0x1, b"fr", fin=False)
        + frame(0x9, b"1")
        + frame(0x0, b"ag", fin=False)
        + frame(0xA, b"x")
        + frame(0x9, b"2")
        + frame(0x0, b"ment")
    )
    assert feed(p, data, chunk) == [Message(b"fragment", False)]
    assert server_frames(p.data_to_send()) == [(0xA, True, b"1"), (0xA, True, b"2")]


def test_close_in_the_middle_of_a_fragmented_message() -> None:
    p = opened()
    assert feed(p, frame(0x2, b"half", fin=False) + frame(0x8, b"\x03\xe8bye") + frame(0x0, b"rest")) == [
        Closed(1000, "bye")
    ]
    assert close_frame(p.data_to_send()) == (1000, "")


@pytest.mark.parametrize(
    "data",
    [
        frame(0x0, b"x"),  # Autobahn 5.9-5.11: continuation with nothing to continue
        frame(0x0, b"x", fin=False) + frame(0x0, b"y"),
        frame(0x0, b"", fin=False),
        frame(0x1, b"a", fin=False) + frame(0x1, b"b"),  # Autobahn 5.18: a new message while one is open
        frame(0x2, b"a", fin=False) + frame(0x1, b"b", fin=False),
        frame(0x1, b"a", fin=False) + frame(0x0, b"b") + frame(0x0, b"c"),  # one continuation too many
    ],
)
def test_fragmentation_errors(data: bytes) -> None:
    p = opened()
    events = _closes(p, data, 1002)
    assert all(isinstance(e, Message) for e in events)


@pytest.mark.parametrize("chunk", [None, 1])
def test_a_code_point_split_across_fragments_is_valid(chunk: int | None) -> None:  # Autobahn 6.2-6.3
    text = "κόσμε 𝄞 €".encode()
    p = opened()
    for size in (1, 2, 3):  # every split, down to one byte per fragment
        parts = [text[i : i + size] for i in range(0, len(text), size)]
        data = b"".join(frame(0x0 if i else 0x1, part, fin=i == len(parts) - 1) for i, part in enumerate(parts))
        assert feed(p, data, chunk) == [Message(text, False)]
    assert p.data_to_send() == b""


@pytest.mark.parametrize(
    "first",
    [
        b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80",  # Autobahn 6.4.1: a surrogate, mid-message
        b"\xf4\x90\x80\x80",  # past U+10FFFF
        b"\xc0\xaf",  # an overlong "/"
        b"ok \xff",
        b"\x80",  # a continuation byte first
    ],
)
def test_invalid_utf8_in_a_first_fragment_fails_at_once(first: bytes) -> None:  # Autobahn 6.4 "fail fast"
    p = opened()
    _closes(p, frame(0x1, first, fin=False), 1007)  # the final fragment never came


def test_invalid_utf8_split_across_fragments_fails_when_it_becomes_certain() -> None:
    p = opened()
    assert feed(p, frame(0x1, b"ok \xf0\x9d", fin=False)) == []  # could still be U+1D11E
    assert feed(p, frame(0x0, b"\x84", fin=False)) == []  # still could
    _closes(p, frame(0x0, b"A", fin=False), 1007)  # now it cannot, though the message is not finished


def test_text_cut_inside_a_code_point_at_the_last_fragment() -> None:
    p = opened()
    assert feed(p, frame(0x1, b"ok \xe2\x82", fin=False)) == []
    _closes(p, frame(0x0, b""), 1007)
    p = opened()
    _closes(p, frame(0x1, b"ok \xe2\x82", fin=False) + frame(0x0, b"A"), 1007)


@pytest.mark.parametrize(
    "code", [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014, 3000, 3999, 4000, 4999]
)
def test_valid_close_codes_are_echoed(code: int) -> None:  # Autobahn 7.7
    p = opened()
    assert feed(p, frame(0x8, code.to_bytes(2, "big") + b"why")) == [Closed(code, "why")]
    assert close_frame(p.data_to_send()) == (code, "")


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535])
def test_invalid_close_codes(code: int) -> None:  # Autobahn 7.9
    _closes(opened(), frame(0x8, code.to_bytes(2, "big")), 1002)


def test_close_payloads() -> None:  # Autobahn 7.3
    _closes(opened(), frame(0x8, b"\x03"), 1002)  # one byte: no room for a code
    p = opened()
    assert feed(p, frame(0x8, b"\x03\xe8" + b"r" * 123)) == [Closed(1000, "r" * 123)]  # the largest allowed
    _closes(opened(), frame(0x8, b"\x03\xe8" + "é".encode()[:1]), 1007)  # reason cut inside a code point


@pytest.mark.parametrize(
    "header",
    [
        bytes((0x82, 0xFE)) + (5).to_bytes(2, "big"),  # 16-bit form for a length that fits in 7 bits
        bytes((0x82, 0xFE)) + (125).to_bytes(2, "big"),
        bytes((0x82, 0xFF)) + (3).to_bytes(8, "big"),  # 64-bit form for a length that fits in 16 bits
        bytes((0x82, 0xFF)) + (65535).to_bytes(8, "big"),
        bytes((0x82, 0xFF)) + (1 << 63).to_bytes(8, "big"),  # the top bit must be 0
        bytes((0x82, 0xFF)) + (2**64 - 1).to_bytes(8, "big"),
    ],
)
def test_length_encodings_that_must_fail(header: bytes) -> None:  # section 5.2
    _closes(opened(), header + MASK + b"x" * 5, 1002)


# --- fragment limits: floods of tiny and empty fragments ---------------------------------------------


def test_a_message_may_have_max_fragments_and_no_more() -> None:
    settings = WsSettings(max_fragments=8)
    p = opened(settings)
    eight = b"".join(frame(0x0 if i else 0x2, b"f", fin=i == 7) for i in range(8))
    assert feed(p, eight) == [Message(b"f" * 8, True)]
    nine = b"".join(frame(0x0 if i else 0x2, b"", fin=False) for i in range(9))
    events = _closes(p, nine, CloseCode.MESSAGE_TOO_BIG)
    assert events == []


@pytest.mark.parametrize("chunk", [None, 1, 3, 7])
def test_fragment_limit_holds_for_a_message_that_is_being_dropped(chunk: int | None) -> None:
    p = opened(WsSettings(max_message=1000, max_fragments=4))
    data = frame(0x2, b"a" * 1001, fin=False) + b"".join(frame(0x0, b"", fin=False) for _ in range(4))
    _closes(p, data, CloseCode.MESSAGE_TOO_BIG, chunk=chunk)


@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_small_frames_of_a_dropped_message_split_inside_their_mask(chunk: int) -> None:
    """A frame of a message already over max_message is dropped: its header and masking key must still
    be read whole before the payload is skipped (a read ending inside the key once lost sync)."""
    p = opened(WsSettings(max_message=10, hard_limit=1000))
    data = frame(0x2, b"a" * 8, fin=False) + frame(0x0, b"bbbb", fin=False) + frame(0x0, b"") + frame(0x1, b"ok")
    assert feed(p, data, chunk) == [Oversized(12, True), Message(b"ok", False)]
    p.close()
    p.data_to_send()
    assert feed(p, frame(0x1, b"late"), chunk) == [] and p.buffered == 0  # closing: read past
    assert feed(p, frame(0x8, b"\x03\xe8"), chunk) == [Closed(1000, "")]


def test_each_fragment_costs_toward_the_hard_limit() -> None:
    from im.gateway.ws_protocol import FRAGMENT_COST

    s = WsSettings(max_message=1000, hard_limit=4000, max_fragments=1_000_000)
    p = opened(s)
    allowed = 4000 // FRAGMENT_COST  # fragments after the first that fit the hard limit with no payload
    flood = frame(0x1, b"", fin=False) + frame(0x0, b"", fin=False) * allowed
    assert feed(p, flood) == []
    _closes(p, frame(0x0, b"", fin=False), CloseCode.MESSAGE_TOO_BIG)


def test_an_empty_fragment_flood_is_refused_with_little_held() -> None:
    """The issue's attack: megabytes of empty continuation frames. Default settings: refused at the
    257th frame, holding one small buffer meanwhile."""
    p = opened()
    flood = frame(0x2, b"x", fin=False) + frame(0x0, b"", fin=False) * 100_000  # 600 KB on the wire
    for i in range(0, len(flood), 4096):
        p.receive_data(flood[i : i + 4096])
        assert p.buffered < 4096 + 14
        if p.state is State.CLOSED:
            break
    assert i < 256 * 6 + 4096
    [event] = p.events_received()
    assert event == Closed(CloseCode.MESSAGE_TOO_BIG, "message in more than 256 fragments")


def test_reassembly_keeps_one_buffer() -> None:
    p = opened()
    p.receive_data(frame(0x2, b"ab", fin=False) + frame(0x0, b"c", fin=False) + frame(0x0, b"", fin=False))
    assert type(p._frags) is bytearray and bytes(p._frags) == b"abc"
    assert feed(p, frame(0x0, b"d")) == [Message(b"abcd", True)]
    assert p._frags is None
