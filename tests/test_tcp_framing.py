"""The sans-I/O TCP framing (im.protocol.tcp_framing): bytes in, events out, with no event loop.

Each stream is fed whole, split in two at every offset, and one byte at a time: the events must not
depend on how the bytes arrive.
"""

from __future__ import annotations

import pytest

from im.model.errors import ErrorCode
from im.protocol.tcp_framing import (
    DEFAULT_MAX_FRAME,
    Broken,
    Event,
    Frame,
    Oversized,
    TcpFramer,
    TcpFramingError,
    UnknownEncoding,
    encode_frame,
    encode_frames,
)

LIMIT = 100


def server_framer() -> TcpFramer:
    """The gateway's limits: skip over LIMIT, break over 4 x LIMIT."""
    return TcpFramer(LIMIT, hard_limit=4 * LIMIT)


def raw(kind: int, payload: bytes) -> bytes:
    return (len(payload) + 1).to_bytes(4, "big") + bytes([kind]) + payload


def splits(stream: bytes) -> list[list[bytes]]:
    """The stream whole, cut in two at every offset, and byte by byte."""
    return [[stream]] + [[stream[:i], stream[i:]] for i in range(1, len(stream))] + [[bytes([b]) for b in stream]]


def events_of(chunks: list[bytes]) -> list[Event]:
    framer = server_framer()
    out: list[Event] = []
    for chunk in chunks:
        out += framer.receive_data(chunk)
    return out


def test_encoding_layout() -> None:
    assert encode_frame(b"abc", binary=False) == b"\x00\x00\x00\x04\x01abc"
    assert encode_frame(b"", binary=True) == b"\x00\x00\x00\x01\x02"
    assert encode_frame(b'{"t":"ping"}', binary=False)[:5] == bytes.fromhex("0000000d01")  # docs/protocol.md
    payloads = [b"one", b"", b"x" * 70_000]
    assert encode_frames(payloads, binary=True) == b"".join(encode_frame(p, binary=True) for p in payloads)
    assert encode_frames([b"hi"], binary=False) == encode_frame(b"hi", binary=False)
    assert encode_frames([], binary=False) == b""


def test_good_frames_arrive_whole_in_any_chunking() -> None:
    payloads = [(b'{"t":"ping"}', False), (b"\x81\xa1t\xa4ping", True), (b"", False), (b"y" * LIMIT, True)]
    stream = b"".join(encode_frame(p, b) for p, b in payloads)
    expected = [Frame(p, b) for p, b in payloads]
    for chunks in splits(stream):
        assert events_of(chunks) == expected, [len(c) for c in chunks]


def test_oversized_and_unknown_encoding_are_skipped_and_the_stream_stays_in_step() -> None:
    stream = (
        encode_frame(b"first", binary=False)
        + raw(0x07, b"{}")
        + encode_frame(b"z" * (LIMIT + 1), binary=False)  # just over the limit
        + encode_frame(b"w" * (4 * LIMIT), binary=True)  # the largest that can be skipped
        + encode_frame(b"last", binary=True)
    )
    expected = [
        Frame(b"first", False),
        UnknownEncoding(7),
        Oversized(LIMIT + 1),
        Oversized(4 * LIMIT),
        Frame(b"last", True),
    ]
    for chunks in splits(stream):
        assert events_of(chunks) == expected, [len(c) for c in chunks]
    assert UnknownEncoding(7).reason == "unknown encoding byte 0x07"


def test_an_oversized_frame_is_reported_at_its_header_and_never_buffered() -> None:
    framer = server_framer()
    big = encode_frame(b"q" * (3 * LIMIT), binary=False)
    assert framer.receive_data(big[:4]) == [Oversized(3 * LIMIT)]
    assert framer.buffered == 0
    for i in range(4, len(big), 7):  # the rest is dropped as it arrives
        assert framer.receive_data(big[i : i + 7]) == []
        assert framer.buffered == 0
    assert framer.receive_data(encode_frame(b"ok", binary=False)) == [Frame(b"ok", False)]


def test_an_incomplete_frame_is_held_up_to_its_size_only() -> None:
    framer = server_framer()
    data = encode_frame(b"a" * LIMIT, binary=False)
    assert framer.receive_data(data[:-1]) == []
    assert framer.buffered == len(data) - 1 == LIMIT + 4
    assert framer.receive_data(data[-1:]) == [Frame(b"a" * LIMIT, False)]
    assert framer.buffered == 0


@pytest.mark.parametrize(
    ("header", "code", "reason"),
    [
        ((0).to_bytes(4, "big"), ErrorCode.BAD_FRAME, "empty frame"),
        (
            (4 * LIMIT + 2).to_bytes(4, "big"),
            ErrorCode.TOO_LARGE,
            f"frame of {4 * LIMIT + 2} bytes is far over the limit",
        ),
        ((2**32 - 1).to_bytes(4, "big"), ErrorCode.TOO_LARGE, f"frame of {2**32 - 1} bytes is far over the limit"),
    ],
    ids=["empty", "just-over-hard-limit", "huge"],
)
def test_what_cannot_be_skipped_breaks_the_stream(header: bytes, code: ErrorCode, reason: str) -> None:
    stream = encode_frame(b"before", binary=False) + header + encode_frame(b"after", binary=False)
    for chunks in splits(stream):
        assert events_of(chunks) == [Frame(b"before", False), Broken(code, reason)], [len(c) for c in chunks]
    framer = server_framer()
    framer.receive_data(stream)
    assert framer.broken and framer.buffered == 0
    assert framer.receive_data(encode_frame(b"more", binary=False)) == []  # nothing more is read


def test_the_default_framer_skips_nothing() -> None:
    framer = TcpFramer(LIMIT)
    assert framer.hard_limit == LIMIT
    assert framer.receive_data(encode_frame(b"b" * (LIMIT + 1), binary=False)) == [
        Broken(ErrorCode.TOO_LARGE, f"frame of {LIMIT + 2} bytes is far over the limit")
    ]
    assert TcpFramer().max_frame == DEFAULT_MAX_FRAME


def test_feed_returns_payloads_in_any_chunking() -> None:
    payloads = [b"one", b"", b"three" * 100]
    stream = encode_frames(payloads, binary=False)
    for chunks in splits(stream):
        framer = TcpFramer()
        got: list[bytes] = []
        for chunk in chunks:
            got += framer.feed(chunk)
        assert got == payloads


@pytest.mark.parametrize(
    "data",
    [b"\x00\x00\x00\x00", raw(0x03, b"x"), encode_frame(b"b" * (LIMIT + 1), binary=True)],
    ids=["zero", "kind", "big"],
)
def test_feed_raises_on_anything_but_a_frame(data: bytes) -> None:
    with pytest.raises(TcpFramingError):
        TcpFramer(LIMIT).feed(data)
    with pytest.raises(TcpFramingError):  # also when the framer would skip it
        TcpFramer(LIMIT, hard_limit=4 * LIMIT).feed(encode_frame(b"ok", binary=False) + data)
