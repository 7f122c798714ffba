"""The web client when things go wrong: a user away and back, the server stopped and killed under an open
page. Nothing typed is lost or doubled, nothing sent meanwhile is missed, and the page recovers by itself."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import signal
import time
from typing import Any

import httpx
import pytest
from playwright.async_api import Route, expect

from tests.support.client import ChatClient
from tests.support.server import ServerProcess
from tests.web.conftest import PHONE, Web, WebUser


async def stored_texts(server: ServerProcess, user: WebUser, other: WebUser) -> list[str]:
    """The conversation's text messages as the server stores them, in seq order."""
    assert user.account is not None
    conv = user.conv_with(other)
    async with httpx.AsyncClient(base_url=server.api, timeout=10) as http:
        r = await http.get(f"/conversations/{conv}/messages", params={"limit": 200}, headers=user.account.auth)
        assert r.status_code == 200, r.text
        return [m["body"]["text"] for m in r.json()["messages"] if m["type"] == "text"]


async def send_from_phone(web: Web, sender: WebUser, to: WebUser, texts: list[str]) -> None:
    """``texts`` sent to ``to`` from another device of ``sender`` (a raw client), each acked."""
    assert sender.account is not None
    phone = ChatClient(web.server.ws, sender.account, "phone")
    await phone.connect()
    for text in texts:
        assert await phone.send({"text": text}, conv=sender.conv_with(to)) is not None, phone.errors
    await phone.close()


async def back_to_a_long_conversation(web: Web) -> tuple[WebUser, WebUser, list[str]]:
    """Alice writes 70 messages to Bob while his page is closed; Bob opens the conversation again and sees
    the newest 50 (one history page). Returns alice, bob and every text in order."""
    alice = await web.user("alice")
    bob = await web.user("bob")
    await alice.open_chat_with(bob)
    await alice.send("first")
    await expect(bob.page.locator("#conv-list .conv")).to_have_count(1)
    await bob.page.close()  # away: the messages below wait in history, not in the open page
    more = [f"message {i}" for i in range(1, 70)]
    await send_from_phone(web, alice, bob, more)
    everything = ["first", *more]
    bob.page = await web.page(bob.context)
    await bob.open_conversation(alice.display)
    await expect(bob.texts).to_have_text(everything[-50:])
    return alice, bob, everything


async def test_offline_user_catches_up_in_order(web: Web) -> None:
    alice = await web.user("alice")
    bob = await web.user("bob", viewport=PHONE)
    await alice.open_chat_with(bob)
    await alice.send("before you left")
    await expect(bob.page.locator("#conv-list .conv")).to_have_count(1)

    # Bob closes the page; Alice writes on, from the page and from her phone (another device: her page
    # receives those as messages), more than one history page in all.
    await bob.page.close()
    typed = [f"while you were away {i}" for i in range(1, 4)]
    for text in typed:
        await alice.send(text)
    for text in typed:
        await expect(alice.message(text).locator(".status")).to_have_text("Sent")
    from_phone = [f"from my phone {i}" for i in range(1, 61)]
    await send_from_phone(web, alice, bob, from_phone)
    everything = ["before you left", *typed, *from_phone]
    await expect(alice.texts).to_have_text(everything)

    # Bob opens the page again (same browser: still logged in) and finds everything, in order.
    bob.page = await web.page(bob.context)
    item = bob.conversation(alice.display)
    await expect(item.locator(".badge")).to_have_text(str(len(everything)))
    await expect(item.locator(".conv-preview")).to_have_text(from_phone[-1])
    await web.shot(bob.page, "08-phone-conversation-list")
    await expect(bob.page.locator("#chat")).to_be_hidden()  # one pane at a time on a phone

    await bob.open_conversation(alice.display)
    await expect(bob.page.locator(".sidebar")).to_be_hidden()
    await expect(bob.page.locator("#back")).to_be_visible()
    # The newest page first; scrolling up pages back by seq until the first message, with no gap.
    await expect(bob.texts).to_have_text(everything[-50:])
    await expect(bob.page.locator("#load-older")).to_be_visible()
    await bob.page.locator("#messages-wrap").evaluate("w => { w.scrollTop = 0; }")
    await expect(bob.texts).to_have_text(everything)
    await expect(bob.page.locator("#load-older")).to_be_hidden()
    for text in typed:
        await expect(alice.message(text).locator(".status")).to_have_text("Read")
    await bob.send("I'm back")
    await expect(alice.message("I'm back")).to_have_count(1)
    await web.shot(bob.page, "09-phone-chat")
    await web.assert_readable(bob.page)

    # Back to the list with the back button; the conversation is read now.
    await bob.page.click("#back")
    await expect(bob.page.locator(".sidebar")).to_be_visible()
    await expect(item.locator(".badge")).to_have_count(0)


