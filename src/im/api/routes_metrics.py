"""``GET /metrics`` on the HTTP port of ``im api`` and ``im serve`` (docs/operations.md, "Metrics").

A plain route, not prometheus-client's ASGI app mounted at ``/metrics`` (which answers ``/metrics`` with a
redirect to ``/metrics/``). 404 when metrics are off. Not under ``/api/v1`` and not in the OpenAPI
document: it is for Prometheus, and like the operations listener it is best kept off public networks.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from im.observability import metrics


async def _metrics(request: Request) -> Response:
    text = metrics.render()
    if text is None:
        return PlainTextResponse("metrics are off (metrics.enabled=false)\n", status_code=404)
    return Response(text, media_type=metrics.CONTENT_TYPE)


def metrics_route(path: str = "/metrics") -> Route:
    return Route(path, _metrics, methods=["GET"], include_in_schema=False)
