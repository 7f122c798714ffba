"""What the routes depend on: the chat writes and reads they call, and the bearer-token principal."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Annotated, Protocol

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from im.core.accounts import AccountService, Principal
from im.model.chat import ConversationSummary, Group, StoredMessage
from im.model.errors import ErrorCode, ImError


class ChatWriteApi(Protocol):
    """The writes the HTTP API makes (``im.core.groups.Groups``): groups and their members. Messages
    are sent over the gateways, never here. Every method raises ImError to refuse."""

    async def create_group(self, owner: int, name: str, members: list[int]) -> Group: ...

    async def add_members(self, actor: int, gid: int, uids: list[int]) -> None: ...

    async def remove_member(self, actor: int, gid: int, uid: int) -> None: ...

    async def leave_group(self, uid: int, gid: int) -> None: ...

    async def set_role(self, actor: int, gid: int, uid: int, role: str) -> None: ...

    async def leave_all_groups(self, uid: int) -> None: ...


class ChatReadApi(Protocol):
    """The reads the HTTP API makes (``im.core.reads.ChatReads``); every method raises ImError to refuse."""

    async def group(self, actor: int, gid: int) -> Group: ...

    async def group_members(self, actor: int, gid: int) -> dict[int, str]: ...

    async def history(
        self, uid: int, conv: str, *, after: int | None, before: int | None, limit: int
    ) -> tuple[list[StoredMessage], bool]: ...

    async def conversations(self, uid: int) -> list[ConversationSummary]: ...

    async def receipts(self, uid: int, conv: str) -> dict[int, tuple[int, int]]: ...

    async def online(self, viewer: int, uids: Sequence[int]) -> dict[int, bool]: ...

    async def devices(self, uid: int) -> list[tuple[str, int, bool]]: ...


#: Returns the address of a gateway for a client to connect to ({"ws": ..., "node": ...}), None if none.
PickGateway = Callable[[], Awaitable[dict[str, str] | None]]

_bearer = HTTPBearer(auto_error=False, description="An access token from /auth/login or /auth/refresh.")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def principal_dependency(accounts: AccountService) -> Callable[..., Awaitable[Principal]]:
    """A FastAPI dependency: the principal of the request's ``Authorization: Bearer`` token."""

    async def principal(credentials: Credentials) -> Principal:
        if credentials is None:
            message = "an 'Authorization: Bearer <access token>' header is needed"
            raise ImError(ErrorCode.UNAUTHENTICATED, message)
        return await accounts.authenticate(credentials.credentials)

    return principal
