"""/auth: register, login, refresh, logout."""

# No "from __future__ import annotations": FastAPI must resolve the local ``Me`` alias at runtime.

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response, status

from im.api.schemas import LoginIn, RefreshIn, RegisterIn, TokensOut, UserOut
from im.core.accounts import AccountService, Principal, Tokens


def _tokens(tokens: Tokens) -> TokensOut:
    return TokensOut(
        access_token=tokens.access_token,
        refresh_token=tokens.refresh_token,
        token_type=tokens.token_type,
        expires_in=tokens.expires_in,
        uid=tokens.uid,
    )


def client_address(request: Request) -> str:
    """The peer address of the connection (no proxy header is trusted: behind a reverse proxy every client
    would share the proxy's budget)."""
    return request.client.host if request.client is not None else ""


def auth_router(accounts: AccountService, principal: Callable[..., Awaitable[Principal]]) -> APIRouter:
    router = APIRouter(prefix="/auth", tags=["auth"])
    Me = Annotated[Principal, Depends(principal)]

    @router.post("/register", status_code=status.HTTP_201_CREATED)
    async def register(body: RegisterIn, request: Request) -> UserOut:
        """Create an account. 409 ``conflict`` when the name is taken (ignoring case); 429 ``rate_limited``
        (with ``Retry-After``) past ``rates.register_per_address``."""
        user = await accounts.register(body.username, body.password, body.display_name, address=client_address(request))
        return UserOut.of(user)

    @router.post("/login")
    async def login(body: LoginIn, request: Request) -> TokensOut:
        """Start a session. 401 ``bad_credentials`` for an unknown name or a wrong password alike; 429
        ``rate_limited`` past the login limits, 503 ``unavailable`` when the password-check queue is full
        (both with ``Retry-After``)."""
        return _tokens(await accounts.login(body.username, body.password, address=client_address(request)))

    @router.post("/refresh")
    async def refresh(body: RefreshIn) -> TokensOut:
        """New tokens; the refresh token presented stops working. Presenting an already used refresh
        token revokes the whole session (401 ``auth_failed``)."""
        return _tokens(await accounts.refresh(body.refresh_token))

    @router.post("/logout", status_code=status.HTTP_204_NO_CONTENT)
    async def logout(me: Me) -> Response:
        """End the session of the bearer token: its refresh token and access tokens stop working."""
        await accounts.logout(me.sid)
        return Response(status_code=status.HTTP_204_NO_CONTENT)

    return router
