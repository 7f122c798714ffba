"""Nemesis tests: faults a real deployment meets (a database killed, a paused node, partitions, bad links,
reconnect storms, broker redelivery), over real ``im cluster`` processes and, where an engine must be
killed, private engine instances the tests start themselves. Every history is judged by the checker
(tests/support/checker.py). docs/reliability.md lists each scenario, its promise and its figures.

Long variants run only with ``IM_FAULTS_LONG=1`` (the suite keeps the short ones).
"""

from __future__ import annotations

import os

import pytest

from tests.cluster.conftest import cluster, history  # noqa: F401  (the cluster fixtures, shared)
from tests.support.apps import apps  # noqa: F401  (the SDK apps' fixture, shared)
from tests.support.postgres import pg  # noqa: F401  (a private PostgreSQL a test may stop and crash)


@pytest.fixture
def long_run() -> bool:
    """True when the long variants were asked for (``IM_FAULTS_LONG=1``)."""
    return os.environ.get("IM_FAULTS_LONG", "") not in ("", "0")
