"""Server message ids: 64-bit, time-ordered, unique per node without coordination."""

from __future__ import annotations

import time
import zlib

_EPOCH_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z


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
