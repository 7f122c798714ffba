"""im.procs: the port blocks the local clusters (tests, soak) start on."""

from __future__ import annotations

import socket

import pytest

from im.procs import ephemeral_low, free_block

OFFSETS = (0, 5, 6, 13, 27)


def test_free_block_is_free_and_inside_its_bounds() -> None:
    for _ in range(20):
        base = free_block(OFFSETS, low=10_000, high=20_000)
        assert base >= 10_000 and base + max(OFFSETS) < min(20_000, ephemeral_low()) and base % 50 == 0
        for off in OFFSETS:
            with socket.socket() as s:
                s.bind(("127.0.0.1", base + off))


def test_free_block_skips_a_block_with_a_port_taken() -> None:
    both = (*OFFSETS, *(50 + off for off in OFFSETS))
    low = free_block(both, low=12_000, high=19_000)  # a block free now, and the one 50 above it ...
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", low + 13))
        # ... the only two bases in range: the first has a port taken, so the second is the answer
        got = {free_block(OFFSETS, low=low, high=low + 50 + max(OFFSETS) + 2) for _ in range(10)}
    assert got == {low + 50}


def test_free_block_gives_up_when_no_block_is_free() -> None:
    base = free_block(OFFSETS, low=12_000, high=19_000)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", base))
        with pytest.raises(RuntimeError, match="no free port range"):
            free_block(OFFSETS, low=base, high=base + max(OFFSETS) + 1)
