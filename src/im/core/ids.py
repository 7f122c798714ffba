"""Server message ids: 64-bit, time-ordered, unique per node without coordination."""

from __future__ import annotations

import re
import time
import zlib

from im.protocol.frames import MAX_ID  # uids and gids are signed 64-bit in every store

_EPOCH_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
#: Longest id ``parse_conv`` looks at: ``d:`` and two 19-digit uids are 41 characters.
_MAX_CONV = 64
_CONV_SHAPE = re.compile(r"d:[1-9][0-9]*:[1-9][0-9]*|g:[1-9][0-9]*")


class Snowflake:
    """41 bits of milliseconds since 2026, 10 bits of node, 12 bits of counter."""

    def __init__(self, node: str | int) -> None:
        self._node = (node if isinstance(node, int) else zlib.crc32(node.encode())) & 0x3FF
        self._last_ms = 0
        self._counter = 0

    def next(self, now_ms: int | None = None) -> int:
        ms = int(time.time() * 1000) if now_ms is None else now_ms
        if ms <= self._last_ms:
            ms = self._last_ms
            self._counter += 1
            if self._counter > 0xFFF:  # 4096 ids in one millisecond: borrow the next one
                ms += 1
                self._counter = 0
        else:
            self._counter = 0
        self._last_ms = ms
        return ((ms - _EPOCH_MS) << 22) | (self._node << 12) | self._counter


def direct_conv(a: int, b: int) -> str:
    """The conversation id of two users, the same whichever of them asks."""
    lo, hi = (a, b) if a < b else (b, a)
    return f"d:{lo}:{hi}"


def group_conv(gid: int) -> str:
    return f"g:{gid}"


def parse_conv(conv: str) -> tuple[str, tuple[int, ...]] | None:
    """("direct", (a, b)) or ("group", (gid,)); None for anything malformed, including ids outside
    1..2^63-1 (no store can hold them: such a conversation cannot exist)."""
    if len(conv) > _MAX_CONV:
        return None
    kind, _, rest = conv.partition(":")
    try:
        if kind == "d":
            a, b = (int(x) for x in rest.split(":"))
            return ("direct", (a, b)) if 0 < a < b <= MAX_ID and conv == direct_conv(a, b) else None
        if kind == "g":
            gid = int(rest)
            return ("group", (gid,)) if 0 < gid <= MAX_ID and conv == group_conv(gid) else None
    except ValueError:
        return None
    return None


def conv_out_of_range(conv: str) -> bool:
    """Whether ``conv`` has the shape of a conversation id but holds an id beyond 2^63-1: a value out of
    its documented range (``invalid``), not an unknown conversation (``not_found``). Only called once
    :func:`parse_conv` has refused ``conv``, so it costs nothing on the hot path."""
    if _CONV_SHAPE.fullmatch(conv) is None:
        return False
    return len(conv) > _MAX_CONV or any(int(part) > MAX_ID for part in conv[2:].split(":"))
