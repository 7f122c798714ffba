"""The :class:`Registry` contract, run against every implementation (see ``conftest.REGISTRIES``)."""

from __future__ import annotations

import asyncio

from im.backends.registry import Registry
from im.model.cluster import ServiceInstance
from tests.contract.conftest import RegistryHarness
from tests.contract.lifecycle import check_lifecycle
from tests.support.wait import eventually


def gw(node: str, load: int = 0) -> ServiceInstance:
    return ServiceInstance("gateway", node, {"ws": f"ws://{node}:8081/ws"}, load)


def by_node(instances: list[ServiceInstance]) -> list[ServiceInstance]:
    return sorted(instances, key=lambda i: i.node)


async def test_register_and_list_by_role(registry_harness: RegistryHarness) -> None:
    reg, ttl = registry_harness.registry, registry_harness.ttl
    assert await reg.instances("gateway") == []
    api = ServiceInstance("api", "api-1", {"http": "http://api-1:8080"})
    await reg.register(gw("gw-1"), ttl)
    await reg.register(gw("gw-2"), ttl)
    await reg.register(api, ttl)
    assert by_node(await reg.instances("gateway")) == [gw("gw-1"), gw("gw-2")]
    assert await reg.instances("api") == [api]
    assert await reg.instances("transfer") == []
    # Registering a node again replaces its entry.
    await reg.register(ServiceInstance("gateway", "gw-1", {"ws": "ws://elsewhere/ws"}), ttl)
    assert by_node(await reg.instances("gateway")) == [
        ServiceInstance("gateway", "gw-1", {"ws": "ws://elsewhere/ws"}),
        gw("gw-2"),
    ]


async def test_update_load(registry_harness: RegistryHarness) -> None:
    reg, ttl = registry_harness.registry, registry_harness.ttl
    await reg.register(gw("gw-1"), ttl)
    await reg.register(gw("gw-2"), ttl)
    await reg.update_load("gw-1", 42)
    assert by_node(await reg.instances("gateway")) == [gw("gw-1", 42), gw("gw-2")]
    await reg.update_load("gw-unknown", 5)  # no entry: nothing appears
    assert by_node(await reg.instances("gateway")) == [gw("gw-1", 42), gw("gw-2")]


async def test_readiness_version_and_start_time_are_stored_and_watched(registry_harness: RegistryHarness) -> None:
    reg, ttl = registry_harness.registry, registry_harness.ttl
    full = ServiceInstance("gateway", "gw-1", {"ws": "ws://gw-1/ws"}, 3, ready=False, version="9.8.7", started_at=1.5)
    await reg.register(full, ttl)
    assert await reg.instances("gateway") == [full]
    seen: list[list[ServiceInstance]] = []
    unwatch = reg.watch("gateway", seen.append)
    try:
        await eventually(lambda: seen and seen[-1] == [full])
        await reg.update_load("gw-1", 4, ready=True)  # ready published with the load
        became = ServiceInstance("gateway", "gw-1", {"ws": "ws://gw-1/ws"}, 4, True, "9.8.7", 1.5)
        await eventually(lambda: seen[-1] == [became])
        await reg.update_load("gw-1", 5)  # None: readiness unchanged
        assert await reg.instances("gateway") == [
            ServiceInstance("gateway", "gw-1", {"ws": "ws://gw-1/ws"}, 5, True, "9.8.7", 1.5)
        ]
        await reg.ping()
    finally:
        unwatch()


async def test_deregister_removes_at_once(registry_harness: RegistryHarness) -> None:
    reg, ttl = registry_harness.registry, registry_harness.ttl
    await reg.register(gw("gw-1"), ttl)
    await reg.register(gw("gw-2"), ttl)
    await reg.deregister("gw-1")
    assert await reg.instances("gateway") == [gw("gw-2")]
    await reg.deregister("gw-1")  # twice, or unknown: harmless
    await reg.deregister("nobody")
    assert await reg.instances("gateway") == [gw("gw-2")]


