"""Request and response bodies of the HTTP API (they also make the OpenAPI document).

Values are checked for shape (422 ``invalid``: a missing field, a wrong JSON type) and for range (400
``invalid``: an id outside 1..2^63-1, a string with a NUL character, a list too short) here, and for
meaning in the core (400 ``invalid``). im.api.app tells the two kinds of validation error apart.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Field

from im.model.accounts import User
from im.model.chat import Group
from im.model.ids import MAX_ID

#: A uid or gid as the stores hold it (signed 64-bit, positive).
Id = Annotated[int, Field(ge=1, le=MAX_ID)]


def _no_nul(value: str) -> str:
    """PostgreSQL keeps no NUL in text: refuse it on both stores alike (400, not a 500 on one of them)."""
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


#: Text that a store keeps.
Text = Annotated[str, AfterValidator(_no_nul)]


class ErrorOut(BaseModel):
    code: str = Field(examples=["not_found"])
    message: str
    retry_after: float | None = Field(
        None, description="Seconds to wait before retrying (429, and 503 when known); also in Retry-After."
    )


class RegisterIn(BaseModel):
    username: Text = Field(description="3 to 32 of: letters, digits, '_', '.', '-'; unique ignoring case")
    password: Text
    display_name: Text | None = None


class LoginIn(BaseModel):
    username: Text
    password: Text


class RefreshIn(BaseModel):
    refresh_token: Text


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
        return cls(uid=user.uid, username=user.username, display_name=user.display_name, created_at=user.created_at)


class GroupIn(BaseModel):
    name: Text
    members: list[Id] = Field(default_factory=list, description="Users to add besides the creator (owner).")


class GroupOut(BaseModel):
    gid: int
    conv: str = Field(description="The group's conversation id, 'g:<gid>'.")
    name: str
    owner: int
    created_at: int

    @classmethod
    def of(cls, group: Group) -> GroupOut:
        return cls(
            gid=group.gid,
            conv=f"g:{group.gid}",
            name=group.name,
            owner=group.owner,
            created_at=group.created_at,
        )


class MemberOut(BaseModel):
    uid: int
    role: Literal["owner", "admin", "member"]


class MembersIn(BaseModel):
    uids: list[Id] = Field(min_length=1)


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
    """``ok`` (200), or ``unavailable`` (503) with the names of what is not ready: engine checks that
    failed (``store``, ``presence``, ``registry``, ``events``), ``registered``, ``draining``."""

    status: Literal["ok", "unavailable"]
    failing: list[str] | None = None


# --- account controls and consent (routes_account) ---------------------------------------------------------


class PasswordChangeIn(BaseModel):
    current_password: Text = Field(max_length=1024)
    new_password: Text = Field(max_length=1024)


class PasswordIn(BaseModel):
    password: Text = Field(max_length=1024, description="The account's current password.")


class SessionOut(BaseModel):
    sid: str = Field(description="The session id (also in its access tokens); revoke it by this id.")
    created_at: int = Field(description="Login time, seconds since the epoch (0: before this was kept).")
    last_used: int = Field(description="Last login or refresh, seconds since the epoch.")
    expires_at: int = Field(description="When its refresh token stops working unless used.")
    current: bool = Field(description="The session of the token making this request.")


class DeviceOut(BaseModel):
    device: str
    last_active: int = Field(description="When the device last saved a delivery cursor, Unix seconds (0: never).")
    online: bool


class SettingsOut(BaseModel):
    contacts_only: bool = Field(description="Only your contacts may start a direct conversation with you.")


class SettingsIn(BaseModel):
    contacts_only: bool
