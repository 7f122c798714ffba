"""TransferPool and LinkRouter over real gRPC on loopback, with a MemoryRegistry listing the transfer nodes.

Most tests run two transfer nodes whose core is a stub (each send is answered at once with a made-up
stored message and recorded, so the test sees which node got it); forwarding (routes, events,
revocations) goes through the real GrpcRouter and TransferServicer. The last test puts a real
committer behind the pool.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from im.backends.registry.memory import MemoryRegistry
from im.backends.routing import DeliverySink
from im.core.committer import SendCallback, SendRequest
from im.model.chat import StoredMessage
from im.model.cluster import DeviceLocation, ServiceInstance
from im.model.errors import ErrorCode
from im.model.ids import direct_conv
from im.protocol.frames import TypingEvent
from im.transfer import GrpcRouter, TransferLink, TransferServicer, serve_transfer
from im.transfer.pool import GRPC_ADDRESS, LinkRouter, TransferPool, conversation_key
from tests.support.chat import chat_core
from tests.support.wait import eventually
from tests.transfer.conftest import Core, RecordingSink, Results

TTL = 600.0


def text(uid: int, cmid: str, *, conv: str | None = None, to: int | None = None) -> SendRequest:
    return SendRequest(uid=uid, device="d1", cmid=cmid, conv=conv, to=to, type="text", body=b'{"text":"hi"}')


def stored(conv: str, seq: int, sender: int = 1) -> StoredMessage:
    return StoredMessage(
        conv=conv,
        seq=seq,
        mid=1000 + seq,
        sender=sender,
        device="d1",
        cmid=f"m{seq}",
        ts=1,
        type="text",
        body=b'{"text":"%d"}' % seq,
    )


class StubCore:
    """A transfer node's core stand-in: records every send; answers it at once, or holds it."""

    def __init__(self, node: str) -> None:
        self.node = node
        self.got: list[SendRequest] = []
        self.hold = False
        self.held: list[tuple[SendRequest, SendCallback]] = []
        self._seqs = itertools.count(1)

    @property
    def cmids(self) -> set[str]:
        return {r.cmid for r in self.got}

    def submit(self, req: SendRequest, done: SendCallback) -> None:
        self.got.append(req)
        if self.hold:
            self.held.append((req, done))
            return
        seq = next(self._seqs)
        m = StoredMessage(
            conv=conversation_key(req),
            seq=seq,
            mid=seq,
            sender=req.uid,
            device=req.device,
            cmid=req.cmid,
            ts=1,
            type=req.type,
            body=req.body,
        )
        done(req, m, False, None)


@dataclass
class StubNode:
    node: str
    core: StubCore
    router: GrpcRouter
    servicer: TransferServicer
    server: Any
    port: int
    running: bool = True

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def instance(self) -> ServiceInstance:
        return ServiceInstance("transfer", self.node, {GRPC_ADDRESS: self.address})

    async def stop(self) -> None:
        if self.running:
            self.running = False
            await self.server.stop(None)

    async def restart(self) -> None:
        self.server, _ = await serve_transfer(self.servicer, self.address)
        self.running = True


async def start_stub(node: str) -> StubNode:
    core, router = StubCore(node), GrpcRouter()
    servicer = TransferServicer(core, router, node=node)
    server, port = await serve_transfer(servicer)
    return StubNode(node, core, router, servicer, server, port)


@dataclass
class Pools:
    """A registry, and the pools (one per gateway/API node) the test opens on it; closed at teardown."""

    registry: MemoryRegistry = field(default_factory=MemoryRegistry)
    opened: list[TransferPool] = field(default_factory=list)

    async def pool(
        self,
        node: str,
        sink: DeliverySink | None = None,
        *,
        on_revoked: Callable[[str], None] | None = None,
        wait: int = 2,
    ) -> TransferPool:
        def link(address: str, gateway: str, s: DeliverySink) -> TransferLink:
            return TransferLink(address, gateway, s, on_revoked=on_revoked, backoff_initial=0.02, backoff_max=0.2)

        pool = TransferPool(self.registry, node, on_revoked=on_revoked, link_factory=link)
        self.opened.append(pool)
        await pool.start(sink or RecordingSink())
        await pool.wait_connected(wait, timeout=10)
        return pool


