"""``im chat`` over TLS, against ``im serve`` speaking TLS itself: ``--ca-file`` trusts the test CA (https://
API, wss:// or tls:// gateway); a server certificate from another CA is shown as a clear error on the login
screen; ``--insecure-skip-verify`` connects and warns on screen; the flags reach the app from the command
line."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import pytest

from im import cli
from im.certs import create_ca
from im.chat_tui import ChatApp
from im.chat_tui.model import direct_conv
from im.chat_tui.screens import LoginScreen
from im.client import Client
from tests.support.client import register
from tests.support.tls_server import TlsServer, running_tls_server
from tests.tui.helpers import PASSWORD, SIZE, Peer, devices, login, type_text, wait_until


@pytest.fixture
def tls(tmp_path: Path) -> Iterator[TlsServer]:
    with running_tls_server(tmp_path) as srv:
        yield srv


def tls_app(srv: TlsServer, **kwargs: object) -> ChatApp:
    return ChatApp(server=srv.http, device=f"tui-{next(devices)}", client_options={"backoff_max": 0.5}, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("transport", ["ws", "tcp"])
async def test_chat_over_tls_with_a_ca_file(tls: TlsServer, transport: Literal["ws", "tcp"]) -> None:
    alice = await register(tls.server.api, "alice", PASSWORD, verify=tls.server.verify)
    bob_account = await register(tls.server.api, "bob", PASSWORD, verify=tls.server.verify)
    bob = Peer(bob_account, await Client.login(tls.http, "bob", PASSWORD, device="peer", ca_file=tls.ca.cert))
    try:
        app = tls_app(tls, transport=transport, ca_file=str(tls.ca.cert))
        async with app.run_test(size=SIZE) as pilot:
            chat = await login(pilot, alice)
            assert app.service is not None
            client = app.service.client
            assert client.transport is not None and client.transport.secure
            assert client.transport.url == (tls.ws if transport == "ws" else tls.tcp)  # type: ignore[attr-defined]
            conv = direct_conv(alice.uid, bob.uid)
            await bob.client.send({"text": "hello over TLS"}, to=alice.uid)
            await wait_until(pilot, lambda: "hello over TLS" in chat.rows_plain.get(conv, ""), "the message")
            await pilot.press("enter")  # open it
            await wait_until(pilot, lambda: "hello over TLS" in chat.timeline_plain, "the timeline")
            await pilot.click("#compose")
            await type_text(pilot, "answer over TLS")
            await pilot.press("enter")
            await bob.wait(lambda: any(m.body == {"text": "answer over TLS"} for m in bob.messages(conv)))
            await pilot.press("ctrl+q")
    finally:
        await bob.close()


async def test_a_certificate_from_another_ca_is_shown_on_the_login_screen(tls: TlsServer, tmp_path: Path) -> None:
    alice = await register(tls.server.api, "alice", PASSWORD, verify=tls.server.verify)
    other = create_ca(tmp_path / "other")
    app = tls_app(tls, ca_file=str(other.cert))
    async with app.run_test(size=SIZE) as pilot:
        screen = app.screen
        assert isinstance(screen, LoginScreen)
        await pilot.click("#username")
        await type_text(pilot, alice.username)
        await pilot.press("enter")
        await type_text(pilot, PASSWORD)
        await pilot.press("enter")
        error = screen.query_one("#login-error")
        await wait_until(pilot, lambda: "certificate" in str(error.render()), "the TLS error")
        text = str(error.render())
        assert "refused" in text and "only the CA file" in text, text
        assert isinstance(app.screen, LoginScreen)
        await pilot.press("ctrl+q")


async def test_insecure_skip_verify_connects_and_warns_on_screen(tls: TlsServer) -> None:
    alice = await register(tls.server.api, "alice", PASSWORD, verify=tls.server.verify)
    app = tls_app(tls, insecure_skip_verify=True)
    async with app.run_test(size=SIZE) as pilot:
        await login(pilot, alice)
        shown = [n.message for n in app._notifications]
        assert any("verification is OFF" in m for m in shown), shown
        await pilot.press("ctrl+q")


def test_chat_tls_flags_reach_the_app(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, object] = {}

    def fake_run(**kwargs: object) -> int:
        seen.update(kwargs)
        return 0

    monkeypatch.setattr("im.chat_tui.run", fake_run)
    assert cli.main(["chat", "--server", "https://h", "--ca-file", "/etc/im/ca.crt"]) == 0
    assert seen["ca_file"] == "/etc/im/ca.crt" and "insecure_skip_verify" not in seen
    seen.clear()
    assert cli.main(["chat", "--server", "https://h", "--insecure-skip-verify"]) == 0
    assert seen["insecure_skip_verify"] is True and "ca_file" not in seen
    with pytest.raises(SystemExit) as exc:
        cli.main(["chat", "--ca-file", "x.crt", "--insecure-skip-verify"])
    assert exc.value.code == 2
