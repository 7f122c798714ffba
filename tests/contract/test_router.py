"""The :class:`Router` contract, run against every implementation (see ``conftest.ROUTERS``)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence

from im.backends.routing import DeliverySink
from im.model.chat import StoredMessage
from tests.contract.conftest import RouterHarness
from tests.support.wait import eventually


class RecordingSink(DeliverySink):
    def __init__(self) -> None:
        self.batches: list[tuple[list[StoredMessage], list[list[int]]]] = []
        self.events: list[tuple[object, list[int], tuple[int, str] | None]] = []

    def deliver(self, messages: Sequence[StoredMessage], recipients: Sequence[Sequence[int]]) -> None:
        self.batches.append((list(messages), [list(r) for r in recipients]))

    def deliver_event(self, frame: object, uids: Iterable[int], skip: tuple[int, str] | None) -> None:
        self.events.append((frame, list(uids), skip))


def m(seq: int, conv: str = "d:1:2") -> StoredMessage:
    return StoredMessage(
        conv=conv, seq=seq, mid=seq, sender=1, device="d", cmid=f"c{seq}", ts=seq, type="text", body=b"{}"
    )


async def test_publish_reaches_the_right_sink_in_order(router_harness: RouterHarness) -> None:
    router = router_harness.router
    one, two = RecordingSink(), RecordingSink()
    router.attach("gw-1", one)
    router.attach("gw-2", two)
    expected_one = [([m(i)], [[1, 2]]) for i in range(1, 51)]
    for batch in expected_one:
        router.publish("gw-1", *batch)
    router.publish("gw-2", [m(7, "g:3"), m(8, "g:3")], [[5], [5, 6]])

    await eventually(lambda: len(one.batches) == 50 and len(two.batches) == 1)
    assert one.batches == expected_one
    assert two.batches == [([m(7, "g:3"), m(8, "g:3")], [[5], [5, 6]])]
    await asyncio.sleep(router_harness.quiet)
    assert len(one.batches) == 50 and len(two.batches) == 1  # at most once
    assert one.events == two.events == []


async def test_publish_to_unknown_node_is_a_no_op(router_harness: RouterHarness) -> None:
    router = router_harness.router
    sink = RecordingSink()
    router.attach("gw-1", sink)
    router.publish("gw-nowhere", [m(1)], [[1]])
    router.publish_event("gw-nowhere", {"t": "typing"}, [1], None)
    router.publish("gw-1", [m(2)], [[1]])
    await eventually(lambda: len(sink.batches) == 1)
    await asyncio.sleep(router_harness.quiet)
    assert sink.batches == [([m(2)], [[1]])] and sink.events == []


async def test_detach_stops_delivery(router_harness: RouterHarness) -> None:
    router = router_harness.router
    old, other = RecordingSink(), RecordingSink()
    router.attach("gw-1", old)
    router.attach("gw-2", other)
    router.publish("gw-1", [m(1)], [[1]])
    await eventually(lambda: len(old.batches) == 1)

    router.detach("gw-1")
    router.detach("gw-never-attached")  # harmless
    router.publish("gw-1", [m(2)], [[1]])
    router.publish_event("gw-1", {"t": "typing"}, [1], None)
    router.publish("gw-2", [m(3)], [[2]])
    await eventually(lambda: len(other.batches) == 1)
    await asyncio.sleep(router_harness.quiet)
    assert old.batches == [([m(1)], [[1]])] and old.events == []

    # Re-attaching the node (a restarted gateway) gets deliveries again, to the new sink only.
    new = RecordingSink()
    router.attach("gw-1", new)
    router.publish("gw-1", [m(4)], [[1]])
    await eventually(lambda: len(new.batches) == 1)
    assert new.batches == [([m(4)], [[1]])] and len(old.batches) == 1


async def test_publish_event_with_skip(router_harness: RouterHarness) -> None:
    router = router_harness.router
    one, two = RecordingSink(), RecordingSink()
    router.attach("gw-1", one)
    router.attach("gw-2", two)
    typing = {"t": "typing", "conv": "g:1", "uid": 1}
    router.publish_event("gw-1", typing, [1, 2, 3], (1, "phone"))
    router.publish_event("gw-1", {"t": "read", "seq": 4}, [2], None)
    await eventually(lambda: len(one.events) == 2)
    assert one.events == [(typing, [1, 2, 3], (1, "phone")), ({"t": "read", "seq": 4}, [2], None)]
    await asyncio.sleep(router_harness.quiet)
    assert two.events == [] and one.batches == []
