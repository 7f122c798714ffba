"""A recording WebSocket chat client for end-to-end tests, written from docs/protocol.md.

It uses the ``websockets`` library (an implementation independent of the server's own sans-I/O protocol,
``im.gateway.ws_protocol``) and plain JSON, so the tests exercise the wire contract, not our own codec.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
import websockets

if TYPE_CHECKING:
    from tests.support.checker import History

_cmids = itertools.count(1)


@dataclass
class Account:
    uid: int
    username: str
    password: str
    access: str
    refresh: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.access}"}


async def register(
    api: str,
    username: str,
    password: str = "correct horse battery",
    display_name: str | None = None,
    *,
    verify: ssl.SSLContext | bool = True,
) -> Account:
    """Register ``username`` and log in; ``verify`` as httpx takes it (over TLS: ``ServerProcess.verify``)."""
    body = {"username": username, "password": password}
    if display_name is not None:
        body["display_name"] = display_name
    async with httpx.AsyncClient(verify=verify) as http:
        r = await http.post(f"{api}/auth/register", json=body)
        assert r.status_code == 201, r.text
        r = await http.post(f"{api}/auth/login", json={"username": username, "password": password})
        assert r.status_code == 200, r.text
        tokens = r.json()
    return Account(tokens["uid"], username, password, tokens["access_token"], tokens["refresh_token"])


class TcpLink:
    """The TCP framing of docs/protocol.md behind the few calls the client makes of a WebSocket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.transport = writer.transport

    @classmethod
    async def open(cls, address: tuple[str, int], source: str | None = None) -> TcpLink:
        """Connect to ``address``, from the local address ``source`` when given (any port)."""
        return cls(*await asyncio.open_connection(*address, local_addr=(source, 0) if source else None))

    async def send(self, data: str | bytes) -> None:
        payload, kind = (data.encode(), b"\x01") if isinstance(data, str) else (data, b"\x02")
        self.writer.write((len(payload) + 1).to_bytes(4, "big") + kind + payload)
        await self.writer.drain()

    async def recv(self) -> str | bytes:
        header = await self.reader.readexactly(5)
        payload = await self.reader.readexactly(int.from_bytes(header[:4], "big") - 1)
        return payload.decode() if header[4] == 1 else payload

    def __aiter__(self) -> TcpLink:
        return self

    async def __anext__(self) -> str | bytes:
        try:
            return await self.recv()
        except (asyncio.IncompleteReadError, ConnectionError):
            raise StopAsyncIteration from None

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