@dataclass
class Cluster:
    pools: Pools
    nodes: dict[str, StubNode]

    @property
    def registry(self) -> MemoryRegistry:
        return self.pools.registry

    async def add(self, node: str) -> StubNode:
        stub = await start_stub(node)
        self.nodes[node] = stub
        await self.registry.register(stub.instance(), TTL)
        return stub

    def where(self, cmid: str) -> list[str]:
        """The transfer nodes whose core got a send with this cmid."""
        return sorted(n for n, stub in self.nodes.items() if cmid in stub.core.cmids)


@pytest.fixture
async def pools() -> AsyncIterator[Pools]:
    p = Pools()
    yield p
    for pool in p.opened:
        await pool.close()


@pytest.fixture
async def cluster(pools: Pools) -> AsyncIterator[Cluster]:
    c = Cluster(pools, {})
    try:
        await c.add("tr-1")
        await c.add("tr-2")
        yield c
    finally:
        for pool in pools.opened:  # links first, so the servers stop without open streams
            await pool.close()
        pools.opened.clear()
        for stub in c.nodes.values():
            await stub.stop()


def conv_on(pool: TransferPool, node: str) -> str:
    """A group conversation that ``pool`` sends through transfer node ``node`` (while it is up)."""
    for gid in range(1, 10_000):
        conv = f"g:{gid}"
        if pool.link_for(conv) is pool.links[node]:
            return conv
    raise AssertionError(f"no conversation ranks {node} first")


def refused_unavailable(results: Results) -> bool:
    return all(m is None and err is not None and err.code is ErrorCode.UNAVAILABLE for _, m, _, err in results.got)


# --- membership of the pool follows the registry ------------------------------------------------------


async def test_pool_links_to_the_transfer_nodes_the_registry_lists(cluster: Cluster) -> None:
    tr1, tr2 = cluster.nodes["tr-1"], cluster.nodes["tr-2"]
    # Instances the pool must ignore: another role, and a transfer node without a grpc address.
    await cluster.registry.register(ServiceInstance("gateway", "gw-x", {GRPC_ADDRESS: tr1.address}), TTL)
    await cluster.registry.register(ServiceInstance("transfer", "tr-nogrpc", {"ws": "ws://x"}), TTL)
    pool = await cluster.pools.pool("gw-a")

    assert sorted(pool.links) == ["tr-1", "tr-2"]
    # each link reached the node the registry named (the welcome carries the transfer node's id)
    assert {node: link.transfer_node for node, link in pool.links.items()} == {"tr-1": "tr-1", "tr-2": "tr-2"}
    assert [link.address for link in pool.connected()] == [tr1.address, tr2.address]
    assert tr1.router.linked() == ["gw-a"] and tr2.router.linked() == ["gw-a"]

    tr3 = await cluster.add("tr-3")  # a node that appears later is linked too
    await pool.wait_connected(3, timeout=10)
    assert sorted(pool.links) == ["tr-1", "tr-2", "tr-3"]
    assert tr3.router.linked() == ["gw-a"]


async def test_a_deregistered_node_is_unlinked_and_its_pending_sends_go_to_the_other_in_order(
    cluster: Cluster,
) -> None:
    tr1, tr2 = cluster.nodes["tr-1"], cluster.nodes["tr-2"]
    pool = await cluster.pools.pool("gw-a")
    conv = conv_on(pool, "tr-1")
    link1 = pool.links["tr-1"]
    tr1.core.hold = True  # tr-1 takes the sends and does not answer
    results = Results()
    reqs = [text(1, f"c{i}", conv=conv) for i in range(5)]
    for req in reqs:
        pool.submit(req, results.done)
    await eventually(lambda: len(tr1.core.held) == 5)
    assert results.got == [] and link1.in_flight == 5

    await cluster.registry.deregister("tr-1")
    assert sorted(pool.links) == ["tr-2"]  # the memory registry calls back at once
    later = text(1, "c5", conv=conv)  # submitted after the failover: must come after the handed-over ones
    pool.submit(later, results.done)
    await eventually(lambda: len(results.got) == 6)
    assert [r for r, *_ in results.got] == [*reqs, later]
    assert all(m is not None and err is None for _, m, _, err in results.got)  # answered by tr-2, no error
    assert [r.cmid for r in tr2.core.got] == [f"c{i}" for i in range(6)]  # in submission order
    assert not link1.connected and link1.in_flight == 0
    # the link is closed, not just forgotten: tr-1 sees the stream end
    await eventually(lambda: tr1.servicer.streams == 0 and tr1.router.linked() == [])
    assert tr2.router.linked() == ["gw-a"]
    assert cluster.where("c0") == ["tr-1", "tr-2"]  # tr-1 held the first try, tr-2 answered the handover

    # the conversation stays on the node that remains
    again = Results()
    pool.submit(text(1, "c6", conv=conv), again.done)
    await eventually(lambda: len(again.got) == 1)
    assert again.got[0][3] is None and again.got[0][1] is not None
    assert cluster.where("c6") == ["tr-2"]


