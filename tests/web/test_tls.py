"""The web client served over HTTPS by ``im serve`` itself (tests/support/tls_server.py), in headless
Chromium trusting exactly the server's key (``--ignore-certificate-errors-spki-list``): it chats over the
``wss://`` address /gateway gives, and a page on https refuses a ``ws://`` address with a clear message
instead of failing silently."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from playwright.async_api import Browser, async_playwright, expect

from tests.support.tls_server import running_tls_server, spki_sha256
from tests.web.conftest import CHROMIUM, CHROMIUM_ARGS, Web


@asynccontextmanager
async def tls_web(tmp_path: Path, shots: Path, name: str, *, public_ws: bool = True) -> AsyncIterator[Web]:
    """A server speaking TLS and a Chromium that trusts its certificate's key (and nothing else extra)."""
    with running_tls_server(tmp_path, public_ws=public_ws) as srv:
        async with async_playwright() as p:
            browser: Browser = await p.chromium.launch(
                executable_path=CHROMIUM,
                args=[*CHROMIUM_ARGS, f"--ignore-certificate-errors-spki-list={spki_sha256(srv.cert.cert)}"],
            )
            w = Web(srv.server, browser, shots, name, origin=srv.http)
            try:
                yield w
            finally:
                for ctx in w.contexts:
                    await ctx.close()
                await browser.close()
            w.check()


async def test_chat_over_https_and_wss(tmp_path: Path, shots_dir: Path) -> None:
    async with tls_web(tmp_path, shots_dir, "tls_chat") as web:
        alice = await web.user("alice", register_in_page=True)  # registers through the HTTPS page
        bob = await web.user("bob", register_in_page=True)
        assert alice.page.url.startswith("https://127.0.0.1:")
        await alice.open_chat_with(bob)
        await alice.send("Hello over TLS")
        await expect(bob.conversation(alice.display).locator(".conv-preview")).to_have_text("Hello over TLS")
        await bob.open_conversation(alice.display)
        await bob.send("Encrypted both ways")
        await expect(alice.message("Encrypted both ways")).to_have_class("msg theirs")
        await expect(alice.message("Hello over TLS").locator(".status")).to_have_text("Read")
        sockets = [ws.url for _, ws in web.websockets]
        assert sockets and all(u.startswith("wss://127.0.0.1:") for u in sockets), sockets
        plain = [u for u in web.requests if u.startswith(("http://", "ws://"))]
        assert not plain, f"requests in clear from an https page: {plain}"
        await web.shot(alice.page, "tls-01-chat-over-https")


async def test_an_https_page_refuses_a_plaintext_chat_address(tmp_path: Path, shots_dir: Path) -> None:
    """The server (misconfigured) hands out ws:// to a page loaded over https: a clear message, no socket."""
    async with tls_web(tmp_path, shots_dir, "tls_refusal", public_ws=False) as web:
        alice = await web.user("alice", register_in_page=True)  # registering and logging in work (HTTPS); the chat
        # connection is refused
        banner = alice.page.locator("#banner-text")
        await expect(banner).to_contain_text("this page is encrypted (HTTPS)")
        await expect(banner).to_contain_text(re.compile(r"unencrypted chat address \(ws://127\.0\.0\.1:\d+/ws\)"))
        await expect(alice.page.locator("#banner-action")).to_have_text("Retry")
        await web.shot(alice.page, "tls-02-plaintext-chat-address-refused")
        await alice.page.click("#banner-action")  # retrying meets the same refusal
        await expect(banner).to_contain_text("Not connecting")
        assert not web.websockets, "a WebSocket was opened despite the refusal"
        refusals = [e for e in web.errors if "unencrypted chat address" in e]
        assert refusals, web.errors
        web.errors = [e for e in web.errors if e not in refusals]  # expected: the client says why it refused


@pytest.mark.parametrize(
    ("url", "page", "refused"),
    [
        ("wss://h/ws", "https:", False),
        ("ws://h/ws", "https:", True),
        ("ws://h/ws", "http:", False),
        ("wss://h/ws", "http:", False),
        ("http://h/ws", "http:", True),
        ("not a url", "https:", True),
    ],
)
async def test_insecure_gateway_rule(web: Web, url: str, page: str, refused: bool) -> None:
    """The rule itself, in the browser's own URL parser (plain page: the shared fixtures)."""
    ctx = await web.context()
    p = await web.page(ctx)
    result = await p.evaluate(
        "async ([url, page]) => (await import('/js/connection.js')).insecureGateway(url, page)", [url, page]
    )
    assert (result is not None) is refused, result
