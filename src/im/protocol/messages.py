"""Stored messages as protocol frames, with the encoded bytes cached per message.

A message delivered to many devices is encoded once per encoding, not once per device.
"""

from __future__ import annotations

from collections import OrderedDict

import msgspec

from im.model.chat import StoredMessage
from im.protocol.codec import Encoding, encode
from im.protocol.frames import Ack, Msg

_json_any = msgspec.json.Decoder()


def msg_frame(m: StoredMessage, encoding: Encoding = Encoding.JSON) -> Msg:
    """The ``msg`` frame of a stored message. For JSON the body is embedded as stored, not re-parsed."""
    body: object = msgspec.Raw(m.body) if encoding is Encoding.JSON else _json_any.decode(m.body)
    return Msg(
        conv=m.conv,
        seq=m.seq,
        mid=str(m.mid),
        sender=m.sender,
        dev=m.device,
        cmid=m.cmid,
        ts=m.ts,
        type=m.type,
        body=body,
    )


def ack_frame(m: StoredMessage, dup: bool = False) -> Ack:
    return Ack(cmid=m.cmid, conv=m.conv, seq=m.seq, mid=str(m.mid), ts=m.ts, dup=dup)


class EncodedCache:
    """Per-message encoded ``msg`` frames, keyed by (conv, seq), one bounded FIFO per encoding."""

    def __init__(self, capacity: int = 4096) -> None:
        self._capacity = capacity
        # One attribute per encoding, not a dict keyed by it: an Enum member hashes in Python code.
        self._json: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._msgpack: OrderedDict[tuple[str, int], bytes] = OrderedDict()

    def msg(self, m: StoredMessage, encoding: Encoding) -> bytes:
        frames = self._json if encoding is Encoding.JSON else self._msgpack
        key = (m.conv, m.seq)
        data = frames.get(key)
        if data is None:
            data = frames[key] = encode(msg_frame(m, encoding), encoding)
            if len(frames) > self._capacity:
                frames.popitem(last=False)
        return data