async def test_a_scroll_to_the_top_that_a_render_overtakes_still_pages_back(web: Web) -> None:
    """A render that runs after the user scrolled up but before the scroll event is dispatched (a live
    message arriving then) must neither pin the log back to the bottom nor leave the older page unfetched."""
    alice, bob, everything = await back_to_a_long_conversation(web)
    # The user scrolls to the top, and this scroll's event never reaches the page (as if a render ran first).
    await bob.page.locator("#messages-wrap").evaluate(
        """w => {
            w.addEventListener("scroll", (e) => e.stopImmediatePropagation(), { capture: true, once: true });
            w.scrollTop = 0;
        }"""
    )
    await bob.page.wait_for_timeout(100)  # the swallowed event has been dispatched
    await alice.send("while you scroll")  # a live message: the page renders
    await expect(bob.texts).to_have_text([*everything, "while you scroll"])
    await expect(bob.page.locator("#load-older")).to_be_hidden()
    # Where the user was reading, not pinned back to the bottom.
    below = await bob.page.locator("#messages-wrap").evaluate("w => w.scrollHeight - w.scrollTop - w.clientHeight")
    assert below > 80, below


async def count_reaches(items: list[float], n: int, *, within: float) -> None:
    """Wait until ``items`` holds ``n`` entries (a condition to wait for, not the assertion)."""
    deadline = time.monotonic() + within
    while len(items) < n and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert len(items) == n, len(items)


async def test_a_failing_fetch_of_older_messages_is_retried_less_and_less_often_and_a_refusal_waits(web: Web) -> None:
    """The page before is fetched again while the top stays in view, each wait twice the last, and renders
    in between fetch nothing; a refusal (4xx) is not tried again until the user clicks "older"."""
    alice, bob, everything = await back_to_a_long_conversation(web)

    tries: list[float] = []
    answer: dict[str, Any] = {"status": 403, "code": "forbidden"}

    async def older_pages(route: Route) -> None:
        if "before=" not in route.request.url:
            await route.continue_()
            return
        tries.append(time.monotonic())
        if answer["status"] == 200:
            await route.continue_()
        else:
            body = json.dumps({"code": answer["code"], "message": "made to fail by the test"})
            await route.fulfill(status=answer["status"], content_type="application/json", body=body)

    await bob.page.route("**/api/v1/conversations/*/messages*", older_pages)
    await bob.page.locator("#messages-wrap").evaluate("w => { w.scrollTop = 0; }")
    await count_reaches(tries, 1, within=5.0)
    # Refused: renders (a live message) and the wait fetch nothing more.
    await alice.send("live while refused")
    await expect(bob.message("live while refused")).to_have_count(1)
    await bob.page.wait_for_timeout(2_500)
    assert len(tries) == 1

    # The user asks again; the server is in trouble now (503): tried again after about 1, 2, then 4 s.
    answer.update(status=503, code="unavailable")
    await bob.page.locator("#messages-wrap").evaluate("w => { w.scrollTop = 0; }")
    await bob.page.click("#load-older")
    await count_reaches(tries, 4, within=10.0)
    answer.update(status=200)
    await alice.send("live while backing off")  # a render between the tries: it fetches nothing
    await expect(bob.message("live while backing off")).to_have_count(1)
    await expect(bob.texts).to_have_text([*everything, "live while refused", "live while backing off"], timeout=15_000)
    assert len(tries) == 5, tries
    # The page says on its console what it does after each failed try (and nothing else went wrong):
    # nothing after the refusal, then waits of about 1, 2 and 4 s (each up to a quarter longer).
    failed = [e for e in web.errors if e.startswith("im: loading older messages failed")]
    assert len(failed) == 4 and all("made to fail by the test" in e for e in failed), failed
    assert "not trying again until asked" in failed[0], failed
    waits = [float(m.group(1)) for e in failed[1:] if (m := re.search(r"trying again in ([0-9.]+) s", e))]
    assert len(waits) == 3 and 1.0 <= waits[0] <= 1.25, waits
    assert all(later >= 1.5 * earlier for earlier, later in itertools.pairwise(waits)), waits
    # And no try came sooner than the wait it announced (a slow machine only makes the gaps longer).
    gaps = [later - earlier for earlier, later in itertools.pairwise(tries[1:])]  # after the click
    assert all(gap >= wait - 0.05 for gap, wait in zip(gaps, waits, strict=True)), (gaps, waits)
    web.errors[:] = [e for e in web.errors if e not in failed]


