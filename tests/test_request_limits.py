"""BodyLimit and HeaderLimit at the ASGI level: bytes counted as received, refusals before the app runs."""

from __future__ import annotations

import json
from typing import Any

from starlette.types import Message, Receive, Scope, Send

from im.api.app import BodyLimit
from im.api.guard import HeaderLimit


def _scope(headers: list[tuple[bytes, bytes]] | None = None, path: str = "/api/v1/auth/login") -> Scope:
    return {
        "type": "http",
        "method": "POST",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": headers or [],
    }


class Client:
    """Feeds body chunks on demand and records what the app sends and how much it pulled."""

    def __init__(self, chunks: int, size: int) -> None:
        self.left = chunks
        self.size = size
        self.pulled = 0
        self.sent: list[Message] = []

    async def receive(self) -> Message:
        self.pulled += 1
        self.left -= 1
        return {"type": "http.request", "body": b"a" * self.size, "more_body": self.left > 0}

    async def send(self, message: Message) -> None:
        self.sent.append(message)

    def status(self) -> int:
        return int(self.sent[0]["status"])

    def body(self) -> Any:
        return json.loads(b"".join(m.get("body", b"") for m in self.sent[1:]))


async def reading_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Reads the whole body like a JSON route, then answers 200 (or gives up when the client is gone)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            await send({"type": "http.response.start", "status": 400, "headers": []})
            await send({"type": "http.response.body", "body": b"{}"})
            return
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


async def test_chunked_body_is_refused_once_past_the_limit_and_not_read_further() -> None:
    client = Client(chunks=4096, size=64 * 1024)  # 256 MiB, no Content-Length
    await BodyLimit(reading_app, max_bytes=1024 * 1024)(_scope(), client.receive, client.send)
    assert client.status() == 413 and client.body()["code"] == "too_large"
    assert len(client.sent) == 2  # the app's own late answer was dropped
    assert client.pulled == 17  # 16 chunks make 1 MiB; the 17th passes the limit; nothing more is read


async def test_body_within_the_limit_passes_and_content_length_over_it_is_refused_unread() -> None:
    client = Client(chunks=16, size=64 * 1024)  # exactly 1 MiB
    await BodyLimit(reading_app, max_bytes=1024 * 1024)(_scope(), client.receive, client.send)
    assert client.status() == 200
    client = Client(chunks=1, size=1)
    scope = _scope([(b"content-length", b"2000000")])
    await BodyLimit(reading_app, max_bytes=1024 * 1024)(scope, client.receive, client.send)
    assert client.status() == 413 and client.pulled == 0


async def test_exempt_path_is_left_to_its_route() -> None:
    client = Client(chunks=32, size=64 * 1024)
    limit = BodyLimit(reading_app, max_bytes=1024 * 1024, exempt=frozenset({"/api/v1/files"}))
    await limit(_scope(path="/api/v1/files"), client.receive, client.send)
    assert client.status() == 200 and client.pulled == 32


async def test_header_limit_counts_fields_and_head_bytes() -> None:
    limit = HeaderLimit(reading_app, max_headers=10, max_head_bytes=1024)
    client = Client(chunks=1, size=0)
    await limit(_scope([(b"x-%d" % i, b"1") for i in range(11)]), client.receive, client.send)
    assert client.status() == 431 and client.body()["code"] == "too_large"
    client = Client(chunks=1, size=0)
    await limit(_scope([(b"x-big", b"a" * 1100)]), client.receive, client.send)
    assert client.status() == 431 and "1024 bytes" in client.body()["message"]
    client = Client(chunks=1, size=0)
    await limit(_scope([(b"x-%d" % i, b"1") for i in range(10)]), client.receive, client.send)
    assert client.status() == 200
