"""What :class:`EtcdNodeIds` promises beyond the shared contract: the real 1,024 ids, a start that finds
etcd away, a claim whose lease is revoked or whose key is deleted under it, reservations that bound
minting, and an etcd restart."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import AsyncIterator

import pytest

from im.backends.node_ids import NodeIdUnavailable
from im.backends.node_ids.etcd import EtcdNodeIds
from im.backends.registry.etcd import EtcdRegistry
from im.model.ids import MAX_NODE_IDS
from im.procs import free_port
from tests.contract.node_ids import Recorder
from tests.support.etcd import EtcdProcess, shared_etcd
from tests.support.wait import eventually


@pytest.fixture
async def admin() -> AsyncIterator[EtcdRegistry]:
    """A registry (its connection) under a private prefix, deleted after."""
    prefix = f"/im-test/{uuid.uuid4().hex[:12]}/"
    async with EtcdRegistry(shared_etcd().endpoint, prefix=prefix) as reg:
        yield reg
        await reg.client.delete_prefix(prefix.encode())


async def test_the_1025th_claimant_is_refused_in_one_line(admin: EtcdRegistry) -> None:
    k = admin.client.transactions
    for start in range(0, MAX_NODE_IDS, 128):  # etcd takes up to 128 operations per transaction
        puts = [k.put(f"{admin.prefix}node-ids/{n}".encode(), b"{}") for n in range(start, start + 128)]
        assert (await admin.client.transaction(compare=[], success=puts, failure=[]))[0]
    claims = EtcdNodeIds(admin, "tr-late", Recorder(), ttl=2)
    with pytest.raises(NodeIdUnavailable) as refused:
        await claims.start()
    message = str(refused.value)
    assert message.startswith("all 1024 node ids for message ids are claimed under") and "\n" not in message
    await admin.client.delete(f"{admin.prefix}node-ids/700".encode())  # one is free again
    async with EtcdNodeIds(admin, "tr-late", Recorder(), ttl=2) as again:
        assert again.node_id == 700


async def test_etcd_away_at_start_is_one_line_naming_the_endpoints() -> None:
    closed = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    async with EtcdRegistry(closed, prefix="/im-test/away/", timeout=1.0) as registry:
        minter = Recorder()
        with pytest.raises(NodeIdUnavailable) as refused:
            await EtcdNodeIds(registry, "tr-1", minter, ttl=2).start()
    message = str(refused.value)
    assert message.startswith("cannot claim a node id for message ids: etcd at " + ",".join(closed)), message
    assert "\n" not in message and minter.node is None


async def test_a_revoked_lease_stops_minting_until_claimed_again(admin: EtcdRegistry) -> None:
    minter = Recorder()
    async with EtcdNodeIds(admin, "tr-1", minter, ttl=2) as claims:
        n = claims.node_id
        assert n is not None
        kv = await admin.client.get(f"{admin.prefix}node-ids/{n}".encode())
        await admin.client.revoke_lease(kv.lease)  # expired, as far as the holder can tell
        await eventually(lambda: ("revoke", None) in minter.events, "the loss noticed", timeout=3)
        await eventually(lambda: claims.node_id is not None, "claimed again", timeout=3)
        assert minter.can_mint(int(time.time() * 1000))


async def test_minting_is_bounded_by_the_reservation_written_in_etcd(admin: EtcdRegistry) -> None:
    minter = Recorder()
    async with EtcdNodeIds(admin, "tr-1", minter, ttl=2) as claims:
        now = int(time.time() * 1000)
        assert minter.can_mint(now) and not minter.can_mint(now + 5_000)  # reserved about one TTL ahead
        mark = await admin.client.get(f"{admin.prefix}node-id-marks/{claims.node_id}".encode())
        assert b'"node":"tr-1"' in mark.value
        first = minter._until_ms
        await eventually(lambda: minter._until_ms != first, "the reservation extended", timeout=3)
        assert minter._until_ms is not None and first is not None and minter._until_ms > first


async def test_a_deleted_claim_stops_minting_at_once_not_at_the_next_renewal(admin: EtcdRegistry) -> None:
    minter = Recorder()
    async with EtcdNodeIds(admin, "tr-1", minter, ttl=9) as claims:  # renewals every 3 s
        n = claims.node_id
        assert n is not None
        await admin.client.delete(f"{admin.prefix}node-ids/{n}".encode())
        deleted = time.monotonic()
        await eventually(lambda: ("revoke", None) in minter.events, "the loss noticed", timeout=3)
        assert time.monotonic() - deleted < 1.5  # the watch, not the renewal 3 s later
        await eventually(lambda: claims.node_id is not None, "claimed again", timeout=3)


async def test_etcd_away_stops_minting_when_the_reservation_runs_out_and_a_restart_resumes_it() -> None:
    etcd = EtcdProcess().start()
    try:
        async with EtcdRegistry(etcd.endpoint, prefix="/im-test/restart/", timeout=1.0) as registry:
            minter = Recorder()
            async with EtcdNodeIds(registry, "tr-1", minter, ttl=2) as claims:
                n = claims.node_id
                await asyncio.to_thread(etcd.stop, signal.SIGKILL)
                # Renewals fail: minting goes on until the reservation (one TTL ahead) runs out, then stops.
                await eventually(lambda: not minter.can_mint(int(time.time() * 1000)), "minting stopped", timeout=4)
                assert minter.node == n  # not lost: the lease may well survive
                await asyncio.to_thread(etcd.start)
                await eventually(lambda: minter.can_mint(int(time.time() * 1000)), "minting resumed", timeout=5)
                assert claims.node_id == n and minter.events == [("assign", n)]  # etcd kept the lease
    finally:
        etcd.destroy()
