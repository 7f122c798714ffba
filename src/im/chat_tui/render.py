"""Turning :mod:`im.chat_tui.model` state into Rich text: pure functions, no Textual, no I/O."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from rich.text import Text

from im.chat_tui.model import ChatState, ConvState, Outgoing
from im.client import Message

__all__ = ["body_text", "conversation_row", "status_line", "system_text", "timeline_text", "typing_line"]


def body_text(body: Any) -> str:
    """The text of a message body: ``{"text": ...}`` by convention, a plain string, or JSON otherwise."""
    if isinstance(body, dict) and isinstance(body.get("text"), str):
        return str(body["text"])
    if isinstance(body, str):
        return body
    return json.dumps(body, ensure_ascii=False)


def system_text(state: ChatState, body: Any) -> str:
    """A group event (docs/protocol.md section 17) in words."""
    if not isinstance(body, dict):
        return body_text(body)

    def names(uids: Any) -> str:
        return ", ".join(state.name(u) for u in uids or () if isinstance(u, int))

    by = state.name(body["by"]) if isinstance(body.get("by"), int) else "someone"
    match body.get("event"):
        case "group_created":
            return f"{by} created the group {body.get('name', '')!r} with {names(body.get('uids'))}"
        case "members_added":
            return f"{by} added {names(body.get('uids'))}"
        case "member_removed":
            return f"{by} removed {names([body.get('uid')])}"
        case "member_left":
            return f"{names([body.get('uid')])} left"
        case "role_changed":
            return f"{by} made {names([body.get('uid')])} {body.get('role', '')}"
    return body_text(body)


def _clock(ts_ms: int) -> str:
    return datetime.fromtimestamp(ts_ms / 1000).strftime("%H:%M")


def preview(state: ChatState, msg: Message | None) -> str:
    if msg is None:
        return "no messages yet"
    if msg.type == "system":
        return system_text(state, msg.body)
    who = "you" if msg.sender == state.uid else state.name(msg.sender)
    return f"{who}: {body_text(msg.body)}"


def conversation_row(state: ChatState, conv: ConvState, width: int = 30) -> Text:
    """Two lines of the conversation list: title and unread count, then the last message (or typing)."""
    row = Text()
    row.append(("# " if conv.kind == "group" else "@ ") + conv.title, style="bold" if conv.unread else "")
    if conv.unread:
        row.append(f" ({conv.unread})", style="bold reverse")
    typing = state.typing_names(conv.conv)
    second = f"{', '.join(typing)} typing…" if typing else preview(state, conv.last_message)
    if len(second) > width:
        second = second[: width - 1] + "…"
    row.append("\n  " + second, style="italic dim" if typing else "dim")
    return row


def _line(state: ChatState, conv: ConvState, msg: Message) -> Text:
    line = Text(f"{_clock(msg.ts)} ", style="dim")
    if msg.type == "system":
        line.append(f"* {system_text(state, msg.body)}", style="italic cyan")
        return line
    mine = msg.sender == state.uid
    line.append("you" if mine else state.name(msg.sender), style="bold green" if mine else "bold blue")
    line.append(": " + body_text(msg.body))
    if msg.type != "text":
        line.append(f" [{msg.type}]", style="dim")
    if mine:
        line.append("  ✓✓ read" if conv.others_read >= msg.seq else "  ✓ sent", style="dim green")
    return line


def _pending_line(out: Outgoing) -> Text:
    line = Text("      ", style="dim")
    line.append("you", style="bold green")
    line.append(": " + body_text(out.body))
    if out.status == "sending":
        line.append("  sending…", style="dim yellow")
    else:
        line.append(f"  failed ({out.error}) — ctrl+r to retry", style="bold red")
    return line


def timeline_text(state: ChatState, conv: ConvState) -> Text:
    """The open conversation: stored messages by seq, then what is still being sent."""
    lines: list[Text] = []
    if conv.has_older:
        lines.append(Text("↑ older messages (ctrl+o, or page up at the top)", style="dim"))
    elif conv.history_loaded and not conv.messages and not conv.pending:
        lines.append(Text("no messages yet: say hello", style="dim"))
    lines.extend(_line(state, conv, m) for m in conv.timeline())
    lines.extend(_pending_line(out) for out in conv.pending.values())
    return Text("\n").join(lines)


def typing_line(state: ChatState, conv: str) -> str:
    names = state.typing_names(conv)
    if not names:
        return ""
    return f"{', '.join(names)} {'is' if len(names) == 1 else 'are'} typing…"


def status_line(state: ChatState, server: str, transport: str) -> Text:
    marks = {
        "connected": ("●", "green"),
        "connecting": ("◌", "yellow"),
        "reconnecting": ("◌", "yellow"),
        "offline": ("✗", "red"),
    }
    mark, color = marks[state.connection]
    line = Text(f"{mark} {state.connection}", style=f"bold {color}")
    line.append(f"  {state.username} @ {server} ({transport})", style="dim")
    if state.connection_detail:
        line.append(f"  — {state.connection_detail}", style="dim")
    return line
