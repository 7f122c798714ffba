"""The link's columns: fresh results as columns, and deliveries of a gateway's own messages back to it as
references by mid (docs/transfer.md section 2). Over a real stream, and the two ends fed to each other
frame by frame, with the window each side keeps made small."""

from __future__ import annotations

import random
from typing import Any

import pytest

from im.core.committer import SendRequest
from im.model.chat import StoredMessage
from im.model.errors import ErrorCode, ImError
from im.transfer import client as transfer_client
from im.transfer import server as transfer_server
from im.transfer.client import TransferLink
from im.transfer.gen import transfer_pb2 as pb
from im.transfer.server import LinkOutbox
from tests.support.wait import eventually
from tests.transfer.conftest import Core, RecordingSink, Results


def request(i: int) -> SendRequest:
    return SendRequest(uid=1, device="d1", cmid=f"c{i}", conv="d:1:2", to=None, type="text", body=b'{"text":"%d"}' % i)


def stored(i: int, req: SendRequest | None = None) -> StoredMessage:
    req = req or request(i)
    return StoredMessage("d:1:2", i, 5000 + i, req.uid, req.device, req.cmid, 1_000 + i, req.type, req.body)


def idle_link(sink: RecordingSink) -> TransferLink:
    """A link that is never started: the tests hand its ``_dispatch`` the frames an outbox takes."""
    return TransferLink("127.0.0.1:1", "gw-a", sink)


