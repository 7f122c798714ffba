"""im.procs: the port blocks the local clusters (tests, soak) start on, and the window free ports come from.

The ranges are this test worker's own (tests/support/workers.py), so that under pytest-xdist these tests
never take or probe the ports another worker's servers are picking."""

from __future__ import annotations

import socket

import pytest

from im.procs import FREE_PORT_LOWEST, confine_ports, ephemeral_low, free_block, free_port
from tests.support.workers import cluster_block_range, port_window, worker_slot

OFFSETS = (0, 5, 6, 13, 27)


def test_free_block_is_free_and_inside_its_bounds() -> None:
    low, high = cluster_block_range()
    for _ in range(20):
        base = free_block(OFFSETS, low=low, high=high)
        assert base >= low and base + max(OFFSETS) < min(high, ephemeral_low()) and base % 50 == 0
        for off in OFFSETS:
            with socket.socket() as s:
                s.bind(("127.0.0.1", base + off))


def test_free_block_skips_a_block_with_a_port_taken() -> None:
    both = (*OFFSETS, *(50 + off for off in OFFSETS))
    start, end = cluster_block_range()
    low = free_block(both, low=start, high=end)  # a block free now, and the one 50 above it ...
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", low + 13))
        # ... the only two bases in range: the first has a port taken, so the second is the answer
        got = {free_block(OFFSETS, low=low, high=low + 50 + max(OFFSETS) + 2) for _ in range(10)}
    assert got == {low + 50}


def test_free_block_gives_up_when_no_block_is_free() -> None:
    low, high = cluster_block_range()
    base = free_block(OFFSETS, low=low, high=high)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", base))
        with pytest.raises(RuntimeError, match="no free port range"):
            free_block(OFFSETS, low=base, high=base + max(OFFSETS) + 1)


def test_free_port_picks_inside_a_confined_window_until_restored() -> None:
    low, high = port_window()  # this worker's share of free_port's range
    inner = (low + 100, low + 300)
    previous = confine_ports(*inner)
    try:
        for _ in range(20):
            assert inner[0] <= free_port() < inner[1]
            base = free_port(span=3)
            assert inner[0] <= base and base + 2 < inner[1]
    finally:
        assert confine_ports(*previous) == inner
    # restored: the window in force before, the worker's own under xdist, else the default
    assert previous == ((FREE_PORT_LOWEST, None) if worker_slot()[1] == 1 else (low, high))
    assert {low <= free_port() < min(high, ephemeral_low()) for _ in range(50)} == {True}


def test_free_port_does_not_hand_out_a_port_again_before_it_could_be_bound() -> None:
    """A server given three free ports binds them in turn: two of them must not be the same port (seen as
    "address already in use" on the HTTP port of an im serve given that port for WebSocket too)."""
    low, _ = port_window()
    inner = (low + 400, low + 700)  # 300 ports: 150 random picks would repeat one almost surely
    previous = confine_ports(*inner)
    try:
        picked = [free_port() for _ in range(150)]
    finally:
        confine_ports(*previous)
    assert len(set(picked)) == len(picked)
    assert all(inner[0] <= port < inner[1] for port in picked)


@pytest.mark.parametrize(("low", "high"), [(0, 100), (30_000, 30_000), (30_000, 20_000), (30_000, 70_000)])
def test_confine_ports_refuses_what_is_not_a_window(low: int, high: int) -> None:
    with pytest.raises(ValueError, match="not a port window"):
        confine_ports(low, high)
