"""ClientSession with no event loop: build it, feed server frames, assert on events and frames out."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from im.client.session import ClientSession, SendFailed, State
from im.protocol.codec import Encoding, decode_client, encode
from im.protocol.frames import Ack, Auth, AuthOk, Bye, Error, Msg, Ping, Pong, Read, Receipt, Recv, Send, Synced, Typing

AUTH_OK = AuthOk(uid=1, device="phone", heartbeat=60.0, max_frame=65536)


def srv(frame: Any, encoding: Encoding = Encoding.JSON) -> bytes:
    return encode(frame, encoding)


def msg(conv: str, seq: int, body: Any = None, cmid: str | None = None) -> bytes:
    cmid = cmid or f"x-{seq}"
    frame = Msg(conv=conv, seq=seq, mid=str(seq), sender=2, dev="x", cmid=cmid, ts=1, type="text", body=body)
    return srv(frame)


def ack(cmid: str, conv: str, seq: int, dup: bool = False) -> bytes:
    return srv(Ack(cmid=cmid, conv=conv, seq=seq, mid=str(seq), ts=1, dup=dup))


def out(s: ClientSession) -> list[Any]:
    return [decode_client(b, s.encoding) for b in s.data_to_send()]


def state_of(s: ClientSession) -> State:
    """``s.state`` read through a call: mypy would carry an earlier ``is`` narrowing past the frame that changes it."""
    return s.state


def opened(**kwargs: Any) -> ClientSession:
    s = ClientSession("phone", cmid_prefix="c", **kwargs)
    s.connect("tok")
    assert s.receive(srv(AUTH_OK)) == AUTH_OK
    return s


def test_auth_names_every_cursor_and_only_auth_ping_precede_auth_ok() -> None:
    s = ClientSession("phone", cursors={"d:1:2": 4, "g:7": 9}, cmid_prefix="c")
    auth = decode_client(s.connect("tok"), Encoding.JSON)
    assert auth == Auth(token="tok", device="phone", cursors={"d:1:2": 4, "g:7": 9})
    assert s.state is State.AUTHENTICATING
    s.send("early", to=2)
    s.read("d:1:2", 4)
    s.typing("d:1:2")
    s.ping()
    assert out(s) == [Ping(id=1)]  # the send waits for auth_ok; read/typing are dropped
    s.receive(srv(AUTH_OK))
    assert state_of(s) is State.OPEN
    assert out(s) == [Send(cmid="c-1", body="early", to=2)]


def test_messages_once_in_order_duplicates_dropped() -> None:
    s = opened(cursors={"d:1:2": 2})
    events = [s.receive(msg("d:1:2", n)) for n in (1, 2, 3, 3, 4, 2)]
    assert [e.seq if e else None for e in events] == [None, None, 3, None, 4, None]  # type: ignore[union-attr]
    assert s.cursors == {"d:1:2": 4}
    assert s.duplicates == 4


def test_a_gap_is_not_delivered_and_asks_for_a_reconnect() -> None:
    s = opened(cursors={"g:1": 3})
    assert s.receive(msg("g:1", 5)) is None
    assert s.cursors["g:1"] == 3
    assert s.reconnect_reason is not None and "g:1" in s.reconnect_reason
    # A conversation not held yet may start anywhere (a new member starts at its members_added message).
    t = opened()
    assert t.receive(msg("g:9", 12)) is not None
    assert t.reconnect_reason is None and t.cursors == {"g:9": 12}


def test_ack_advances_the_cursor_unless_dup_and_is_reported_once() -> None:
    s = opened(cursors={"d:1:2": 1})
    a = s.send("x", conv="d:1:2")
    b = s.send("y", conv="d:1:2")
    assert [f.cmid for f in out(s)] == [a.cmid, b.cmid]
    assert s.receive(ack(a.cmid, "d:1:2", 2)) is not None
    assert s.cursors["d:1:2"] == 2
    assert s.receive(ack(a.cmid, "d:1:2", 2, dup=True)) is None  # a second ack for the same send
    s.receive(msg("d:1:2", 3, cmid=b.cmid))  # replayed as msg first (another connection stored it)
    ev = s.receive(ack(b.cmid, "d:1:2", 3, dup=True))
    assert isinstance(ev, Ack) and ev.dup
    assert s.cursors["d:1:2"] == 3 and s.outbox == {}


def test_outbox_survives_reconnect_and_is_resent_in_order_with_same_cmids() -> None:
    s = opened()
    sends = [s.send(i, to=2) for i in range(3)]
    s.data_to_send()
    s.receive(ack(sends[1].cmid, "d:1:2", 1))
    s.connection_lost()
    assert s.state is State.IDLE
    extra = s.send("offline", to=2)  # made while disconnected
    assert out(s) == []
    s.connect("tok2")
    s.receive(srv(AUTH_OK))
    assert out(s) == [sends[0], sends[2], extra]


def test_in_flight_window() -> None:
    s = opened(max_in_flight=2)
    sends = [s.send(i, to=2) for i in range(5)]
    assert [f.cmid for f in out(s)] == [sends[0].cmid, sends[1].cmid]
    s.receive(ack(sends[0].cmid, "d:1:2", 1))
    assert [f.cmid for f in out(s)] == [sends[2].cmid]
    assert s.in_flight == 2


def test_retryable_refusal_is_retried_with_the_same_cmid_final_one_is_reported() -> None:
    s = opened()
    a = s.send("a", to=2)
    b = s.send("b", to=3)
    s.data_to_send()
    assert s.receive(srv(Error(code="rate_limited", message="slow down", ref=a.cmid))) is None
    assert s.wants_retry and a.cmid in s.outbox
    failed = s.receive(srv(Error(code="not_found", message="no such user", ref=b.cmid)))
    assert failed == SendFailed(b, "not_found", "no such user")
    assert b.cmid not in s.outbox
    c = s.send("c", to=2)
    assert out(s) == []  # held back: it would meet the same limit
    s.retry()
    assert out(s) == [a, c]
    assert not s.wants_retry


def test_errors_without_ref_receipts_typing_synced_bye_pass_through_pong_and_unknown_do_not() -> None:
    s = opened()
    for frame in (
        Error(code="invalid", message="cursor beyond", ref=None),
        Receipt(conv="d:1:2", uid=2, kind="read", seq=3),
        Synced(convs=2),
    ):
        assert s.receive(srv(frame)) == frame
    assert s.synced
    assert s.receive(srv(Pong(id=3))) is None
    assert s.receive(b'{"t":"from_the_future","x":1}') is None
    assert s.receive(b"not json") is None
    assert s.ignored == 2
    typing_in = s.receive(b'{"t":"typing","conv":"d:1:2","uid":2}')
    assert typing_in is not None and typing_in.conv == "d:1:2"  # type: ignore[union-attr]
    bye = Bye(code="shutdown", message="stopping", reconnect=True)
    assert s.receive(srv(bye)) == bye
    assert s.state is State.CLOSED


def test_recv_reports_handled_messages_once_and_never_beyond_what_is_held() -> None:
    s = opened(cursors={"g:1": 5, "g:2": 1})
    for n in (6, 7, 8):
        s.receive(msg("g:1", n))
    s.flush_recv()
    assert out(s) == []  # nothing handled yet: the app has not taken the messages
    s.handled("g:1", 7)
    s.flush_recv()
    assert out(s) == [Recv(conv="g:1", seq=7)]
    s.flush_recv()
    assert out(s) == []
    s.handled("g:1", 8)
    s.handled("g:1", 6)  # never moves back
    s.flush_recv()
    assert out(s) == [Recv(conv="g:1", seq=8)]
    assert s.handled_cursors == {"g:1": 8, "g:2": 1}
    # After a reconnect, conversations not moved since are not reported (they may not be tracked).
    s.connect("tok")
    s.receive(srv(AUTH_OK))
    s.flush_recv()
    assert out(s) == []


def test_read_typing_and_msgpack() -> None:
    s = ClientSession("phone", encoding=Encoding.MSGPACK, cmid_prefix="c")
    auth = s.connect("tok")
    assert msgspec.msgpack.decode(auth)["t"] == "auth"
    s.receive(srv(AUTH_OK, Encoding.MSGPACK))
    s.read("g:1", 3)
    s.typing("g:1")
    assert out(s) == [Read(conv="g:1", seq=3), Typing(conv="g:1")]
    system = Msg(conv="g:1", seq=1, mid="1", sender=2, dev="", cmid="sys-1", ts=1, type="system", body={"event": "x"})
    m = s.receive(srv(system, Encoding.MSGPACK))
    assert isinstance(m, Msg) and m.body == {"event": "x"}


def test_send_validation_and_idempotent_cmid() -> None:
    s = opened()
    with pytest.raises(ValueError):
        s.send("x")
    with pytest.raises(ValueError):
        s.send("x", conv="d:1:2", to=2)
    first = s.send("x", to=2, cmid="same")
    assert s.send("other body", to=2, cmid="same") is first
    assert len(out(s)) == 1
