"""The HTTP API application: routes under ``/api/v1``, and every error as JSON ``{code, message}``;
the browser chat client (``im.api.web``) at ``/``.

    create_app(accounts, writes, reads, pick_gateway, limits, *, files=None) -> FastAPI

The app holds no state of its own and starts nothing: the composition root starts the services it is
given and serves the app (uvicorn).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from im.api.deps import ChatReadApi, ChatWriteApi, PickGateway, principal_dependency
from im.api.docs import docs_routes
from im.api.routes_account import account_router
from im.api.routes_auth import auth_router
from im.api.routes_chat import chat_router
from im.api.routes_files import files_router
from im.api.routes_metrics import metrics_route
from im.api.routes_users import users_router
from im.api.schemas import ErrorOut, GatewayOut, HealthOut
from im.api.web import web_mount
from im.config import LimitsConfig
from im.core.accounts import AccountService
from im.core.passwords import LoginGuard
from im.files import FileService
from im.model.errors import ErrorCode, ImError
from im.observability.health import Readiness
from im.observability.metrics import METRICS, engine_unreachable
from im.throttled_log import ThrottledLog

log = logging.getLogger(__name__)

PREFIX = "/api/v1"
#: Default largest request body (``http.max_body_bytes``); the API takes small JSON documents only.
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
    status_code: int,
    code: str,
    message: str,
    headers: dict[str, str] | None = None,
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


#: pydantic error types that are about a value's range (400), not the request's shape (422).
_RANGE_ERRORS = frozenset(
    {
        "greater_than",
        "greater_than_equal",
        "less_than",
        "less_than_equal",
        "too_short",
        "too_long",
        "string_too_short",
        "string_too_long",
        "int_parsing_size",
        "value_error",
    }
)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    """400 ``invalid`` when every problem is a value out of its range (an id beyond 2^63-1, a NUL
    character, a too long string); 422 ``invalid`` when the request has the wrong shape (a missing field,
    a wrong JSON type). docs/protocol.md section 18."""
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    problems = []
    for err in errors[:10]:
        where = ".".join(str(part) for part in err.get("loc", ()))
        problems.append(f"{where}: {err.get('msg', 'invalid')}")
    status = 400 if errors and all(err.get("type") in _RANGE_ERRORS for err in errors) else 422
    return error_response(status, ErrorCode.INVALID, "; ".join(problems)[:1000] or "invalid request")


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
    # Only for what escapes ResponseHardening (a failure in an outer middleware); Starlette logs it.
    return error_response(500, ErrorCode.INTERNAL, "internal error")


class ResponseHardening:
    """Every response: ``X-Content-Type-Options: nosniff``, and ``Cache-Control: no-store`` on API
    responses that set no caching of their own (private data; file downloads keep their ``private``
    ETag caching); on HTTPS responses, ``Strict-Transport-Security: max-age=<hsts_max_age>`` when that is
    above 0 (never over plain HTTP, where RFC 6797 section 7.2 says it must not be sent). Requests whose
    path or query carries a NUL character are refused 400 ``invalid`` (no
    store keeps one). An unexpected exception answers 500 ``internal`` and is logged as one counted,
    rate-limited line with at most one traceback per window (im.throttled_log), never one per request;
    one that says an engine is unreachable (the database away: ``engine_unreachable``) answers 503
    ``unavailable`` with ``Retry-After: 1``, counted the same way without a traceback."""

    def __init__(self, app: ASGIApp, prefix: str = PREFIX, hsts_max_age: int = 0) -> None:
        self.app = app
        self.prefix = prefix
        self.hsts = f"max-age={hsts_max_age}".encode() if hsts_max_age > 0 else b""
        self.crashes = ThrottledLog(log, "requests that failed with an unexpected error", level=logging.ERROR)
        self.outages = ThrottledLog(log, "requests (503): an engine is unreachable")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        api = path == self.prefix or path.startswith(self.prefix + "/")
        hsts = self.hsts if scope.get("scheme") == "https" else b""
        started = False

        async def send_hardened(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"server"]
                names = {k.lower() for k, _ in headers}
                if b"x-content-type-options" not in names:
                    headers.append((b"x-content-type-options", b"nosniff"))
                if api and b"cache-control" not in names:
                    headers.append((b"cache-control", b"no-store"))
                if hsts and b"strict-transport-security" not in names:
                    headers.append((b"strict-transport-security", hsts))
                message["headers"] = headers
            await send(message)

        if "\x00" in path or b"%00" in scope.get("query_string", b""):
            response = error_response(400, ErrorCode.INVALID, "the path or query must not contain NUL characters")
            await response(scope, receive, send_hardened)
            return
        try:
            await self.app(scope, receive, send_hardened)
        except Exception as exc:
            what = f"{scope.get('method')} {path[:200]}: {type(exc).__name__}: {str(exc)[:200]}"
            if engine_unreachable(exc):  # an outage (the database away), not a bug: retryable, no traceback
                METRICS.engine_error(exc)
                self.outages.hit(what)
                if not started:
                    response = error_response(
                        503, ErrorCode.UNAVAILABLE, "storage unavailable, retry later", retry_after=1
                    )
                    await response(scope, receive, send_hardened)
                return
            self.crashes.hit(what, exc)
            if not started:
                await error_response(500, ErrorCode.INTERNAL, "internal error")(scope, receive, send_hardened)


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` (413 ``too_large``), except on the ``exempt`` paths,
    whose routes enforce their own limit while streaming (file uploads).

    A declared ``Content-Length`` over the limit is refused before anything is read. Otherwise the bytes
    are counted as the application reads them (chunked bodies too): once past the limit the 413 goes out
    at once and the application sees the client as gone; the rest is never buffered (the listener
    discards a bounded amount of it, then closes: im.api.guard).
    """

    def __init__(self, app: ASGIApp, max_bytes: int, exempt: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.exempt = exempt

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.exempt:
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                if not value.isdigit() or int(value) > self.max_bytes:
                    await self._refuse(send)
                    return
                break
        received = 0
        started = refused = False

        async def counted_receive() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    refused = True
                    if not started:
                        await self._refuse(send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return  # the 413 was the answer
            started = True
            await send(message)

        await self.app(scope, counted_receive, guarded_send)

    async def _refuse(self, send: Send) -> None:
        message = f"request bodies are limited to {self.max_bytes} bytes"
        body = json.dumps({"code": ErrorCode.TOO_LARGE.value, "message": message}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


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
    writes: ChatWriteApi,
    reads: ChatReadApi,
    pick_gateway: PickGateway,
    limits: LimitsConfig,
    *,
    max_request_bytes: int = MAX_REQUEST_BYTES,
    files: FileService | None = None,
    refusal_delay: float = 1.0,
    hsts_max_age: int = 0,
    readiness: Readiness | None = None,
) -> FastAPI:
    """The HTTP API on the given services (already started by the caller): ``writes`` makes the group
    changes (``im.core.groups.Groups``), ``reads`` answers the rest (``im.core.reads.ChatReads``).
    ``hsts_max_age`` > 0: HTTPS responses carry HSTS with that max-age (seconds)."""
    app = FastAPI(
        title="im",
        version="1",
        openapi_url=f"{PREFIX}/openapi.json",
        docs_url=None,  # im.api.docs serves the page from a package, with a CSP
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
    app.add_middleware(
        ResponseHardening, hsts_max_age=hsts_max_age
    )  # outermost: its headers go on every answer, refusals included

    principal = principal_dependency(accounts)
    app.include_router(auth_router(accounts, principal), prefix=PREFIX)
    app.include_router(users_router(accounts, principal), prefix=PREFIX)
    app.include_router(account_router(accounts, writes, reads, principal), prefix=PREFIX)
    app.include_router(chat_router(writes, reads, principal, limits), prefix=PREFIX)
    if files is not None:
        app.include_router(files_router(files, principal), prefix=PREFIX)

    @app.get(f"{PREFIX}/gateway", tags=["gateway"], dependencies=[Depends(principal)])
    async def gateway() -> GatewayOut:
        """Where to connect, over WebSocket or TCP (the least loaded live gateway): ``ws://``/``tcp://``, or
        ``wss://``/``tls://`` when the gateway speaks TLS (docs/protocol.md, "TLS")."""
        found = await pick_gateway()
        if found is None:
            raise ImError(ErrorCode.UNAVAILABLE, "no gateway is available, retry later")
        return GatewayOut(ws=found["ws"], tcp=found.get("tcp"), node=found.get("node", ""))

    async def ready() -> JSONResponse:
        if readiness is None:  # nothing to check (tests on in-process services)
            return JSONResponse({"status": "ok"})
        ok, details = await readiness.check()
        if ok:
            return JSONResponse({"status": "ok"})
        # Names only: the engines' error texts (hosts, ports) are for the private operations listener.
        checks = details.get("checks")
        failing = [name for name, c in checks.items() if not c.get("ok")] if isinstance(checks, dict) else []
        if not readiness.registered:
            failing.append("registered")
        if readiness.draining:
            failing.append("draining")
        return JSONResponse({"status": "unavailable", "failing": failing}, status_code=503)

    health_responses: dict[int | str, dict[str, Any]] = {503: {"model": HealthOut, "description": "not ready"}}

    @app.get(f"{PREFIX}/health", tags=["health"], response_model=HealthOut, responses=health_responses)
    async def health() -> JSONResponse:
        """Readiness (the same answer as ``/health/ready``): 200 ``{"status": "ok"}`` when this process's
        engines answer, it is registered and not stopping; else 503 ``{"status": "unavailable",
        "failing": [...]}`` (docs/operations.md, "Health and readiness")."""
        return await ready()

    @app.get(f"{PREFIX}/health/ready", tags=["health"], response_model=HealthOut, responses=health_responses)
    async def health_ready() -> JSONResponse:
        """Readiness: 200 when ready to take traffic, 503 (with what is failing) when not."""
        return await ready()

    @app.get(f"{PREFIX}/health/live", tags=["health"], response_model=HealthOut)
    async def health_live() -> JSONResponse:
        """Liveness: 200 while the process answers at all; engines being away never fails it."""
        return JSONResponse({"status": "ok"})

    app.router.routes.extend(docs_routes(f"{PREFIX}/docs", f"{PREFIX}/openapi.json", app.title))
    app.router.routes.append(metrics_route())  # Prometheus (404 with metrics.enabled=false)
    # The browser client at "/" (last: it answers every path the API does not).
    app.router.routes.append(web_mount(PREFIX))
    return app
