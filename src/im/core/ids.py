"""Server message ids (``mid``): 64-bit, time-ordered, made without coordination.

Within one :class:`Snowflake` (one process) ids strictly increase, so they never repeat. Across processes
they are unique only if their 10 node bits differ, and nothing checks that: a node name is reduced to the
low 10 bits of its crc32 (an int to its low 10 bits), so two different names share them with probability
1/1024 (about n²/2048 among n nodes), and two processes given the same node name share them
outright; such processes can mint the same id in the same millisecond. A restart whose clock
reads earlier than the previous run's last id can also repeat ids. Since the push consumer deduplicates
by ``mid``, a repeated id can cost a push. (Issue 13 fixes this.)
"""

from __future__ import annotations

import time
import zlib

_EPOCH_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z


class Snowflake:
    """41 bits of milliseconds since 2026, 10 bits of node, 12 bits of counter (4,096 ids per millisecond;
    past that the next millisecond is borrowed, so ids keep increasing)."""

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
