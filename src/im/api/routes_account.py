"""Account controls and consent: password, sessions, devices, deletion; blocks and settings.

/account/password          POST    change the password (other sessions end)
/account/sessions          GET     my live sessions;  /account/sessions/{sid}  DELETE  end one
/account/logout-all        POST    end every session, this one included
/account/devices           GET     my devices, online or not
/account/delete            POST    delete the account (password needed)
/blocks                    GET     whom I block;  /blocks/{uid}  PUT block, DELETE unblock
/users/me/settings         GET, PUT   {contacts_only}
"""

# No "from __future__ import annotations": FastAPI must resolve the local ``Me`` alias at runtime.

from collections.abc import Awaitable, Callable
from typing import Annotated, Protocol

from fastapi import APIRouter, Depends, Path, Request, Response, status

from im.api.routes_auth import client_address
from im.api.schemas import (
    DeviceOut,
    PasswordChangeIn,
    PasswordIn,
    SessionOut,
    SettingsIn,
    SettingsOut,
    UserOut,
)
from im.core.accounts import AccountService, Principal

Uid = Annotated[int, Path(ge=1, le=2**63 - 1, description="A user id")]
NO_CONTENT = status.HTTP_204_NO_CONTENT
Sid = Annotated[str, Path(min_length=1, max_length=64, description="A session id from GET /account/sessions")]


class GroupLeaver(Protocol):
    """What account deletion needs of the chat core's writes (``im.core.groups.Groups``)."""

    async def leave_all_groups(self, uid: int) -> None: ...


class DeviceLister(Protocol):
    """What the devices route needs of the chat core's reads (``im.core.reads.ChatReads``)."""

    async def devices(self, uid: int) -> list[tuple[str, int, bool]]: ...


def _no_content() -> Response:
    return Response(status_code=NO_CONTENT)


def account_router(
    accounts: AccountService,
    writes: GroupLeaver,
    reads: DeviceLister,
    principal: Callable[..., Awaitable[Principal]],
) -> APIRouter:
    router = APIRouter()
    Me = Annotated[Principal, Depends(principal)]

    @router.post("/account/password", tags=["account"], status_code=NO_CONTENT)
    async def change_password(me: Me, body: PasswordChangeIn, request: Request) -> Response:
        """Set a new password. Every other session of the account ends at once (its refresh token stops
        working, its chat connections are closed with ``auth_failed``); this one goes on. 403
        ``forbidden`` when the current password is wrong, 400 ``invalid`` for a new one out of bounds."""
        await accounts.change_password(me, body.current_password, body.new_password, address=client_address(request))
        return _no_content()

    @router.get("/account/sessions", tags=["account"])
    async def sessions(me: Me) -> list[SessionOut]:
        """The account's live sessions (logins), oldest first."""
        return [
            SessionOut(
                sid=s.sid, created_at=s.created_at, last_used=s.last_used, expires_at=s.expires_at, current=s.current
            )
            for s in await accounts.sessions(me)
        ]

    @router.delete("/account/sessions/{sid}", tags=["account"], status_code=NO_CONTENT)
    async def revoke_session(me: Me, sid: Sid) -> Response:
        """End one session of the account (its connections close at once). 404 for a sid that is not a
        live session of yours."""
        await accounts.revoke_session(me, sid)
        return _no_content()

    @router.post("/account/logout-all", tags=["account"], status_code=NO_CONTENT)
    async def logout_all(me: Me) -> Response:
        """End every session of the account, this one included."""
        await accounts.logout_everywhere(me.uid)
        return _no_content()

    @router.get("/account/devices", tags=["account"])
    async def devices(me: Me) -> list[DeviceOut]:
        """The account's devices: those that ever synced a conversation and those online now."""
        return [DeviceOut(device=d, last_active=t, online=o) for d, t, o in await reads.devices(me.uid)]

    @router.post("/account/delete", tags=["account"], status_code=NO_CONTENT)
    async def delete_account(me: Me, body: PasswordIn, request: Request) -> Response:
        """Delete the account (docs/protocol.md section 18, "Deleting an account"). 403 ``forbidden``
        when the password is wrong."""
        await accounts.delete_account(me, body.password, writes.leave_all_groups, address=client_address(request))
        return _no_content()

    @router.get("/blocks", tags=["blocks"])
    async def blocks(me: Me) -> list[UserOut]:
        """The users you block."""
        return [UserOut.of(u) for u in await accounts.blocks(me.uid)]

    @router.put("/blocks/{uid}", tags=["blocks"], status_code=NO_CONTENT)
    async def block(me: Me, uid: Uid) -> Response:
        """Block a user (idempotent). 404 unknown user, 400 yourself."""
        await accounts.block(me.uid, uid)
        return _no_content()

    @router.delete("/blocks/{uid}", tags=["blocks"], status_code=NO_CONTENT)
    async def unblock(me: Me, uid: Uid) -> Response:
        """Unblock a user. 404 when you do not block them."""
        await accounts.unblock(me.uid, uid)
        return _no_content()

    @router.get("/users/me/settings", tags=["users"])
    async def settings(me: Me) -> SettingsOut:
        return SettingsOut(contacts_only=(await accounts.settings(me.uid)).contacts_only)

    @router.put("/users/me/settings", tags=["users"])
    async def set_settings(me: Me, body: SettingsIn) -> SettingsOut:
        """Change your settings; answers the settings now in force."""
        await accounts.set_contacts_only(me.uid, body.contacts_only)
        return SettingsOut(contacts_only=body.contacts_only)

    return router
