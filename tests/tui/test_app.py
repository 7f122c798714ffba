"""``im chat`` end to end: the Textual app driven by ``Pilot`` against a real ``im serve``, with a second
user on the SDK ``Client``. Assertions are on what the other side receives and on what the screen shows."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import pytest

from im.chat_tui.chat_screen import ChatScreen
from im.chat_tui.model import direct_conv
from im.chat_tui.screens import LoginScreen
from im.client import ApiClient, Receipt, TypingEvent
from tests.support.server import ServerProcess
from tests.tui.helpers import (
    PASSWORD,
    SIZE,
    Peer,
    login,
    new_app,
    save,
    to_png,
    type_text,
    wait_until,
)

Factory = Callable[..., Any]


@pytest.mark.parametrize("transport", ["ws", "tcp"])
async def test_log_in_through_the_ui_and_quit(
    server: ServerProcess, accounts: Factory, screenshots: Path, transport: Literal["ws", "tcp"]
) -> None:
    alice = await accounts("alice")
    app = new_app(server, transport=transport)
    async with app.run_test(size=SIZE) as pilot:
        assert isinstance(app.screen, LoginScreen)
        if transport == "ws":
            save(app, screenshots, "1-login")
        chat = await login(pilot, alice)
        assert app.state is not None and app.state.uid == alice.uid
        status = chat.query_one("#status")
        await wait_until(pilot, lambda: "● connected" in str(status.render()), "status line")
        assert f"alice @ {server.http} ({transport})" in str(status.render())
        assert app.service is not None
        client = app.service.client
        await pilot.press("ctrl+q")
        await wait_until(pilot, lambda: not app.is_running, "the app to quit", timeout=5)
    assert client.transport is None  # the connection was closed on the way out


async def test_wrong_password_is_shown_and_register_toggle_creates_an_account(
    server: ServerProcess, accounts: Factory
) -> None:
    alice = await accounts("alice")
    app = new_app(server)
    async with app.run_test(size=SIZE) as pilot:
        screen = app.screen
        assert isinstance(screen, LoginScreen)
        await pilot.click("#username")
        await type_text(pilot, alice.username)
        await pilot.press("enter")
        await type_text(pilot, "not the password")
        await pilot.press("enter")
        error = screen.query_one("#login-error")
        await wait_until(pilot, lambda: "wrong user name or password" in str(error.render()), "login error")
        assert isinstance(app.screen, LoginScreen)

        # register a new user from the same screen
        screen.query_one("#username").value = "newbie"  # type: ignore[attr-defined]
        screen.query_one("#password").value = PASSWORD  # type: ignore[attr-defined]
        await pilot.click("#register")
        await pilot.click("#submit")
        await wait_until(pilot, lambda: isinstance(app.screen, ChatScreen), "the chat screen after registering")
    async with ApiClient(server.http) as api:
        tokens = await api.login("newbie", PASSWORD)
        assert app.state is not None and tokens.uid == app.state.uid


def timeline_texts(chat: ChatScreen) -> list[str]:
    """The message bodies in the order the timeline shows them (lines of the form ``HH:MM who: text``)."""
    return [line.split(": ", 1)[1].split("  ")[0] for line in chat.timeline_plain.splitlines() if ": " in line]


async def test_unread_count_history_in_order_and_read_mark(
    server: ServerProcess, accounts: Factory, peer: Factory, screenshots: Path
) -> None:
    alice, bob_account = await accounts("alice"), await accounts("bob")
    bob: Peer = await peer(bob_account)
    conv = direct_conv(alice.uid, bob.uid)
    for i in range(1, 4):  # before alice logs in: these come from GET /conversations
        await bob.client.send({"text": f"early {i}"}, to=alice.uid)

    app = new_app(server)
    async with app.run_test(size=SIZE) as pilot:
        chat = await login(pilot, alice)
        await wait_until(pilot, lambda: "(3)" in chat.rows_plain.get(conv, ""), "3 unread in the list")
        assert "bob: early 3" in chat.rows_plain[conv]

        for i in range(1, 3):  # live, while the conversation is not open: the count goes up
            await bob.client.send({"text": f"live {i}"}, conv=conv)
        await wait_until(pilot, lambda: "(5)" in chat.rows_plain.get(conv, ""), "5 unread in the list")
        assert "bob: live 2" in chat.rows_plain[conv]
        save(app, screenshots, "2-conversation-list")

        await pilot.press("enter")  # the list has the focus and its only row highlighted
        await wait_until(pilot, lambda: "live 2" in chat.timeline_plain, "the history")
        assert timeline_texts(chat) == ["early 1", "early 2", "early 3", "live 1", "live 2"]
        assert app.state is not None and app.state.convs[conv].unread == 0
        assert "(" not in chat.rows_plain[conv].splitlines()[0]
        # viewing the conversation sent a read mark: bob gets the receipt
        await bob.wait(
            lambda: any(
                isinstance(e, Receipt) and e.kind == "read" and e.uid == alice.uid and e.seq == 5 for e in bob.events
            )
        )
        svg = save(app, screenshots, "3-conversation")
        to_png(svg)


async def test_typing_enter_delivers_and_marks_sent(
    server: ServerProcess, accounts: Factory, peer: Factory, screenshots: Path
) -> None:
    alice, bob_account = await accounts("alice"), await accounts("bob")
    bob: Peer = await peer(bob_account)
    conv = direct_conv(alice.uid, bob.uid)
    app = new_app(server)
    async with app.run_test(size=SIZE) as pilot:
        chat = await login(pilot, alice)
        await pilot.press("ctrl+n")  # new direct chat by user name
        await type_text(pilot, "bob")
        save(app, screenshots, "4-new-chat")
        await pilot.press("enter")
        await wait_until(pilot, lambda: app.state is not None and app.state.open_conv == conv, "the chat with bob")
        await wait_until(pilot, lambda: "no messages yet" in chat.timeline_plain, "the empty history")

        await type_text(pilot, "hello bob")
        await pilot.press("enter")
        await bob.wait(lambda: len(bob.messages(conv)) == 1)
        got = bob.messages(conv)[0]
        assert (got.sender, got.body, got.seq) == (alice.uid, {"text": "hello bob"}, 1)
        await wait_until(pilot, lambda: "hello bob  ✓" in chat.timeline_plain, "the message marked sent")
        assert "sending" not in chat.timeline_plain
        assert "bob" in chat.rows_plain[conv] and "you: hello bob" in chat.rows_plain[conv]

        # the other side types, then answers: a typing line, then the live message in order
        bob.client.typing(conv)
        await wait_until(pilot, lambda: "bob is typing" in str(chat.query_one("#typing").render()), "typing line")
        await bob.client.send({"text": "hi alice"}, conv=conv)
        await wait_until(pilot, lambda: "hi alice" in chat.timeline_plain, "the live message")
        assert timeline_texts(chat) == ["hello bob", "hi alice"]
        assert "is typing" not in str(chat.query_one("#typing").render())  # a message ends the typing
        # seen while open: marked read at once, so bob gets a read receipt for it and nothing is unread
        await bob.wait(lambda: any(isinstance(e, Receipt) and e.uid == alice.uid and e.seq == 2 for e in bob.events))
        assert app.state is not None and app.state.convs[conv].unread == 0
        # and alice's typing reaches bob
        await type_text(pilot, "ok")
        await bob.wait(lambda: any(isinstance(e, TypingEvent) and e.uid == alice.uid for e in bob.events))


async def test_create_group_from_the_ui(
    server: ServerProcess, accounts: Factory, peer: Factory, screenshots: Path
) -> None:
    alice, bob_account, carol = await accounts("alice"), await accounts("bob"), await accounts("carol")
    bob: Peer = await peer(bob_account)
    app = new_app(server)
    async with app.run_test(size=SIZE) as pilot:
        chat = await login(pilot, alice)
        await pilot.press("ctrl+g")
        await type_text(pilot, "weekend plans")
        await pilot.press("enter")  # to the members box
        await type_text(pilot, "bob, carol")
        save(app, screenshots, "5-new-group")
        await pilot.press("enter")

        await bob.wait(lambda: any(m.type == "system" for m in bob.messages()))
        created = next(m for m in bob.messages() if m.type == "system")
        assert created.body["event"] == "group_created" and created.body["name"] == "weekend plans"
        assert sorted(created.body["uids"]) == sorted([alice.uid, bob.uid, carol.uid])
        listed = await bob.client.api.conversations()
        assert [(c.conv, c.kind, c.title) for c in listed] == [(created.conv, "group", "weekend plans")]

        await wait_until(pilot, lambda: app.state is not None and app.state.open_conv == created.conv, "group open")
        await wait_until(pilot, lambda: "alice created the group" in chat.timeline_plain, "the system message")
        await type_text(pilot, "saturday?")
        await pilot.press("enter")
        await bob.wait(lambda: len(bob.messages(created.conv)) == 2)
        assert bob.messages(created.conv)[1].body == {"text": "saturday?"}
        save(app, screenshots, "6-group")


async def test_older_pages_load_in_order(server: ServerProcess, accounts: Factory, peer: Factory) -> None:
    alice, bob_account = await accounts("alice"), await accounts("bob")
    bob: Peer = await peer(bob_account)
    conv = direct_conv(alice.uid, bob.uid)
    cmids = [bob.client.post({"text": f"m{i}"}, to=alice.uid) for i in range(1, 61)]  # one page is 50
    await bob.wait(lambda: {getattr(e, "cmid", None) for e in bob.events} >= set(cmids))
    # The app's device already holds them (delivery cursor 60), so the gateway replays none of them:
    # what the app shows comes from the history pages.
    earlier: Peer = await peer(alice, device="alice-laptop")
    await earlier.wait(lambda: len(earlier.messages(conv)) == 60)
    await earlier.close()
    app = new_app(server, device="alice-laptop")
    async with app.run_test(size=SIZE) as pilot:
        chat = await login(pilot, alice)
        await wait_until(pilot, lambda: "(60)" in chat.rows_plain.get(conv, ""), "60 unread")
        await pilot.press("enter")
        await wait_until(pilot, lambda: "m60" in chat.timeline_plain, "the newest page")
        assert timeline_texts(chat) == [f"m{i}" for i in range(11, 61)]
        assert "older messages" in chat.timeline_plain
        await pilot.press("ctrl+o")
        await wait_until(pilot, lambda: "m1" in timeline_texts(chat), "the older page")
        assert timeline_texts(chat) == [f"m{i}" for i in range(1, 61)]
        assert "older messages" not in chat.timeline_plain


async def test_refused_send_shows_failed_and_retries(server: ServerProcess, accounts: Factory, peer: Factory) -> None:
    alice, bob_account = await accounts("alice"), await accounts("bob")
    bob: Peer = await peer(bob_account)
    group = await bob.client.api.create_group("bob's club", members=[alice.uid])
    app = new_app(server)
    async with app.run_test(size=SIZE) as pilot:
        chat = await login(pilot, alice)
        await wait_until(pilot, lambda: group.conv in chat.rows_plain, "the group in the list")
        await pilot.press("enter")
        await wait_until(pilot, lambda: "bob created the group" in chat.timeline_plain, "the group history")
        await bob.client.api.remove_member(group.gid, alice.uid)
        await wait_until(pilot, lambda: "bob removed alice" in chat.timeline_plain, "the removal")

        await type_text(pilot, "am I still here")
        await pilot.press("enter")
        await wait_until(pilot, lambda: "failed (not_member" in chat.timeline_plain, "the refusal")
        assert "ctrl+r to retry" in chat.timeline_plain

        await bob.client.api.add_members(group.gid, [alice.uid])
        await wait_until(pilot, lambda: "bob added alice" in chat.timeline_plain, "the re-add")
        await pilot.press("ctrl+r")
        await bob.wait(lambda: any(m.body == {"text": "am I still here"} for m in bob.messages(group.conv)))
        await wait_until(pilot, lambda: "am I still here  ✓" in chat.timeline_plain, "the retried send marked sent")
        assert "failed" not in chat.timeline_plain


async def test_connection_status_follows_the_server(server: ServerProcess, accounts: Factory) -> None:
    alice = await accounts("alice")
    app = new_app(server)
    async with app.run_test(size=SIZE) as pilot:
        chat = await login(pilot, alice)
        status = chat.query_one("#status")
        server.stop()
        await wait_until(pilot, lambda: "reconnecting" in str(status.render()), "reconnecting")
        server.start()
        await wait_until(pilot, lambda: "● connected" in str(status.render()), "connected again", timeout=30)
