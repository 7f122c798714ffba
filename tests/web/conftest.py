"""Browser tests of the web client: a real ``im serve`` per test, headless Chromium (Debian's package,
``/usr/bin/chromium``) driven by Playwright.

A missing browser fails these tests, never skips them (``scripts/test.sh`` installs it). Screenshots go
to ``$IM_TEST_ARTIFACTS`` (default ``test-artifacts/screenshots/`` at the repository root).

Every page records the URL of each request and WebSocket it opens, every uncaught script error and what
the client logs as refused or failed; when the test ends, all requests must have stayed on 127.0.0.1 and
there must be no error.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import pytest_asyncio
from playwright.async_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Locator,
    Page,
    ViewportSize,
    WebSocket,
    async_playwright,
    expect,
)

from tests.support.client import Account, register
from tests.support.server import ServerProcess, running_server

CHROMIUM = os.environ.get("IM_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-quic",
    "--disable-sync",
]
REPO = Path(__file__).resolve().parents[2]
PASSWORD = "correct horse battery"
DESKTOP: ViewportSize = {"width": 1100, "height": 720}
PHONE: ViewportSize = {"width": 390, "height": 780}

# Generous: a loaded 2-core CI machine runs the server, two or three pages and the test at once.
expect.set_options(timeout=20_000)


# WCAG contrast of the visible text of these elements against the first opaque background behind it.
TEXT = [
    "#me-name",
    "#me-username",
    ".list-heading",
    ".conv-title",
    ".conv-preview",
    ".conv-time",
    ".badge",
    "#chat-title",
    "#chat-subtitle",
    ".msg .text",
    ".msg .meta time",
    ".msg .status",
    ".msg .sender",
    ".msg.system span",
    ".file-name",
    ".file-size",
    "#typing",
    "#banner-text",
    ".banner-action",
    "button.primary",
    "button.secondary",
    "button.ghost",
    "#login-view label",
    "#login-view [role=tab]",
    ".role",
    ".member-name",
]
CONTRAST_JS = """(selectors) => {
    const channel = (v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; };
    const luminance = ([r, g, b]) => 0.2126 * channel(r) + 0.7152 * channel(g) + 0.0722 * channel(b);
    const rgba = (s) => (s.match(/[\\d.]+/g) || []).map(Number);
    const background = (el) => {
        for (; el; el = el.parentElement) {
            const c = rgba(getComputedStyle(el).backgroundColor);
            if (c.length === 3 || (c.length === 4 && c[3] === 1)) return c.slice(0, 3);
        }
        return [255, 255, 255];
    };
    const found = [];
    for (const selector of selectors) {
        for (const el of document.querySelectorAll(selector)) {
            if (!el.checkVisibility() || !el.textContent.trim()) continue;
            const text = luminance(rgba(getComputedStyle(el).color));
            const [hi, lo] = [text, luminance(background(el))].sort((a, b) => b - a);
            found.push([selector, el.textContent.trim().slice(0, 40), (hi + 0.05) / (lo + 0.05)]);
        }
    }
    return found;
}"""


def unique(name: str) -> str:
    return f"{name}_{uuid.uuid4().hex[:6]}"


@pytest.fixture
def server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    """A real ``im serve``; ``@pytest.mark.parametrize("server", [[...flags]], indirect=True)`` adds flags."""
    with running_server(tmp_path / "data", getattr(request, "param", None)) as proc:
        yield proc


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The browser is started once for all web tests, so they share one event loop (the session's)."""
    here = Path(__file__).parent
    for item in items:
        if item.path.is_relative_to(here) and pytest_asyncio.is_async_test(item):
            item.add_marker(pytest.mark.asyncio(loop_scope="session"), append=False)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def browser() -> AsyncIterator[Browser]:
    """One headless Chromium for the session; each test works in browser contexts of its own."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: install it with 'apt-get install -y chromium' (scripts/test.sh does)")
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            await b.close()


@pytest.fixture(scope="session")
def shots_dir() -> Path:
    path = Path(os.environ.get("IM_TEST_ARTIFACTS") or REPO / "test-artifacts" / "screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class WebUser:
    """One user in one browser context (its own storage), with the page that shows the chat."""

    name: str  # user name; the display name is the capitalised first part ("alice_1a2b3c" -> "Alice")
    context: BrowserContext
    page: Page
    account: Account | None = None  # tokens of a login made over the API (for checks through the API)
    uid: int = 0

    def conv_with(self, other: WebUser) -> str:
        return f"d:{min(self.uid, other.uid)}:{max(self.uid, other.uid)}"

    @property
    def display(self) -> str:
        return self.name.split("_")[0].capitalize()

    async def login(self) -> None:
        page = self.page
        await page.fill("#login-username", self.name)
        await page.fill("#login-password", PASSWORD)
        await page.press("#login-password", "Enter")
        await expect(page.locator("#app-view")).to_be_visible()
        await expect(page.locator("#me-name")).to_have_text(self.display)

    async def open_chat_with(self, other: WebUser) -> None:
        """Search ``other`` by name and open the direct conversation."""
        page = self.page
        await page.fill("#search", other.name[:5])
        await page.locator("#people button", has_text=other.display).click()
        await expect(page.locator("#chat-title")).to_have_text(other.display)

    def conversation(self, title: str) -> Locator:
        """The conversation list's entry titled exactly ``title``."""
        return self.page.locator("#conv-list .conv").filter(
            has=self.page.locator(".conv-title").get_by_text(title, exact=True)
        )

    async def open_conversation(self, title: str) -> None:
        await self.conversation(title).click()
        await expect(self.page.locator("#chat-title")).to_have_text(title)

    async def send(self, text: str) -> None:
        await self.page.fill("#message-input", text)
        await self.page.press("#message-input", "Enter")

    def message(self, text: str) -> Locator:
        """The message items of the open conversation whose text is exactly ``text``."""
        return self.page.locator("#messages li.msg").filter(has=self.page.get_by_text(text, exact=True))

    @property
    def texts(self) -> Locator:
        """The text messages of the open conversation, in order (``expect(...).to_have_text([...])``)."""
        return self.page.locator("#messages li.msg:not(.system) .text")


