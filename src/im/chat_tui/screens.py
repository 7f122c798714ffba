"""The login screen and the two dialogs (new direct chat, new group). They collect input and hand it
to the app as a message or a dismiss result; they do no I/O themselves."""

from __future__ import annotations

from dataclasses import dataclass

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import ModalScreen, Screen
from textual.widgets import Button, Checkbox, Input, Label, Static

__all__ = ["GroupForm", "LoginForm", "LoginScreen", "NewChatScreen", "NewGroupScreen", "split_names"]


@dataclass(frozen=True)
class LoginForm:
    server: str
    username: str
    password: str
    register: bool


@dataclass(frozen=True)
class GroupForm:
    name: str
    members: list[str]


def split_names(text: str) -> list[str]:
    """``"bob, carol dave"`` -> ``["bob", "carol", "dave"]`` (order kept, duplicates dropped)."""
    names = [n for n in text.replace(",", " ").split() if n]
    return list(dict.fromkeys(names))


class LoginScreen(Screen[None]):
    """Server URL, user name, password and a register toggle. Posts :class:`LoginScreen.Submitted`."""

    class Submitted(Message):
        def __init__(self, form: LoginForm) -> None:
            super().__init__()
            self.form = form

    def __init__(self, *, server: str, username: str = "") -> None:
        super().__init__()
        self._server = server
        self._username = username

    def compose(self) -> ComposeResult:
        with Vertical(id="login-box"):
            yield Static("im chat", id="login-title")
            yield Label("Server")
            yield Input(self._server, placeholder="http://127.0.0.1:8080", id="server")
            yield Label("User name")
            yield Input(self._username, placeholder="alice", id="username")
            yield Label("Password")
            yield Input(placeholder="at least 8 characters", password=True, id="password")
            yield Checkbox("Register a new account", id="register")
            yield Button("Log in", variant="primary", id="submit")
            yield Static("", id="login-error")

    def on_mount(self) -> None:
        self.query_one("#password" if self._username else "#username", Input).focus()

    @on(Checkbox.Changed, "#register")
    def _toggle(self, event: Checkbox.Changed) -> None:
        self.query_one("#submit", Button).label = "Register and log in" if event.value else "Log in"

    @on(Input.Submitted, "#server")
    def _next_from_server(self) -> None:
        self.query_one("#username", Input).focus()

    @on(Input.Submitted, "#username")
    def _next_from_username(self) -> None:
        self.query_one("#password", Input).focus()

    @on(Input.Submitted, "#password")
    @on(Button.Pressed, "#submit")
    def submit(self) -> None:
        form = LoginForm(
            server=self.query_one("#server", Input).value.strip(),
            username=self.query_one("#username", Input).value.strip(),
            password=self.query_one("#password", Input).value,
            register=self.query_one("#register", Checkbox).value,
        )
        if not form.server or not form.username or not form.password:
            self.show_error("server, user name and password are needed")
            return
        self.set_busy(True)
        self.post_message(self.Submitted(form))

    def set_busy(self, busy: bool) -> None:
        self.query_one("#submit", Button).disabled = busy
        if busy:
            self.query_one("#login-error", Static).update("connecting…")

    def show_error(self, text: str) -> None:
        self.set_busy(False)
        self.query_one("#login-error", Static).update(text)


class NewChatScreen(ModalScreen[str | None]):
    """Ask for a user name; dismissed with it (or None on Escape)."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("New direct chat with (user name):")
            yield Input(placeholder="bob", id="peer")
            with Horizontal(classes="buttons"):
                yield Button("Start", variant="primary", id="start")
                yield Button("Cancel", id="cancel")

    @on(Input.Submitted, "#peer")
    @on(Button.Pressed, "#start")
    def _start(self) -> None:
        name = self.query_one("#peer", Input).value.strip()
        if name:
            self.dismiss(name)

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)


class NewGroupScreen(ModalScreen[GroupForm | None]):
    """Ask for a group name and member user names; dismissed with a :class:`GroupForm` (None: Escape)."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("New group")
            yield Input(placeholder="group name", id="group-name")
            yield Input(placeholder="members: bob, carol", id="group-members")
            yield Static("", id="group-error")
            with Horizontal(classes="buttons"):
                yield Button("Create", variant="primary", id="create")
                yield Button("Cancel", id="cancel")

    @on(Input.Submitted, "#group-name")
    def _next(self) -> None:
        self.query_one("#group-members", Input).focus()

    @on(Input.Submitted, "#group-members")
    @on(Button.Pressed, "#create")
    def _create(self) -> None:
        name = self.query_one("#group-name", Input).value.strip()
        if not name:
            self.query_one("#group-error", Static).update("the group needs a name")
            self.query_one("#group-name", Input).focus()
            return
        self.dismiss(GroupForm(name, split_names(self.query_one("#group-members", Input).value)))

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)
