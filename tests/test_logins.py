"""The login gate (im.protocol.logins) and the refusal it leads to, with no event loop: a fake clock."""

from __future__ import annotations

import itertools

import msgspec

from im.client.session import ClientSession
from im.config import load_config
from im.live_config import LiveConfig, follow_hub
from im.model.errors import ErrorCode
from im.protocol import commands as cmd
from im.protocol.codec import Encoding
from im.protocol.logins import MAX_RETRY_AFTER, Busy, LoginGate
from im.protocol.messages import EncodedCache
from im.protocol.session import Limits, ServerSession, State
from tests.support.wait import eventually
from tests.test_hub import FakeConnection, Gateway, gateway  # noqa: F401  (the in-process gateway fixture)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def gate(rate: float = 100.0, burst: int = 10, max_wait: float = 0.5) -> tuple[LoginGate, Clock]:
    clock = Clock()
    return LoginGate(Limits(auth_rate=rate, auth_burst=burst, auth_max_wait=max_wait), clock=clock), clock


def test_a_burst_starts_at_once_then_logins_queue_then_are_refused() -> None:
    g, _ = gate(rate=100, burst=10, max_wait=0.5)
    turns = [g.admit() for _ in range(100)]
    assert turns[:10] == [0.0] * 10  # the burst
    queued = turns[10:60]  # 0.5 s of queue at 100/s: 50 more, each one interval after the last
    assert all(isinstance(t, float) for t in queued)
    waits = [t for t in queued if isinstance(t, float)]
    assert waits == sorted(waits) and 0 < waits[0] <= 0.011 and waits[-1] <= 0.5
    refused = turns[60:]
    assert all(isinstance(t, Busy) for t in refused)
    assert (g.admitted, g.queued, g.refused) == (10, 50, 40)


def test_refusals_of_one_burst_are_told_successive_times_at_the_admission_rate() -> None:
    g, _ = gate(rate=100, burst=10, max_wait=0.5)
    for _ in range(60):
        g.admit()
    told = [t.retry_after for t in (g.admit() for _ in range(200)) if isinstance(t, Busy)]
    assert len(told) == 200
    assert told[0] > 0.5  # after the queue has drained
    gaps = [b - a for a, b in itertools.pairwise(told)]
    assert all(abs(gap - 0.01) < 0.0015 for gap in gaps)  # one admission interval apart (ms rounding)
    assert told[-1] - told[0] > 1.98  # 200 refusals spread over 2 s, not one instant


def test_clients_that_come_back_when_told_are_admitted() -> None:
    g, clock = gate(rate=100, burst=10, max_wait=0.5)
    start = clock.now
    told = [t for t in (g.admit() for _ in range(300)) if isinstance(t, Busy)]
    assert len(told) == 240
    came_back = sorted(start + t.retry_after for t in told)
    refused_again = 0
    for at in came_back:
        clock.now = at
        if isinstance(g.admit(), Busy):
            refused_again += 1
    assert refused_again == 0


def test_the_rate_refills_and_is_read_on_every_login() -> None:
    g, clock = gate(rate=10, burst=2, max_wait=0.0)
    assert [g.admit(), g.admit()] == [0.0, 0.0]
    assert isinstance(g.admit(), Busy)
    clock.now += 0.1
    assert g.admit() == 0.0
    g.limits.auth_rate = 1000.0  # a dynamic change applies to the next login
    clock.now += 0.01
    assert [g.admit(), g.admit()] == [0.0, 0.0]


def test_a_promise_is_never_further_than_the_cap() -> None:
    g, _ = gate(rate=1, burst=1, max_wait=0.0)
    g.admit()
    told = [t for t in (g.admit() for _ in range(200)) if isinstance(t, Busy)]
    assert max(t.retry_after for t in told) == MAX_RETRY_AFTER


def test_the_session_answers_a_busy_login_with_error_retry_after_then_bye() -> None:
    s = ServerSession(EncodedCache())
    commands = s.receive(b'{"t":"auth","token":"x","device":"d"}', False)
    assert type(commands[0]) is cmd.Authenticate
    closing = s.auth_busy(1.25)
    assert [type(c) for c in closing] == [cmd.Close]
    assert s.state is State.CLOSED
    frames = [msgspec.json.decode(f) for f in s.data_to_send()]
    assert frames == [
        {
            "t": "error",
            "code": "unavailable",
            "message": "too many logins at once; retry in 1.25s",
            "ref": None,
            "retry_after": 1.25,
        },
        {"t": "bye", "code": "unavailable", "message": "too many logins at once; retry in 1.25s", "reconnect": True},
    ]
    assert s.auth_busy(1.0) == []  # once


