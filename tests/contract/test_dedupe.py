"""The :class:`Dedupe` contract, run against every implementation (see ``conftest.DEDUPES``: memory, and
Redis under a private key prefix; no skip when Redis is down)."""

from __future__ import annotations

from im.backends.dedupe import Dedupe
from im.backends.dedupe.memory import MemoryDedupe
from tests.contract.conftest import DedupeHarness, FakeClock
from tests.contract.lifecycle import check_lifecycle


async def test_recorded_keys_are_seen(dedupe_harness: DedupeHarness) -> None:
    dedupe = dedupe_harness.dedupe
    assert not await dedupe.seen("1")
    await dedupe.record("1")
    await dedupe.record("1")  # recording twice is harmless
    assert await dedupe.seen("1")
    assert not await dedupe.seen("2")


async def test_lifecycle(dedupe_harness: DedupeHarness) -> None:
    async def probe(d: Dedupe) -> None:
        await d.seen("probe")

    await check_lifecycle(dedupe_harness.unstarted, probe)


async def test_memory_dedupe_forgets_after_ttl_and_beyond_max_keys() -> None:
    clock = FakeClock()
    d = MemoryDedupe(ttl=10, max_keys=2, clock=clock)
    await d.record("a")
    clock.advance(11)
    assert not await d.seen("a")
    await d.record("b")
    await d.record("c")
    await d.record("d")  # pushes "b" out
    assert [await d.seen(k) for k in "bcd"] == [False, True, True]
