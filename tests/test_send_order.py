"""Sender order across retryable refusals (im.model.send_order; docs/protocol.md section 8, "Sender order").

A device's sends to one conversation are stored in the order it sent them, even when one is refused with a
retryable code and a later one is already on its way: the barrier (no event loop), the server session
(sans-I/O), the SDK session's retry order (sans-I/O) and the committer over real stores (SQLite,
PostgreSQL) whose commits fail for one batch and then recover.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from im.client.session import ClientSession
from im.config import load_config
from im.live_config import LiveConfig, follow_committer, follow_hub
from im.model.chat import SyncPoint
from im.model.errors import ErrorCode
from im.model.send_order import SendOrder
from im.observability.metrics import METRICS
from im.protocol import commands as cmd
from im.protocol.frames import Ack, AuthOk, Error
from im.protocol.session import Limits
from tests.support.chat import ChatCore
from tests.test_chat_isolation import kind, send, submit_all, svc  # noqa: F401 (the fixtures are used by name)
from tests.test_hub import Gateway, gateway  # noqa: F401  (the in-process gateway fixture)
from tests.test_session import CONV, UID, Clock, feed, frames, opened, send_frame

# --- the barrier, alone ----------------------------------------------------------------------------------


def test_a_refused_send_bars_later_ones_of_its_key_until_it_comes_again() -> None:
    now = [0.0]
    order: SendOrder[str] = SendOrder(hold=30.0, clock=lambda: now[0])
    assert not order.held and order.barring("g:1", "y") is None  # nothing held: nothing barred
    order.refused("g:1", "x")
    assert order.barring("g:1", "y") == "x"  # later sends of g:1 wait for x ...
    assert order.barring("g:1", "z") == "x"
    assert order.barring("g:2", "y") is None  # ... other conversations do not
    order.refused("g:1", "y")  # a later refusal does not move the barrier off the earlier send
    assert order.barring("g:1", "y") == "x"
    assert order.barring("g:1", "x") is None  # x itself lifts it
    assert order.barring("g:1", "y") is None and not order.held


def test_a_barrier_expires_and_a_zero_hold_makes_none() -> None:
    now = [0.0]
    order: SendOrder[str] = SendOrder(hold=30.0, clock=lambda: now[0])
    order.refused("g:1", "x")
    now[0] = 29.9
    assert order.barring("g:1", "y") == "x"
    now[0] = 30.0  # the client gave x up: its later sends are not blocked for ever
    assert order.barring("g:1", "y") is None and not order.held
    off: SendOrder[str] = SendOrder(hold=0.0)
    off.refused("g:1", "x")
    assert not off.held


def test_an_earlier_send_refused_later_takes_the_barrier_over() -> None:
    """Refusals may come back out of send order (a rate limit at the gateway answers at once, the store
    later): with order numbers the barrier always waits for the earliest refused send."""
    order: SendOrder[str] = SendOrder(clock=lambda: 0.0)
    order.refused("g:1", "y", 2)
    order.refused("g:1", "x", 1)
    assert order.barring("g:1", "y", 2) == "x"
    assert order.barring("g:1", "w", 0) is None  # sent before x: not held back
    assert order.barring("g:1", "z") == "x"  # (no number: a new send, after every other)
    order.refused("g:1", "z", 3)
    assert order.barring("g:1", "y") == "x"


def test_memory_is_bounded_oldest_and_expired_first() -> None:
    now = [0.0]
    order: SendOrder[int] = SendOrder(hold=10.0, max_entries=100, clock=lambda: now[0])
    for k in range(1000):
        order.refused(k, f"c{k}")
    assert len(order) == 100 and min(order.held) == 900  # the oldest went first
    now[0] = 10.0
    order.refused(5000, "late")
    assert list(order.held) == [5000]  # expired ones are dropped as new ones come
    with pytest.raises(ValueError, match="max_entries"):
        SendOrder(max_entries=0)


# --- the server session (sans-I/O) -----------------------------------------------------------------------


def codes(fs: list[dict[str, Any]]) -> list[tuple[str, str | None]]:
    return [(f["code"], f["ref"]) for f in fs if f["t"] == "error"]


def test_session_a_rate_limited_send_holds_back_later_ones_that_would_pass() -> None:

    clock = Clock()
    s, _ = opened([SyncPoint(CONV, 0, 0), SyncPoint("g:2", 0, 0)], limits=Limits(send_rate=1.0), clock=clock)
    assert len(feed(s, send_frame("a"))) == 1 and len(feed(s, send_frame("b"))) == 1  # the burst
    assert feed(s, send_frame("x")) == []
    assert codes(frames(s)) == [("rate_limited", "x")]
    clock.now += 5.0  # the bucket refilled: y alone would pass now, and be stored before x
    assert feed(s, send_frame("y")) == []
    fs = frames(s)
    assert codes(fs) == [("unavailable", "y")] and "resend it first" in fs[0]["message"], fs
    assert len(feed(s, send_frame("w", conv="g:2"))) == 1  # another conversation is not held back
    submitted = feed(s, send_frame("x"))  # x resent: it lifts the barrier and goes
    assert [c.cmid for c in submitted if isinstance(c, cmd.Submit)] == ["x"]
    clock.now += 5.0
    assert [c.cmid for c in feed(s, send_frame("y")) if isinstance(c, cmd.Submit)] == ["y"]
    assert codes(frames(s)) == []


def test_session_a_gateway_refusal_holds_back_direct_sends_by_conversation() -> None:
    """``send_failed`` with a gateway's ``unavailable`` (no transfer link) bars the conversation, however
    it is addressed; the core's own ``unavailable`` does not (its committer holds the sends back)."""
    s, _ = opened()
    feed(s, {"t": "send", "cmid": "v", "to": 9, "body": "0"})
    s.send_failed("v", ErrorCode.UNAVAILABLE, "storage error")  # the core's: its committer bars, not us
    assert len(feed(s, {"t": "send", "cmid": "v2", "to": 9, "body": "0"})) == 1
    feed(s, {"t": "send", "cmid": "x", "to": 9, "body": "1"})
    s.send_failed("x", ErrorCode.UNAVAILABLE, "no transfer node reachable", gateway=True)
    frames(s)
    assert feed(s, {"t": "send", "cmid": "y", "conv": f"d:{UID}:9", "body": "2"}) == []
    assert codes(frames(s)) == [("unavailable", "y")]
    feed(s, {"t": "send", "cmid": "z", "to": 8, "body": "3"})  # another peer: another conversation
    s.send_failed("z", ErrorCode.NOT_FOUND, "no user 8")  # final refusals hold nothing back
    assert codes(frames(s)) == [("not_found", "z")]
    assert len(feed(s, {"t": "send", "cmid": "z2", "to": 8, "body": "4"})) == 1
    assert len(feed(s, {"t": "send", "cmid": "x", "to": 9, "body": "1"})) == 1
    assert len(feed(s, {"t": "send", "cmid": "y", "conv": f"d:{UID}:9", "body": "2"})) == 1