class RecordingLink(TransferLink):
    """Notes, per frame it takes: its result rows, fresh results, delivery rows and references."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[int, int, int, int]] = []

    def _dispatch(self, frame: pb.TransferFrame) -> None:
        self.seen.append((len(frame.results), len(frame.fresh.rid), len(frame.deliveries), len(frame.sent.mid)))
        super()._dispatch(frame)


async def test_own_messages_come_back_as_references_and_are_delivered_whole(core: Core) -> None:
    sink = RecordingSink()
    alice, bob = await core.user("alice", "gw-a"), await core.user("bob", "gw-a")
    link = await core.link("gw-a", sink, RecordingLink)
    assert isinstance(link, RecordingLink)
    seen = link.seen  # per frame: result rows, fresh, delivery rows, references
    results = Results()
    reqs = [
        SendRequest(uid=alice, device="d1", cmid=f"c{i}", conv=None, to=bob, type="text", body=b'{"text":"m%d"}' % i)
        for i in range(30)
    ]
    for req in reqs:
        link.submit(req, results.done)
    await eventually(lambda: len(results.got) == 30 and len(sink.messages) == 30)

    assert [r for r, *_ in results.got] == reqs
    acked = {m.mid: m for _, m, _, _ in results.got if m is not None}
    assert [(m.seq, m.sender, m.device, m.cmid, m.type, m.body) for m, _ in sink.messages] == [
        (i + 1, alice, "d1", f"c{i}", "text", b'{"text":"m%d"}' % i) for i in range(30)
    ]
    assert all(sorted(uids) == sorted([alice, bob]) for _, uids in sink.messages)
    assert all(acked[m.mid] == m for m, _ in sink.messages)
    # Every result came as a column and every delivery as a reference: no message crossed back whole.
    assert sum(f[1] for f in seen) == 30 and sum(f[3] for f in seen) == 30
    assert sum(f[0] for f in seen) == 0 and sum(f[2] for f in seen) == 0
    assert link.missed_references == 0 and not link._sent  # each kept message left when delivered


def test_a_gateway_that_does_not_read_columns_gets_rows() -> None:
    outbox = LinkOutbox("gw-old", max_frame_items=100, max_pending=100)
    outbox.add_result(1, stored(1), False, None)
    outbox.add_deliveries([stored(1)], [[2]])
    frame = outbox.take()
    assert frame is not None
    assert [(r.rid, r.seq) for r in frame.results] == [(1, 1)] and not frame.fresh.rid
    assert [d.message.body for d in frame.deliveries] == [stored(1).body] and not frame.sent.mid


def test_rows_and_columns_interleave_in_the_order_they_were_answered_and_published() -> None:
    outbox = LinkOutbox("gw-a", max_frame_items=100, max_pending=100, columns=True)
    outbox.add_result(1, stored(1), False, None)
    outbox.add_result(2, None, False, ImError(ErrorCode.NOT_MEMBER, "no"))
    outbox.add_result(3, stored(3), False, None)
    outbox.add_result(4, stored(4), True, None)  # a duplicate: the stored original, whole
    frame = outbox.take()
    assert frame is not None
    assert list(frame.fresh.rid) == [1, 3] and list(frame.fresh.seq) == [1, 3]
    assert [r.rid for r in frame.results] == [2, 4]
    assert frame.result_order == bytes([1, 0, 1, 0])

    other = StoredMessage("d:1:3", 1, 7000, 3, "d9", "x", 5, "text", b'"y"')  # sent through another gateway
    outbox.add_deliveries([stored(1), other, stored(3)], [[2], [1, 2], [2, 5]])
    frame = outbox.take()
    assert frame is not None
    assert list(frame.sent.mid) == [stored(1).mid, stored(3).mid]
    assert list(frame.sent.count) == [1, 2] and list(frame.sent.uids) == [2, 2, 5]
    assert [d.message.mid for d in frame.deliveries] == [other.mid]
    assert frame.delivery_order == bytes([1, 0, 1])

    outbox.add_deliveries([stored(1)], [[2]])  # named once already: whole this time
    frame = outbox.take()
    assert frame is not None and [d.message.mid for d in frame.deliveries] == [stored(1).mid]
    assert not frame.sent.mid and not frame.delivery_order


def test_the_gateway_takes_an_interleaved_frame_in_order_and_checks_the_log_for_what_it_lacks() -> None:
    sink = RecordingSink()
    link = idle_link(sink)
    order: list[int] = []
    results = Results()

    def done(req: SendRequest, m: StoredMessage | None, dup: bool, err: ImError | None) -> None:
        order.append(int(req.cmid[1:]))
        results.done(req, m, dup, err)

    for i in (1, 2, 3):
        link._pending[i] = (request(i), done)
    frame = pb.TransferFrame(result_order=bytes([1, 0, 1]))
    frame.fresh.rid.extend([1, 3])
    frame.fresh.conv.extend(["d:1:2", "d:1:2"])
    frame.fresh.seq.extend([1, 3])
    frame.fresh.mid.extend([stored(1).mid, stored(3).mid])
    frame.fresh.ts.extend([stored(1).ts, stored(3).ts])
    frame.results.add(rid=2, error_code=ErrorCode.NOT_MEMBER.value, error_message="no")
    other = frame.deliveries.add(uids=[7])
    other.message.conv, other.message.seq, other.message.mid, other.message.body = "d:1:3", 4, 7000, b'"y"'
    frame.sent.mid.extend([stored(3).mid, 999, stored(1).mid])  # 999: never answered here
    frame.sent.count.extend([1, 1, 2])
    frame.sent.uids.extend([2, 2, 2, 1])
    frame.delivery_order = bytes([1, 0, 1, 1])
    link._dispatch(frame)

    assert order == [1, 2, 3]
    assert [m.seq if m else None for _, m, _, _ in results.got] == [1, None, 3]
    assert [(m.mid, uids) for m, uids in sink.messages] == [
        (stored(3).mid, [2]),
        (7000, [7]),
        (stored(1).mid, [2, 1]),
    ]
    assert sink.messages[0][0] == stored(3)  # rebuilt from the request and the column
    assert link.missed_references == 1 and sink.catch_ups == 1


def test_a_frame_whose_order_does_not_add_up_is_taken_rows_first_and_nothing_is_lost() -> None:
    link = idle_link(RecordingSink())
    results = Results()
    for i in (1, 2):
        link._pending[i] = (request(i), results.done)
    frame = pb.TransferFrame(result_order=bytes([1, 1, 1]))  # three items named, two in the frame
    frame.fresh.rid.append(1)
    frame.fresh.conv.append("d:1:2")
    frame.fresh.seq.append(1)
    frame.fresh.mid.append(stored(1).mid)
    frame.fresh.ts.append(1)
    frame.results.add(rid=2, error_code=ErrorCode.NOT_MEMBER.value, error_message="no")
    link._dispatch(frame)
    assert [req.cmid for req, *_ in results.got] == ["c2", "c1"]
    assert not link._pending


@pytest.mark.parametrize("seed", range(5))
def test_both_ends_keep_the_same_window_whatever_is_delivered_and_when(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Results and deliveries in random order and batches, some messages never delivered back, some twice,
    a window of 8: the outbox names only messages the gateway still keeps, and everything arrives."""
    monkeypatch.setattr(transfer_server, "SENT_WINDOW", 8)
    monkeypatch.setattr(transfer_client, "SENT_WINDOW", 8)
    rng = random.Random(seed)
    sink = RecordingSink()
    link = idle_link(sink)
    outbox = LinkOutbox("gw-a", max_frame_items=16, max_pending=10_000, columns=True)
    results = Results()
    answered: list[StoredMessage] = []
    published: list[StoredMessage] = []
    references = 0
    for i in range(1, 400):
        req = request(i)
        link._pending[i] = (req, results.done)
        m = stored(i, req)
        outbox.add_result(i, m, False, None)
        answered.append(m)
        if rng.random() < 0.3:  # publish a few answered messages, old or new, some again
            batch = [rng.choice(answered[-rng.choice((3, 12, 40)) :]) for _ in range(rng.randint(1, 4))]
            outbox.add_deliveries(batch, [[2]] * len(batch))
            published += batch
        if rng.random() < 0.4:  # the stream writes now and then
            while (frame := outbox.take()) is not None:
                references += len(frame.sent.mid)
                link._dispatch(frame)
    while (frame := outbox.take()) is not None:
        references += len(frame.sent.mid)
        link._dispatch(frame)
    assert [m for m, _ in sink.messages] == published
    assert link.missed_references == 0 and sink.catch_ups == 0
    assert references > len(published) // 4  # the window was used, not bypassed
    assert len(results.got) == 399 and not link._pending
    assert len(link._fresh_mids) <= 8 and len(link._sent) <= 8


