"""The main screen: connection line, conversation list, the open conversation and the input box.

It only lays out and forwards: what to show comes from the app (already rendered by
:mod:`im.chat_tui.render`), and what the user does goes back to the app as the messages below.
"""

from __future__ import annotations

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Input, Label, OptionList, Static
from textual.widgets.option_list import Option

__all__ = ["ChatScreen", "TimelineView"]


class TimelineView(VerticalScroll):
    """The messages of the open conversation; Page Up at the top asks for older ones."""

    class LoadOlder(Message):
        pass

    def compose(self) -> ComposeResult:
        yield Static("", id="timeline")

    def action_page_up(self) -> None:
        if self.scroll_y <= 0:
            self.post_message(self.LoadOlder())
        else:
            super().action_page_up()


class ChatScreen(Screen[None]):
    class Open(Message):
        """The user chose a conversation."""

        def __init__(self, conv: str) -> None:
            super().__init__()
            self.conv = conv

    class SendText(Message):
        """The user pressed Enter in the input box."""

        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

    class Typed(Message):
        """The user changed the text in the input box."""

    def __init__(self) -> None:
        super().__init__()
        self.timeline_plain = ""  # what the timeline shows, as plain text (tests read it)
        self.rows_plain: dict[str, str] = {}  # conv -> its row in the list, as plain text

    def compose(self) -> ComposeResult:
        yield Static("", id="status")
        with Horizontal():
            with Vertical(id="sidebar"):
                yield Label("Conversations", id="sidebar-title")
                yield OptionList(id="convs")
            with Vertical(id="main"):
                yield Static("Choose a conversation (↑↓ Enter), or ctrl+n / ctrl+g to start one", id="conv-title")
                yield TimelineView(id="timeline-scroll")
                yield Static("", id="typing")
                yield Input(placeholder="Type a message, Enter sends", id="compose", disabled=True)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#convs", OptionList).focus()

    # --- what the app shows ---------------------------------------------------------------------------

    def show_status(self, line: Text) -> None:
        self.query_one("#status", Static).update(line)

    def show_conversations(self, rows: list[tuple[str, Text]], selected: str | None) -> None:
        """Replace the list; the highlight stays on ``selected`` (or on the conversation it was on)."""
        options = self.query_one("#convs", OptionList)
        current = None
        if options.highlighted is not None and options.option_count:
            current = options.get_option_at_index(options.highlighted).id
        options.clear_options()
        options.add_options([Option(text, id=conv) for conv, text in rows])
        self.rows_plain = {conv: text.plain for conv, text in rows}
        keep = current if current in self.rows_plain else selected
        if keep in self.rows_plain:
            options.highlighted = options.get_option_index(keep)
        elif rows:
            options.highlighted = 0

    def show_conversation(self, title: str, timeline: Text, *, scroll_end: bool) -> None:
        self.query_one("#conv-title", Static).update(Text(title, style="bold"))
        self.query_one("#timeline", Static).update(timeline)
        self.timeline_plain = timeline.plain
        compose = self.query_one("#compose", Input)
        compose.disabled = False
        if scroll_end:
            self.query_one(TimelineView).scroll_end(animate=False, immediate=False)

    def show_typing(self, text: str) -> None:
        self.query_one("#typing", Static).update(Text(text, style="italic dim"))

    def focus_compose(self) -> None:
        self.query_one("#compose", Input).focus()

    # --- what the user does ---------------------------------------------------------------------------

    @on(OptionList.OptionSelected, "#convs")
    def _selected(self, event: OptionList.OptionSelected) -> None:
        if event.option_id is not None:
            self.post_message(self.Open(event.option_id))

    @on(Input.Submitted, "#compose")
    def _submitted(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if text:
            event.input.value = ""
            self.post_message(self.SendText(text))

    @on(Input.Changed, "#compose")
    def _changed(self, event: Input.Changed) -> None:
        if event.value:
            self.post_message(self.Typed())
