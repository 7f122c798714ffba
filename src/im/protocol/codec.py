"""Encode and decode frames: JSON in WebSocket text frames, MessagePack in binary frames.

A connection's encoding is fixed by its first frame (text -> JSON, binary -> MessagePack) and the server
answers in it. Decoding never raises anything but :class:`ImError` with ``bad_frame``, ``unknown_type``
or ``too_large``, so a transport can answer any input with an error frame.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

import msgspec

from im.protocol.errors import ErrorCode, ImError
from im.protocol.frames import CLIENT_FRAME_TAGS, ClientFrame, ServerFrame


class Encoding(Enum):
    JSON = "json"
    MSGPACK = "msgpack"


_json_client = msgspec.json.Decoder(ClientFrame)
_msgpack_client = msgspec.msgpack.Decoder(ClientFrame)
_json_server = msgspec.json.Decoder(ServerFrame)
_msgpack_server = msgspec.msgpack.Decoder(ServerFrame)
_json_any = msgspec.json.Decoder()
_msgpack_any = msgspec.msgpack.Decoder()
_json_enc = msgspec.json.Encoder()
_msgpack_enc = msgspec.msgpack.Encoder()


def encode(frame: Any, encoding: Encoding) -> bytes:
    """Encode a frame (or any msgspec-encodable value)."""
    if encoding is Encoding.JSON:
        return _json_enc.encode(frame)
    return _msgpack_enc.encode(frame)


def _explain(data: bytes, encoding: Encoding, exc: Exception) -> ImError:
    """Slow path, only for bad input: tell an unknown kind from a malformed frame."""
    try:
        raw = (_json_any if encoding is Encoding.JSON else _msgpack_any).decode(data)
    except (msgspec.DecodeError, ValueError, RecursionError):
        return ImError(ErrorCode.BAD_FRAME, f"not valid {encoding.value}")
    if not isinstance(raw, dict):
        return ImError(ErrorCode.BAD_FRAME, "a frame must be an object")
    kind = raw.get("t")
    if not isinstance(kind, str):
        return ImError(ErrorCode.BAD_FRAME, "a frame needs a string field 't'")
    if kind not in CLIENT_FRAME_TAGS:
        return ImError(ErrorCode.UNKNOWN_TYPE, f"unknown frame type {kind[:40]!r}")
    return ImError(ErrorCode.BAD_FRAME, str(exc)[:200])


def decode_client(data: bytes, encoding: Encoding) -> ClientFrame:
    """Decode and validate one client frame."""
    decoder = _json_client if encoding is Encoding.JSON else _msgpack_client
    try:
        frame: ClientFrame = decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
        raise _explain(data, encoding, exc) from None
    except RecursionError:
        raise ImError(ErrorCode.BAD_FRAME, "nested too deeply") from None
    return frame


def decode_server(data: bytes, encoding: Encoding) -> ServerFrame:
    """Decode one server frame (used by the SDK and the tests)."""
    decoder = _json_server if encoding is Encoding.JSON else _msgpack_server
    frame: ServerFrame = decoder.decode(data)
    return frame
