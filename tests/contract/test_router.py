"""The :class:`Router` contract, run against every implementation (see ``conftest.ROUTERS``): the memory
router, and the gRPC-linked ones over real streams on 127.0.0.1 (``GrpcRouter`` on a transfer node,
``LinkRouter`` forwarding through one). Events are protocol frames, since the linked routers carry them
encoded."""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Iterable, Sequence

from im.backends.routing import DeliverySink, Router
from im.model.chat import StoredMessage
from im.protocol.frames import Receipt, TypingEvent
from tests.contract.lifecycle import check_lifecycle
from tests.contract.routers import RouterHarness
from tests.support.wait import eventually


class RecordingSink(DeliverySink):
    def __init__(self) -> None:
        self.batches: list[tuple[list[StoredMessage], list[list[int]]]] = []
        self.events: list[tuple[object, list[int], tuple[int, str] | None]] = []

    @property
    def items(self) -> list[tuple[StoredMessage, list[int]]]:
        """Every (message, recipients) delivered, in arrival order, whatever the batches."""
        return [(msg, r) for messages, recipients in self.batches for msg, r in zip(messages, recipients, strict=True)]

    def deliver(self, messages: Sequence[StoredMessage], recipients: Sequence[Sequence[int]]) -> None:
        self.batches.append((list(messages), [list(r) for r in recipients]))

    def deliver_event(self, frame: object, uids: Iterable[int], skip: tuple[int, str] | None) -> None:
        self.events.append((frame, list(uids), skip))


class HoldingSink(RecordingSink):
    """A sink that reports the users it holds (a gateway's hub)."""

    def __init__(self, held: Collection[int]) -> None:
        super().__init__()
        self.held = set(held)

    def held_users(self) -> Collection[int]:
        return self.held


def m(seq: int, conv: str = "d:1:2") -> StoredMessage:
    return StoredMessage(
        conv=conv, seq=seq, mid=seq, sender=1, device="d", cmid=f"c{seq}", ts=seq, type="text", body=b"{}"
    )


async def test_publish_reaches_the_right_sink_in_order(router_harness: RouterHarness) -> None:
    router = router_harness.router
    one, two = RecordingSink(), RecordingSink()
    await router_harness.attach("gw-1", one)
    await router_harness.attach("gw-2", two)
    expected_one = [([m(i)], [[1, 2]]) for i in range(1, 51)]
    for batch in expected_one:
        router.publish("gw-1", *batch)
    router.publish("gw-2", [m(7, "g:3"), m(8, "g:3")], [[5], [5, 6]])

    await eventually(lambda: len(one.items) == 50 and len(two.items) == 2)
    assert one.items == [(msg, r) for [msg], [r] in expected_one]  # in publish order
    assert two.items == [(m(7, "g:3"), [5]), (m(8, "g:3"), [5, 6])]
    if router_harness.keeps_batches:
        assert one.batches == expected_one
        assert two.batches == [([m(7, "g:3"), m(8, "g:3")], [[5], [5, 6]])]
    await asyncio.sleep(router_harness.quiet)
    assert len(one.items) == 50 and len(two.items) == 2  # at most once
    assert one.events == two.events == []


async def test_publish_to_unknown_node_is_a_no_op(router_harness: RouterHarness) -> None:
    router = router_harness.router
    sink = RecordingSink()
    await router_harness.attach("gw-1", sink)
    router.publish("gw-nowhere", [m(1)], [[1]])
    router.publish_event("gw-nowhere", TypingEvent("g:1", 1), [1], None)
    router.publish("gw-1", [m(2)], [[1]])
    await eventually(lambda: len(sink.batches) == 1)
    await asyncio.sleep(router_harness.quiet)
    assert sink.batches == [([m(2)], [[1]])] and sink.events == []


