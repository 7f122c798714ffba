"""The web client and the gateway's login admission (docs/protocol.md, "Login admission") and connection
caps: a page whose login is refused with ``retry_after``, or whose connection is closed 1013, waits that
long before it tries again, instead of hammering the gateway with its own short back-off, and then
connects by itself."""

from __future__ import annotations

import re
import time

import httpx
import pytest
from playwright.async_api import WebSocketRoute, expect

from tests.support.client import register
from tests.support.wait import eventually
from tests.web.conftest import PASSWORD, Web, WebUser, unique

#: One login per 5 s, none queued: the first page takes the only turn, the second is told to wait ~5 s.
SLOW_LOGINS = ["--set", "limits.auth_rate=0.2", "--set", "limits.auth_burst=1", "--set", "limits.auth_max_wait=0"]


async def logins(web: Web) -> dict[str, float]:
    """The gateway's login admission counters, from the server's /metrics."""
    async with httpx.AsyncClient(timeout=10) as http:
        r = await http.get(f"{web.server.http}/metrics")
        assert r.status_code == 200, r.text
    found = re.findall(r'^im_gateway_logins_total\{outcome="(\w+)"\} ([0-9.e+]+)$', r.text, re.MULTILINE)
    return {outcome: float(n) for outcome, n in found}


@pytest.mark.parametrize("server", [SLOW_LOGINS], indirect=True)
async def test_a_refused_login_waits_the_servers_retry_after_then_connects(web: Web) -> None:
    alice = await web.user("alice")
    await expect(alice.page.locator("#banner")).to_be_hidden()  # connected: the one turn of the burst
    started = time.monotonic()
    bob = await web.user("bob")
    await expect(bob.page.locator("#banner")).to_contain_text("Retrying")  # refused, waiting as told
    await expect(bob.page.locator("#banner")).to_be_hidden(timeout=20_000)
    waited = time.monotonic() - started
    counts = await logins(web)
    # Refused once: a client on its own back-off (250 ms, 500 ms, 1 s, ...) would have come back, and
    # been refused, three or four times within the 5 s.
    assert counts.get("refused") == 1, counts
    assert counts.get("admitted", 0) + counts.get("queued", 0) == 2, counts
    assert waited > 3.0, waited

    # The connection works: a message from Alice reaches Bob's page.
    await alice.open_chat_with(bob)
    await alice.send("you waited your turn")
    await expect(bob.page.locator("#conv-list .conv")).to_have_count(1)
    web.check()


async def test_a_gateway_closing_1013_is_tried_again_no_sooner_than_5_s(web: Web) -> None:
    """A gateway over its connection cap completes the handshake and closes with 1013 (docs/protocol.md
    section 3, "Connection caps"): the page waits at least the protocol's 5 s before its next attempt,
    not its own 250 ms back-off, and then connects. The first chat connection is answered by a route
    that closes it 1013; the next goes through to the real gateway."""
    ctx = await web.context()
    attempts: list[float] = []

    async def gateway(ws: WebSocketRoute) -> None:
        attempts.append(time.monotonic())
        if len(attempts) == 1:
            await ws.close(code=1013, reason="the server is at its connection limit, retry later")
        else:
            ws.connect_to_server()

    await ctx.route_web_socket(re.compile(r"/ws$"), gateway)
    page = await web.page(ctx)
    alice = WebUser(unique("alice"), ctx, page)
    await register(web.server.api, alice.name, PASSWORD, display_name=alice.display)
    await alice.login()
    await eventually(lambda: len(attempts) >= 2, "a second connection attempt", 20)
    await expect(page.locator("#banner")).to_be_hidden(timeout=20_000)  # connected, on the second try
    assert len(attempts) == 2, attempts
    assert attempts[1] - attempts[0] >= 5.0, f"tried again after {attempts[1] - attempts[0]:.2f}s"
    web.check()
