"""The :class:`NodeIdClaims` contract, run against every implementation (``node_ids_harness``)."""

from __future__ import annotations

import time

import pytest

from im.backends.node_ids import NodeIdUnavailable
from tests.contract.lifecycle import check_lifecycle
from tests.contract.node_ids import NodeIdsHarness, Recorder
from tests.support.wait import eventually


def now_ms() -> int:
    return int(time.time() * 1000)


def node_of(mid: int) -> int:
    return (mid >> 12) & 0x3FF


async def test_claims_hold_distinct_ids_and_mint_distinct_message_ids(node_ids_harness: NodeIdsHarness) -> None:
    minters = [Recorder() for _ in range(3)]
    claims = [node_ids_harness.claims(f"tr-{i}", m) for i, m in enumerate(minters)]
    for c in claims:
        await c.start()
    held = [c.node_id for c in claims if c.node_id is not None]
    assert sorted(held) == [0, 1, 2]  # the lowest free ones, each once
    assert [m.node for m in minters] == held
    t = now_ms()
    mids = [m.next(t) for m in minters for _ in range(100)]  # the same millisecond everywhere
    assert len(set(mids)) == len(mids)
    assert {node_of(mid) for mid in mids} == set(held)
    await claims[1].close()
    assert claims[1].node_id is None and minters[1].node is None  # given back: it mints no more
    assert not minters[1].can_mint(now_ms())


async def test_a_given_back_id_goes_to_the_next_claimant_which_mints_above_what_was_used(
    node_ids_harness: NodeIdsHarness,
) -> None:
    first = Recorder()
    a = node_ids_harness.claims("tr-a", first)
    await a.start()
    n = a.node_id
    assert n is not None
    last = max(first.next(now_ms()) for _ in range(10))
    await a.close()
    second = Recorder()
    b = node_ids_harness.claims("tr-b", second)
    await b.start()
    assert b.node_id == n  # free again at once
    behind = now_ms() - 60_000  # the next holder's clock reads a minute earlier ...
    assert second.can_mint(behind)
    assert second.next(behind) > last  # ... and still mints above every id minted before


async def test_a_restarted_owner_takes_its_previous_id_when_free(node_ids_harness: NodeIdsHarness) -> None:
    claims = {name: node_ids_harness.claims(name, Recorder()) for name in ("tr-a", "tr-b", "tr-c")}
    for c in claims.values():
        await c.start()
    ids = {name: c.node_id for name, c in claims.items()}
    await claims["tr-a"].close()
    await claims["tr-c"].close()
    again = node_ids_harness.claims("tr-c", Recorder())
    await again.start()
    assert again.node_id == ids["tr-c"]  # not the lowest free one (tr-a's)
    other = node_ids_harness.claims("tr-new", Recorder())
    await other.start()
    assert other.node_id == ids["tr-a"]  # a newcomer: the lowest free


async def test_no_free_id_refuses_the_start(node_ids_harness: NodeIdsHarness) -> None:
    for i in range(node_ids_harness.size):
        await node_ids_harness.claims(f"tr-{i}", Recorder()).start()
    minter = Recorder()
    late = node_ids_harness.claims("tr-late", minter)
    with pytest.raises(NodeIdUnavailable, match=f"all {node_ids_harness.size} node ids") as refused:
        await late.start()
    assert late.node_id is None and minter.node is None and not late.started
    assert "\n" not in str(refused.value)  # one line


async def test_a_claim_taken_away_stops_minting_then_is_made_again(node_ids_harness: NodeIdsHarness) -> None:
    minter = Recorder()
    claims = node_ids_harness.claims("tr-a", minter)
    await claims.start()
    n = claims.node_id
    assert n is not None
    before = minter.next(now_ms())
    await node_ids_harness.take_away(n)
    # The loss is found (at once in one process; by the next keepalive, TTL/3, on etcd) and minting stops
    # before the claim is made again.
    await eventually(lambda: ("revoke", None) in minter.events, "the loss noticed", timeout=node_ids_harness.ttl * 2)
    await eventually(lambda: minter.events[-1][0] == "assign", "claimed again", timeout=node_ids_harness.ttl * 2)
    assert claims.node_id is not None and minter.can_mint(now_ms())
    assert minter.events[:3] == [("assign", n), ("revoke", None), ("assign", claims.node_id)]
    assert minter.next(now_ms()) > before


async def test_lifecycle(node_ids_harness: NodeIdsHarness) -> None:
    async def probe(c: object) -> None:
        assert getattr(c, "node_id", None) is not None

    await check_lifecycle(lambda: node_ids_harness.claims("tr-life", Recorder()), probe)
