"""The API documentation page renders in a real browser with no internet access needed: Swagger UI from
im itself, under its Content-Security-Policy, with no request to another host and no CSP violation."""

from __future__ import annotations

from urllib.parse import urlsplit

from playwright.async_api import Browser, ConsoleMessage, Request, expect

from tests.support.server import ServerProcess


async def test_api_docs_render_offline_under_the_csp(server: ServerProcess, browser: Browser) -> None:
    context = await browser.new_context()
    page = await context.new_page()
    hosts: set[str] = set()
    console: list[str] = []
    errors: list[str] = []

    def on_request(request: Request) -> None:
        if not request.url.startswith("data:"):
            hosts.add(urlsplit(request.url).hostname or "")

    def on_console(message: ConsoleMessage) -> None:
        console.append(f"{message.type}: {message.text}")

    page.on("request", on_request)
    page.on("console", on_console)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        await page.goto(f"{server.api}/docs")
        await expect(page.locator(".swagger-ui .info .title")).to_contain_text("im")
        await expect(page.locator(".opblock-summary-path").first).to_be_visible()  # the routes are listed
        assert await page.locator(".opblock").count() > 10
    finally:
        await context.close()
    assert hosts == {"127.0.0.1"}, hosts
    assert not errors, errors
    assert not [line for line in console if "Content Security Policy" in line or "Refused" in line], console