async def test_page_recovers_from_server_restarts(web: Web, server: ServerProcess) -> None:
    alice = await web.user("alice")
    bob = await web.user("bob")
    await alice.open_chat_with(bob)
    await alice.send("before the restart")
    await bob.open_conversation(alice.display)
    await expect(alice.message("before the restart").locator(".status")).to_have_text("Read")
    # Alice wrote to Bob, so Bob sees her online (Bob has not answered: she does not see him, protocol §18).
    await expect(bob.page.locator("#chat-subtitle")).to_have_text("online")

    expected = ["before the restart"]
    for sig, name in ((signal.SIGTERM, "stopped"), (signal.SIGKILL, "killed")):
        await asyncio.to_thread(server.stop, sig)
        for user in (alice, bob):
            await expect(user.page.locator("#banner")).to_contain_text("Reconnecting")
        # Typed while the server is down: shown at once, waiting; sent when the connection is back.
        typed = f"typed while the server was {name}"
        await alice.send(typed)
        pending = alice.message(typed)
        await expect(pending).to_have_class("msg mine pending")
        await expect(pending.locator(".status")).to_have_text("Waiting for connection…")
        if sig == signal.SIGTERM:
            await web.shot(alice.page, "10-reconnecting-banner")
            await web.assert_readable(alice.page)

        await asyncio.to_thread(server.start)
        for user in (alice, bob):
            await expect(user.page.locator("#banner")).to_be_hidden()
        await expect(bob.message(typed)).to_have_count(1)
        await expect(alice.message(typed).locator(".status")).to_have_text("Read")
        reply = f"reply after the server was {name}"
        await bob.send(reply)
        await expect(alice.message(reply)).to_have_count(1)
        expected += [typed, reply]

    # Exactly once each, in the same order on both pages and in the server's log.
    for user in (alice, bob):
        await expect(user.texts).to_have_text(expected)
    assert await stored_texts(web.server, alice, bob) == expected


@pytest.mark.parametrize("server", [["--set", "auth.access_ttl=2"]], indirect=True)
async def test_session_outlives_its_access_tokens(web: Web) -> None:
    """Access tokens live 2 s here: reloads and reconnects refresh them, and two tabs refreshing the same
    single-use refresh token at once do not revoke the session (they take turns)."""
    alice = await web.user("alice")
    bob = await web.user("bob")
    second_tab = await web.page(alice.context)
    await expect(second_tab.locator("#me-name")).to_have_text(alice.display)
    first_refresh = await alice.page.evaluate("JSON.parse(localStorage.getItem('im.auth')).refresh")

    # Wait (a condition, not an assertion) until the access token is due for a refresh, then reload both
    # tabs at once: both need a new token at the same moment.
    await alice.page.wait_for_function("() => Date.now() >= JSON.parse(localStorage.getItem('im.auth')).refreshAt")
    await asyncio.gather(alice.page.reload(), second_tab.reload())
    for page in (alice.page, second_tab):
        await expect(page.locator("#me-name")).to_have_text(alice.display)
        await expect(page.locator("#banner")).to_be_hidden()
    assert await alice.page.evaluate("JSON.parse(localStorage.getItem('im.auth')).refresh") != first_refresh

    # Later calls and a new connection (the server drops it) work with refreshed tokens too.
    await alice.page.wait_for_function("() => Date.now() >= JSON.parse(localStorage.getItem('im.auth')).refreshAt")
    await alice.open_chat_with(bob)
    await alice.send("still logged in")
    await expect(bob.message("still logged in")).to_have_count(0)  # Bob has not opened it
    await expect(bob.page.locator("#conv-list .conv-preview")).to_have_text("still logged in")
    await asyncio.to_thread(web.server.restart)
    await alice.send("and after a reconnect")
    await expect(alice.message("and after a reconnect").locator(".status")).to_have_text("Delivered")
    await expect(second_tab.locator("#login-view")).to_be_hidden()
