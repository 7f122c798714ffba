"""Encode and decode frames: JSON in WebSocket text frames, MessagePack in binary frames.

A connection's encoding is fixed by its first frame (text -> JSON, binary -> MessagePack) and the server
answers in it. Decoding never raises anything but :class:`ImError` with ``bad_frame``, ``unknown_type``,
``invalid`` or ``too_large``, so a transport can answer any input with an error frame: a value of the
wrong type or a missing field is ``bad_frame``; a value of the right type out of its documented range
(an integer beyond 2^63-1, a NUL character, too many cursors) is ``invalid``, and names the ``cmid`` of
a refused ``send`` in ``ref`` (as the session's own ``invalid`` refusals do).
"""

from __future__ import annotations

import re
from enum import Enum
from typing import Any

import msgspec

from im.model.errors import ErrorCode, ImError
from im.protocol.frames import CLIENT_FRAME_TAGS, NUL_REFUSED, ClientFrame, ServerFrame


class Encoding(Enum):
    __hash__ = object.__hash__  # members are singletons: identity hashing, in C (Enum's own is Python code)

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
#: msgspec's wording for a constraint (``Meta``) a value of the right type broke.
_OUT_OF_RANGE = re.compile(r"^Expected `[^`]+` (?:>=|<=|>|<|of length|matching)")
#: Longest cmid echoed back as ``ref`` from a frame that did not decode.
_MAX_REF = 256


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
    cmid = raw.get("cmid") if kind == "send" else None
    ref = cmid if isinstance(cmid, str) and len(cmid) <= _MAX_REF else None
    text = str(exc)
    if isinstance(exc, msgspec.ValidationError) and (_OUT_OF_RANGE.match(text) or NUL_REFUSED in text):
        return ImError(ErrorCode.INVALID, text[:200], ref)
    return ImError(ErrorCode.BAD_FRAME, text[:200])


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
