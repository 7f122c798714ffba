"""The transfer link over real gRPC on loopback, in front of a real Committer on SQLite."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from im.core.committer import SendRequest
from im.model.chat import StoredMessage
from im.model.errors import ErrorCode
from im.observability.metrics import METRICS
from im.protocol.frames import TypingEvent
from im.transfer import client as transfer_client
from im.transfer.client import TransferLink
from im.transfer.server import LinkOutbox, TransferServicer, encode_event
from tests.support.wait import eventually
from tests.transfer.conftest import Core, RecordingSink, Results, close_core, open_core


def send(uid: int, to: int, cmid: str, text: str = "hi") -> SendRequest:
    body = b'{"text":"%s"}' % text.encode()
    return SendRequest(uid=uid, device="d1", cmid=cmid, conv=None, to=to, type="text", body=body)


async def test_send_from_a_is_delivered_at_b_and_acked_at_a_in_order(core: Core) -> None:
    sink_a, sink_b = RecordingSink(), RecordingSink()
    alice, bob = await core.user("alice", "gw-a"), await core.user("bob", "gw-b")
    link_a = await core.link("gw-a", sink_a)
    await core.link("gw-b", sink_b)
    assert link_a.transfer_node == "tr-1"
    assert core.router.linked() == ["gw-a", "gw-b"]

    results = Results()
    reqs = [send(alice, bob, f"c{i}", f"m{i}") for i in range(20)]
    for req in reqs:
        link_a.submit(req, results.done)
    await eventually(lambda: len(results.got) == 20 and len(sink_b.messages) == 20)

    assert [r for r, *_ in results.got] == reqs  # acks in submit order
    assert all(err is None and not dup for _, _, dup, err in results.got)
    assert [m.seq for _, m, _, _ in results.got if m is not None] == list(range(1, 21))  # dense
    conv = results.got[0][1].conv if results.got[0][1] is not None else ""
    assert [(m.conv, m.seq, m.body, uids) for m, uids in sink_b.messages] == [
        (conv, i + 1, b'{"text":"m%d"}' % i, [bob]) for i in range(20)
    ]
    # alice is a member too, held by gw-a: her node gets them, addressed to her only
    await eventually(lambda: len(sink_a.messages) == 20)
    assert {tuple(uids) for _, uids in sink_a.messages} == {(alice,)}


async def test_resend_with_same_cmid_is_a_duplicate(core: Core) -> None:
    alice, bob = await core.user("alice", "gw-a"), await core.user("bob", "gw-b")
    link = await core.link("gw-a", RecordingSink())
    results = Results()
    link.submit(send(alice, bob, "x"), results.done)
    await eventually(lambda: len(results.got) == 1)
    link.submit(send(alice, bob, "x"), results.done)
    link.submit(
        SendRequest(uid=alice, device="d1", cmid="y", conv="d:0:0", to=None, type="text", body=b"{}"), results.done
    )
    await eventually(lambda: len(results.got) == 3)
    (_, first, dup1, _), (_, again, dup2, _), (_, none, _, err) = results.got
    assert first is not None and again is not None and not dup1 and dup2
    assert (again.seq, again.mid) == (first.seq, first.mid)
    assert none is None and err is not None and err.code in (ErrorCode.NOT_FOUND, ErrorCode.NOT_MEMBER)


async def test_a_batch_of_1000_sends_takes_few_frames(core: Core) -> None:
    sink_b = RecordingSink()
    alice, bob = await core.user("alice", "gw-a"), await core.user("bob", "gw-b")
    link_a = await core.link("gw-a", RecordingSink())
    link_b = await core.link("gw-b", sink_b)
    sent0, recv_a0, recv_b0 = link_a.frames_sent, link_a.frames_received, link_b.frames_received
    # every end of a link in this process, each counted in METRICS too
    ends: list[TransferLink | TransferServicer] = [link_a, link_b, core.servicer]
    metrics0 = dict(METRICS.link_frames)
    totals0 = {"sent": sum(e.frames_sent for e in ends), "received": sum(e.frames_received for e in ends)}
    results = Results()
    for i in range(1000):
        link_a.submit(send(alice, bob, f"c{i}"), results.done)
    await eventually(lambda: len(results.got) == 1000 and len(sink_b.messages) == 1000, timeout=30)

    assert [m.seq for _, m, _, _ in results.got if m is not None] == list(range(1, 1001))
    assert link_a.frames_sent - sent0 == 1  # one loop turn of submits: one frame
    assert link_a.frames_received - recv_a0 <= 20  # results (and alice's deliveries), batched per commit
    assert link_b.frames_received - recv_b0 <= 20
    assert len(sink_b.batches) <= 20
    totals = {"sent": sum(e.frames_sent for e in ends), "received": sum(e.frames_received for e in ends)}
    for direction in ("sent", "received"):  # im_transfer_link_frames_total
        assert METRICS.link_frames[direction] - metrics0[direction] == totals[direction] - totals0[direction] > 0


async def test_sends_wait_at_the_gateway_while_a_frame_is_unanswered(core: Core) -> None:
    """Idle, a send goes out at once; while a frame of sends waits for the core (its commit is held),
    later sends, submitted in separate loop turns, stay at the gateway and go out together when an answer
    comes back: few frames, every send answered, in order."""
    alice, bob = await core.user("alice", "gw-a"), await core.user("bob", "gw-b")
    link = await core.link("gw-a", RecordingSink())
    await core.link("gw-b", RecordingSink())
    results = Results()
    sent0, received0 = link.frames_sent, core.servicer.frames_received
    core.store.gate.clear()  # the first commit waits
    link.submit(send(alice, bob, "c0"), results.done)
    await eventually(lambda: core.servicer.frames_received == received0 + 1)  # at once: the link was idle
    for i in range(1, 50):  # one send per loop turn: without the hold, one frame each
        link.submit(send(alice, bob, f"c{i}"), results.done)
        await asyncio.sleep(0.002)
    assert link.frames_sent - sent0 == 1 and core.servicer.frames_received == received0 + 1
    core.store.gate.set()
    await eventually(lambda: len(results.got) == 50)
    assert [m.seq for _, m, _, _ in results.got if m is not None] == list(range(1, 51))
    assert link.frames_sent - sent0 == 2, link.frames_sent - sent0  # the 49 that waited: one frame


async def test_a_forward_takes_the_waiting_sends_along_and_sends_flow_again_once_all_are_answered(
    core: Core, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A forwarded event goes at once and takes the sends waiting behind an unanswered one with it; once
    every written send is answered, the next send goes at once again, however the core grouped its
    answers (LINK_HOLD_MAX, the safety net, is set far beyond the wait here: it cannot be what wakes it)."""
    monkeypatch.setattr(transfer_client, "LINK_HOLD_MAX", 3600.0)
    alice, bob = await core.user("alice", "gw-a"), await core.user("bob", "gw-b")
    link = await core.link("gw-a", RecordingSink())
    await core.link("gw-b", RecordingSink())
    results = Results()
    received0 = core.servicer.frames_received
    core.store.gate.clear()
    link.submit(send(alice, bob, "c0"), results.done)
    await eventually(lambda: core.servicer.frames_received == received0 + 1)
    link.submit(send(alice, bob, "c1"), results.done)
    await asyncio.sleep(0.02)
    assert core.servicer.frames_received == received0 + 1  # c1 waits behind c0
    assert link.forward_event("gw-b", encode_event(TypingEvent(conv="d:1:2", uid=alice)), [bob], None)
    await eventually(lambda: core.servicer.frames_received == received0 + 2)  # the forward, c1 with it
    core.store.gate.set()
    await eventually(lambda: len(results.got) == 2)
    link.submit(send(alice, bob, "c2"), results.done)
    await eventually(lambda: len(results.got) == 3)
    assert [m.seq for _, m, _, _ in results.got if m is not None] == [1, 2, 3]