def test_columns_that_do_not_add_up_are_refused_whole() -> None:
    """Fresh columns of different lengths, or references whose counts do not cover their recipients: the
    frame cannot be taken (the link then ends the stream; see the next test)."""
    link = idle_link(RecordingSink())
    link._pending[1] = (request(1), Results().done)
    frame = pb.TransferFrame()
    frame.fresh.rid.extend([1, 2])
    frame.fresh.conv.append("d:1:2")
    with pytest.raises(ValueError):
        link._dispatch(frame)
    frame = pb.TransferFrame()
    frame.sent.mid.append(stored(1).mid)
    frame.sent.count.append(3)
    frame.sent.uids.append(2)
    with pytest.raises(ValueError):
        link._dispatch(frame)


class SpoilingLink(TransferLink):
    """Makes the first frame with fresh results it takes malformed: one column longer than the others."""

    spoiled = False

    def _dispatch(self, frame: pb.TransferFrame) -> None:
        if frame.fresh.rid and not self.spoiled:
            self.spoiled = True
            frame.fresh.conv.append("d:0:0")
        super()._dispatch(frame)


async def test_a_frame_that_cannot_be_taken_ends_the_stream_and_the_link_comes_back(
    core: Core, caplog: pytest.LogCaptureFixture
) -> None:
    sink = RecordingSink()
    alice, bob = await core.user("alice", "gw-a"), await core.user("bob", "gw-b")
    link = await core.link("gw-a", sink, SpoilingLink)
    results = Results()
    first = SendRequest(uid=alice, device="d1", cmid="c0", conv=None, to=bob, type="text", body=b'"x"')
    link.submit(first, results.done)
    await eventually(lambda: len(results.got) == 1)
    _, m, _, err = results.got[0]
    assert m is None and err is not None and err.code is ErrorCode.UNAVAILABLE  # handed back: resend
    await eventually(lambda: link.connects == 2 and link.connected)
    assert any("could not be taken" in r.getMessage() for r in caplog.records)
    link.submit(first, results.done)  # the resend: stored before the frame was spoiled, so a duplicate
    await eventually(lambda: len(results.got) == 2)
    _, again, dup, err = results.got[1]
    assert err is None and again is not None and dup and again.seq == 1
