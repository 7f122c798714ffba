"""tests/support/workers.py: the xdist groups the tests run in, and each worker's share of the ports."""

from __future__ import annotations

import pytest

from im.procs import FREE_PORT_LOWEST, ephemeral_low
from tests.support.workers import (
    SERIAL,
    GroupScheduling,
    cluster_block_range,
    group_of,
    port_window,
    worker_slot,
)


@pytest.mark.parametrize(
    ("module", "group"),
    [
        ("tests/faults/x.py", SERIAL),
        ("tests/cluster/test_cluster_chat.py", SERIAL),
        ("tests/bench/test_bench.py", SERIAL),
        ("tests/web/test_cluster_web.py", SERIAL),
        ("tests/e2e/test_a.py", "tests/e2e/test_a.py"),
        ("tests/web/test_chat.py", "tests/web/test_chat.py"),
        ("tests/faultsy/test_b.py", "tests/faultsy/test_b.py"),  # a directory's name, not a prefix
        ("tests/test_procs.py", "tests/test_procs.py"),
    ],
)
def test_the_tests_that_must_not_overlap_share_one_group_and_every_other_module_has_its_own(
    module: str, group: str
) -> None:
    assert group_of(module) == group


@pytest.mark.parametrize(
    ("nodeid", "group"),
    [
        ("tests/faults/test_storm.py::test_storm[a@b]", SERIAL),
        ("tests/web/test_cluster_web.py::test_x", SERIAL),
        ("tests/e2e/test_a.py::TestC::test_x", "tests/e2e/test_a.py"),
        ("tests/e2e/test_a.py::test_x[at@sign]", "tests/e2e/test_a.py"),
        ("tests/e2e/test_a.py::test_x@tests/e2e/test_a.py", "tests/e2e/test_a.py"),  # xdist's own suffix
    ],
)
def test_the_scheduler_groups_test_ids_as_the_marks_do(nodeid: str, group: str) -> None:
    scheduler = object.__new__(GroupScheduling)  # _split_scope needs none of the workers' state
    assert scheduler._split_scope(nodeid) == group


def test_outside_xdist_nothing_is_split(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT", raising=False)
    assert worker_slot() == (0, 1)
    assert cluster_block_range() == (10_000, 20_000)
    assert port_window() == (FREE_PORT_LOWEST, ephemeral_low())


def test_two_workers_get_disjoint_shares(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    shares = []
    for worker in ("gw0", "gw1"):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
        shares.append((cluster_block_range(), port_window()))
    (blocks0, ports0), (blocks1, ports1) = shares
    assert blocks0 == (10_000, 15_000) and blocks1 == (15_000, 20_000)
    assert FREE_PORT_LOWEST == ports0[0] < ports0[1] == ports1[0] < ports1[1] <= ephemeral_low()


def test_a_worker_name_that_is_not_gwN_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw2")
    with pytest.raises(RuntimeError, match=r"gw0\.\.gw1"):
        worker_slot()