async def test_events_reach_the_gateway_decoded(core: Core) -> None:
    sink_b = RecordingSink()
    await core.link("gw-b", sink_b)
    frame = TypingEvent(conv="d:1:2", uid=1)
    core.router.publish_event("gw-b", frame, [2], (1, "d1"))
    core.router.publish_event("gw-b", frame, [2, 3], None)
    await eventually(lambda: len(sink_b.events) == 2)
    assert sink_b.events == [(frame, [2], (1, "d1")), (frame, [2, 3], None)]


async def test_publish_to_an_unlinked_node_is_dropped(core: Core) -> None:
    alice, bob = await core.user("alice", "gw-a"), await core.user("bob", "gw-gone")
    link = await core.link("gw-a", RecordingSink())
    results = Results()
    link.submit(send(alice, bob, "c"), results.done)
    await eventually(lambda: len(results.got) == 1 and core.router.unroutable == 1)
    assert results.got[0][3] is None


async def test_link_loss_fails_pending_sends_unavailable_then_reconnects(core: Core) -> None:
    sink_b = RecordingSink()
    alice, bob = await core.user("alice", "gw-a"), await core.user("bob", "gw-b")
    link = await core.link("gw-a", RecordingSink())
    await core.link("gw-b", sink_b)
    core.store.gate.clear()  # commits wait: the sends stay unanswered in the core
    results = Results()
    reqs = [send(alice, bob, f"c{i}") for i in range(10)]
    for req in reqs:
        link.submit(req, results.done)
    await eventually(lambda: core.servicer.sends_received == 10)
    assert results.got == []

    await core.server.stop(None)  # the transfer node goes away
    await eventually(lambda: len(results.got) == 10)
    assert [r for r, *_ in results.got] == reqs
    assert all(m is None and err is not None and err.code is ErrorCode.UNAVAILABLE for _, m, _, err in results.got)
    assert not link.connected and link.in_flight == 0

    refused = Results()
    link.submit(send(alice, bob, "while-down"), refused.done)  # no link: refused at once
    assert refused.got[0][3] is not None and refused.got[0][3].code is ErrorCode.UNAVAILABLE

    core.store.gate.set()  # the core finishes the batch it had (its results have no stream to go to)
    assert sink_b.catch_ups == 1
    await core.restart_server()
    await asyncio.wait_for(link.wait_connected(), 10)
    assert link.connects == 2
    # What the core routed to gw-b meanwhile was dropped: its sink is told when its link is back.
    await eventually(lambda: sink_b.catch_ups == 2)
    again = Results()
    for req in reqs:  # the SDK resends with the same cmids: dedupe makes it safe
        link.submit(req, again.done)
    await eventually(lambda: len(again.got) == 10)
    assert all(err is None for *_, err in again.got)
    assert [m.seq for _, m, _, _ in again.got if m is not None] == list(range(1, 11))
    assert [m.cmid for _, m, _, _ in again.got if m is not None] == [f"c{i}" for i in range(10)]


