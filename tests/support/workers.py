"""Running the suite on several pytest-xdist workers (``scripts/test.sh``: ``-n 2 --dist loadgroup``).

Two things keep workers out of each other's way:

- groups (:func:`group_of`, applied by ``tests/conftest.py``): ``--dist loadgroup`` runs every test of one
  ``xdist_group`` on the same worker. The tests that start whole clusters or measure time (:data:`SERIAL_DIRS`,
  :data:`SERIAL_MODULES`) share one group, so they never overlap each other; every other module is a group
  of its own, so its module-scoped fixtures run once, not once per worker. pytest-xdist 3.8.0 reads the
  ``xdist_group`` marks by appending the group to each test's id, which pytest 9.2's structured ids ignore
  (pytest-xdist issue #1386): so :class:`GroupScheduling` (``pytest_xdist_make_scheduler``) takes the group
  from each test's module with the same :func:`group_of`.
- ports (:func:`confine_this_worker`, :func:`cluster_block_range`): worker ``gwN`` of ``M`` gets the N-th of
  M disjoint slices of :func:`im.procs.free_port`'s range and of the local clusters' base-port range, so
  no two workers pick the same "free" port.

Outside xdist (``-n 0``, or no ``-n``), :envvar:`PYTEST_XDIST_WORKER` is unset and nothing is confined.
"""

from __future__ import annotations

import os
import re
from pathlib import PurePosixPath

import pytest
from xdist.scheduler import LoadGroupScheduling

from im.procs import FREE_PORT_LOWEST, confine_ports, ephemeral_low

#: The group of the tests that must not run beside each other.
SERIAL = "SERIAL"
#: Directories (from the repository root) whose tests are all in :data:`SERIAL`: whole local clusters,
#: the nemesis suite, and the benchmarks' timings.
SERIAL_DIRS = ("tests/faults", "tests/cluster", "tests/bench")
#: Single modules in :data:`SERIAL`, for the same reasons.
SERIAL_MODULES = ("tests/web/test_cluster_web.py",)

#: The local clusters' base ports (``tests/cluster/conftest.py``), below :func:`im.procs.free_port`'s range.
CLUSTER_LOW, CLUSTER_HIGH = 10_000, FREE_PORT_LOWEST
#: A cluster's base port is a multiple of this (``im.procs.free_block``'s step).
CLUSTER_STEP = 50


def group_of(module: str) -> str:
    """The xdist group of the tests in ``module``, a path from the repository root
    (``tests/e2e/test_a.py``): :data:`SERIAL`, or the module's own path."""
    path = PurePosixPath(module)
    if module in SERIAL_MODULES or any(path.is_relative_to(d) for d in SERIAL_DIRS):
        return SERIAL
    return str(path)


class GroupScheduling(LoadGroupScheduling):  # type: ignore[misc]  # xdist ships no type information
    """``--dist loadgroup`` by :func:`group_of`: a test's group is its module's, or :data:`SERIAL`; an id that
    does carry an ``@group`` (a pytest-xdist that gets through to the ids again) keeps that group."""

    def _split_scope(self, nodeid: str) -> str:
        if nodeid.rfind("@") > nodeid.rfind("]"):  # as LoadGroupScheduling: not an "@" of a parameter
            return str(super()._split_scope(nodeid))
        return group_of(nodeid.split("::", 1)[0])


def make_scheduler(config: pytest.Config, log: object) -> GroupScheduling | None:
    """``pytest_xdist_make_scheduler``: :class:`GroupScheduling` for ``--dist loadgroup``, else xdist's own."""
    return GroupScheduling(config, log) if config.getvalue("dist") == "loadgroup" else None


def worker_slot() -> tuple[int, int]:
    """(this worker's index, how many workers): ``gw1`` of 2 is (1, 2); (0, 1) outside xdist."""
    name = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not name:
        return 0, 1
    match = re.fullmatch(r"gw(\d+)", name)
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if match is None or not 0 <= int(match.group(1)) < count:
        raise RuntimeError(f"PYTEST_XDIST_WORKER={name!r} is not gw0..gw{count - 1}")
    return int(match.group(1)), count


def _slice(low: int, high: int, step: int = 1) -> tuple[int, int]:
    """This worker's share of ``[low, high)``: equal slices, each a multiple of ``step`` wide."""
    index, count = worker_slot()
    width = (high - low) // count // step * step
    if width < max(step, 50):
        raise RuntimeError(f"[{low}, {high}) is too small for {count} test workers: run fewer (IM_TEST_WORKERS)")
    return low + index * width, low + (index + 1) * width


def port_window() -> tuple[int, int]:
    """This worker's slice of :func:`im.procs.free_port`'s range (20000 up to the ephemeral range)."""
    return _slice(FREE_PORT_LOWEST, ephemeral_low())


def cluster_block_range() -> tuple[int, int]:
    """(low, high) for this worker's local clusters' base-port blocks (``im.procs.free_block``):
    10000-19999 outside xdist, a disjoint slice of it on each worker."""
    return _slice(CLUSTER_LOW, CLUSTER_HIGH, CLUSTER_STEP)


def confine_this_worker() -> None:
    """On an xdist worker, confine :func:`im.procs.free_port` to :func:`port_window`; elsewhere, nothing."""
    if worker_slot()[1] > 1:
        confine_ports(*port_window())