@dataclass
class Web:
    """Makes users and their pages; checks what every page did when the test ends."""

    server: ServerProcess
    browser: Browser
    shots: Path
    test_name: str
    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    contexts: list[BrowserContext] = field(default_factory=list)
    websockets: list[tuple[Page, WebSocket]] = field(default_factory=list)  # every page's, in opening order
    #: Where the pages load from (None: the server's plaintext HTTP address; the TLS tests give https://).
    origin: str | None = None

    async def context(self, viewport: ViewportSize | None = None) -> BrowserContext:
        ctx = await self.browser.new_context(viewport=viewport or DESKTOP, locale="en-GB", timezone_id="UTC")
        self.contexts.append(ctx)
        return ctx

    async def page(self, ctx: BrowserContext) -> Page:
        page = await ctx.new_page()
        page.on("request", lambda r: self.requests.append(r.url))

        def websocket(ws: WebSocket) -> None:
            self.requests.append(ws.url)
            self.websockets.append((page, ws))

        page.on("websocket", websocket)
        page.on("pageerror", lambda e: self.errors.append(f"{page.url}: {e}"))

        def console(m: ConsoleMessage) -> None:
            # The client warns of what the server refused and what failed (console.warn, console.error) with
            # an "im: " prefix: none expected. Its information lines (console.info: a reconnect's wait) are not.
            if m.type in ("error", "warning") and m.text.startswith("im: "):
                self.errors.append(m.text)

        page.on("console", console)
        await page.goto(f"{self.origin or self.server.http}/")
        return page

    def sockets(self, page: Page) -> list[WebSocket]:
        """The WebSockets ``page`` opened (the chat connection and its reconnects), oldest first."""
        return [ws for p, ws in self.websockets if p is page]

    async def user(self, name: str, *, register_in_page: bool = False, viewport: ViewportSize | None = None) -> WebUser:
        """A user logged in on a new page of a new browser context."""
        username = unique(name)
        ctx = await self.context(viewport)
        page = await self.page(ctx)
        user = WebUser(username, ctx, page)
        if register_in_page:
            await page.click("#tab-register")
            await page.fill("#login-display-name", user.display)
        else:
            user.account = await register(self.server.api, username, PASSWORD, display_name=user.display)
        await user.login()
        user.uid = await page.evaluate("JSON.parse(localStorage.getItem('im.auth')).uid")
        return user

    async def shot(self, page: Page, name: str) -> Path:
        path = self.shots / f"{name}.png"
        await page.screenshot(path=str(path), animations="disabled", caret="hide")
        return path

    async def assert_readable(self, page: Page, minimum: float = 4.5) -> None:
        """Every visible text of the main elements has at least WCAG AA contrast (4.5:1)."""
        found = await page.evaluate(CONTRAST_JS, TEXT)
        assert len(found) >= 5, f"too few texts checked: {found}"
        poor = [(sel, text, round(ratio, 2)) for sel, text, ratio in found if ratio < minimum]
        assert not poor, f"text with contrast below {minimum}:1: {poor}"

    def check(self) -> None:
        assert self.requests, "no request was recorded"
        # blob: and data: URLs never touch the network (image previews, downloads made in the page).
        remote = [u for u in self.requests if not u.startswith(("blob:", "data:"))]
        outside = sorted({u for u in remote if urlsplit(u).hostname != "127.0.0.1"})
        assert not outside, f"requests left for other hosts: {outside}"
        assert not self.errors, f"script errors or refusals: {self.errors}"


@pytest_asyncio.fixture(loop_scope="session")
async def web(
    server: ServerProcess, browser: Browser, shots_dir: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Web]:
    w = Web(server, browser, shots_dir, re.sub(r"\W+", "_", request.node.name))
    yield w
    for ctx in w.contexts:
        await ctx.close()
    w.check()
