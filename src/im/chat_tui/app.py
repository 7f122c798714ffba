"""``ChatApp``: the Textual application. It wires three things together and holds no rules of its own:

    screens (screens.py, chat_screen.py)  --user actions-->  ChatApp  --calls-->  ChatService (SDK)
    screens  <--rendered text (render.py)--  ChatApp  <--events, pages--  ChatService
                                              |  ChatState (model.py): what is shown, updated by both

Every I/O call runs in a Textual worker; a failure becomes a notification, never a crash.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Literal

from textual import on
from textual.app import App
from textual.binding import Binding

from im.chat_tui.chat_screen import ChatScreen, TimelineView
from im.chat_tui.model import ChatState, Update
from im.chat_tui.render import conversation_row, status_line, timeline_text, typing_line
from im.chat_tui.screens import GroupForm, LoginScreen, NewChatScreen, NewGroupScreen
from im.chat_tui.service import ChatService, LoginError
from im.client import ClientClosed

__all__ = ["ChatApp"]

log = logging.getLogger(__name__)

TYPING_EVERY = 3.0  # seconds between two typing notices while the user types

Connect = Callable[..., Awaitable[ChatService]]

CSS = """
LoginScreen, NewChatScreen, NewGroupScreen { align: center middle; }
#login-box { width: 64; height: auto; border: round $accent; padding: 1 2; }
#login-title { text-style: bold; content-align: center middle; width: 100%; margin-bottom: 1; }
#login-box Button { margin-top: 1; }
#login-error { color: $error; height: auto; margin-top: 1; }
#status { height: 1; padding: 0 1; background: $boost; }
#sidebar { width: 38; border-right: solid $primary; }
#sidebar-title { padding: 0 1; text-style: bold; }
#convs { height: 1fr; border: none; }
#main { width: 1fr; }
#conv-title { height: 1; padding: 0 1; background: $panel; }
#timeline-scroll { height: 1fr; padding: 0 1; }
#typing { height: 1; padding: 0 1; }
.dialog { width: 64; height: auto; border: thick $accent; padding: 1 2; background: $surface; }
.dialog Input { margin-bottom: 1; }
#group-error { color: $error; height: auto; }
.buttons { height: auto; align-horizontal: right; }
.buttons Button { margin-left: 1; }
"""


class ChatApp(App[None]):
    """The chat client. ``connect`` builds the :class:`ChatService` (tests may pass their own)."""

    CSS = CSS
    TITLE = "im chat"
    BINDINGS = [
        Binding("ctrl+q", "quit", "Quit", priority=True),
        Binding("ctrl+n", "new_chat", "New chat"),
        Binding("ctrl+g", "new_group", "New group"),
        Binding("ctrl+o", "older", "Older"),
        Binding("ctrl+r", "retry", "Retry failed"),
    ]

    def __init__(
        self,
        *,
        server: str = "http://127.0.0.1:8080",
        username: str = "",
        device: str = "im-chat",
        transport: Literal["ws", "tcp"] = "ws",
        connect: Connect = ChatService.connect,
        client_options: dict[str, Any] | None = None,
        ca_file: str | None = None,
        insecure_skip_verify: bool = False,
    ) -> None:
        super().__init__()
        self.server, self.username, self.device, self.transport = server, username, device, transport
        #: TLS: trust only this CA file (None: the system store); or verify nothing (warned on screen).
        self.ca_file, self.insecure_skip_verify = ca_file, insecure_skip_verify
        self._connect = connect
        self._client_options = client_options or {"backoff_max": 5.0}
        self.service: ChatService | None = None
        self.state: ChatState | None = None
        self.chat: ChatScreen | None = None
        self._typing_sent = 0.0
        self._refreshing = self._refresh_again = False
        self._loading: set[str] = set()
        self._resolving: set[int] = set()

    def on_mount(self) -> None:
        self.push_screen(LoginScreen(server=self.server, username=self.username))

    def _spawn(self, work: Coroutine[Any, Any, None], what: str) -> None:
        """Run ``work`` in a worker; an exception is shown, not raised."""

        async def guarded() -> None:
            try:
                await work
            except Exception as exc:
                log.debug("%s failed", what, exc_info=True)
                self.notify(f"{what} failed: {exc}", severity="error")

        self.run_worker(guarded(), group=what)

    # --- logging in -----------------------------------------------------------------------------------

    @on(LoginScreen.Submitted)
    def _login_submitted(self, event: LoginScreen.Submitted) -> None:
        self._spawn(
            self._login(event.form.server, event.form.username, event.form.password, event.form.register), "logging in"
        )

    def _tls_options(self) -> dict[str, Any]:
        """The TLS options for ChatService.connect (only those set: fakes need not take them)."""
        options: dict[str, Any] = {}
        if self.ca_file is not None:
            options["ca_file"] = self.ca_file
        if self.insecure_skip_verify:
            options["insecure_skip_verify"] = True
            self.notify(
                "TLS certificate verification is OFF (--insecure-skip-verify): anyone on the path can pose as "
                "the server and read this chat",
                severity="warning",
                timeout=15,
            )
        return options

    async def _login(self, server: str, username: str, password: str, register: bool) -> None:
        screen = self.screen
        try:
            service = await self._connect(
                server,
                username,
                password,
                register=register,
                device=self.device,
                transport=self.transport,
                **self._tls_options(),
                **self._client_options,
            )
        except LoginError as exc:
            if isinstance(screen, LoginScreen):
                screen.show_error(str(exc))
            return
        self.server, self.username, self.service = server, username, service
        self.state = ChatState(service.uid, username, device=service.device)
        self.chat = ChatScreen()
        await self.switch_screen(self.chat)
        self.sub_title = f"{username} @ {server}"
        self._redraw_status()
        self.run_worker(self._pump(service), group="events")
        await self._refresh_conversations()

    async def _pump(self, service: ChatService) -> None:
        async for event in service.events():
            assert self.state is not None
            self._apply(self.state.apply(event))

    # --- applying changes -----------------------------------------------------------------------------

    def _apply(self, update: Update) -> None:
        state, service = self.state, self.service
        assert state is not None and service is not None
        if update.read is not None:
            service.read(*update.read)
        if update.status:
            self._redraw_status()
        if update.unknown_conv:
            self._spawn(self._refresh_conversations(), "loading conversations")
        if update.typing_until is not None:
            self.set_timer(update.typing_until - time.monotonic() + 0.05, self._redraw)
        if update.convs:
            self._redraw(scroll_end=state.open_conv in update.convs)
        missing = state.unknown_uids() - self._resolving
        if missing:
            self._resolving |= missing
            self._spawn(self._resolve_names(missing), "looking up users")

    async def _resolve_names(self, uids: set[int]) -> None:
        assert self.service is not None and self.state is not None
        try:
            for uid in sorted(uids):
                self.state.names[uid] = (await self.service.user(uid)).display_name
        finally:
            self._resolving -= uids
        self._redraw()

    async def _refresh_conversations(self) -> None:
        """``GET /conversations`` into the state; concurrent asks coalesce into one more round."""
        if self._refreshing:
            self._refresh_again = True
            return
        assert self.service is not None and self.state is not None
        self._refreshing = True
        try:
            while True:
                self._refresh_again = False
                self.state.load_conversations(await self.service.conversations())
                self._redraw()
                if not self._refresh_again:
                    break
        finally:
            self._refreshing = False

    # --- drawing --------------------------------------------------------------------------------------

    def _redraw_status(self) -> None:
        if self.chat is not None and self.state is not None:
            self.chat.show_status(status_line(self.state, self.server, self.transport))

    def _redraw(self, scroll_end: bool = False) -> None:
        state, chat = self.state, self.chat
        if state is None or chat is None or not chat.is_mounted:
            return
        width = chat.query_one("#sidebar").size.width - 6
        rows = [(c.conv, conversation_row(state, c, max(width, 16))) for c in state.ordered()]
        chat.show_conversations(rows, state.open_conv)
        conv = state.convs.get(state.open_conv or "")
        if conv is not None:
            kind = "group" if conv.kind == "group" else "direct chat with"
            chat.show_conversation(f"{kind} {conv.title}", timeline_text(state, conv), scroll_end=scroll_end)
            chat.show_typing(typing_line(state, conv.conv))

    # --- user actions ---------------------------------------------------------------------------------

    @on(ChatScreen.Open)
    def _open(self, event: ChatScreen.Open) -> None:
        self.open_conversation(event.conv)

    def open_conversation(self, conv: str) -> None:
        assert self.state is not None and self.service is not None and self.chat is not None
        read = self.state.open(conv)
        if read is not None:
            self.service.read(*read)
        self._redraw(scroll_end=True)
        self.chat.focus_compose()
        if not self.state.convs[conv].history_loaded:
            self._spawn(self._load_history(conv), "loading history")

    async def _load_history(self, conv: str, *, older: bool = False) -> None:
        """The newest page (or, ``older``, the page before the oldest loaded), then any hole."""
        assert self.service is not None and self.state is not None
        if conv in self._loading:
            return
        self._loading.add(conv)
        try:
            state = self.state.convs[conv]
            before = state.oldest_seq if older else None
            if older and (before is None or before <= 1):
                return
            page = await self.service.history(conv, before=before)
            self._apply_page(conv, page.messages, scroll_end=not older)
            while (gap := state.gap()) is not None:
                page = await self.service.history(conv, after=gap[0], before=gap[1])
                if not page.messages:
                    break
                self._apply_page(conv, page.messages, scroll_end=not older)
        finally:
            self._loading.discard(conv)

    def _apply_page(self, conv: str, messages: list[Any], *, scroll_end: bool) -> None:
        assert self.state is not None
        update = self.state.merge_history(conv, messages)
        update.convs = set()  # redrawn below, keeping the scroll position when paging back
        self._apply(update)
        self._redraw(scroll_end=scroll_end)

    @on(ChatScreen.SendText)
    def _send_text(self, event: ChatScreen.SendText) -> None:
        state, service = self.state, self.service
        if state is None or service is None or state.open_conv is None:
            return
        cmid = service.new_cmid()
        self._typing_sent = 0.0  # done typing this one: the next keystroke announces typing again
        state.add_outgoing(state.open_conv, cmid, {"text": event.text})
        self._post(state.open_conv, cmid, {"text": event.text})

    def _post(self, conv: str, cmid: str, body: Any) -> None:
        assert self.state is not None and self.service is not None
        peer = self.state.convs[conv].peer
        try:
            self.service.post(conv, body, cmid, peer=peer)
        except ClientClosed as exc:
            self.state.failed(conv, cmid, f"offline: {exc}")
        self._redraw(scroll_end=True)

    @on(ChatScreen.Typed)
    def _typed(self) -> None:
        state, service = self.state, self.service
        now = time.monotonic()
        if state is None or service is None or state.open_conv is None or now - self._typing_sent < TYPING_EVERY:
            return
        self._typing_sent = now
        service.typing(state.open_conv)

    def action_retry(self) -> None:
        state, service = self.state, self.service
        if state is None or service is None or state.open_conv is None:
            return
        conv = state.convs[state.open_conv]
        for _ in [o for o in conv.pending.values() if o.status == "failed"]:
            out = state.retry(conv.conv, service.new_cmid())
            if out is not None:
                self._post(out.conv, out.cmid, out.body)

    @on(TimelineView.LoadOlder)
    def action_older(self) -> None:
        if self.state is not None and self.state.open_conv is not None:
            self._spawn(self._load_history(self.state.open_conv, older=True), "loading older messages")

    def action_new_chat(self) -> None:
        if self.service is not None:
            self.push_screen(NewChatScreen(), self._new_chat_chosen)

    def _new_chat_chosen(self, name: str | None) -> None:
        if name:
            self._spawn(self._start_chat(name), "starting a chat")

    async def _start_chat(self, name: str) -> None:
        assert self.service is not None and self.state is not None
        try:
            user = await self.service.user_by_name(name)
        except LookupError as exc:
            self.notify(str(exc), severity="error")
            return
        if user.uid == self.service.uid:
            self.notify("that is you: pick someone else", severity="warning")
            return
        self.open_conversation(self.state.start_direct(user.uid, user.display_name).conv)

    def action_new_group(self) -> None:
        if self.service is not None:
            self.push_screen(NewGroupScreen(), self._new_group_chosen)

    def _new_group_chosen(self, form: GroupForm | None) -> None:
        if form is not None:
            self._spawn(self._create_group(form), "creating the group")

    async def _create_group(self, form: GroupForm) -> None:
        assert self.service is not None and self.state is not None
        try:
            group = await self.service.create_group(form.name, form.members)
        except LookupError as exc:
            self.notify(str(exc), severity="error")
            return
        self.state.ensure(group.conv, "group", group.name)
        self.open_conversation(group.conv)
        await self._refresh_conversations()

    async def action_quit(self) -> None:
        await self.close_service()
        self.exit()

    async def close_service(self) -> None:
        if self.service is not None:
            await self.service.close()

    async def on_unmount(self) -> None:
        await self.close_service()
