"""Router harnesses for the contract suite (``router_harness``, imported by ``conftest.py``): the memory
router, and the gRPC-linked routers of :mod:`im.transfer` over real streams on 127.0.0.1 (a transfer node
on a grpc.aio server on a free port; each attached gateway node is a :class:`TransferLink`)."""

from __future__ import annotations

import abc
import asyncio
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import pytest

from im.backends.registry.memory import MemoryRegistry
from im.backends.routing import DeliverySink, Router
from im.backends.routing.memory import MemoryRouter
from im.core.committer import SendCallback, SendRequest
from im.model.chat import StoredMessage
from im.model.cluster import ServiceInstance
from im.transfer import GrpcRouter, TransferLink, TransferServicer, serve_transfer
from im.transfer.pool import GRPC_ADDRESS, LinkRouter, TransferPool
from tests.support.wait import eventually


class RouterHarness(abc.ABC):
    """A router, and how a gateway node becomes reachable through it.

    ``attach``/``detach`` are what the interface's ``attach``/``detach`` mean for the implementation:
    a local sink for the memory router; a gateway's gRPC stream opened or closed for the linked ones
    (returning once the other side has seen it). ``quiet`` is how long a delivery may take (a "nothing
    arrives" check waits that long). ``keeps_batches``: a batch arrives as published (the memory
    router); the linked ones may coalesce consecutive batches of one node into one, keeping their order,
    which is all the interface promises."""

    router: Router
    quiet: float = 0.0
    keeps_batches: bool = False
    #: The router answers ``holders`` from its attached nodes' reports (False: always None, presence).
    tables: bool = True

    async def open(self) -> None:  # noqa: B027 - optional
        pass

    @abc.abstractmethod
    async def attach(self, node: str, sink: DeliverySink) -> None: ...

    @abc.abstractmethod
    async def detach(self, node: str) -> None: ...

    @abc.abstractmethod
    def unstarted(self) -> Router:
        """A new, not yet started router of the same kind."""

    async def close(self) -> None:  # noqa: B027 - optional
        pass


class MemoryRouterHarness(RouterHarness):
    keeps_batches = True

    def __init__(self) -> None:
        self.router = MemoryRouter()

    async def attach(self, node: str, sink: DeliverySink) -> None:
        self.router.attach(node, sink)

    async def detach(self, node: str) -> None:
        self.router.detach(node)

    def unstarted(self) -> Router:
        return MemoryRouter()


class _NoSends:
    """The transfer node's core for router tests: no test sends through it."""

    def submit(self, req: SendRequest, done: SendCallback) -> None:
        raise AssertionError("the router contract sends nothing through the core")


class _Discard(DeliverySink):
    def deliver(self, messages: Sequence[StoredMessage], recipients: Sequence[Sequence[int]]) -> None:
        pass

    def deliver_event(self, frame: object, uids: Iterable[int], skip: tuple[int, str] | None) -> None:
        pass


class _TransferNodeHarness(RouterHarness):
    """A transfer node (GrpcRouter + TransferServicer on a grpc.aio server on 127.0.0.1, free port);
    every attached gateway node is a real :class:`TransferLink` to it with the test's sink."""

    quiet = 0.2

    def __init__(self) -> None:
        self.transfer_router = GrpcRouter()
        self.servicer = TransferServicer(_NoSends(), self.transfer_router, node="tr-contract")
        self.server: Any = None
        self.address = ""
        self._links: dict[str, TransferLink] = {}

    async def open(self) -> None:
        self.server, port = await serve_transfer(self.servicer)
        self.address = f"127.0.0.1:{port}"

    async def attach(self, node: str, sink: DeliverySink) -> None:
        link = TransferLink(self.address, node, sink, backoff_initial=0.02, backoff_max=0.2)
        self._links[node] = link
        link.start()
        await asyncio.wait_for(link.wait_connected(), 10)  # the welcome follows the stream's registration
        assert node in self.transfer_router.linked()

    async def detach(self, node: str) -> None:
        link = self._links.pop(node, None)
        if link is not None:
            await link.close()
        await eventually(lambda: node not in self.transfer_router.linked())

    async def close(self) -> None:
        for link in self._links.values():
            await link.close()
        self._links.clear()
        if self.server is not None:
            await self.server.stop(None)


class GrpcRouterHarness(_TransferNodeHarness):
    """:class:`GrpcRouter` on the transfer node: publish goes down each gateway's stream."""

    def __init__(self) -> None:
        super().__init__()
        self.router = self.transfer_router

    def unstarted(self) -> Router:
        return GrpcRouter()


class LinkRouterHarness(_TransferNodeHarness):
    """:class:`LinkRouter` in a process without streams (an API node): its pool links to the transfer
    node found in a :class:`MemoryRegistry`, and publishes are forwarded there, then down the target
    gateway's stream: two gRPC hops."""

    tables = False  # its nodes are elsewhere: its committer asks presence

    def __init__(self) -> None:
        super().__init__()
        self.registry = MemoryRegistry()
        self.pool = TransferPool(
            self.registry,
            "api-contract",
            link_factory=lambda address, node, sink: TransferLink(
                address, node, sink, backoff_initial=0.02, backoff_max=0.2
            ),
        )
        self.router = LinkRouter(self.pool)

    async def open(self) -> None:
        await super().open()
        await self.registry.register(ServiceInstance("transfer", "tr-contract", {GRPC_ADDRESS: self.address}), 600)
        await self.pool.start(_Discard())
        await self.pool.wait_connected(1, timeout=10)
        await eventually(lambda: "api-contract" in self.transfer_router.linked())

    def unstarted(self) -> Router:
        return LinkRouter(self.pool)

    async def close(self) -> None:
        await self.pool.close()
        await super().close()


ROUTERS = [
    pytest.param(MemoryRouterHarness, id="memory"),
    pytest.param(GrpcRouterHarness, id="grpc"),
    pytest.param(LinkRouterHarness, id="link"),
]


@pytest.fixture(params=ROUTERS)
async def router_harness(request: pytest.FixtureRequest) -> AsyncIterator[RouterHarness]:
    harness: RouterHarness = request.param()
    try:
        await harness.open()
        yield harness
    finally:
        await harness.close()
