"""Identifiers: the range every stored id fits in, the number of node ids, and conversation ids
(``d:<a>:<b>``, ``g:<gid>``)."""

from __future__ import annotations

import re

#: Largest uid, gid, seq or cursor: SQLite INTEGER and PostgreSQL bigint are signed 64-bit.
MAX_ID = 2**63 - 1

#: Node ids in a message id (``mid``, im.core.ids): its 10 node bits. At most this many processes mint
#: message ids at once in one cluster (each holds a claim on one: im.backends.node_ids).
MAX_NODE_IDS = 1024

#: Longest id ``parse_conv`` looks at: ``d:`` and two 19-digit uids are 41 characters.
_MAX_CONV = 64


_CONV_SHAPE = re.compile(r"d:[1-9][0-9]*:[1-9][0-9]*|g:[1-9][0-9]*")


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
