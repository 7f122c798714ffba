"""Serving the HTTP API: uvicorn on a socket we bind, and the registry view behind ``GET /gateway``.

:class:`HttpServer` and :class:`GatewayPicker` are lifecycle parts (``start``/``stop``) of the roles that
serve HTTP (``im serve``, ``im api``).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn

from im.api.guard import HeaderLimit, guarded_protocol
from im.backends.registry import Registry
from im.config import Config
from im.model.cluster import ServiceInstance
from im.net import Admission, Listener, TlsAccept, bind


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handlers (the role's lifecycle owns shutdown), accepting through
    :class:`im.net.Listener` (uvloop's own server stops accepting for good on the first EMFILE).

    ``up`` resolves once it accepts connections: uvicorn itself offers only the ``started`` flag, which
    would have to be polled.
    """

    def __init__(self, config: uvicorn.Config, sock: socket.socket, tls: TlsAccept | None) -> None:
        super().__init__(config)
        self._sock = sock
        self._tls = tls
        self.up: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=[])  # uvicorn's own setup, and no server of its own
        config = self.config

        def create_protocol() -> asyncio.Protocol:
            return config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=self.server_state, app_state=self.lifespan.state
            )

        # With TLS, uvicorn's protocol sees the TLS transport: it reports scheme "https" from it.
        listener = Listener(self._sock, create_protocol, name="http", tls=self._tls).start()
        self.servers.append(listener)  # type: ignore[arg-type]  # closed by uvicorn's shutdown, like a Server
        if not self.up.done():
            self.up.set_result(None)


class HttpServer:
    """The HTTP API on uvicorn, started on a socket we bind (so port 0 works and the URL is known); HTTPS
    only with ``tls``.

    ``start`` returns once it accepts connections (or raises what stopped uvicorn from starting); its
    serving task belongs to this object, and ``stop`` waits for it: in-flight requests are finished.
    """

    def __init__(self, config: Config, app: Any, admission: Admission, *, tls: TlsAccept | None = None) -> None:
        self.config = config
        self._app = app
        self.app = app  # the ASGI app as given (tracing instruments it before the start)
        self._admission = admission
        self._tls = tls
        self.url = ""
        self._uv: _Uvicorn | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        cfg = self.config
        sock = bind(cfg.http.host, cfg.http.port)
        scheme = "https" if self._tls is not None else "http"
        self.url = cfg.http.public_url or f"{scheme}://{cfg.http.host}:{sock.getsockname()[1]}"
        h = cfg.http
        protocol = guarded_protocol(self._admission, head_timeout=h.head_timeout, body_timeout=h.body_timeout)
        app = HeaderLimit(self._app, max_headers=h.max_headers, max_head_bytes=h.max_head_bytes)
        uv = self._uv = _Uvicorn(
            uvicorn.Config(
                app,
                lifespan="off",
                log_level=cfg.log_level,
                log_config=None,  # no handler of its own: its lines go through im.observability.logs
                access_log=False,
                ws="none",
                server_header=False,  # no "server: uvicorn": the version of nothing is anyone's business
                http=protocol,  # a protocol class is accepted, not only a name
                timeout_keep_alive=h.keepalive_timeout,
                h11_max_incomplete_event_size=h.max_head_bytes,
            ),
            sock,
            self._tls,
        )
        task = self._task = asyncio.create_task(uv.serve(sockets=[]), name="im-http")
        await asyncio.wait([uv.up, task], return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            self._task = None
            sock.close()
            task.result()  # what stopped it
            raise RuntimeError("the HTTP server ended while starting")

    async def stop(self) -> None:
        if self._uv is not None and self._task is not None:
            self._uv.should_exit = True
            await self._task
            self._task = None


class GatewayPicker:
    """The API's answer to "which gateway?": the least loaded live one that is ready, from a watched
    registry view (kept current by the registry's watch, never a list read once).

    A gateway publishes ``ready=false`` when it lost an engine (im.observability.health); it is handed
    out again once it publishes ready. When no live gateway is ready (an engine outage every gateway
    sees), the least loaded not-ready one is handed out rather than none: it may still serve part of
    the protocol, and a client told "no gateway" can only retry. A draining gateway is never handed
    out: its stop removes its registry entry first.
    """

    def __init__(self, registry: Registry) -> None:
        self._registry = registry
        self._live: list[ServiceInstance] = []
        self._unwatch: Callable[[], None] | None = None

    def start(self) -> None:
        self._unwatch = self._registry.watch("gateway", self._update)

    def _update(self, live: list[ServiceInstance]) -> None:
        self._live = live

    def stop(self) -> None:
        if self._unwatch is not None:
            self._unwatch()

    async def pick(self) -> dict[str, str] | None:
        if not self._live:
            return None
        ready = [i for i in self._live if i.ready]
        best = min(ready or self._live, key=lambda i: (i.load, secrets.randbits(16)))
        return {"node": best.node, **best.addresses}