# --- the choice of node -------------------------------------------------------------------------------


async def test_one_conversation_goes_to_one_node_and_conversations_spread(cluster: Cluster) -> None:
    tr1, tr2 = cluster.nodes["tr-1"], cluster.nodes["tr-2"]
    gw_a, gw_b = await cluster.pools.pool("gw-a"), await cluster.pools.pool("gw-b")

    results = Results()
    for i in range(30):  # one conversation, from two gateways
        gw_a.submit(text(1, f"a{i}", conv="g:7"), results.done)
        gw_b.submit(text(2, f"b{i}", conv="g:7"), results.done)
    await eventually(lambda: len(results.got) == 60)
    assert all(err is None for *_, err in results.got)
    counts = sorted([len(tr1.core.got), len(tr2.core.got)])
    assert counts == [0, 60]  # every send of g:7 went to the same node, whichever gateway sent it

    many = Results()
    convs = [f"g:{gid}" for gid in range(100, 300)]
    for conv in convs:
        gw_a.submit(text(1, f"m-{conv}", conv=conv), many.done)
    await eventually(lambda: len(many.got) == 200)
    on = {conv: cluster.where(f"m-{conv}") for conv in convs}
    assert all(len(nodes) == 1 for nodes in on.values())
    per_node = {n: sum(1 for nodes in on.values() if nodes == [n]) for n in ("tr-1", "tr-2")}
    assert min(per_node.values()) >= 50, per_node  # 200 conversations spread over both nodes
    # the other gateway would choose the same node for each of them
    assert all(gw_b.link_for(conv) is gw_b.links[on[conv][0]] for conv in convs)


async def test_a_direct_conversation_named_by_to_goes_where_its_conv_id_goes(cluster: Cluster) -> None:
    pool = await cluster.pools.pool("gw-a")
    results = Results()
    pairs = [(uid, uid + 1000) for uid in range(1, 41)]
    for lo, hi in pairs:
        assert conversation_key(text(lo, "x", to=hi)) == conversation_key(text(hi, "x", to=lo)) == direct_conv(lo, hi)
        pool.submit(text(lo, f"to-{lo}", to=hi), results.done)
        pool.submit(text(hi, f"back-{lo}", to=lo), results.done)
        pool.submit(text(lo, f"conv-{lo}", conv=f"d:{lo}:{hi}"), results.done)
    await eventually(lambda: len(results.got) == 3 * len(pairs))
    nodes = set()
    for lo, _ in pairs:
        where = cluster.where(f"conv-{lo}")
        assert len(where) == 1
        assert cluster.where(f"to-{lo}") == cluster.where(f"back-{lo}") == where, lo
        nodes.update(where)
    assert nodes == {"tr-1", "tr-2"}  # not trivially one node for everything


async def test_sends_fail_over_to_a_connected_node_and_fail_at_once_when_none_is(cluster: Cluster) -> None:
    tr1, tr2 = cluster.nodes["tr-1"], cluster.nodes["tr-2"]
    pool = await cluster.pools.pool("gw-a")
    conv1, conv2 = conv_on(pool, "tr-1"), conv_on(pool, "tr-2")

    await tr1.stop()
    await eventually(lambda: not pool.links["tr-1"].connected)
    assert "tr-1" in pool.links  # still registered: only the link is down
    results = Results()
    for i in range(3):
        pool.submit(text(1, f"one-{i}", conv=conv1), results.done)
        pool.submit(text(1, f"two-{i}", conv=conv2), results.done)
    await eventually(lambda: len(results.got) == 6)
    assert all(err is None for *_, err in results.got)
    assert tr1.core.got == [] and len(tr2.core.got) == 6  # conv1's sends went to the other node

    await tr1.restart()  # back: conv1 returns to its node
    await pool.wait_connected(2, timeout=10)
    back = Results()
    pool.submit(text(1, "one-back", conv=conv1), back.done)
    await eventually(lambda: len(back.got) == 1)
    assert back.got[0][3] is None and cluster.where("one-back") == ["tr-1"]

    await tr1.stop()
    await tr2.stop()
    await eventually(lambda: pool.connected() == [])
    refused = Results()
    pool.submit(text(1, "nowhere", conv=conv1), refused.done)
    assert len(refused.got) == 1 and refused_unavailable(refused)  # at once, before any await


