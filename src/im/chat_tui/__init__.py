"""``im chat``: a terminal chat client (Textual) built on the Python SDK (:mod:`im.client`).

Modules, from the screen down::

    app.py          ChatApp: wires screens, state and service; every I/O call in a worker
    screens.py      login screen, "new chat" and "new group" dialogs (input only)
    chat_screen.py  conversation list, open conversation, input box, connection line (layout only)
    render.py       state -> Rich text (pure)
    model.py        ChatState: conversations, timelines by seq, outbox, typing, connection (pure)
    service.py      ChatService: the SDK (ApiClient + Client) behind the few calls the app makes

Keys: Tab / Shift+Tab move between the list, the messages and the input box; arrows and Enter choose a
conversation; Enter sends; Ctrl+N new direct chat; Ctrl+G new group; Ctrl+O (or Page Up at the top)
older messages; Ctrl+R retry failed sends; Ctrl+Q quit.
"""

from __future__ import annotations

from typing import Literal

from im.chat_tui.app import ChatApp
from im.chat_tui.model import ChatState
from im.chat_tui.service import ChatService, LoginError

__all__ = ["ChatApp", "ChatService", "ChatState", "LoginError", "run"]


def run(
    *,
    server: str,
    username: str = "",
    device: str = "im-chat",
    transport: Literal["ws", "tcp"] = "ws",
    ca_file: str | None = None,
    insecure_skip_verify: bool = False,
) -> int:
    """Run the client in this terminal until the user quits. ``ca_file``: trust only this CA for an
    ``https://`` server (None: the system store); ``insecure_skip_verify``: verify nothing (warned)."""
    ChatApp(
        server=server,
        username=username,
        device=device,
        transport=transport,
        ca_file=ca_file,
        insecure_skip_verify=insecure_skip_verify,
    ).run()
    return 0
