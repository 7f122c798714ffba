"""The chat state and its rendering, without Textual or a server: events in, state and text out."""

from __future__ import annotations

import time

from im.chat_tui.model import TYPING_SECONDS, ChatState, direct_conv
from im.chat_tui.render import conversation_row, status_line, timeline_text, typing_line
from im.chat_tui.screens import split_names
from im.client import Ack, Conversation, Disconnected, Message, Receipt, Send, SendFailed, Synced, TypingEvent

ME, BOB = 1, 2
CONV = direct_conv(ME, BOB)


def msg(seq: int, sender: int = BOB, text: str | None = None, conv: str = CONV, dev: str = "phone") -> Message:
    return Message(
        conv=conv,
        seq=seq,
        mid=str(1000 + seq),
        sender=sender,
        dev=dev,
        cmid=f"c{seq}",
        ts=1_700_000_000_000 + seq,
        type="text",
        body={"text": text or f"m{seq}"},
    )


def listed(last_seq: int, read_seq: int) -> Conversation:
    return Conversation(
        conv=CONV,
        kind="direct",
        title="Bob",
        unread=last_seq - read_seq,
        last_seq=last_seq,
        read_seq=read_seq,
        last_message=msg(last_seq) if last_seq else None,
        peer=BOB,
    )


def state() -> ChatState:
    s = ChatState(ME, "me", device="tui")
    s.load_conversations([listed(3, 1)])
    return s


def test_direct_conv_orders_uids() -> None:
    assert direct_conv(7, 3) == direct_conv(3, 7) == "d:3:7"


def test_timeline_is_by_seq_without_duplicates_whatever_the_arrival_order() -> None:
    s = state()
    s.apply(msg(5))
    s.apply(msg(4))
    s.merge_history(CONV, [msg(2), msg(3), msg(4)])
    s.apply(msg(5))
    conv = s.convs[CONV]
    assert [m.seq for m in conv.timeline()] == [2, 3, 4, 5]
    assert conv.gap() is None and conv.has_older  # seq 1 not loaded yet
    s.merge_history(CONV, [msg(1)])
    assert not s.convs[CONV].has_older


def test_gap_is_reported() -> None:
    s = state()
    s.merge_history(CONV, [msg(1), msg(2), msg(6)])
    assert s.convs[CONV].gap() == (2, 6)


def test_unread_counts_new_messages_of_others_not_replays_or_own() -> None:
    s = state()
    assert s.convs[CONV].unread == 2
    s.apply(msg(2))  # a replay of what the list already counted
    assert s.convs[CONV].unread == 2
    s.apply(msg(4))
    assert s.convs[CONV].unread == 3
    s.apply(msg(5, sender=ME, dev="phone"))  # sent from another device of mine: read up to it
    assert s.convs[CONV].unread == 0


def test_opening_reads_and_later_messages_are_read_while_open() -> None:
    s = state()
    assert s.open(CONV) == (CONV, 3)
    assert s.open(CONV) is None  # nothing new
    assert s.apply(msg(4)).read == (CONV, 4)
    assert s.convs[CONV].unread == 0


def test_send_shows_sending_then_sent_then_read() -> None:
    s = state()
    s.add_outgoing(CONV, "x1", {"text": "hello"})
    assert "hello  sending…" in timeline_text(s, s.convs[CONV]).plain
    update = s.apply(Ack(cmid="x1", conv=CONV, seq=4, mid="9", ts=1_700_000_000_100))
    assert update.convs == {CONV}
    text = timeline_text(s, s.convs[CONV]).plain
    assert "hello  ✓ sent" in text and "sending" not in text
    assert s.convs[CONV].messages[4].sender == ME and s.convs[CONV].unread == 0
    s.apply(Receipt(conv=CONV, uid=BOB, kind="read", seq=4))
    assert "hello  ✓✓ read" in timeline_text(s, s.convs[CONV]).plain


def test_refused_send_is_failed_and_retry_moves_it_to_a_new_cmid() -> None:
    s = state()
    s.add_outgoing(CONV, "x1", {"text": "hello"})
    s.apply(SendFailed(Send(cmid="x1", body={"text": "hello"}, conv=CONV), "not_member", "not a member"))
    assert "failed (not_member: not a member)" in timeline_text(s, s.convs[CONV]).plain
    out = s.retry(CONV, "x2")
    assert out is not None and out.cmid == "x2" and out.status == "sending"
    assert list(s.convs[CONV].pending) == ["x2"]
    assert s.retry(CONV, "x3") is None


def test_replayed_own_message_settles_its_pending_send() -> None:
    s = state()
    s.add_outgoing(CONV, "c4", {"text": "m4"})
    s.apply(msg(4, sender=ME, dev="tui"))
    assert not s.convs[CONV].pending
    assert s.apply(Ack(cmid="c4", conv=CONV, seq=4, mid="1004", ts=1, dup=True)).convs == set()


def test_message_of_an_unknown_conversation_asks_for_the_list() -> None:
    s = state()
    update = s.apply(msg(1, conv="g:9", sender=3))
    assert update.unknown_conv and s.convs["g:9"].kind == "group"
    assert 3 in s.unknown_uids()


def test_typing_shows_then_expires_and_a_message_ends_it() -> None:
    s = state()
    now = time.monotonic()
    s.apply(TypingEvent(conv=CONV, uid=BOB), now=now)
    assert typing_line(s, CONV) == "Bob is typing…"
    assert "Bob typing…" in conversation_row(s, s.convs[CONV]).plain
    assert s.typing_names(CONV, now=now + TYPING_SECONDS + 0.1) == []  # expired
    s.apply(TypingEvent(conv=CONV, uid=BOB), now=now)
    s.apply(msg(4))
    assert s.typing_names(CONV, now=now) == []
    s.apply(TypingEvent(conv=CONV, uid=ME), now=now)  # our own typing echoed: ignored
    assert s.typing_names(CONV, now=now) == []


def test_connection_status() -> None:
    s = state()
    assert "connecting" in status_line(s, "http://x", "ws").plain
    s.apply(Disconnected("connection closed", reconnect=True))
    line = status_line(s, "http://x", "ws").plain
    assert "reconnecting" in line and "connection closed" in line
    s.apply(Synced(convs=1))
    assert "● connected" in status_line(s, "http://x", "ws").plain


def test_split_names() -> None:
    assert split_names(" bob, carol  dave,bob ") == ["bob", "carol", "dave"]