async def test_closing_a_link_unregisters_its_node(core: Core) -> None:
    link = await core.link("gw-a", RecordingSink())
    assert core.router.linked() == ["gw-a"] and core.servicer.streams == 1
    await link.close()
    await eventually(lambda: core.router.linked() == [] and core.servicer.streams == 0)
    refused = Results()
    link.submit(send(1, 2, "late"), refused.done)
    assert refused.got[0][3] is not None and refused.got[0][3].code is ErrorCode.UNAVAILABLE


async def test_a_stopping_transfer_node_answers_its_last_batch_before_ending_the_streams(core: Core) -> None:
    """The transfer role's stop, without a sleep: the committer's stop hands over the answers of its last
    batch, and ``close_streams`` returns once they left on the stream, which then ends."""
    alice, bob = await core.user("alice", "gw-a"), await core.user("bob", "gw-b")
    link = await core.link("gw-a", RecordingSink())
    core.store.gate.clear()  # commits wait: the sends stay in the committer, unanswered
    results = Results()
    reqs = [send(alice, bob, f"c{i}") for i in range(20)]
    for req in reqs:
        link.submit(req, results.done)
    await eventually(lambda: core.servicer.sends_received == 20)
    answered = asyncio.ensure_future(link.wait_answered())
    await asyncio.sleep(0.05)
    assert not answered.done() and link.in_flight == 20

    stopping = asyncio.ensure_future(core.committer.stop())
    core.store.gate.set()
    await stopping
    await asyncio.wait_for(core.servicer.close_streams(timeout=5.0), 5.0)
    assert core.servicer.streams == 0
    # Every send got its stored answer (none failed as `unavailable` by the stream's end), in order.
    await asyncio.wait_for(answered, 5.0)
    assert [r for r, *_ in results.got] == reqs
    assert all(m is not None and err is None for _, m, _, err in results.got)

    # A stopping node takes no new stream: the link keeps trying, and sends fail `unavailable` at once.
    await eventually(lambda: not link.connected)
    refused = Results()
    link.submit(send(alice, bob, "late"), refused.done)
    assert refused.got[0][3] is not None and refused.got[0][3].code is ErrorCode.UNAVAILABLE
    await asyncio.sleep(0.3)
    assert core.servicer.streams == 0 and not link.connected


