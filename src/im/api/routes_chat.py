"""/groups and /conversations: thin calls into the chat core (group writes, and reads), which owns every
membership rule."""

# No "from __future__ import annotations": FastAPI must resolve the local ``Me`` alias at runtime.

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import msgspec
from fastapi import APIRouter, Depends, Path, Query, Response, status

from im.api.deps import ChatReadApi, ChatWriteApi
from im.api.schemas import (
    ConversationOut,
    GroupIn,
    GroupOut,
    MemberOut,
    MembersIn,
    MessagesOut,
    PresenceOut,
    ReceiptOut,
    RoleIn,
)
from im.config import LimitsConfig
from im.core.accounts import Principal
from im.model.chat import StoredMessage
from im.model.errors import ErrorCode, ImError
from im.model.ids import MAX_ID
from im.protocol.messages import msg_frame

_json = msgspec.json.Encoder()
#: Most users one ``GET /presence`` may ask about.
MAX_PRESENCE_UIDS = 100


def _json_response(value: Any) -> Response:
    # Stored bodies are JSON text already: msg_frame embeds them raw instead of parsing and re-encoding.
    return Response(_json.encode(value), media_type="application/json")


def _msg(m: StoredMessage | None) -> Any:
    return None if m is None else msg_frame(m)


def chat_router(
    writes: ChatWriteApi,
    reads: ChatReadApi,
    principal: Callable[..., Awaitable[Principal]],
    limits: LimitsConfig,
) -> APIRouter:
    router = APIRouter()
    Me = Annotated[Principal, Depends(principal)]
    Gid = Annotated[int, Path(ge=1, le=MAX_ID)]
    Uid = Annotated[int, Path(ge=1, le=MAX_ID)]

    # --- groups -------------------------------------------------------------------------------------------

    @router.post("/groups", status_code=status.HTTP_201_CREATED, tags=["groups"])
    async def create_group(me: Me, body: GroupIn) -> GroupOut:
        """Create a group owned by the caller, with ``members`` as members."""
        if len(body.members) >= limits.max_group_members:
            raise ImError(ErrorCode.INVALID, f"a group has at most {limits.max_group_members} members")
        return GroupOut.of(await writes.create_group(me.uid, body.name, body.members))

    @router.get("/groups/{gid}", tags=["groups"])
    async def group(me: Me, gid: Gid) -> GroupOut:
        return GroupOut.of(await reads.group(me.uid, gid))

    @router.get("/groups/{gid}/members", tags=["groups"])
    async def members(me: Me, gid: Gid) -> list[MemberOut]:
        found = await reads.group_members(me.uid, gid)
        return [MemberOut(uid=uid, role=role) for uid, role in sorted(found.items())]

    @router.post("/groups/{gid}/members", status_code=status.HTTP_204_NO_CONTENT, tags=["groups"])
    async def add_members(me: Me, gid: Gid, body: MembersIn) -> Response:
        """Add members (owner or admin)."""
        if len(body.uids) > limits.max_group_members:
            raise ImError(ErrorCode.INVALID, f"a group has at most {limits.max_group_members} members")
        await writes.add_members(me.uid, gid, body.uids)
        return Response(status_code=status.HTTP_204_NO_CONTENT)

    @router.delete("/groups/{gid}/members/{uid}", status_code=status.HTTP_204_NO_CONTENT, tags=["groups"])
    async def remove_member(me: Me, gid: Gid, uid: Uid) -> Response:
        """Remove a member (owner, or admin removing a plain member)."""
        await writes.remove_member(me.uid, gid, uid)
        return Response(status_code=status.HTTP_204_NO_CONTENT)

    @router.post("/groups/{gid}/leave", status_code=status.HTTP_204_NO_CONTENT, tags=["groups"])
    async def leave(me: Me, gid: Gid) -> Response:
        await writes.leave_group(me.uid, gid)
        return Response(status_code=status.HTTP_204_NO_CONTENT)

    @router.put("/groups/{gid}/members/{uid}/role", status_code=status.HTTP_204_NO_CONTENT, tags=["groups"])
    async def set_role(me: Me, gid: Gid, uid: Uid, body: RoleIn) -> Response:
        """Make a member an admin or a plain member again (owner only)."""
        await writes.set_role(me.uid, gid, uid, body.role)
        return Response(status_code=status.HTTP_204_NO_CONTENT)

    # --- conversations ------------------------------------------------------------------------------------

    @router.get("/conversations", response_model=list[ConversationOut], tags=["conversations"])
    async def conversations(me: Me) -> Response:
        """The caller's conversations, most recently active first."""
        found = await reads.conversations(me.uid)
        return _json_response(
            [
                {
                    "conv": c.conv,
                    "kind": c.kind,
                    "title": c.title,
                    "unread": c.unread,
                    "last_seq": c.last_seq,
                    "read_seq": c.read_seq,
                    "last_message": _msg(c.last_message),
                    "peer": c.peer,
                }
                for c in found
            ]
        )

    @router.get("/conversations/{conv}/messages", response_model=MessagesOut, tags=["conversations"])
    async def messages(
        me: Me,
        conv: str,
        after: Annotated[int | None, Query(ge=0, le=MAX_ID, description="Oldest messages with seq > after")] = None,
        before: Annotated[int | None, Query(ge=1, le=MAX_ID, description="Newest messages with seq < before")] = None,
        limit: Annotated[int | None, Query(ge=1, le=MAX_ID, description="Page size (capped by the server)")] = None,
    ) -> Response:
        """A page of the conversation's log, ascending by seq. Neither ``after`` nor ``before``: the newest
        page. ``has_more`` says whether more messages lie beyond the page in the paging direction."""
        page = min(limit or 50, limits.history_page_max)
        found, has_more = await reads.history(me.uid, conv, after=after, before=before, limit=page)
        return _json_response({"messages": [msg_frame(m) for m in found], "has_more": has_more})

    @router.get("/conversations/{conv}/receipts", tags=["conversations"])
    async def receipts(me: Me, conv: str) -> list[ReceiptOut]:
        """Every member's read mark and delivery mark (the stored ones: what ``receipt`` frames announced
        while you were away). Members only."""
        found = await reads.receipts(me.uid, conv)
        return [ReceiptOut(uid=uid, read_seq=r, delivered_seq=d) for uid, (r, d) in found.items()]

    # --- presence -----------------------------------------------------------------------------------------

    @router.get("/presence", tags=["presence"])
    async def presence(
        me: Me,
        uids: Annotated[str, Query(max_length=2000, description="Comma-separated uids, at most 100")],
    ) -> list[PresenceOut]:
        """Which of the given users have a device online, in the order asked (duplicates dropped). Users
        you share no conversation with always read as offline."""
        try:
            wanted = list(dict.fromkeys(int(u) for u in uids.split(",") if u.strip()))
        except ValueError:
            raise ImError(ErrorCode.INVALID, "uids must be comma-separated integers") from None
        if not wanted or len(wanted) > MAX_PRESENCE_UIDS or min(wanted) < 1 or max(wanted) > MAX_ID:
            raise ImError(ErrorCode.INVALID, f"give 1 to {MAX_PRESENCE_UIDS} uids, each in 1..{MAX_ID}")
        found = await reads.online(me.uid, wanted)
        return [PresenceOut(uid=u, online=found.get(u, False)) for u in wanted]

    return router