# --- forwarding ---------------------------------------------------------------------------------------


async def test_link_router_reaches_a_remote_gateway_through_a_transfer_node(cluster: Cluster) -> None:
    sink_b = RecordingSink()
    api = await cluster.pools.pool("api-1")
    await cluster.pools.pool("gw-b", sink_b)
    router = LinkRouter(api)

    batches = [([stored("g:5", seq)], [[2, 3]]) for seq in range(1, 21)]
    for messages, recipients in batches:
        router.publish("gw-b", messages, recipients)
    typing = TypingEvent(conv="g:5", uid=1)
    router.publish_event("gw-b", typing, [2, 3], (1, "d1"))
    router.publish_event("gw-b", typing, [3], None)
    await eventually(lambda: len(sink_b.messages) >= 20 and len(sink_b.events) >= 2)
    await asyncio.sleep(0.1)  # a duplicate through the second transfer node would arrive by now
    # once each (one transfer node forwarded), in publish order
    assert sink_b.messages == [(m, [2, 3]) for messages, _ in batches for m in messages]
    assert sink_b.events == [(typing, [2, 3], (1, "d1")), (typing, [3], None)]
    assert router.dropped == 0

    # a gateway node nobody links: the forwarding transfer node cannot route it
    router.publish("gw-gone", [stored("g:5", 99)], [[9]])
    await eventually(lambda: sum(n.router.unroutable for n in cluster.nodes.values()) == 1)


async def test_link_router_calls_local_sinks_directly(cluster: Cluster) -> None:
    sink_b = RecordingSink()
    api = await cluster.pools.pool("api-1")
    await cluster.pools.pool("gw-b", sink_b)
    router = LinkRouter(api)
    local = RecordingSink()
    router.attach("gw-b", local)  # a gateway node in this process: no transfer node involved
    sent = sum(link.frames_sent for link in api.links.values())
    m, typing = stored("g:5", 1), TypingEvent(conv="g:5", uid=1)

    router.publish("gw-b", [m], [[2]])
    router.publish_event("gw-b", typing, [2], None)
    assert local.messages == [(m, [2])] and local.events == [(typing, [2], None)]  # synchronously
    await asyncio.sleep(0.1)
    assert sum(link.frames_sent for link in api.links.values()) == sent
    assert sink_b.batches == [] and sink_b.events == []

    router.detach("gw-b")  # detached: forwarded again
    router.publish("gw-b", [m], [[3]])
    await eventually(lambda: len(sink_b.messages) == 1)
    assert sink_b.messages == [(m, [3])] and len(local.messages) == 1


async def test_link_router_counts_what_it_cannot_forward(cluster: Cluster) -> None:
    api = await cluster.pools.pool("api-1")
    router = LinkRouter(api)
    for stub in cluster.nodes.values():
        await stub.stop()
    await eventually(lambda: api.connected() == [])
    router.publish("gw-b", [stored("g:5", 1), stored("g:5", 2)], [[2], [2]])
    router.publish_event("gw-b", TypingEvent(conv="g:5", uid=1), [2], None)
    assert router.dropped == 3