def test_session_a_send_held_by_the_gateway_is_refused_if_an_earlier_one_was_refused_meanwhile() -> None:
    """The gateway's shared rate limits decide a batch after the session took the sends: x refused there,
    y let through after it must not reach the core (``may_submit``); a send made before x still may."""
    s, _ = opened()
    w, x, y = (feed(s, send_frame(c))[0] for c in ("w", "x", "y"))
    assert isinstance(w, cmd.Submit) and isinstance(x, cmd.Submit) and isinstance(y, cmd.Submit)
    assert s.may_submit(w)
    s.send_failed("x", ErrorCode.RATE_LIMITED, "user send limit reached", 0.5)
    assert s.may_submit(w)  # sent before x
    assert not s.may_submit(y)
    assert codes(frames(s)) == [("rate_limited", "x"), ("unavailable", "y")]
    assert s.in_flight == 1  # w only


def test_session_refusals_back_out_of_order_still_wait_for_the_earliest() -> None:
    s, _ = opened()
    for c in ("x", "y"):
        feed(s, send_frame(c))
    s.send_failed("y", ErrorCode.RATE_LIMITED, "limit", 0.1)  # answered first (the gateway's limit) ...
    s.send_failed("x", ErrorCode.UNAVAILABLE, "link lost", gateway=True)  # ... then x, sent before it
    frames(s)
    assert feed(s, send_frame("y")) == []  # y resent first: it still waits for x
    assert codes(frames(s)) == [("unavailable", "y")]
    assert len(feed(s, send_frame("x"))) == 1 and len(feed(s, send_frame("y"))) == 1


# --- the SDK session: retry in send order ----------------------------------------------------------------


