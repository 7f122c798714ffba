"""The API documentation page (Swagger UI) at ``/api/v1/docs``, served entirely by im.

FastAPI's own page loads Swagger UI from a CDN: blank on a machine with no internet access, and a third
party's script running with the page's origin. Here the assets (Swagger UI 5, which reads OpenAPI 3.1)
come from the ``fastapi-offline`` package's static files, the page has no inline script (its start-up
code is a file of its own), and a Content-Security-Policy allows nothing from anywhere but im itself.
"""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

#: Swagger UI's files as the fastapi-offline package ships them (swagger-ui-bundle.js, swagger-ui.css,
#: favicon.png); only the files are used, not its FastAPI subclass.
ASSETS_DIR = Path(str(files("fastapi_offline") / "static"))

#: Swagger UI sets styles from JavaScript (allowed by 'self') and draws icons from data: URLs.
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "font-src 'self'",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)
HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "Referrer-Policy": "no-referrer"}


def docs_routes(docs_url: str, openapi_url: str, title: str) -> list[BaseRoute]:
    """The page at ``docs_url``, its start-up script and the Swagger UI files under ``docs_url/assets``."""
    assets = f"{docs_url}/assets"
    page = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title} - API</title>
<link rel="stylesheet" href="{assets}/swagger-ui.css">
<link rel="icon" type="image/png" href="{assets}/favicon.png">
</head>
<body>
<div id="swagger-ui"></div>
<script src="{assets}/swagger-ui-bundle.js"></script>
<script src="{docs_url}/init.js"></script>
</body>
</html>
"""
    init = f"SwaggerUIBundle({{url: {json.dumps(openapi_url)}, dom_id: '#swagger-ui', deepLinking: true}});\n"

    async def docs_page(request: Request) -> Response:
        return HTMLResponse(page, headers=HEADERS)

    async def init_script(request: Request) -> Response:
        return Response(init, media_type="text/javascript", headers=HEADERS)

    return [
        Route(docs_url, docs_page, methods=["GET"], include_in_schema=False),
        Route(f"{docs_url}/init.js", init_script, methods=["GET"], include_in_schema=False),
        Mount(assets, app=StaticFiles(directory=ASSETS_DIR), name="swagger-ui"),
    ]