async def test_replaced_connections_reach_their_gateway_once_through_a_transfer_node(cluster: Cluster) -> None:
    sink_a, sink_b = RecordingSink(), RecordingSink()
    gw_a = await cluster.pools.pool("gw-a", sink_a)
    await cluster.pools.pool("gw-b", sink_b)
    router = LinkRouter(gw_a)
    older = [DeviceLocation(7, "phone", "gw-b", "k.1"), DeviceLocation(8, "web|x", "gw-b", "k.2")]
    router.publish_replaced("gw-b", older)
    await eventually(lambda: len(sink_b.replaced) >= 2)
    await asyncio.sleep(0.1)  # a second copy through the other transfer node would arrive by now
    assert sink_b.replaced == older and sink_a.replaced == []
    local = RecordingSink()
    router.attach("gw-b", local)  # a gateway node in this process: called directly
    router.publish_replaced("gw-b", older[:1])
    assert local.replaced == older[:1]

    for stub in cluster.nodes.values():  # no link: dropped and counted (the refresh of presence catches it)
        await stub.stop()
    await eventually(lambda: gw_a.connected() == [])
    router.publish_replaced("gw-c", older)
    assert router.dropped == 2


async def test_revoke_reaches_every_other_linked_gateway(cluster: Cluster) -> None:
    seen: dict[str, list[str]] = {"api-1": [], "gw-a": [], "gw-b": []}
    api = await cluster.pools.pool("api-1", on_revoked=seen["api-1"].append)
    await cluster.pools.pool("gw-a", on_revoked=seen["gw-a"].append)
    await cluster.pools.pool("gw-b", on_revoked=seen["gw-b"].append)

    api.revoke("sid-1")
    await eventually(lambda: bool(seen["gw-a"] and seen["gw-b"]))
    await asyncio.sleep(0.1)  # a second copy through the other transfer node would arrive by now
    assert seen["gw-a"] == ["sid-1"] and seen["gw-b"] == ["sid-1"]

    # the transfer node revocations went through is down: the other one carries the next
    forwarder = api.connected()[0].transfer_node
    await cluster.nodes[forwarder].stop()
    await eventually(lambda: len(api.connected()) == 1)
    await eventually(lambda: all(len(p.connected()) == 1 for p in cluster.pools.opened))
    api.revoke("sid-2")
    await eventually(lambda: seen["gw-a"][-1:] == ["sid-2"] and seen["gw-b"][-1:] == ["sid-2"])
    assert seen["gw-a"] == ["sid-1", "sid-2"] and seen["gw-b"] == ["sid-1", "sid-2"]


# --- a real core behind the pool ----------------------------------------------------------------------


async def test_pool_in_front_of_a_real_core(core: Core, pools: Pools) -> None:
    await pools.registry.register(ServiceInstance("transfer", "tr-1", {GRPC_ADDRESS: core.address}), TTL)
    sink_a, sink_b = RecordingSink(), RecordingSink()
    alice, bob = await core.user("alice", "gw-a"), await core.user("bob", "gw-b")
    gw_a = await pools.pool("gw-a", sink_a, wait=1)
    await pools.pool("gw-b", sink_b, wait=1)

    results = Results()
    for i in range(10):
        # named by ``to`` and by conv id alternately: one conversation, one dense log
        req = text(alice, f"c{i}", to=bob) if i % 2 == 0 else text(alice, f"c{i}", conv=direct_conv(alice, bob))
        gw_a.submit(req, results.done)
    await eventually(lambda: len(results.got) == 10 and len(sink_b.messages) == 10)
    assert all(err is None and not dup for _, _, dup, err in results.got)
    assert [m.seq for _, m, _, _ in results.got if m is not None] == list(range(1, 11))
    assert [(m.conv, m.seq, uids) for m, uids in sink_b.messages] == [
        (direct_conv(alice, bob), seq, [bob]) for seq in range(1, 11)
    ]

    # an API process: its own committer on the same store, routing through its LinkRouter
    api_pool = await pools.pool("api-1", wait=1)
    api_chat = chat_core(core.store, core.accounts, LinkRouter(api_pool), core.presence, node_id=1)
    api_chat.committer.start()
    try:
        group = await api_chat.groups.create_group(alice, "team", [bob])
        conv = f"g:{group.gid}"
        await eventually(
            lambda: any(m.conv == conv for m, _ in sink_b.messages) and any(m.conv == conv for m, _ in sink_a.messages)
        )
        assert [(m.seq, m.type, uids) for m, uids in sink_b.messages if m.conv == conv] == [(1, "system", [bob])]
        assert [(m.seq, m.type, uids) for m, uids in sink_a.messages if m.conv == conv] == [(1, "system", [alice])]
    finally:
        await api_chat.committer.stop()


