"""Helpers to drive :class:`ChatApp` through Textual's ``Pilot`` and a second user through the SDK."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from textual.pilot import Pilot

from im.chat_tui import ChatApp
from im.chat_tui.chat_screen import ChatScreen
from im.client import Client, ClientEvent, Message
from tests.support.client import Account
from tests.support.server import ServerProcess

PASSWORD = "correct horse battery"
SIZE = (120, 32)
devices = itertools.count(1)


class Peer:
    """Another user, on the SDK ``Client``, recording every event it takes from ``events()``."""

    def __init__(self, account: Account, client: Client) -> None:
        self.account = account
        self.client = client
        self.events: list[ClientEvent] = []
        self._changed = asyncio.Event()
        self._task = asyncio.create_task(self._consume())

    @property
    def uid(self) -> int:
        return self.account.uid

    async def _consume(self) -> None:
        async for event in self.client.events():
            self.events.append(event)
            self._changed.set()

    def messages(self, conv: str | None = None) -> list[Message]:
        return [e for e in self.events if isinstance(e, Message) and (conv is None or e.conv == conv)]

    async def wait(self, predicate: Callable[[], bool], timeout: float = 15.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

    async def close(self) -> None:
        await self.client.close()
        await self._task


async def wait_until(pilot: Pilot[Any], predicate: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    """Let the app run until ``predicate()`` holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for: {what}")
        await pilot.pause(0.02)


async def type_text(pilot: Pilot[Any], text: str) -> None:
    """Type ``text`` key by key into the focused widget."""
    await pilot.press(*["space" if ch == " " else ch for ch in text])


def chat_screen(app: ChatApp) -> ChatScreen:
    assert app.chat is not None, "not logged in"
    return app.chat


async def login(pilot: Pilot[Any], account: Account, password: str = PASSWORD) -> ChatScreen:
    """Fill in the login screen by keyboard and wait for the connected chat screen."""
    app = pilot.app
    assert isinstance(app, ChatApp)
    await pilot.click("#username")
    await type_text(pilot, account.username)
    await pilot.press("enter")  # moves to the password box
    await type_text(pilot, password)
    await pilot.press("enter")
    await wait_until(pilot, lambda: isinstance(app.screen, ChatScreen), "the chat screen")
    await wait_until(pilot, lambda: app.state is not None and app.state.connection == "connected", "connected")
    return chat_screen(app)


def new_app(server: ServerProcess, **kwargs: Any) -> ChatApp:
    kwargs.setdefault("device", f"tui-{next(devices)}")
    return ChatApp(server=server.http, client_options={"backoff_max": 0.5}, **kwargs)


def save(app: ChatApp, folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = Path(app.save_screenshot(f"{name}.svg", str(folder)))
    print(f"\nscreenshot: {path}")
    return path


def to_png(svg: Path) -> Path | None:
    """Convert with cairosvg when it (and libcairo) is there; None otherwise."""
    try:
        import cairosvg
    except (ImportError, OSError):
        return None
    png = svg.with_suffix(".png")
    cairosvg.svg2png(url=str(svg), write_to=str(png), output_width=1600)
    print(f"screenshot: {png}")
    return png