async def test_registration_expires_after_ttl(registry_harness: RegistryHarness) -> None:
    h = registry_harness
    reg = h.registry
    await reg.register(gw("gw-1"), h.ttl)
    await reg.register(gw("gw-2"), h.ttl * 10)
    await h.advance(h.ttl * 0.5)
    assert by_node(await reg.instances("gateway")) == [gw("gw-1"), gw("gw-2")]
    await h.advance(h.ttl)
    assert await reg.instances("gateway") == [gw("gw-2")]  # crashed owner: gone within its TTL


async def test_keepalive_extends_ttl(registry_harness: RegistryHarness) -> None:
    h = registry_harness
    reg = h.registry
    await reg.register(gw("gw-1"), h.ttl)
    await reg.register(gw("gw-2"), h.ttl)
    await h.advance(h.ttl * 0.6)
    await reg.update_load("gw-1", 3)  # the owner's periodic load report keeps it alive
    await reg.register(gw("gw-2"), h.ttl)  # ... as does registering again
    await h.advance(h.ttl * 0.6)
    assert by_node(await reg.instances("gateway")) == [gw("gw-1", 3), gw("gw-2")]
    await h.advance(h.ttl * 0.6)
    assert await reg.instances("gateway") == []


async def test_watch_sees_the_live_list_now_and_on_change(registry_harness: RegistryHarness) -> None:
    h = registry_harness
    reg = h.registry
    await reg.register(gw("gw-1"), h.ttl)
    await reg.register(ServiceInstance("api", "api-1", {}), h.ttl)
    seen: list[list[ServiceInstance]] = []
    unsubscribe = reg.watch("gateway", lambda live: seen.append(by_node(live)))

    await eventually(lambda: len(seen) >= 1)
    assert seen[-1] == [gw("gw-1")]

    await reg.register(gw("gw-2"), h.ttl)
    await eventually(lambda: seen[-1] == [gw("gw-1"), gw("gw-2")])
    await reg.deregister("gw-1")
    await eventually(lambda: seen[-1] == [gw("gw-2")])
    # Changes to another role do not show up in this list.
    await reg.register(ServiceInstance("api", "api-2", {}), h.ttl)
    assert all(i.role == "gateway" for live in seen for i in live)

    unsubscribe()
    count = len(seen)
    await reg.register(gw("gw-3"), h.ttl)
    await reg.deregister("gw-2")
    assert await reg.instances("gateway") == [gw("gw-3")]
    await asyncio.sleep(h.quiet)
    assert len(seen) == count


async def test_watch_lists_only_live_instances(registry_harness: RegistryHarness) -> None:
    h = registry_harness
    reg = h.registry
    await reg.register(gw("gw-1"), h.ttl)
    await h.advance(h.ttl * 1.5)  # gw-1 is dead
    seen: list[list[ServiceInstance]] = []
    reg.watch("gateway", lambda live: seen.append(by_node(live)))
    await eventually(lambda: len(seen) >= 1)
    assert seen[-1] == []
    await reg.register(gw("gw-2"), h.ttl)
    await eventually(lambda: seen[-1] == [gw("gw-2")])


async def test_watchers_are_independent(registry_harness: RegistryHarness) -> None:
    h = registry_harness
    reg = h.registry
    a: list[list[ServiceInstance]] = []
    b: list[list[ServiceInstance]] = []
    stop_a = reg.watch("gateway", lambda live: a.append(by_node(live)))
    reg.watch("gateway", lambda live: b.append(by_node(live)))
    await reg.register(gw("gw-1"), h.ttl)
    await eventually(lambda: bool(a) and bool(b) and a[-1] == b[-1] == [gw("gw-1")])
    stop_a()
    await reg.register(gw("gw-2"), h.ttl)
    await eventually(lambda: b[-1] == [gw("gw-1"), gw("gw-2")])
    assert a[-1] == [gw("gw-1")]


async def test_lifecycle(registry_harness: RegistryHarness) -> None:
    async def probe(registry: Registry) -> None:
        assert await registry.instances("nobody-registers-this-role") == []

    await check_lifecycle(registry_harness.unstarted, probe)
