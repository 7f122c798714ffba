"""Node id claim harnesses for the contract suite (``node_ids_harness``, imported by ``conftest.py``): the
in-process table, and etcd (the shared test etcd, a private registry prefix per test)."""

from __future__ import annotations

import abc
import uuid
from collections.abc import AsyncIterator

import pytest

from im.backends.node_ids import NodeIdClaims
from im.backends.node_ids.etcd import EtcdNodeIds
from im.backends.node_ids.memory import MemoryNodeIds, NodeIdTable
from im.backends.registry.etcd import EtcdRegistry
from im.core.ids import Snowflake
from tests.support.etcd import shared_etcd


class Recorder(Snowflake):
    """The committer's Snowflake, recording what the claim did to it."""

    def __init__(self) -> None:
        super().__init__(None)
        self.events: list[tuple[str, int | None]] = []

    def assign(self, node: int, *, after_ms: int = 0, until_ms: int | None = None, token: int = 0) -> None:
        super().assign(node, after_ms=after_ms, until_ms=until_ms, token=token)
        self.events.append(("assign", node))

    def revoke(self) -> None:
        super().revoke()
        self.events.append(("revoke", None))


class NodeIdsHarness(abc.ABC):
    """Claims on one shared place, as processes of one cluster make them. ``size``: how many ids there
    are (kept small, so that running out is quick to reach). ``ttl``: the lease of a claim."""

    size = 4
    ttl = 2.0

    @abc.abstractmethod
    def claims(self, owner: str, minter: Snowflake) -> NodeIdClaims:
        """A new, unstarted claim of ``owner`` driving ``minter``."""

    @abc.abstractmethod
    async def take_away(self, node_id: int) -> None:
        """End the claim on ``node_id`` from outside its holder (an operator)."""

    async def open(self) -> None:  # noqa: B027 - optional
        pass

    async def close(self) -> None:  # noqa: B027 - optional
        pass


class MemoryNodeIdsHarness(NodeIdsHarness):
    def __init__(self) -> None:
        self.table = NodeIdTable(self.size)

    def claims(self, owner: str, minter: Snowflake) -> NodeIdClaims:
        return MemoryNodeIds(owner, minter, table=self.table)

    async def take_away(self, node_id: int) -> None:
        self.table.take_away(node_id)


class EtcdNodeIdsHarness(NodeIdsHarness):
    """On the shared test etcd, under a private prefix deleted at close; each claim on a registry of its
    own (one per process, as in a cluster)."""

    def __init__(self) -> None:
        self.prefix = f"/im-test/{uuid.uuid4().hex[:12]}/"
        self.registries: list[EtcdRegistry] = []
        self.made: list[NodeIdClaims] = []

    def claims(self, owner: str, minter: Snowflake) -> NodeIdClaims:
        registry = EtcdRegistry(shared_etcd().endpoint, prefix=self.prefix)
        self.registries.append(registry)
        claims = EtcdNodeIds(registry, owner, minter, ttl=self.ttl, size=self.size)
        self.made.append(claims)
        return claims

    async def take_away(self, node_id: int) -> None:
        async with EtcdRegistry(shared_etcd().endpoint, prefix=self.prefix) as admin:
            assert await admin.client.delete(f"{self.prefix}node-ids/{node_id}".encode())

    async def close(self) -> None:
        for claims in self.made:
            await claims.close()
        for registry in self.registries:
            await registry.close()
        async with EtcdRegistry(shared_etcd().endpoint, prefix=self.prefix) as cleaner:
            await cleaner.client.delete_prefix(self.prefix.encode())


NODE_IDS = [pytest.param(MemoryNodeIdsHarness, id="memory"), pytest.param(EtcdNodeIdsHarness, id="etcd")]


@pytest.fixture(params=NODE_IDS)
async def node_ids_harness(request: pytest.FixtureRequest) -> AsyncIterator[NodeIdsHarness]:
    harness: NodeIdsHarness = request.param()
    await harness.open()
    try:
        yield harness
    finally:
        await harness.close()
