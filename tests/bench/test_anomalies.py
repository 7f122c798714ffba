"""The bench's delivery checker counts what it is fed: gaps, duplicates, late seqs, lost acked sends."""

from __future__ import annotations

from im.bench.anomalies import AnomalyCounter


def _pair() -> AnomalyCounter:
    c = AnomalyCounter()
    c.member("d:1:2", "sender")
    c.member("d:1:2", "receiver")
    return c


def test_a_clean_stream_has_no_anomaly() -> None:
    c = _pair()
    for seq in (1, 2, 3):
        c.seq("sender", "d:1:2", seq)
        c.acked("d:1:2", seq, "sender")
        assert c.seq("receiver", "d:1:2", seq)
    a = c.finish()
    assert (a.lost, a.duplicated, a.out_of_order) == (0, 0, 0)
    assert a.examples == []


def test_gap_duplicate_and_loss_are_counted() -> None:
    c = _pair()
    for seq in range(1, 7):
        c.seq("sender", "d:1:2", seq)
        c.acked("d:1:2", seq, "sender")
    c.seq("receiver", "d:1:2", 1)
    c.seq("receiver", "d:1:2", 2)
    assert not c.seq("receiver", "d:1:2", 2)  # duplicate
    c.seq("receiver", "d:1:2", 4)  # gap: 3 missing
    c.seq("receiver", "d:1:2", 5)
    # 6 was acked but never arrives: lost; 3 never arrives either: lost
    a = c.finish()
    assert a.duplicated == 1
    assert a.out_of_order == 0
    assert a.lost == 2
    assert a.total == 3
    assert any("duplicate" in e for e in a.examples)
    assert any("gap" in e for e in a.examples)
    assert any("lost" in e for e in a.examples)


def test_a_late_seq_is_out_of_order_not_lost() -> None:
    c = _pair()
    for seq in (1, 2, 3):
        c.acked("d:1:2", seq, "sender")
    c.seq("receiver", "d:1:2", 1)
    c.seq("receiver", "d:1:2", 3)
    assert c.seq("receiver", "d:1:2", 2)  # fills the gap, late
    a = c.finish()
    assert (a.lost, a.duplicated, a.out_of_order) == (0, 0, 1)


def test_losses_in_groups_are_per_recipient_and_exclude_the_sender() -> None:
    c = AnomalyCounter()
    for dev in ("a", "b", "c"):
        c.member("g:1", dev)
        c.seq(dev, "g:1", 1)  # the group_created system message
    c.seq("a", "g:1", 2)
    c.acked("g:1", 2, "a")  # a's own ack: a is not a recipient
    c.seq("b", "g:1", 2)  # c never gets seq 2
    a = c.finish()
    assert a.lost == 1
    assert c.received("b", "g:1", 2) and not c.received("c", "g:1", 2)


def test_a_resume_point_starts_the_stream() -> None:
    c = AnomalyCounter()
    c.start("x", "d:1:2", 10)
    c.seq("x", "d:1:2", 11)
    assert c.finish().total == 0
