"""Fencing tokens of node id claims shared by processes (etcd): every later claim of an id carries a larger
token, and a token a store refused is a lost claim, made again under a new token."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from im.backends.node_ids.memory import MemoryNodeIds
from tests.contract.node_ids import EtcdNodeIdsHarness, Recorder
from tests.support.wait import eventually


@pytest.fixture
async def etcd_claims() -> AsyncIterator[EtcdNodeIdsHarness]:
    harness = EtcdNodeIdsHarness()
    await harness.open()
    try:
        yield harness
    finally:
        await harness.close()


async def test_each_later_claim_of_an_id_carries_a_larger_token(etcd_claims: EtcdNodeIdsHarness) -> None:
    tokens = []
    for owner in ("tr-a", "tr-b", "tr-a"):
        minter = Recorder()
        claims = etcd_claims.claims(owner, minter)
        await claims.start()
        assert claims.node_id == 0 and minter.fence is not None and minter.fence[0] == 0
        tokens.append(minter.fence[1])
        await claims.close()
        assert minter.fence is None  # given back: no fence, no minting
    assert tokens == sorted(set(tokens))


async def test_a_refused_token_is_a_lost_claim_made_again(etcd_claims: EtcdNodeIdsHarness) -> None:
    minter = Recorder()
    claims = etcd_claims.claims("tr-a", minter)
    await claims.start()
    assert minter.fence is not None
    node, token = minter.fence
    minter.refused(token - 1)  # an older token (a previous claim's refusal arriving late): ignored
    assert minter.fence == (node, token)
    minter.refused(token)  # what the committer does when the store refuses its batch
    assert minter.node is None and not minter.can_mint(0)
    await eventually(lambda: minter.fence is not None and minter.fence[1] > token, "not claimed again", timeout=10)
    assert ("revoke", None) in minter.events


async def test_in_process_claims_carry_no_token() -> None:
    minter = Recorder()
    claims = MemoryNodeIds("serve", minter, prefer=3)
    await claims.start()
    assert minter.node == 3 and minter.fence is None  # one process: commits are not fenced
    await claims.close()