def test_a_closed_outbox_keeps_its_writer_awake_until_it_is_empty() -> None:
    """Closing a stream's outbox with answers still in it: the writer takes them, then ends the stream
    (it must not go back to sleep on an empty, closed outbox)."""
    outbox = LinkOutbox("gw-a", max_frame_items=10, max_pending=10)
    outbox.add_result(1, None, False, None)
    outbox.close()
    frame = outbox.take()
    assert frame is not None and [r.rid for r in frame.results] == [1]
    assert outbox.ready.is_set()
    assert outbox.take() is None and outbox.closed


async def test_deliveries_dropped_for_a_slow_gateway_make_its_sessions_catch_up(tmp_path: Path) -> None:
    """Beyond ``max_pending`` queued items for one gateway the transfer node drops deliveries (it never
    blocks on a gateway); the next frame says so, and the gateway's sink is asked to catch up from the log."""
    core = await open_core(tmp_path, max_pending=2)
    try:
        sink = RecordingSink()
        await core.link("gw-b", sink)
        assert sink.catch_ups == 1  # the link came up
        messages = [StoredMessage("d:1:2", i, 900 + i, 1, "d1", f"c{i}", 1_000, "text", b'"x"') for i in range(1, 6)]
        for m in messages:  # in one loop turn: the stream's writer takes nothing in between
            core.router.publish("gw-b", [m], [[2]])
        await eventually(lambda: sink.catch_ups == 2)
        assert [m.seq for m, _ in sink.messages] == [1, 2]  # the other three were dropped
        core.router.publish("gw-b", [messages[0]], [[2]])  # room again: no drop, nothing more to say
        await eventually(lambda: len(sink.messages) == 3)
        assert sink.catch_ups == 2
    finally:
        await close_core(core)


async def test_close_shuts_the_open_stream_s_channel_down(core: Core) -> None:
    """close() cancels the link's task mid-stream; the channel that stream used is still shut down (the
    task's own cleanup after a cancellation does not wait, so close() does it)."""
    link = await core.link("gw-a", RecordingSink())
    channel = link._channel
    assert channel is not None and channel.get_state() is grpc.ChannelConnectivity.READY
    await link.close()
    assert channel.get_state() is grpc.ChannelConnectivity.SHUTDOWN
    assert link._channel is None