@dataclass
class ChatClient:
    """One device of one user. ``cursors`` is what it holds: the highest seq seen per conversation."""

    url: str
    account: Account
    device: str
    history: History | None = None
    cursors: dict[str, int] = field(default_factory=dict)
    messages: list[dict[str, Any]] = field(default_factory=list)  # every msg frame, in arrival order
    acks: dict[str, dict[str, Any]] = field(default_factory=dict)  # cmid -> ack
    errors: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)  # receipts, typing, bye, synced ...
    ws: Any = None
    _reader: asyncio.Task[None] | None = None
    _changed: asyncio.Condition | None = None
    synced: bool = False
    closed_reason: dict[str, Any] | None = None
    tcp: tuple[str, int] | None = None  # connect over TCP framing instead of WebSocket
    reader_error: Exception | None = None
    source: str | None = None  # the local address to connect from (127.0.0.x: "another address")

    async def connect(self, resume: bool = True, token: str | None = None) -> dict[str, Any]:
        """Open, authenticate (stating ``cursors`` when ``resume``), and wait for ``auth_ok``."""
        self._changed = asyncio.Condition()
        self.synced = False
        self.closed_reason = None
        local: dict[str, Any] = {"local_addr": (self.source, 0)} if self.source else {}
        self.ws = await (
            TcpLink.open(self.tcp, self.source) if self.tcp else websockets.connect(self.url, max_size=None, **local)
        )
        auth: dict[str, Any] = {"t": "auth", "token": token or self.account.access, "device": self.device}
        if resume:
            auth["cursors"] = dict(self.cursors)
        await self.ws.send(json.dumps(auth))
        first: dict[str, Any] = json.loads(await asyncio.wait_for(self.ws.recv(), 10))
        if first["t"] != "auth_ok":
            return first
        if self.history is not None:
            self.history.connected(self)
        self._reader = asyncio.create_task(self._read())
        return first

    async def _read(self) -> None:
        assert self._changed is not None
        try:
            async for raw in self.ws:
                frame = json.loads(raw)
                kind = frame["t"]
                if kind == "msg":
                    self.messages.append(frame)
                    self._advance(frame["conv"], frame["seq"])
                    if self.history is not None:
                        self.history.received(self, frame)
                elif kind == "ack":
                    self.acks[frame["cmid"]] = frame
                    if not frame.get("dup"):
                        self._advance(frame["conv"], frame["seq"])
                    if self.history is not None:
                        self.history.acked(self, frame)
                elif kind == "error":
                    self.errors.append(frame)
                    if self.history is not None:
                        self.history.refused(self, frame)
                else:
                    if kind == "synced":
                        self.synced = True
                    if kind == "bye":
                        self.closed_reason = frame
                    self.events.append(frame)
                async with self._changed:
                    self._changed.notify_all()
        except websockets.ConnectionClosed:
            pass
        except Exception as exc:  # a bug in the test harness must fail the test, not hang it
            self.reader_error = exc
            raise
        finally:
            async with self._changed:
                self._changed.notify_all()

    @property
    def live(self) -> bool:
        """The connection is open: its reader is still reading."""
        return self._reader is not None and not self._reader.done()

    def _advance(self, conv: str, seq: int) -> None:
        if seq > self.cursors.get(conv, 0):
            self.cursors[conv] = seq

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        assert self._changed is not None
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(predicate), timeout)

    async def send_frame(self, frame: dict[str, Any] | str | bytes) -> None:
        await self.ws.send(frame if isinstance(frame, str | bytes) else json.dumps(frame))

    async def send(
        self,
        body: Any,
        *,
        to: int | None = None,
        conv: str | None = None,
        cmid: str | None = None,
        wait: bool = True,
        type: str = "text",
    ) -> dict[str, Any] | None:
        """Send a message and (by default) wait for its ack or error; returns the ack frame."""
        cmid = cmid or f"{self.device}-{next(_cmids)}"
        frame: dict[str, Any] = {"t": "send", "cmid": cmid, "type": type, "body": body}
        if to is not None:
            frame["to"] = to
        else:
            frame["conv"] = conv
        if self.history is not None:
            self.history.sending(self, cmid)
        n_errors = len(self.errors)
        self.acks.pop(cmid, None)
        await self.send_frame(frame)
        if not wait:
            return None
        await self.wait_for(lambda: cmid in self.acks or len(self.errors) > n_errors)
        return self.acks.get(cmid)

    async def wait_messages(self, count: int, conv: str | None = None, timeout: float = 15.0) -> list[dict[str, Any]]:
        def matching() -> list[dict[str, Any]]:
            return [m for m in self.messages if conv is None or m["conv"] == conv]

        await self.wait_for(lambda: len(matching()) >= count, timeout)
        return matching()

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    async def drop(self) -> None:
        """Vanish without a close handshake, as a lost network would."""
        if self.ws is not None:
            self.ws.transport.abort()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader


def http_from(address: str, base_url: str = "", timeout: float = 30) -> httpx.AsyncClient:
    """An HTTP client whose connections come from ``address`` (another 127.0.0.x: another client address)."""
    return httpx.AsyncClient(
        base_url=base_url, timeout=timeout, transport=httpx.AsyncHTTPTransport(local_address=address)
    )