async def test_detach_stops_delivery(router_harness: RouterHarness) -> None:
    router = router_harness.router
    old, other = RecordingSink(), RecordingSink()
    await router_harness.attach("gw-1", old)
    await router_harness.attach("gw-2", other)
    router.publish("gw-1", [m(1)], [[1]])
    await eventually(lambda: len(old.batches) == 1)

    await router_harness.detach("gw-1")
    await router_harness.detach("gw-never-attached")  # harmless
    router.publish("gw-1", [m(2)], [[1]])
    router.publish_event("gw-1", TypingEvent("g:1", 1), [1], None)
    router.publish("gw-2", [m(3)], [[2]])
    await eventually(lambda: len(other.batches) == 1)
    await asyncio.sleep(router_harness.quiet)
    assert old.batches == [([m(1)], [[1]])] and old.events == []

    # Re-attaching the node (a restarted gateway) gets deliveries again, to the new sink only.
    new = RecordingSink()
    await router_harness.attach("gw-1", new)
    router.publish("gw-1", [m(4)], [[1]])
    await eventually(lambda: len(new.batches) == 1)
    assert new.batches == [([m(4)], [[1]])] and len(old.batches) == 1


async def test_publish_event_with_skip(router_harness: RouterHarness) -> None:
    router = router_harness.router
    one, two = RecordingSink(), RecordingSink()
    await router_harness.attach("gw-1", one)
    await router_harness.attach("gw-2", two)
    typing = TypingEvent(conv="g:1", uid=1)
    read = Receipt(conv="g:1", uid=2, kind="read", seq=4)
    router.publish_event("gw-1", typing, [1, 2, 3], (1, "phone"))
    router.publish_event("gw-1", read, [2], None)
    await eventually(lambda: len(one.events) == 2)
    assert one.events == [(typing, [1, 2, 3], (1, "phone")), (read, [2], None)]
    await asyncio.sleep(router_harness.quiet)
    assert two.events == [] and one.batches == []


async def test_publish_never_raises_and_keeps_order_with_events_between(router_harness: RouterHarness) -> None:
    """Batches and events to one node keep the publish order of each kind, whatever is published to
    unreachable nodes in between (which never raises)."""
    router = router_harness.router
    sink = RecordingSink()
    await router_harness.attach("gw-1", sink)
    for i in range(1, 21):
        router.publish("gw-1", [m(i)], [[1]])
        router.publish("gw-gone", [m(i)], [[1]])
        router.publish_event("gw-1", TypingEvent("g:1", i), [1], None)
        router.publish_event("gw-gone", TypingEvent("g:1", i), [1], None)
    await eventually(lambda: len(sink.items) == 20 and len(sink.events) == 20)
    assert [msg.seq for msg, _ in sink.items] == list(range(1, 21))
    assert [e[0] for e in sink.events] == [TypingEvent("g:1", i) for i in range(1, 21)]
    await asyncio.sleep(router_harness.quiet)
    assert len(sink.items) == 20 and len(sink.events) == 20  # at most once


async def test_lifecycle(router_harness: RouterHarness) -> None:
    async def probe(router: Router) -> None:
        router.publish("gw-nowhere", [m(1)], [[1]])  # usable once started; never raises

    await check_lifecycle(router_harness.unstarted, probe)


async def test_holders_name_each_users_nodes_from_their_reports_or_none(router_harness: RouterHarness) -> None:
    """``holders``: the attached nodes whose sinks report holding each user (users held nowhere left
    out), or None while a node reports nothing (the committer then asks presence); a router whose nodes
    are elsewhere answers None always."""
    router = router_harness.router
    await router_harness.attach("gw-1", HoldingSink({1, 2}))
    await router_harness.attach("gw-2", HoldingSink({2, 3}))
    found = router.holders({1, 2, 3, 4})
    if not router_harness.tables:
        assert found is None
        return
    assert found == {1: {"gw-1"}, 2: {"gw-1", "gw-2"}, 3: {"gw-2"}}
    await router_harness.detach("gw-1")
    assert router.holders({1, 2, 3}) == {2: {"gw-2"}, 3: {"gw-2"}}
    await router_harness.attach("gw-3", RecordingSink())  # reports no users
    assert router.holders({2}) is None
    await router_harness.detach("gw-3")
    assert router.holders({2}) == {2: {"gw-2"}}