def test_the_client_session_keeps_the_wait_the_server_asked_for() -> None:
    c = ClientSession("d", encoding=Encoding.JSON)
    c.connect("token")
    c.receive(b'{"t":"error","code":"unavailable","message":"busy","ref":null,"retry_after":2.5}')
    c.receive(b'{"t":"bye","code":"unavailable","message":"busy","reconnect":true}')
    assert c.reconnect_after == 2.5
    c.connection_lost()
    c.connect("token")
    assert c.reconnect_after is None
    # an error with retry_after once connected (a rate limit) is not a reason to stay away
    c.receive(b'{"t":"auth_ok","uid":1,"device":"d","heartbeat":60.0,"max_frame":65536}')
    c.receive(b'{"t":"error","code":"rate_limited","message":"x","ref":null,"retry_after":1.0}')
    assert c.reconnect_after is None


async def test_a_gateway_refuses_logins_past_the_rate_set_live_and_admits_them_later(
    gateway: Gateway,  # noqa: F811  (the fixture imported above)
) -> None:
    """The hub's gate, on real stores: the rate set through the configuration centre applies to the next
    login; the refused connection gets ``error unavailable`` with ``retry_after``, then ``bye``, and closes."""
    live = LiveConfig(load_config(None, {}))
    follow_hub(live, gateway.hub)
    live.set_centre({"limits.auth_rate": "0.5", "limits.auth_burst": "1", "limits.auth_max_wait": "0"})
    assert (gateway.hub.limits.auth_rate, gateway.hub.limits.auth_burst) == (0.5, 1)
    (_, alice), (_, bob) = await gateway.user("alice"), await gateway.user("bob")
    first = await gateway.connect(alice)
    assert first.of_type("synced") and first.closed_with is None
    refused = await gateway.connect(bob)
    assert refused.closed_with is ErrorCode.UNAVAILABLE
    error, bye = refused.of_type("error"), refused.of_type("bye")
    assert error[0]["code"] == "unavailable" and 1.0 < error[0]["retry_after"] <= 2.0, error
    assert bye == [{"t": "bye", "code": "unavailable", "message": error[0]["message"], "reconnect": True}]
    assert not refused.of_type("auth_ok")

    live.set_centre({"limits.auth_rate": "1000"})  # raised live: the next login goes through
    again = await gateway.connect(bob)
    assert again.of_type("auth_ok") and again.closed_with is None


def test_a_turn_given_back_goes_to_the_next_login() -> None:
    g, _ = gate(rate=10, burst=1, max_wait=1.0)
    assert g.admit() == 0.0
    first = g.admit()
    second = g.admit()
    assert isinstance(first, float) and isinstance(second, float) and abs(second - first - 0.1) < 1e-9
    g.give_back()  # the first queued login's connection closed before its turn
    third = g.admit()
    assert third == second  # the freed turn: the third waits no longer than the second
    for _ in range(5):
        g.give_back()
    assert g.admit() == 0.0 and g.returned == 6  # never more than the burst is handed back at once
    assert g.admit() != 0.0


async def test_a_queued_login_whose_connection_closes_gives_its_turn_back_and_does_no_work(
    gateway: Gateway,  # noqa: F811  (the fixture imported above)
) -> None:
    gateway.hub.limits.auth_rate, gateway.hub.limits.auth_burst, gateway.hub.limits.auth_max_wait = 5.0, 1, 2.0
    (_, alice), (_, bob) = await gateway.user("alice"), await gateway.user("bob")
    first = await gateway.connect(alice)
    assert first.of_type("synced")
    waiting = FakeConnection(gateway.hub)
    gateway.hub.add(waiting)
    waiting.send(t="auth", token=bob, device="phone")  # queued: its turn is 0.2 s away
    await eventually(lambda: gateway.hub.logins.queued == 1, "the login queued")
    assert not waiting.of_type("auth_ok")
    waiting.close_transport(ErrorCode.UNAVAILABLE)  # the client gave up
    await eventually(lambda: gateway.hub.logins.returned == 1, "the turn handed back")
    assert not waiting.of_type("auth_ok") and not waiting.session.uid  # no token check, no registration
