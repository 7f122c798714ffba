"""Frame codec: every bad input is an ImError (bad_frame, unknown_type, or invalid when out of range)."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from im.model.errors import ErrorCode, ImError
from im.protocol.codec import Encoding, decode_client, decode_server, encode
from im.protocol.frames import Ack, Auth, Bye, Error, Msg, Ping, Read, Recv, Send, Synced, Typing

ENCODINGS = [Encoding.JSON, Encoding.MSGPACK]


def raw(value: Any, encoding: Encoding) -> bytes:
    if encoding is Encoding.JSON:
        return msgspec.json.encode(value)
    return msgspec.msgpack.encode(value)


def refused(data: bytes, encoding: Encoding) -> ErrorCode:
    with pytest.raises(ImError) as info:
        decode_client(data, encoding)
    return info.value.code


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"t": "auth", "token": "x", "device": "d"}, Auth(token="x", device="d")),
        ({"t": "auth", "token": "x", "device": "d", "cursors": {"g:1": 4}}, Auth("x", "d", {"g:1": 4})),
        ({"t": "send", "cmid": "c", "conv": "g:1", "body": {"a": [1]}}, Send(cmid="c", body={"a": [1]}, conv="g:1")),
        ({"t": "send", "cmid": "c", "to": 5, "body": "hi", "type": "img"}, Send("c", "hi", to=5, type="img")),
        ({"t": "recv", "conv": "g:1", "seq": 3}, Recv("g:1", 3)),
        ({"t": "read", "conv": "g:1", "seq": 3}, Read("g:1", 3)),
        ({"t": "typing", "conv": "g:1"}, Typing("g:1")),
        ({"t": "ping"}, Ping()),
        ({"t": "ping", "id": 4}, Ping(4)),
    ],
)
def test_valid_client_frames(encoding: Encoding, value: dict[str, Any], expected: object) -> None:
    assert decode_client(raw(value, encoding), encoding) == expected


def test_send_ignores_unknown_fields_such_as_from() -> None:
    frame = decode_client(b'{"t":"send","cmid":"c","conv":"g:1","body":1,"from":42}', Encoding.JSON)
    assert frame == Send("c", 1, conv="g:1")
    assert not hasattr(frame, "sender")


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize(
    "value",
    [
        [1, 2, 3],
        "send",
        42,
        None,
        {},
        {"type": "send"},
        {"t": 5},
        {"t": None},
        {"t": ["send"]},
        {"t": "send"},  # missing fields
        {"t": "send", "cmid": "c", "conv": "g:1"},  # missing body
        {"t": "send", "cmid": 1, "conv": "g:1", "body": "x"},  # wrong type
        {"t": "send", "cmid": "c", "to": "bob", "body": "x"},
        {"t": "send", "cmid": "c", "conv": 1, "body": "x"},
        {"t": "auth", "token": "x"},
        {"t": "auth", "token": 1, "device": "d"},
        {"t": "auth", "token": "x", "device": "d", "cursors": [1]},
        {"t": "auth", "token": "x", "device": "d", "cursors": {"g:1": "4"}},
        {"t": "recv", "conv": "g:1", "seq": "3"},
        {"t": "recv", "conv": "g:1", "seq": 1.5},
        {"t": "ping", "id": "x"},
    ],
)
def test_malformed_frames_are_bad_frame(encoding: Encoding, value: Any) -> None:
    assert refused(raw(value, encoding), encoding) is ErrorCode.BAD_FRAME


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("kind", ["hello", "msg", "ack", "auth_ok", "SEND", ""])
def test_unknown_kinds_are_unknown_type(encoding: Encoding, kind: str) -> None:
    # Server frame kinds are unknown as client frames too.
    assert refused(raw({"t": kind, "conv": "g:1"}, encoding), encoding) is ErrorCode.UNKNOWN_TYPE


@pytest.mark.parametrize(
    "data", [b"", b"garbage", b"{", b'{"t":"send",}', b"\xff\xfe", b"\x00", b'{"t":"ping"} trailing']
)
def test_invalid_json_is_bad_frame(data: bytes) -> None:
    assert refused(data, Encoding.JSON) is ErrorCode.BAD_FRAME


@pytest.mark.parametrize("data", [b"", b"\xc1", b"\x81", b"\x82\xa1t\xa4ping", b"\xd9\x10abc"])
def test_invalid_msgpack_is_bad_frame(data: bytes) -> None:
    assert refused(data, Encoding.MSGPACK) is ErrorCode.BAD_FRAME


def test_json_bytes_in_a_binary_frame_are_bad_frame() -> None:
    # A text frame's JSON sent as MessagePack decodes as a positive fixint or a str, never as an object.
    assert refused(b'{"t":"ping"}', Encoding.MSGPACK) is ErrorCode.BAD_FRAME


def test_error_messages_are_bounded() -> None:
    with pytest.raises(ImError) as info:
        decode_client(raw({"t": "x" * 10_000}, Encoding.JSON), Encoding.JSON)
    assert info.value.code is ErrorCode.UNKNOWN_TYPE
    assert len(info.value.message) < 200


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_server_frames_round_trip(encoding: Encoding) -> None:
    for frame in (
        Msg(conv="g:1", seq=2, mid="9", sender=3, dev="d", cmid="c", ts=1, type="text", body={"x": 1}),
        Ack(cmid="c", conv="g:1", seq=2, mid="9", ts=1, dup=True),
        Synced(convs=2),
        Error(code="bad_frame", message="m", ref=None),
        Bye(code="shutdown", message="m"),
    ):
        assert decode_server(encode(frame, encoding), encoding) == frame


def test_msg_uses_from_on_the_wire() -> None:
    data = encode(Msg(conv="g:1", seq=2, mid="9", sender=3, dev="d", cmid="c", ts=1, type="t", body=1), Encoding.JSON)
    decoded = msgspec.json.decode(data)
    assert decoded["t"] == "msg" and decoded["from"] == 3 and "sender" not in decoded


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_deeply_nested_frame_is_bad_frame_not_recursion_error(encoding: Encoding) -> None:
    # ~10 KB, well under the frame limit. The codec promises to raise nothing but ImError.
    depth = 5000
    if encoding is Encoding.JSON:
        data = b'{"t":"send","cmid":"c","to":2,"body":' + b"[" * depth + b"]" * depth + b"}"
    else:
        data = msgspec.msgpack.encode({"t": "send", "cmid": "c", "to": 2, "body": []})[:-1] + b"\x91" * depth + b"\x90"
    assert refused(data, encoding) is ErrorCode.BAD_FRAME


BIG = 2**63  # one past the largest uid, seq or cursor a store can hold


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize(
    ("value", "ref"),
    [
        ({"t": "send", "cmid": "c1", "to": BIG, "body": 1}, "c1"),
        ({"t": "send", "cmid": "c2", "to": 2**64 - 1, "body": 1}, "c2"),
        ({"t": "send", "cmid": "c3", "to": 0, "body": 1}, "c3"),
        ({"t": "send", "cmid": "c4", "to": -1, "body": 1}, "c4"),
        ({"t": "send", "cmid": "c5", "conv": "g:" + "1" * 80, "body": 1}, "c5"),
        ({"t": "send", "cmid": "c6\x00", "to": 2, "body": 1}, "c6\x00"),
        ({"t": "send", "cmid": "c7", "to": 2, "type": "te\x00xt", "body": 1}, "c7"),
        ({"t": "recv", "conv": "g:1", "seq": BIG}, None),
        ({"t": "read", "conv": "g:1", "seq": -1}, None),
        ({"t": "typing", "conv": "d" * 65}, None),
        ({"t": "ping", "id": BIG}, None),
        ({"t": "ping", "id": -5}, None),
        ({"t": "auth", "token": "x", "device": "d\x00"}, None),
        ({"t": "auth", "token": "x" * 5000, "device": "d"}, None),
        ({"t": "auth", "token": "x", "device": "d", "cursors": {"g:1": BIG}}, None),
        ({"t": "auth", "token": "x", "device": "d", "cursors": {"g:1": -1}}, None),
        ({"t": "auth", "token": "x", "device": "d", "cursors": {f"g:{i}": 0 for i in range(1, 10_002)}}, None),
    ],
)
def test_values_out_of_range_are_invalid_with_the_cmid_as_ref(
    encoding: Encoding, value: dict[str, Any], ref: str | None
) -> None:
    with pytest.raises(ImError) as info:
        decode_client(raw(value, encoding), encoding)
    assert (info.value.code, info.value.ref) == (ErrorCode.INVALID, ref)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_range_edges_are_accepted(encoding: Encoding) -> None:
    top = 2**63 - 1
    assert decode_client(raw({"t": "send", "cmid": "c", "to": top, "body": 1}, encoding), encoding) == Send(
        "c", 1, to=top
    )
    assert decode_client(raw({"t": "recv", "conv": "g:1", "seq": top}, encoding), encoding) == Recv("g:1", top)
    assert decode_client(raw({"t": "ping", "id": 0}, encoding), encoding) == Ping(0)
    many = {f"g:{i}": i for i in range(1, 10_001)}
    assert decode_client(raw({"t": "auth", "token": "x", "device": "d", "cursors": many}, encoding), encoding) == Auth(
        "x", "d", many
    )


def test_wrong_types_stay_bad_frame_without_ref() -> None:
    with pytest.raises(ImError) as info:
        decode_client(b'{"t":"send","cmid":"c","to":"5","body":1}', Encoding.JSON)
    assert (info.value.code, info.value.ref) == (ErrorCode.BAD_FRAME, None)


def test_conversation_ids_out_of_range_are_told_from_malformed_ones() -> None:
    from im.model.ids import conv_out_of_range, parse_conv

    for bad in (f"d:1:{2**63}", f"d:{2**64 - 1}:{2**64}", f"g:{2**63}", "g:" + "9" * 5000):
        assert parse_conv(bad) is None and conv_out_of_range(bad), bad
    for malformed in ("d:2:1", "d:01:2", "x:1", "g:0", "g:-1", "d:1", "g:1:2", ""):
        assert parse_conv(malformed) is None and not conv_out_of_range(malformed), malformed
    assert parse_conv(f"g:{2**63 - 1}") == ("group", (2**63 - 1,))