async def test_sends_pending_on_a_broken_link_are_handed_to_the_other_node_in_order(cluster: Cluster) -> None:
    tr1, tr2 = cluster.nodes["tr-1"], cluster.nodes["tr-2"]
    pool = await cluster.pools.pool("gw-a")
    conv = conv_on(pool, "tr-1")
    tr1.core.hold = True
    results = Results()
    reqs = [text(1, f"b{i}", conv=conv) for i in range(5)]
    for req in reqs:
        pool.submit(req, results.done)
    await eventually(lambda: len(tr1.core.held) == 5)
    await tr1.stop()  # the stream breaks (a crash, as the gateway sees it); the node is still registered
    await eventually(lambda: len(results.got) == 5)
    assert [r for r, *_ in results.got] == reqs
    assert all(m is not None and err is None for _, m, _, err in results.got)  # no `unavailable` to the client
    assert [r.cmid for r in tr2.core.got] == [f"b{i}" for i in range(5)]


async def test_a_node_that_comes_back_does_not_overtake_sends_still_on_the_other(cluster: Cluster) -> None:
    """conv ranks tr-1 first. While tr-1 is down, a send of conv goes to tr-2, which holds it (a slow
    commit, or a slow link). tr-1 comes back: a later send of conv follows the unanswered one to tr-2
    instead of being committed ahead of it on tr-1; once nothing of conv is unanswered, conv is back on
    tr-1."""
    tr1, tr2 = cluster.nodes["tr-1"], cluster.nodes["tr-2"]
    pool = await cluster.pools.pool("gw-a")
    conv = conv_on(pool, "tr-1")
    await tr1.stop()
    await eventually(lambda: not pool.links["tr-1"].connected)
    tr2.core.hold = True
    results = Results()
    pool.submit(text(1, "early", conv=conv), results.done)
    await eventually(lambda: len(tr2.core.held) == 1)
    await tr1.restart()
    await eventually(lambda: pool.links["tr-1"].connected)
    assert pool.link_for(conv) is pool.links["tr-1"]
    pool.submit(text(1, "later", conv=conv), results.done)
    # It follows the unanswered one on tr-2's link (which holds it back while its frame is unanswered).
    await eventually(lambda: pool.links["tr-2"].in_flight == 2, "the later send follows the unanswered one")
    await asyncio.sleep(0.1)
    assert tr1.core.got == [] and pool.links["tr-1"].in_flight == 0
    held, tr2.core.held, tr2.core.hold = tr2.core.held, [], False
    for seq, (req, done) in enumerate(held, 1):
        done(req, stored(conv, seq), False, None)
    await eventually(lambda: len(results.got) == 2)
    assert [r.cmid for r, *_ in results.got] == ["early", "later"]
    back = Results()
    pool.submit(text(1, "back", conv=conv), back.done)
    await eventually(lambda: len(back.got) == 1)
    assert cluster.where("back") == ["tr-1"]


async def test_wait_answered_returns_once_no_send_is_in_flight_on_any_link(cluster: Cluster) -> None:
    """What a stopping gateway waits on (no polling): sends held by a node keep it waiting; sends that a
    lost link hands to the other node are waited for there."""
    tr1, tr2 = cluster.nodes["tr-1"], cluster.nodes["tr-2"]
    pool = await cluster.pools.pool("gw-a")
    conv = conv_on(pool, "tr-1")
    await pool.wait_answered()  # nothing in flight: at once
    tr1.core.hold = tr2.core.hold = True
    results = Results()
    for i in range(3):
        pool.submit(text(1, f"w{i}", conv=conv), results.done)
    await eventually(lambda: len(tr1.core.held) == 3)
    waiting = asyncio.ensure_future(pool.wait_answered())
    await asyncio.sleep(0.1)
    assert not waiting.done()

    await tr1.stop()  # the link breaks: its sends go to tr-2, which holds them too
    await eventually(lambda: len(tr2.core.held) == 3)
    await asyncio.sleep(0.1)
    assert not waiting.done() and results.got == []

    tr2.core.hold = False
    for req, done in tr2.core.held:
        tr2.core.submit(req, done)
    await asyncio.wait_for(waiting, 5)
    assert len(results.got) == 3 and all(err is None for *_, err in results.got)