def test_sdk_retry_writes_refused_sends_in_their_original_order_once_nothing_is_in_flight() -> None:
    s = ClientSession("phone", cmid_prefix="c")
    s.connect("tok")
    s.receive_frame(AuthOk(uid=1, device="phone", heartbeat=60.0, max_frame=65536))
    sends = [s.send(i, conv="g:1") for i in range(4)]
    s.data_to_send()
    # Refusals come back in another order: y (held back by the server) before x (the store's answer).
    for i in (2, 0, 1):
        assert s.receive_frame(Error(code="unavailable", message="later", ref=sends[i].cmid)) is None
    late = s.send(4, conv="g:1")
    s.retry()  # sends[3] is still unanswered: it may be refused too, so nothing is resent yet
    assert s.data_to_send() == []
    assert s.receive_frame(Ack(cmid=sends[3].cmid, conv="g:1", seq=1, mid="1", ts=1, dup=False)) is not None
    written = [json.loads(b)["cmid"] for b in s.data_to_send()]
    assert written == [sends[0].cmid, sends[1].cmid, sends[2].cmid, late.cmid]


# --- the committer, over real stores whose commits fail for a while ---------------------------------------


def store_away(core: ChatCore, monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """The real store's commits and loads refused (connection refused) while ``down[0]``, which starts
    True: returns ``down``."""
    down = [True]
    real_commit, real_load = core.store.commit, core.store.load_conversations

    async def commit(batch):  # type: ignore[no-untyped-def]
        if down[0]:
            raise ConnectionRefusedError(111, "Connection refused")
        await real_commit(batch)

    async def load(convs):  # type: ignore[no-untyped-def]
        if down[0]:
            raise ConnectionRefusedError(111, "Connection refused")
        return await real_load(convs)

    monkeypatch.setattr(core.store, "commit", commit)
    monkeypatch.setattr(core.store, "load_conversations", load)
    return down


async def x_refused_then_store_back(core: ChatCore, monkeypatch: pytest.MonkeyPatch) -> str:
    """A group of users 1 and 2; send x of user 1's phone refused ``unavailable`` while the store is away
    (its barrier held), then the store back. Returns the group's conversation."""
    group = await core.groups.create_group(1, "g", [2])
    conv = f"g:{group.gid}"
    down = store_away(core, monkeypatch)
    [(m, err)] = await asyncio.gather(*submit_all(core, [send(conv, "x")]))
    assert m is None and err is not None and err.code is ErrorCode.UNAVAILABLE
    down[0] = False
    return conv


async def test_committer_a_send_behind_one_refused_by_the_store_waits_for_it(
    svc: ChatCore,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    conv = await x_refused_then_store_back(svc, monkeypatch)  # y, written before x is resent, must wait
    y, other_device, other_conv = send(conv, "y"), send(conv, "z"), send("d:1:2", "w")
    other_device.device = "laptop"
    outcomes = await asyncio.gather(*submit_all(svc, [y, other_device, other_conv]))
    (ym, yerr), (zm, zerr), (wm, werr) = outcomes
    assert ym is None and yerr is not None and yerr.code is ErrorCode.UNAVAILABLE, outcomes
    assert "resend it first" in yerr.message
    assert zerr is None and werr is None and zm is not None and wm is not None  # nothing else held back
    outcomes = await asyncio.gather(*submit_all(svc, [send(conv, "x"), send(conv, "y")]))  # resent in order
    assert [err for _, err in outcomes] == [None, None], outcomes
    page, _ = await svc.reads.history(1, conv, after=0, before=None, limit=50)
    mine = [e.cmid for e in page if e.sender == 1 and e.device == "phone" and e.type == "text"]
    assert mine == ["x", "y"]
    assert not svc.committer.order.held


async def test_committer_the_barrier_holds_across_a_second_refusal_of_the_resent_send(
    svc: ChatCore,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """x resent while the store is still away is refused again (with y behind it, in the same batch):
    the barrier waits for x again, not for y."""
    group = await svc.groups.create_group(1, "g", [2])
    conv = f"g:{group.gid}"
    down = store_away(svc, monkeypatch)
    for _ in range(2):
        outcomes = await asyncio.gather(*submit_all(svc, [send(conv, "x"), send(conv, "y")]))
        assert [err.code if err else None for _, err in outcomes] == [ErrorCode.UNAVAILABLE] * 2
    down[0] = False
    [(_, yerr)] = await asyncio.gather(*submit_all(svc, [send(conv, "y")]))
    assert yerr is not None and "cmid 'x'" in yerr.message
    outcomes = await asyncio.gather(*submit_all(svc, [send(conv, "x"), send(conv, "y"), send(conv, "v")]))
    assert [m.seq if m else None for m, _ in outcomes] == [2, 3, 4], outcomes


async def test_committer_the_hold_set_live_applies_to_a_barrier_already_held(
    svc: ChatCore,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``limits.send_order_hold`` is a dynamic setting (im.dynamic): lowered through the configuration
    centre while a barrier is held, the barrier ends by the new hold, not the one it was made under."""
    live = LiveConfig(load_config(None, {}))
    follow_committer(live, svc.committer)
    assert svc.committer.order.hold == 30.0
    conv = await x_refused_then_store_back(svc, monkeypatch)
    [(_, yerr)] = await asyncio.gather(*submit_all(svc, [send(conv, "y")]))
    assert yerr is not None and "resend it first" in yerr.message  # held under the 30 s hold
    live.set_centre({"limits.send_order_hold": "0.2"})
    assert svc.committer.order.hold == 0.2
    await asyncio.sleep(0.3)
    [(ym, yerr)] = await asyncio.gather(*submit_all(svc, [send(conv, "y")]))
    assert yerr is None and ym is not None, yerr  # the barrier ran out under the hold set live


async def test_the_gateways_sessions_take_the_hold_set_live(gateway: Gateway) -> None:  # noqa: F811
    """The hub's shared session limits follow the centre: a session's barrier reads the hold at its next
    refusal (``ServerSession._hold_back``, covered above with its own limits)."""
    live = LiveConfig(load_config(None, {}))
    follow_hub(live, gateway.hub)
    live.set_centre({"limits.send_order_hold": "5"})
    assert gateway.hub.limits.send_order_hold == 5.0
    _, alice = await gateway.user("alice")
    conn = await gateway.connect(alice)
    assert conn.session.limits.send_order_hold == 5.0  # the limits a session judges by are the hub's


async def test_committer_a_barrier_whose_refused_send_was_stored_elsewhere_is_lifted(
    svc: ChatCore,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """x refused here, then resent to another node that stored it (this node had lost its node id and the
    conversation moved away and back: tests/faults/test_engine_links.py, etcd): the client has x's ack and
    never resends it, so y must not wait behind it until the barrier expires."""
    conv = await x_refused_then_store_back(svc, monkeypatch)
    barrier = dict(svc.committer.order.held)
    svc.committer.order.held.clear()  # x taken by another writer: it never passes this barrier
    [(xm, xerr)] = await asyncio.gather(*submit_all(svc, [send(conv, "x")]))
    assert xerr is None and xm is not None
    svc.committer.order.held.update(barrier)
    [(ym, yerr)] = await asyncio.gather(*submit_all(svc, [send(conv, "y")]))
    assert yerr is None and ym is not None and ym.seq == xm.seq + 1, yerr
    assert not svc.committer.order.held
    # A barrier whose send is not stored still holds.
    [(_, zerr)] = await asyncio.gather(*submit_all(svc, [send(conv, "z")]))
    assert zerr is None
    svc.committer.order.refused((1, "phone", conv), "never-stored")
    [(_, werr)] = await asyncio.gather(*submit_all(svc, [send(conv, "w")]))
    assert werr is not None and "never-stored" in werr.message


async def test_committer_a_barrier_stays_while_the_store_cannot_say_whether_its_send_is_stored(
    svc: ChatCore,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The look-up that would lift a barrier fails (the store away for reads): the barrier stays, the
    later send is refused behind it, and the failure is counted as an engine error."""
    conv = await x_refused_then_store_back(svc, monkeypatch)

    async def find_sent(_keys: object) -> dict[object, object]:
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(svc.store, "find_sent", find_sent)
    errors_before = sum(METRICS.engine_errors.values())
    [(ym, yerr)] = await asyncio.gather(*submit_all(svc, [send(conv, "y")]))
    assert ym is None and yerr is not None and "cmid 'x'" in yerr.message, yerr
    assert sum(METRICS.engine_errors.values()) == errors_before + 1
    assert svc.committer.order.held


def test_lift_drops_only_the_barrier_of_that_send() -> None:
    order: SendOrder[str] = SendOrder()
    order.refused("k", "x")
    order.lift("k", "y")
    assert order.barring("k", "z") == "x"
    order.lift("k", "x")
    assert order.barring("k", "z") is None
