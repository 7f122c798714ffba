"""The HTTP API application: routes under ``/api/v1``, and every error as JSON ``{code, message}``;
the browser chat client (``im.api.web``) at ``/``.

    create_app(accounts, chat, pick_gateway, limits, *, files=None) -> FastAPI

The app holds no state of its own and starts nothing: the composition root starts the services it is
given and serves the app (uvicorn).
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from im.api.deps import ChatApi, PickGateway, principal_dependency
from im.api.routes_auth import auth_router
from im.api.routes_chat import chat_router
from im.api.routes_files import files_router
from im.api.routes_users import users_router
from im.api.schemas import ErrorOut, GatewayOut, HealthOut
from im.api.web import web_mount
from im.config import LimitsConfig
from im.core.accounts import AccountService
from im.core.passwords import LoginGuard
from im.files import FileService
from im.protocol.errors import ErrorCode, ImError

log = logging.getLogger(__name__)

PREFIX = "/api/v1"
#: Largest request body accepted (by Content-Length); the API takes small JSON documents only.
MAX_REQUEST_BYTES = 1024 * 1024

STATUS: dict[ErrorCode, int] = {
    ErrorCode.INVALID: 400,
    ErrorCode.BAD_FRAME: 400,
    ErrorCode.UNKNOWN_TYPE: 400,
    ErrorCode.AUTH_FAILED: 401,
    ErrorCode.UNAUTHENTICATED: 401,
    ErrorCode.BAD_CREDENTIALS: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.NOT_MEMBER: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.CONFLICT: 409,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.TOO_MANY_IN_FLIGHT: 429,
    ErrorCode.UNAVAILABLE: 503,
}


def error_response(
    status_code: int, code: str, message: str, headers: dict[str, str] | None = None,
    retry_after: float | None = None,
) -> JSONResponse:
    """The JSON error body; with ``retry_after`` (seconds) also a ``Retry-After`` header (whole seconds)."""
    if status_code == 401:
        headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
    body: dict[str, Any] = {"code": code, "message": message}
    if retry_after is not None:
        body["retry_after"] = retry_after
        headers = {**(headers or {}), "Retry-After": str(max(1, math.ceil(retry_after)))}
    return JSONResponse(body, status_code=status_code, headers=headers)


async def _im_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ImError)
    code = STATUS.get(exc.code)
    if code is None:
        log.error("unmapped error code %s on %s %s: %s", exc.code, request.method, request.url.path, exc)
        return error_response(500, ErrorCode.INTERNAL, "internal error")
    return error_response(code, exc.code, exc.message, retry_after=exc.retry_after)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = []
    for err in exc.errors()[:10]:
        where = ".".join(str(part) for part in err.get("loc", ()))
        problems.append(f"{where}: {err.get('msg', 'invalid')}")
    return error_response(422, ErrorCode.INVALID, "; ".join(problems) or "invalid request")


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    headers = dict(exc.headers) if exc.headers else None
    if exc.status_code == 404:
        return error_response(404, ErrorCode.NOT_FOUND, "no such resource", headers)
    if exc.status_code == 405:
        return error_response(405, ErrorCode.INVALID, f"method {request.method} not allowed here", headers)
    code = ErrorCode.INTERNAL if exc.status_code >= 500 else ErrorCode.INVALID
    return error_response(exc.status_code, code, str(exc.detail), headers)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # Starlette logs the traceback after this response is sent; the client sees nothing of it.
    return error_response(500, ErrorCode.INTERNAL, "internal error")


class BodyLimit:
    """Refuse requests whose declared body is larger than ``max_bytes`` (413 ``too_large``), except on
    the ``exempt`` paths, whose routes enforce their own limit while streaming (file uploads)."""

    def __init__(self, app: ASGIApp, max_bytes: int, exempt: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.exempt = exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.exempt:
            for name, value in scope["headers"]:
                if name == b"content-length":
                    if not value.isdigit() or int(value) > self.max_bytes:
                        message = f"request bodies are limited to {self.max_bytes} bytes"
                        await error_response(413, ErrorCode.TOO_LARGE, message)(scope, receive, send)
                        return
                    break
        await self.app(scope, receive, send)


class RefusedAddresses:
    """Answer 429 without reading the body to an address whose login or registration budget is spent
    (``LoginGuard.refused_for``), after holding the request ``delay`` seconds (at most its retry time): a
    client that retries at once then makes one attempt per ``delay`` per connection, so a flood of refused
    attempts costs the server next to nothing and cannot slow everyone else's requests."""

    def __init__(self, app: ASGIApp, guard: LoginGuard, paths: dict[str, str], delay: float = 1.0) -> None:
        self.app = app
        self.guard = guard
        self.paths = paths  # path -> kind
        self.delay = delay

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            kind = self.paths.get(scope["path"])
            client = scope.get("client")
            if kind is not None and client:
                left = self.guard.refused_for(kind, client[0])
                if left:
                    await asyncio.sleep(min(left, self.delay))
                    left = max(1.0, left - self.delay)
                    message = f"too many {kind} attempts from this address"
                    await error_response(429, ErrorCode.RATE_LIMITED, message, retry_after=math.ceil(left))(
                        scope, receive, send
                    )
                    return
        await self.app(scope, receive, send)


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut} for code in (400, 401, 403, 404, 409, 413, 422, 429, 503)
}


def create_app(
    accounts: AccountService,
    chat: ChatApi,
    pick_gateway: PickGateway,
    limits: LimitsConfig,
    *,
    max_request_bytes: int = MAX_REQUEST_BYTES,
    files: FileService | None = None,
    refusal_delay: float = 1.0,
) -> FastAPI:
    """The HTTP API on the given services (already started by the caller)."""
    app = FastAPI(
        title="im",
        version="1",
        openapi_url=f"{PREFIX}/openapi.json",
        docs_url=f"{PREFIX}/docs",
        redoc_url=None,
        responses=_ERRORS,
    )
    app.add_exception_handler(ImError, _im_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    exempt = frozenset({f"{PREFIX}/files"} if files is not None else ())
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes, exempt=exempt)
    if accounts.guard is not None:
        paths = {f"{PREFIX}/auth/login": "login", f"{PREFIX}/auth/register": "register"}
        app.add_middleware(RefusedAddresses, guard=accounts.guard, paths=paths, delay=refusal_delay)

    principal = principal_dependency(accounts)
    app.include_router(auth_router(accounts, principal), prefix=PREFIX)
    app.include_router(users_router(accounts, principal), prefix=PREFIX)
    app.include_router(chat_router(chat, principal, limits), prefix=PREFIX)
    if files is not None:
        app.include_router(files_router(files, principal), prefix=PREFIX)

    @app.get(f"{PREFIX}/gateway", tags=["gateway"], dependencies=[Depends(principal)])
    async def gateway() -> GatewayOut:
        """Where to connect, over WebSocket or TCP (the least loaded live gateway)."""
        found = await pick_gateway()
        if found is None:
            raise ImError(ErrorCode.UNAVAILABLE, "no gateway is available, retry later")
        return GatewayOut(ws=found["ws"], tcp=found.get("tcp"), node=found.get("node", ""))

    @app.get(f"{PREFIX}/health", tags=["health"])
    async def health() -> HealthOut:
        return HealthOut(status="ok")

    # The browser client at "/" (last: it answers every path the API does not).
    app.router.routes.append(web_mount(PREFIX))
    return app

