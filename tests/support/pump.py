"""Driving a gateway pump (TcpConnection, WsConnection) over a real loopback socket, without a server.

:class:`PumpHub` is the part of :class:`~im.gateway.hub.Hub` a connection uses before it authenticates
(frames such as ``ping`` need nothing more); :func:`connect_pump` accepts one loopback TCP connection into
a pump made by ``factory`` and returns the client's end as asyncio streams.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any, TypeVar

from im.gateway.hub import Connection
from im.model.errors import ErrorCode, ImError
from im.net import Admission
from im.protocol.messages import EncodedCache
from im.protocol.session import Limits

P = TypeVar("P", bound=asyncio.BaseProtocol)

LIMIT = 1024  # max_frame_bytes of the tests' hub


class RefusingAccounts:
    async def authenticate(self, token: str) -> Any:
        raise ImError(ErrorCode.AUTH_FAILED, "token invalid")


class PumpHub:
    """Records what the connections tell the hub: ``added`` (live) and ``unregistered`` (closed)."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits(max_frame_bytes=LIMIT, auth_timeout=5.0)
        self.cache = EncodedCache()
        self.accounts = RefusingAccounts()
        self.max_send_buffer = 4 * 1024 * 1024
        self.preauth_send_buffer = 64 * 1024
        self.added: list[Connection] = []
        self.unregistered: list[Connection] = []

    def add(self, conn: Connection) -> None:
        self.added.append(conn)

    def unregister(self, conn: Connection) -> None:
        if conn in self.added:
            self.added.remove(conn)
        self.unregistered.append(conn)


def admission(max_connections: int = 100, max_refusing: int = 10) -> Admission:
    return Admission(max_connections=max_connections, max_per_address=0, max_refusing=max_refusing)


async def connect_pump(factory: Callable[[], P]) -> tuple[P, asyncio.StreamReader, asyncio.StreamWriter]:
    """One loopback TCP connection: its server end handed to a pump from ``factory``, its client end as
    streams."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server_side, _ = listener.accept()
    server_side.setblocking(False)
    client.setblocking(False)
    _, pump = await asyncio.get_running_loop().connect_accepted_socket(factory, server_side)
    reader, writer = await asyncio.open_connection(sock=client)
    return pump, reader, writer
