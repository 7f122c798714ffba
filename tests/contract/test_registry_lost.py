"""``Registry.on_lost`` on etcd: a registration whose lease ended under its owner (expired while the owner
was paused or cut off; here revoked from outside) is reported to the owner, by node, before it is made
again under a new lease. A gateway acts on it (moves its clients): docs/operations.md, "Node ids"."""

from __future__ import annotations

import uuid

from im.backends.registry.etcd import EtcdRegistry
from im.backends.registry.memory import MemoryRegistry
from im.model.cluster import ServiceInstance
from tests.support.etcd import shared_etcd
from tests.support.wait import eventually


async def test_a_lost_lease_is_reported_then_registered_again() -> None:
    prefix = f"/im-test/{uuid.uuid4().hex[:12]}/"
    endpoint = shared_etcd().endpoint
    async with EtcdRegistry(endpoint, prefix=prefix) as registry, EtcdRegistry(endpoint, prefix=prefix) as admin:
        lost: list[str] = []
        registry.on_lost(lost.append)
        await registry.register(ServiceInstance("gateway", "gw-x", {"ws": "ws://x"}), ttl=2)
        (kv,) = await admin.client.get_prefix(f"{prefix}gateway/".encode())
        first_lease = int(kv.lease)
        await admin.client.revoke_lease(first_lease)  # what an expiry during a pause amounts to
        await eventually(lambda: lost == ["gw-x"], f"not reported: {lost}", timeout=10)

        async def listed_again() -> bool:
            kvs = await admin.client.get_prefix(f"{prefix}gateway/".encode())
            return len(kvs) == 1 and int(kvs[0].lease) != first_lease

        await eventually(listed_again, "not registered again", timeout=10)
        assert lost == ["gw-x"]  # once per loss
        await admin.client.delete_prefix(prefix.encode())


async def test_a_registry_without_leases_never_reports_a_loss() -> None:
    registry = MemoryRegistry()
    lost: list[str] = []
    registry.on_lost(lost.append)
    async with registry:
        await registry.register(ServiceInstance("gateway", "gw-x", {}), ttl=2)
        await registry.update_load("gw-x", 3)
    assert lost == []
