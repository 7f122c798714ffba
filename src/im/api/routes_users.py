"""/users and /contacts."""

# No "from __future__ import annotations": FastAPI must resolve the local ``Me`` alias at runtime.

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Response, status

from im.api.schemas import UserOut
from im.core.accounts import AccountService, Principal
from im.model.ids import MAX_ID


def users_router(accounts: AccountService, principal: Callable[..., Awaitable[Principal]]) -> APIRouter:
    router = APIRouter(tags=["users"])
    Me = Annotated[Principal, Depends(principal)]
    Uid = Annotated[int, Path(ge=1, le=MAX_ID)]

    @router.get("/users/me")
    async def me(me: Me) -> UserOut:
        return UserOut.of(await accounts.user(me.uid))

    @router.get("/users")
    async def search_users(
        me: Me,
        q: Annotated[str, Query(min_length=1, max_length=64, description="Prefix of a user or display name")],
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
    ) -> list[UserOut]:
        """Users whose user name or display name starts with ``q``, ignoring case."""
        return [UserOut.of(u) for u in await accounts.search(q, limit)]

    @router.get("/users/by-name/{username}")
    async def user_by_name(me: Me, username: Annotated[str, Path(max_length=64)]) -> UserOut:
        return UserOut.of(await accounts.user_by_name(username))

    @router.get("/users/{uid}")
    async def user(me: Me, uid: Uid) -> UserOut:
        return UserOut.of(await accounts.user(uid))

    @router.get("/contacts", tags=["contacts"])
    async def contacts(me: Me) -> list[UserOut]:
        return [UserOut.of(u) for u in await accounts.contacts(me.uid)]

    @router.put("/contacts/{uid}", status_code=status.HTTP_204_NO_CONTENT, tags=["contacts"])
    async def add_contact(me: Me, uid: Uid) -> Response:
        """Add a contact (idempotent). 404 for an unknown user, 400 for yourself."""
        await accounts.add_contact(me.uid, uid)
        return Response(status_code=status.HTTP_204_NO_CONTENT)

    @router.delete("/contacts/{uid}", status_code=status.HTTP_204_NO_CONTENT, tags=["contacts"])
    async def remove_contact(me: Me, uid: Uid) -> Response:
        """Remove a contact. 404 when the user is not a contact."""
        await accounts.remove_contact(me.uid, uid)
        return Response(status_code=status.HTTP_204_NO_CONTENT)

    return router
