"""The sans-I/O session state machine, driven by hand: no event loop, no sockets.

Each test builds a :class:`ServerSession`, feeds it client bytes and the results of the work it asked
for, and asserts on the frames it queued (decoded) and the commands it returned.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

from im.model.chat import StoredMessage, SyncPoint
from im.model.errors import ErrorCode
from im.protocol import commands as cmd
from im.protocol.messages import EncodedCache
from im.protocol.session import Limits, ServerSession, State

UID = 7
DEVICE = "phone"
CONV = "g:1"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def msg(seq: int, conv: str = CONV, sender: int = 99, device: str = "other", cmid: str | None = None) -> StoredMessage:
    return StoredMessage(
        conv=conv,
        seq=seq,
        mid=1000 + seq,
        sender=sender,
        device=device,
        cmid=cmid or f"c{seq}",
        ts=1_700_000_000_000 + seq,
        type="text",
        body=json.dumps(f"m{seq}").encode(),
    )


def frames(s: ServerSession) -> list[dict[str, Any]]:
    out = s.data_to_send()
    if s.encoding is not None and s.encoding.value == "msgpack":
        return [msgspec.msgpack.decode(b) for b in out]
    return [json.loads(b) for b in out]


def kinds(fs: list[dict[str, Any]]) -> list[str]:
    return [f["t"] for f in fs]


def feed(s: ServerSession, frame: dict[str, Any]) -> list[cmd.Command]:
    return s.receive(json.dumps(frame).encode(), False)


def send_frame(cmid: str, conv: str = CONV, body: Any = "hi") -> dict[str, Any]:
    return {"t": "send", "cmid": cmid, "conv": conv, "body": body}


def new(limits: Limits | None = None, clock: Clock | None = None) -> ServerSession:
    return ServerSession(EncodedCache(), limits=limits, clock=clock or Clock())


def opened(
    points: list[SyncPoint] | None = None,
    cursors: dict[str, int] | None = None,
    limits: Limits | None = None,
    clock: Clock | None = None,
) -> tuple[ServerSession, list[cmd.Command]]:
    """A session past auth; returns it (with its queue emptied) and the commands of auth_succeeded."""
    s = new(limits, clock)
    commands = feed(s, {"t": "auth", "token": "tok", "device": DEVICE, "cursors": cursors or {}})
    assert commands == [cmd.Authenticate("tok", DEVICE, cursors or {})]
    assert s.state is State.AUTHENTICATING
    out = s.auth_succeeded(UID, DEVICE, points or [], cursors or {})
    fs = frames(s)
    assert fs[0]["t"] == "auth_ok" and fs[0]["uid"] == UID and fs[0]["device"] == DEVICE
    return s, out


def caught_up(seq: int = 0) -> tuple[ServerSession, list[cmd.Command]]:
    """Open, with CONV at ``seq`` and the device holding all of it (no replay)."""
    s, out = opened([SyncPoint(CONV, seq, seq)])
    assert out == []
    return s, out


# --- replay and ordering ----------------------------------------------------------------------------


def test_replay_then_synced() -> None:
    s = new()
    feed(s, {"t": "auth", "token": "tok", "device": DEVICE})
    out = s.auth_succeeded(UID, DEVICE, [SyncPoint(CONV, 3, 0), SyncPoint("d:1:7", 2, 2)], {})
    assert out == [cmd.Fetch(CONV, 0, 3)]
    assert kinds(frames(s)) == ["auth_ok"]  # not synced while CONV replays
    assert s.fetched(CONV, 0, [msg(1), msg(2), msg(3)]) == []
    fs = frames(s)
    assert kinds(fs) == ["msg", "msg", "msg", "synced"]
    assert [f["seq"] for f in fs[:3]] == [1, 2, 3]
    assert fs[0]["from"] == 99 and fs[0]["body"] == "m1"
    assert fs[3]["convs"] == 2


def test_nothing_to_replay_is_synced_at_once() -> None:
    s = new()
    feed(s, {"t": "auth", "token": "tok", "device": DEVICE})
    assert s.auth_succeeded(UID, DEVICE, [SyncPoint(CONV, 4, 4)], {}) == []
    assert kinds(frames(s)) == ["auth_ok", "synced"]


def test_client_cursor_overrides_stored_cursor_and_is_clamped() -> None:
    _, out = opened([SyncPoint(CONV, 10, 2)], cursors={CONV: 6})
    assert out == [cmd.Fetch(CONV, 6, 10)]
    _, out = opened([SyncPoint(CONV, 10, 2)], cursors={CONV: 50})  # beyond the head: nothing to fetch
    assert out == []


def test_live_message_waits_for_outstanding_replay() -> None:
    s, out = opened([SyncPoint(CONV, 3, 0)])
    assert out == [cmd.Fetch(CONV, 0, 3)]
    assert s.deliver(msg(4)) == []
    assert s.deliver(msg(5)) == []
    assert frames(s) == []  # held: replay comes first
    s.fetched(CONV, 0, [msg(1), msg(2), msg(3)])
    fs = frames(s)
    assert [f.get("seq") for f in fs if f["t"] == "msg"] == [1, 2, 3, 4, 5]
    assert kinds(fs)[-1] == "synced"


def test_live_message_during_authentication_is_kept() -> None:
    s = new()
    feed(s, {"t": "auth", "token": "tok", "device": DEVICE})
    assert s.deliver(msg(3)) == []  # registered before the sync points were read
    out = s.auth_succeeded(UID, DEVICE, [SyncPoint(CONV, 2, 1)], {})
    assert out == [cmd.Fetch(CONV, 1, 2)]
    assert kinds(frames(s)) == ["auth_ok"]
    s.fetched(CONV, 1, [msg(2)])
    assert [f["seq"] for f in frames(s) if f["t"] == "msg"] == [2, 3]


def test_gap_is_fetched_before_later_message() -> None:
    s, _ = caught_up(2)
    assert s.deliver(msg(5)) == [cmd.Fetch(CONV, 2, 4)]
    assert frames(s) == []
    assert s.deliver(msg(3)) == []  # a fetch is outstanding: wait for it
    assert frames(s) == []
    assert s.fetched(CONV, 2, [msg(3), msg(4)]) == []
    assert [f["seq"] for f in frames(s)] == [3, 4, 5]
    assert s.conversations[CONV].delivered == 5


def test_partial_fetch_asks_for_the_rest() -> None:
    s, _ = caught_up(0)
    assert s.deliver(msg(10)) == [cmd.Fetch(CONV, 0, 9)]
    assert s.fetched(CONV, 0, [msg(1), msg(2), msg(3)]) == [cmd.Fetch(CONV, 3, 9)]
    assert s.fetched(CONV, 3, [msg(i) for i in range(4, 10)]) == []
    assert [f["seq"] for f in frames(s)] == list(range(1, 11))


def test_duplicates_and_old_messages_are_dropped() -> None:
    s, _ = caught_up(0)
    s.deliver(msg(1))
    s.deliver(msg(1))
    s.deliver(msg(2))
    s.deliver(msg(1))
    assert [f["seq"] for f in frames(s)] == [1, 2]


def test_first_sight_of_a_conversation_starts_at_the_stored_cursor() -> None:
    s, _ = opened([])
    assert s.deliver(msg(4, conv="g:9")) == [cmd.Fetch("g:9", None, 3)]
    assert frames(s) == []
    s.fetched("g:9", 3, [])  # the user joined at 3: nothing before to replay
    assert [(f["conv"], f["seq"]) for f in frames(s)] == [("g:9", 4)]


def test_heads_past_what_was_delivered_are_fetched() -> None:
    """After a relink: messages the link dropped are fetched from the log, with no live message to show
    the gap."""
    s, _ = caught_up(2)
    assert s.check_heads({CONV: 2}) == []  # nothing missed
    assert s.check_heads({CONV: 5}) == [cmd.Fetch(CONV, 2, 5)]
    assert s.check_heads({CONV: 6}) == []  # a fetch in flight goes on to the new head
    assert s.fetched(CONV, 2, [msg(3), msg(4), msg(5)]) == [cmd.Fetch(CONV, 5, 6)]
    assert s.fetched(CONV, 5, [msg(6)]) == []
    assert [f["seq"] for f in frames(s)] == [3, 4, 5, 6]
    assert s.check_heads({CONV: 6}) == []


def test_heads_stop_below_a_live_message_that_waits() -> None:
    s, _ = caught_up(2)
    s.conversations[CONV].pending[9] = msg(9)  # a live message the store had not shown yet
    assert s.check_heads({CONV: 9}) == [cmd.Fetch(CONV, 2, 8)]


def test_heads_of_a_conversation_not_seen_on_this_connection_start_where_the_store_says() -> None:
    s, _ = opened([SyncPoint(CONV, 1, 1)], cursors={"g:9": 2})  # g:9 named by the client, joined later
    assert s.check_heads({CONV: 1, "g:7": 0, "g:8": 4, "g:9": 5}) == [
        cmd.Fetch("g:8", None, 4),  # the store decides: the device's cursor, or the join point
        cmd.Fetch("g:9", 2, 5),  # the client's own cursor
    ]
    assert s.fetched("g:8", 3, [msg(4, conv="g:8")]) == []
    assert [(f["conv"], f["seq"]) for f in frames(s)] == [("g:8", 4)]
    assert "g:7" not in s.conversations  # empty: nothing to track yet


def test_heads_are_ignored_before_the_session_is_open() -> None:
    s = new()
    feed(s, {"t": "auth", "token": "tok", "device": DEVICE})
    assert s.check_heads({CONV: 3}) == []


# --- sends and acks ---------------------------------------------------------------------------------


def test_own_message_becomes_ack_other_device_gets_msg() -> None:
    s, _ = caught_up(0)
    out = feed(s, send_frame("a1", body={"text": "hello"}))
    assert len(out) == 1 and isinstance(out[0], cmd.Submit)
    sub = out[0]
    assert (sub.cmid, sub.conv, sub.to, sub.type, json.loads(sub.body)) == ("a1", CONV, None, "text", {"text": "hello"})
    assert s.in_flight == 1
    mine = msg(1, sender=UID, device=DEVICE, cmid="a1")
    assert s.send_done("a1", mine, dup=False) == []
    fs = frames(s)
    assert fs == [{"t": "ack", "cmid": "a1", "conv": CONV, "seq": 1, "mid": "1001", "ts": mine.ts, "dup": False}]
    assert s.in_flight == 0
    # The same user's other device sent seq 2: this device gets it as a msg
    s.deliver(msg(2, sender=UID, device="laptop", cmid="l1"))
    fs = frames(s)
    assert kinds(fs) == ["msg"] and fs[0]["from"] == UID and fs[0]["dev"] == "laptop"
    # The routed copy of our own message is not delivered a second time
    s.deliver(mine)
    assert frames(s) == []


def test_own_ack_waits_its_turn_after_a_gap() -> None:
    """The own result is ahead of the live messages before it and they never come: once the wait is over
    they are read from the store, and the ack follows them."""
    s, _ = caught_up(0)
    feed(s, send_frame("a1"))
    mine = msg(3, sender=UID, device=DEVICE, cmid="a1")
    assert s.send_done("a1", mine, dup=False) == [cmd.AwaitLive(CONV, 3)]
    assert frames(s) == []
    assert s.live_wait_over(CONV, 3) == [cmd.Fetch(CONV, 0, 2)]
    assert frames(s) == []
    s.fetched(CONV, 0, [msg(1), msg(2)])
    fs = frames(s)
    assert kinds(fs) == ["msg", "msg", "ack"]
    assert fs[2]["seq"] == 3 and fs[2]["cmid"] == "a1"


def test_own_result_ahead_of_its_commit_s_deliveries_waits_for_them_live() -> None:
    """Another sender's messages of the same commit (seqs 1 and 2) are routed after this device's result
    (seq 3) is answered: they arrive live, close the gap, and nothing is read from the store."""
    s, _ = caught_up(0)
    feed(s, send_frame("a1"))
    mine = msg(3, sender=UID, device=DEVICE, cmid="a1")
    assert s.send_done("a1", mine, dup=False) == [cmd.AwaitLive(CONV, 3)]
    assert s.deliver(msg(2)) == []  # still one short: nothing written out of order
    assert frames(s) == []
    assert s.deliver(msg(1)) == []
    fs = frames(s)
    assert kinds(fs) == ["msg", "msg", "ack"] and [f["seq"] for f in fs] == [1, 2, 3]
    assert s.deliver(mine) == []  # the routed copy of its own message: not written again
    assert s.live_wait_over(CONV, 3) == []  # the wait ended with the gap: no fetch
    assert frames(s) == []
    assert s.deliver(msg(4)) == []  # and live delivery goes on in order
    assert [f["seq"] for f in frames(s)] == [4]


def test_a_wait_for_live_messages_fetches_only_what_did_not_come() -> None:
    s, _ = caught_up(0)
    feed(s, send_frame("a1"))
    assert s.send_done("a1", msg(4, sender=UID, device=DEVICE, cmid="a1"), dup=False) == [cmd.AwaitLive(CONV, 4)]
    assert s.deliver(msg(1)) == []
    assert [f["seq"] for f in frames(s)] == [1]
    assert s.live_wait_over(CONV, 4) == [cmd.Fetch(CONV, 1, 3)]
    assert s.deliver(msg(3)) == []  # arrives during the fetch: waits for it
    s.fetched(CONV, 1, [msg(2), msg(3)])
    fs = frames(s)
    assert kinds(fs) == ["msg", "msg", "ack"] and [f["seq"] for f in fs] == [2, 3, 4]


def test_the_end_of_a_wait_that_closed_its_gap_does_not_cut_a_later_wait_short() -> None:
    """Waits follow each other in a busy conversation: the first one's timer, firing while a second wait
    runs, must leave the second its own time (else nearly every wait ended in a store read)."""
    s, _ = caught_up(0)
    feed(s, send_frame("a1"))
    feed(s, send_frame("a2"))
    assert s.send_done("a1", msg(2, sender=UID, device=DEVICE, cmid="a1"), dup=False) == [cmd.AwaitLive(CONV, 2)]
    assert s.deliver(msg(1)) == []  # the first wait ends with its gap
    assert s.send_done("a2", msg(4, sender=UID, device=DEVICE, cmid="a2"), dup=False) == [cmd.AwaitLive(CONV, 4)]
    assert s.live_wait_over(CONV, 2) == []  # the first wait's timer: nothing to do
    assert s.deliver(msg(3)) == []
    assert [(f["t"], f["seq"]) for f in frames(s)] == [("msg", 1), ("ack", 2), ("msg", 3), ("ack", 4)]
    assert s.live_wait_over(CONV, 4) == []


def test_another_device_s_message_past_a_gap_is_fetched_at_once() -> None:
    """Only the device's own result waits for live messages: another message past a gap means a
    delivery was lost, and the gap is read at once."""
    s, _ = caught_up(0)
    assert s.deliver(msg(3, sender=UID, device="laptop", cmid="l1")) == [cmd.Fetch(CONV, 0, 2)]


def test_resend_while_in_flight_is_answered_once() -> None:
    s, _ = caught_up(0)
    assert len(feed(s, send_frame("a1"))) == 1
    assert feed(s, send_frame("a1")) == []  # the first commit's ack answers both
    assert frames(s) == []
    s.send_done("a1", msg(1, sender=UID, device=DEVICE, cmid="a1"), dup=False)
    assert kinds(frames(s)) == ["ack"]


def test_retry_of_acked_cmid_gets_dup_ack_with_same_seq() -> None:
    s, _ = caught_up(0)
    feed(s, send_frame("a1"))
    mine = msg(1, sender=UID, device=DEVICE, cmid="a1")
    s.send_done("a1", mine, dup=False)
    first = frames(s)[0]
    out = feed(s, send_frame("a1"))
    assert len(out) == 1 and isinstance(out[0], cmd.Submit)
    s.send_done("a1", mine, dup=True)  # the core found it stored
    again = frames(s)
    assert len(again) == 1 and again[0]["t"] == "ack" and again[0]["dup"] is True
    assert (again[0]["seq"], again[0]["mid"]) == (first["seq"], first["mid"])
    assert s.in_flight == 0


def test_dup_ack_for_cmid_stored_by_an_earlier_connection() -> None:
    # Resumed with cursor 5: the retried send was stored as seq 4 before the drop.
    s, _ = opened([SyncPoint(CONV, 5, 5)])
    feed(s, send_frame("old"))
    s.send_done("old", msg(4, sender=UID, device=DEVICE, cmid="old"), dup=True)
    fs = frames(s)
    assert kinds(fs) == ["ack"] and fs[0]["seq"] == 4 and fs[0]["dup"] is True


def test_send_failed_is_an_error_with_ref() -> None:
    s, _ = caught_up(0)
    feed(s, send_frame("a1"))
    s.send_failed("a1", ErrorCode.NOT_MEMBER, "not a member")
    assert frames(s) == [
        {"t": "error", "code": "not_member", "message": "not a member", "ref": "a1", "retry_after": None}
    ]
    assert s.in_flight == 0


def test_invalid_sends_are_refused_with_ref() -> None:
    s, _ = caught_up(0)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"t": "send", "cmid": "x1", "conv": CONV, "to": 3, "body": 1}, "invalid"),
        ({"t": "send", "cmid": "x2", "body": 1}, "invalid"),
        ({"t": "send", "cmid": "x3", "conv": CONV, "body": 1, "type": "system"}, "invalid"),
        ({"t": "send", "cmid": "", "conv": CONV, "body": 1}, "invalid"),
        ({"t": "send", "cmid": "x" * 65, "conv": CONV, "body": 1}, "invalid"),
        ({"t": "send", "cmid": "x6", "conv": CONV, "body": "y" * (32 * 1024)}, "too_large"),
    ]
    for frame, code in cases:
        assert feed(s, frame) == [], frame
        fs = frames(s)
        assert len(fs) == 1 and fs[0]["t"] == "error" and fs[0]["code"] == code, (frame, fs)
        assert fs[0]["ref"] == frame["cmid"]
    assert s.in_flight == 0


# --- cursors ----------------------------------------------------------------------------------------


def test_cursor_beyond_delivered_is_refused() -> None:
    s, _ = caught_up(2)
    assert feed(s, {"t": "recv", "conv": CONV, "seq": 3}) == []
    assert [(f["t"], f["code"]) for f in frames(s)] == [("error", "invalid")]
    assert feed(s, {"t": "recv", "conv": "g:404", "seq": 0}) == []
    assert [f["code"] for f in frames(s)] == ["invalid"]
    assert feed(s, {"t": "recv", "conv": CONV, "seq": 2}) == [cmd.SaveCursor(CONV, 2)]
    assert feed(s, {"t": "read", "conv": CONV, "seq": 9}) == []
    assert [f["code"] for f in frames(s)] == ["invalid"]
    assert feed(s, {"t": "read", "conv": CONV, "seq": 1}) == [cmd.MarkRead(CONV, 1)]
    assert frames(s) == []


def test_cursor_is_refused_while_start_point_unknown() -> None:
    s, _ = opened([])
    s.deliver(msg(4, conv="g:9"))  # fetch outstanding, delivered unknown
    assert feed(s, {"t": "recv", "conv": "g:9", "seq": 0}) == []
    assert [f["code"] for f in frames(s)] == ["invalid"]


# --- limits -----------------------------------------------------------------------------------------


def test_rate_limit() -> None:
    clock = Clock()
    s, _ = opened([SyncPoint(CONV, 0, 0)], limits=Limits(send_rate=2.0), clock=clock)
    accepted = [feed(s, send_frame(f"r{i}")) for i in range(5)]
    assert [len(a) for a in accepted] == [1, 1, 1, 1, 0]  # burst of 2 * rate
    fs = frames(s)
    assert fs == [{"t": "error", "code": "rate_limited", "message": fs[0]["message"], "ref": "r4", "retry_after": 0.5}]
    clock.now += 0.5  # one token back: the refused send first (a later one would wait for it: test_send_order)
    assert len(feed(s, send_frame("r4"))) == 1
    assert feed(s, send_frame("r5")) == []
    assert [f["code"] for f in frames(s)] == ["rate_limited"]


def test_in_flight_limit() -> None:
    s2, _ = opened([SyncPoint(CONV, 0, 0)], limits=Limits(max_in_flight=2))
    assert len(feed(s2, send_frame("a"))) == 1
    assert len(feed(s2, send_frame("b"))) == 1
    assert feed(s2, send_frame("c")) == []
    assert frames(s2) == [
        {
            "t": "error",
            "code": "too_many_in_flight",
            "message": "more than 2 unacked sends",
            "ref": "c",
            "retry_after": None,
        }
    ]
    s2.send_done("a", msg(1, sender=UID, device=DEVICE, cmid="a"), dup=False)
    assert kinds(frames(s2)) == ["ack"]
    assert len(feed(s2, send_frame("c"))) == 1


def test_oversized_frame_is_refused_and_session_goes_on() -> None:
    s, _ = caught_up(0)
    big = json.dumps(send_frame("big", body="x" * 70_000)).encode()
    assert s.receive(big, False) == []
    fs = frames(s)
    assert [(f["t"], f["code"]) for f in fs] == [("error", "too_large")]
    assert s.state is State.OPEN
    feed(s, {"t": "ping", "id": 3})
    assert frames(s) == [{"t": "pong", "id": 3}]


# --- timers -----------------------------------------------------------------------------------------


def test_auth_timeout() -> None:
    clock = Clock()
    s = new(Limits(auth_timeout=5.0), clock)
    clock.now += 4.9
    assert s.check_timers() == []
    clock.now += 0.2
    out = s.check_timers()
    assert out == [cmd.Close(ErrorCode.AUTH_TIMEOUT, "no auth frame in time")]
    # docs/protocol.md section 14: auth_timeout says reconnect (after fixing the client)
    assert frames(s) == [{"t": "bye", "code": "auth_timeout", "message": "no auth frame in time", "reconnect": True}]
    assert s.state is State.CLOSED
    assert feed(s, {"t": "auth", "token": "tok", "device": DEVICE}) == []  # closed: input ignored
    assert frames(s) == []
    assert s.check_timers() == []


def test_auth_timeout_counts_from_open_not_from_last_frame() -> None:
    clock = Clock()
    s = new(Limits(auth_timeout=5.0), clock)
    for _ in range(6):
        clock.now += 1.0
        feed(s, {"t": "ping"})  # pings before auth do not keep an unauthenticated connection alive
    assert [c.code for c in s.check_timers() if isinstance(c, cmd.Close)] == [ErrorCode.AUTH_TIMEOUT]


def test_idle_timeout() -> None:
    clock = Clock()
    s, _ = opened([], limits=Limits(idle_timeout=30.0), clock=clock)
    clock.now += 29.0
    assert s.check_timers() == []
    feed(s, {"t": "ping", "id": 1})  # any frame resets it
    frames(s)
    clock.now += 29.0
    assert s.check_timers() == []
    clock.now += 2.0
    out = s.check_timers()
    assert len(out) == 1 and isinstance(out[0], cmd.Close) and out[0].code is ErrorCode.IDLE_TIMEOUT
    fs = frames(s)
    assert kinds(fs) == ["bye"] and fs[0]["code"] == "idle_timeout" and fs[0]["reconnect"] is True
    assert s.deliver(msg(1)) == [] and frames(s) == []


# --- the state table --------------------------------------------------------------------------------


def test_send_before_auth_is_unauthenticated() -> None:
    s = new()
    assert feed(s, send_frame("early")) == []
    assert frames(s) == [
        {
            "t": "error",
            "code": "unauthenticated",
            "message": "await_auth: cannot take a send frame",
            "ref": "early",
            "retry_after": None,
        }
    ]
    others: list[dict[str, Any]] = [
        {"t": "recv", "conv": CONV, "seq": 1},
        {"t": "read", "conv": CONV, "seq": 1},
        {"t": "typing", "conv": CONV},
    ]
    for frame in others:
        assert feed(s, frame) == []
        assert [(f["code"], f["ref"]) for f in frames(s)] == [("unauthenticated", None)]
    feed(s, {"t": "ping", "id": 9})  # ping is fine before auth
    assert frames(s) == [{"t": "pong", "id": 9}]
    assert s.state is State.AWAIT_AUTH


def test_frames_while_authenticating() -> None:
    s = new()
    feed(s, {"t": "auth", "token": "tok", "device": DEVICE})
    assert feed(s, send_frame("x")) == []
    assert feed(s, {"t": "auth", "token": "tok", "device": DEVICE}) == []
    assert [f["code"] for f in frames(s)] == ["unauthenticated", "unauthenticated"]
    assert s.state is State.AUTHENTICATING


def test_auth_twice_is_already_authenticated() -> None:
    s, _ = caught_up(0)
    assert feed(s, {"t": "auth", "token": "tok", "device": DEVICE}) == []
    assert [(f["t"], f["code"]) for f in frames(s)] == [("error", "already_authenticated")]
    assert s.state is State.OPEN


def test_auth_failed_says_error_then_bye_and_closes() -> None:
    s = new()
    feed(s, {"t": "auth", "token": "bad", "device": DEVICE})
    out = s.auth_failed(ErrorCode.AUTH_FAILED, "invalid token")
    assert out == [cmd.Close(ErrorCode.AUTH_FAILED, "invalid token")]
    fs = frames(s)
    assert [(f["t"], f["code"]) for f in fs] == [("error", "auth_failed"), ("bye", "auth_failed")]
    assert fs[1]["reconnect"] is False
    assert s.state is State.CLOSED
    assert s.auth_succeeded(UID, DEVICE, [], {}) == []  # a late success changes nothing
    assert frames(s) == []


def test_auth_with_bad_device_or_cursors_is_invalid_and_stays_awaiting() -> None:
    s = new()
    for frame in (
        {"t": "auth", "token": "tok", "device": ""},
        {"t": "auth", "token": "tok", "device": "d" * 65},
        {"t": "auth", "token": "tok", "device": DEVICE, "cursors": {CONV: -1}},
    ):
        assert feed(s, frame) == []
        assert [f["code"] for f in frames(s)] == ["invalid"]
        assert s.state is State.AWAIT_AUTH
    assert feed(s, {"t": "auth", "token": "tok", "device": DEVICE}) == [cmd.Authenticate("tok", DEVICE, {})]


def test_close_is_final() -> None:
    s, _ = caught_up(0)
    out = s.close(ErrorCode.SHUTDOWN, "stopping")
    assert out == [cmd.Close(ErrorCode.SHUTDOWN, "stopping")]
    assert frames(s) == [{"t": "bye", "code": "shutdown", "message": "stopping", "reconnect": True}]
    assert s.close(ErrorCode.SHUTDOWN, "again") == []
    assert feed(s, send_frame("late")) == []
    assert frames(s) == []


def test_binary_first_frame_makes_the_session_answer_in_msgpack() -> None:
    s = new()
    out = s.receive(msgspec.msgpack.encode({"t": "auth", "token": "tok", "device": DEVICE}), True)
    assert out == [cmd.Authenticate("tok", DEVICE, {})]
    s.auth_succeeded(UID, DEVICE, [SyncPoint(CONV, 1, 0)], {})
    s.fetched(CONV, 0, [msg(1)])
    raw = s.data_to_send()
    decoded = [msgspec.msgpack.decode(b) for b in raw]
    assert [f["t"] for f in decoded] == ["auth_ok", "msg", "synced"]
    assert decoded[1]["body"] == "m1" and decoded[1]["from"] == 99


def test_messagepack_body_with_no_json_form_is_refused_not_raised() -> None:
    # A MessagePack body is stored as JSON text; values JSON cannot hold must be refused with an error
    # frame (ref = cmid), not raise out of receive() (which kills the connection in the gateway).
    s = new()
    s.receive(msgspec.msgpack.encode({"t": "auth", "token": "tok", "device": DEVICE}), True)
    s.auth_succeeded(UID, DEVICE, [], {})
    frames(s)
    ext = msgspec.msgpack.encode({"t": "send", "cmid": "ext", "to": 2, "body": msgspec.msgpack.Ext(5, b"xx")})
    array_key = msgspec.msgpack.encode({"t": "send", "cmid": "key", "to": 2, "body": 0})[:-1] + b"\x81\x91\x01\x01"
    for cmid, data in (("ext", ext), ("key", array_key)):
        assert s.receive(data, True) == []
        fs = frames(s)
        assert len(fs) == 1 and fs[0]["t"] == "error" and fs[0]["code"] in ("bad_frame", "invalid"), fs
        assert fs[0]["ref"] == cmid
    assert s.in_flight == 0
    assert s.state is State.OPEN
