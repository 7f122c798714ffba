"""Request and response bodies of the HTTP API (they also make the OpenAPI document).

Values are checked for shape here (422 ``invalid``) and for meaning in the core (400 ``invalid``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from im.backends.base import Group, User


class ErrorOut(BaseModel):
    code: str = Field(examples=["not_found"])
    message: str
    retry_after: float | None = Field(
        None, description="Seconds to wait before retrying (429, and 503 when known); also in Retry-After."
    )


class RegisterIn(BaseModel):
    username: str = Field(description="3 to 32 of: letters, digits, '_', '.', '-'; unique ignoring case")
    password: str
    display_name: str | None = None


class LoginIn(BaseModel):
    username: str
    password: str


class RefreshIn(BaseModel):
    refresh_token: str


class TokensOut(BaseModel):
    access_token: str
    refresh_token: str = Field(description="Single use: every refresh returns a new one.")
    token_type: str = "bearer"
    expires_in: int = Field(description="Seconds the access token is valid.")
    uid: int


class UserOut(BaseModel):
    uid: int
    username: str
    display_name: str
    created_at: int

    @classmethod
    def of(cls, user: User) -> UserOut:
        return cls(
            uid=user.uid, username=user.username, display_name=user.display_name, created_at=user.created_at
        )


class GroupIn(BaseModel):
    name: str
    members: list[int] = Field(default_factory=list, description="Users to add besides the creator (owner).")


class GroupOut(BaseModel):
    gid: int
    conv: str = Field(description="The group's conversation id, 'g:<gid>'.")
    name: str
    owner: int
    created_at: int

    @classmethod
    def of(cls, group: Group) -> GroupOut:
        return cls(
            gid=group.gid, conv=f"g:{group.gid}", name=group.name, owner=group.owner,
            created_at=group.created_at,
        )


class MemberOut(BaseModel):
    uid: int
    role: Literal["owner", "admin", "member"]


class MembersIn(BaseModel):
    uids: list[int] = Field(min_length=1)


class RoleIn(BaseModel):
    role: Literal["admin", "member"]


class MessageOut(BaseModel):
    """A stored message, exactly as the WebSocket ``msg`` frame carries it."""

    t: Literal["msg"] = "msg"
    conv: str
    seq: int
    mid: str
    from_: int = Field(alias="from")
    dev: str
    cmid: str
    ts: int = Field(description="Milliseconds since the Unix epoch.")
    type: str
    body: Any


class MessagesOut(BaseModel):
    messages: list[MessageOut] = Field(description="Ascending by seq.")
    has_more: bool = Field(description="More messages lie beyond this page in the direction of paging.")


class ConversationOut(BaseModel):
    conv: str
    kind: Literal["direct", "group"]
    title: str
    unread: int
    last_seq: int
    read_seq: int
    last_message: MessageOut | None
    peer: int | None = Field(description="The other user of a direct conversation.")


class ReceiptOut(BaseModel):
    uid: int
    read_seq: int = Field(description="The member has read the conversation up to this seq.")
    delivered_seq: int = Field(
        description="At least one of the member's devices holds the conversation up to this seq (>= read_seq)."
    )


class PresenceOut(BaseModel):
    uid: int
    online: bool = Field(description="A device of the user is connected; always false for strangers.")


class GatewayOut(BaseModel):
    ws: str = Field(examples=["ws://127.0.0.1:8081/ws"])
    tcp: str | None = Field(None, examples=["tcp://127.0.0.1:8082"], description="None when TCP is off.")
    node: str


class HealthOut(BaseModel):
    status: Literal["ok"]
