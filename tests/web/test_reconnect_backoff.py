"""The web client's reconnect back-off (docs/protocol.md section 19, step 8): with the gateway unreachable
and the HTTP API up, the n-th attempt in a row waits a random 50-100 % of min(5 s, 0.25 s * 2^n), so the
waits grow exponentially up to the cap; two pages cut off at the same moment come back at different times
(jitter); once the gateway is back the page reconnects by itself and everything sent meanwhile, either way,
arrives.

Both pages reach the gateway through a :class:`~im.faultproxy.FaultProxy`: ``gateway.public_ws_url`` is the
proxy's address, so that is what ``GET /api/v1/gateway`` gives the page. :meth:`FaultProxy.cut` resets the
open chat connections and refuses new ones; the API, on its own port, stays reachable.

The page says on its console (``console.info``) how long it waits before each attempt, and the browser
stamps each line with its time: the test checks those waits against the policy, that the next line (after
the next attempt failed) came no sooner than announced (both times from the page's clock, so a busy test
process cannot shift them), and that the page opened exactly one WebSocket between two lines.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.async_api import ConsoleMessage, expect

from im.faultproxy import FaultProxy
from im.procs import free_port
from tests.support.client import ChatClient
from tests.support.server import ServerProcess, running_server
from tests.support.wait import eventually
from tests.web.conftest import Web, WebUser

#: The web client's back-off (src/im/web/js/connection.js; not configurable from the page): seconds.
BASE, CAP = 0.25, 5.0
#: Waits checked per page: steps 0-6, the last two at the cap (uncapped, step 6 would be 8-16 s).
STEPS = 7
#: How much shorter: the announced wait is rounded to a millisecond, the stamps are in milliseconds.
EARLY = 0.003

ANNOUNCED = re.compile(r"^im: (.*); reconnecting in ([0-9.]+) s$")


def nominal(n: int) -> float:
    """The longest wait before the n-th attempt in a row (n from 0); the shortest is half of it."""
    return min(CAP, BASE * 2.0**n)


@pytest.fixture
def gateway_proxy() -> Iterator[FaultProxy]:
    """A proxy in front of the gateway's WebSocket port, which the server is then started on."""
    with FaultProxy(("127.0.0.1", free_port()), port=free_port()) as proxy:
        yield proxy


@pytest.fixture
def server(tmp_path: Path, gateway_proxy: FaultProxy) -> Iterator[ServerProcess]:
    """``im serve`` whose GET /api/v1/gateway gives the proxy's address (the conftest's ``web`` uses it)."""
    public = ["--set", f"gateway.public_ws_url=ws://{gateway_proxy.address}/ws"]
    with running_server(tmp_path / "data", public, ws_port=gateway_proxy.target[1]) as proc:
        yield proc


@dataclass
class Announced:
    """The reconnect waits one page announced: (the line's time stamp in s, the reason, the wait in s), and
    how many WebSockets the page had opened when it said each."""

    user: WebUser
    web: Web
    lines: list[tuple[float, str, float]] = field(default_factory=list)
    sockets: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.user.page.on("console", self._console)

    def _console(self, m: ConsoleMessage) -> None:
        if m.type == "info" and (found := ANNOUNCED.match(m.text)):
            self.lines.append((m.timestamp / 1000, found.group(1), float(found.group(2))))
            self.sockets.append(len(self.web.sockets(self.user.page)))

    def waits(self) -> list[float]:
        return [wait for _, _, wait in self.lines[:STEPS]]

    def steps(self) -> list[float]:
        """How long each of the first STEPS waits took, up to the failure of the attempt after it."""
        stamps = [t for t, _, _ in self.lines[: STEPS + 1]]
        return [later - earlier for earlier, later in itertools.pairwise(stamps)]


async def test_reconnects_back_off_exponentially_with_jitter_up_to_the_cap_then_resync(
    web: Web, gateway_proxy: FaultProxy
) -> None:
    alice = await web.user("alice")
    bob = await web.user("bob")
    await alice.open_chat_with(bob)
    await alice.send("before the cut")
    await expect(bob.page.locator("#conv-list .conv")).to_have_count(1)
    await bob.open_conversation(alice.display)
    await expect(bob.message("before the cut")).to_have_count(1)
    pages = [Announced(alice, web), Announced(bob, web)]

    gateway_proxy.cut()
    await expect(alice.page.locator("#banner")).to_contain_text("Reconnecting")
    # Away: Alice types a message (it waits in her outbox), Bob's phone, connected straight to the
    # gateway, writes to her.
    await alice.send("typed while cut off")
    assert bob.account is not None
    phone = ChatClient(web.server.ws, bob.account, "phone")
    await phone.connect()
    assert await phone.send({"text": "sent while you were away"}, conv=bob.conv_with(alice)) is not None
    await phone.close()

    # Each page: STEPS waits, each followed by a failed attempt (at most 17.75 s of waiting).
    await eventually(lambda: all(len(p.lines) > STEPS for p in pages), f"{STEPS} failed reconnects on each page", 30)
    gateway_proxy.heal()

    for p in pages:
        # Every wait follows a lost or refused WebSocket: the API (GET /gateway) was answered each time.
        assert all(reason == "connection closed" for _, reason, _ in p.lines[: STEPS + 1]), p.lines
        # The policy: before attempt n (from 0, since the connection was lost) a wait of 50-100 % of
        # min(5 s, 0.25 s * 2^n). So the waits grow: two steps apart by at least twice (one step apart,
        # the jitter allows as little as equal), and from step 5 on they stay at the cap.
        waits = p.waits()
        for n, wait in enumerate(waits):
            assert nominal(n) / 2 - 0.001 <= wait <= nominal(n) + 0.001, (p.user.name, n, waits)
        # The page waited what it said: each attempt came no sooner.
        steps = p.steps()
        for n, (step, wait) in enumerate(zip(steps, waits, strict=True)):
            assert wait - EARLY <= step, (p.user.name, n, steps, waits)
        # And each step was one attempt: one WebSocket opened between two announcements.
        opened = [later - earlier for earlier, later in itertools.pairwise(p.sockets[: STEPS + 1])]
        assert opened == [1] * STEPS, (p.user.name, p.sockets)
    # Jitter: the two pages, cut off at the same moment, chose different waits.
    a, b = (p.waits() for p in pages)
    assert sum(abs(x - y) for x, y in zip(a, b, strict=True)) > 0.3, (a, b)

    # Healed: both pages come back within one capped wait (and a margin), without being asked, and resync.
    for user in (alice, bob):
        await expect(user.page.locator("#banner")).to_be_hidden(timeout=(CAP + 6) * 1000)
    # The phone's message was stored while Alice was away, hers once she was back: in that order.
    everything = ["before the cut", "sent while you were away", "typed while cut off"]
    await expect(alice.texts).to_have_text(everything)
    await expect(bob.texts).to_have_text(everything)
    await expect(alice.message("typed while cut off").locator(".status")).to_have_text("Read")
    web.check()
