"""ResponseHardening (im.api.app): headers on every response, NUL in a path or query refused, and a
handler that crashes answers 500 ``internal`` with one counted log line per window, not a traceback per
request."""

from __future__ import annotations

import logging

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from im.api.app import ResponseHardening


async def ok(request: Request) -> Response:
    return JSONResponse({"ok": True})


async def cached(request: Request) -> Response:
    return Response(b"x", headers={"Cache-Control": "private, no-cache"})


async def crash(request: Request) -> Response:
    raise RuntimeError("a bug any client can trigger")


def client() -> httpx.AsyncClient:
    """Placed as create_app places it: inside Starlette's outermost error middleware."""
    app = Starlette(
        routes=[
            Route("/api/v1/ok", ok),
            Route("/api/v1/cached", cached),
            Route("/api/v1/crash", crash),
            Route("/page", ok),
        ],
        middleware=[Middleware(ResponseHardening)],
    )
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


async def test_headers() -> None:
    async with client() as http:
        r = await http.get("/api/v1/ok")
        assert r.headers["x-content-type-options"] == "nosniff" and r.headers["cache-control"] == "no-store"
        r = await http.get("/api/v1/cached")
        assert r.headers["cache-control"] == "private, no-cache"  # a route's own caching is kept
        r = await http.get("/page")  # outside the API: nosniff, caching left to the route
        assert r.headers["x-content-type-options"] == "nosniff" and "cache-control" not in r.headers


async def test_nul_in_path_or_query_is_400() -> None:
    async with client() as http:
        for url in ("/api/v1/o%00k", "/api/v1/ok?q=a%00b", "/api/v1/ok?q=%00"):
            r = await http.get(url)
            assert r.status_code == 400 and r.json()["code"] == "invalid", url
            assert r.headers["x-content-type-options"] == "nosniff"


async def test_crashes_answer_500_and_log_one_line_per_window(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="im.api.app"):
        async with client() as http:
            for _ in range(200):
                r = await http.get("/api/v1/crash")
                assert r.status_code == 500 and r.json() == {"code": "internal", "message": "internal error"}
                assert r.headers["cache-control"] == "no-store"
            assert (await http.get("/api/v1/ok")).status_code == 200
    records = [r for r in caplog.records if r.name == "im.api.app"]
    assert len(records) == 1 and records[0].exc_info is not None  # the first, with its traceback
    assert "RuntimeError" in records[0].getMessage()
