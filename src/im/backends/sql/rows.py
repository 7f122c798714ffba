"""Row shapes shared by the SQL adapters (SQLite and PostgreSQL): one definition of each mapping."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from im.model.accounts import User
from im.model.chat import ConversationSummary, StoredMessage

USER_COLUMNS = "uid, username, display_name, created_at"


def user_from_row(row: Sequence[Any]) -> User:
    return User(uid=row[0], username=row[1], display_name=row[2], created_at=row[3])


def like_prefix(prefix: str) -> str:
    """A LIKE pattern matching ``prefix`` literally at the start (escape character ``\\``)."""
    escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped + "%"


def conversation_summary(
    conv: str, kind: str, title: object, last_seq: int, read_seq: int, last: StoredMessage | None, peer: int | None
) -> ConversationSummary:
    """One row of a user's conversation list; ``unread`` is what lies past the read mark."""
    return ConversationSummary(
        conv=conv,
        kind=kind,
        title=str(title),
        last_seq=last_seq,
        read_seq=read_seq,
        unread=max(0, last_seq - read_seq),
        last_message=last,
        peer=peer,
    )
