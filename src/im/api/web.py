"""The browser chat client (``src/im/web/``): static files served at ``/`` beside the API.

Plain HTML, CSS and JavaScript modules, no build step. Every response carries a Content-Security-Policy
that allows nothing from another origin except WebSocket connections (the gateway listens on its own
port, so ``connect-src`` names ``ws:``/``wss:``); images come from the app itself or from ``blob:`` URLs
the client makes of files it downloaded with its bearer token.
"""

from __future__ import annotations

import mimetypes
from pathlib import Path

from starlette.routing import Match, Mount
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: Where the client's files live (shipped inside the package).
WEB_DIR = Path(__file__).resolve().parent.parent / "web"

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' blob:",
        "media-src 'self' blob:",
        "font-src 'self'",
        "connect-src 'self' ws: wss:",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)

HEADERS: list[tuple[bytes, bytes]] = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    # Revalidate every time (cheap: ETag / Last-Modified), so an upgraded server serves its own client.
    (b"cache-control", b"no-cache"),
]

# Some platforms' MIME tables lack these or map them oddly; module scripts need a JavaScript type.
for _ext, _type in ((".js", "text/javascript"), (".css", "text/css"), (".svg", "image/svg+xml")):
    mimetypes.add_type(_type, _ext)


class _SecurityHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [
                    *(h for h in message.get("headers", []) if h[0].lower() not in dict(HEADERS)),
                    *HEADERS,
                ]
            await send(message)

        await self.app(scope, receive, send_with_headers)


class _WebMount(Mount):
    """A mount at ``/`` that never claims the API's paths: an unknown ``/api/...`` path or a wrong method
    there keeps the API's JSON 404/405."""

    def __init__(self, app: ASGIApp, api_prefix: str) -> None:
        super().__init__("/", app=app, name="web")
        self._api_prefix = api_prefix.rstrip("/")

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        path: str = scope.get("path", "")
        if path == self._api_prefix or path.startswith(self._api_prefix + "/"):
            return Match.NONE, {}
        return super().matches(scope)


def web_mount(api_prefix: str, directory: Path = WEB_DIR) -> Mount:
    """The route serving the web client (``index.html`` at ``/``); add it after the API routes."""
    return _WebMount(_SecurityHeaders(StaticFiles(directory=directory, html=True)), api_prefix)
