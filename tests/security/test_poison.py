"""Attack (issue 9, item 1): one user sends poison (integers no store can hold, NUL characters, ids out of
range) at full rate, in JSON and MessagePack, over WebSocket and TCP, while a bystander sends a steady
stream. Against a real ``im serve`` on SQLite and on PostgreSQL: every poison frame gets its documented
error (docs/protocol.md sections 13 and 15), every bystander send is acked and delivered, and the server
log has no traceback and barely grows."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import websockets

from tests.security.test_http_validation import _drop, store_args
from tests.support.client import Account, ChatClient, TcpLink, register
from tests.support.server import ServerProcess, running_server
from tests.support.wait import eventually

ROUNDS = 150  # of every poison frame below, per attacking connection
BYSTANDER_SENDS = 120
LOG_GROWTH_MAX = 16 * 1024  # bytes the server log may grow by during the whole attack


@pytest.fixture(params=["sqlite", "postgres"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ServerProcess]:
    schema = f"im_sec_poison_{uuid.uuid4().hex[:10]}"
    try:
        with running_server(tmp_path / "data", store_args(request.param, schema)) as proc:
            yield proc
    finally:
        if request.param == "postgres":
            asyncio.run(_drop(schema))


Expected = tuple[str, str | None]  # (error code, ref)


def poison(me: int, peer: int, tag: str, i: int) -> list[tuple[dict[str, Any], Expected]]:
    """One round of poison frames, each with the error docs/protocol.md promises for it."""
    c = f"{tag}-{i}"
    return [
        ({"t": "send", "cmid": f"{c}-a", "to": 2**63, "body": "x"}, ("invalid", f"{c}-a")),
        ({"t": "send", "cmid": f"{c}-b", "to": 2**64 - 1, "body": "x"}, ("invalid", f"{c}-b")),
        ({"t": "send", "cmid": f"{c}-c", "to": -1, "body": "x"}, ("invalid", f"{c}-c")),
        ({"t": "send", "cmid": f"{c}-d", "conv": f"d:{me}:{2**64 - 1}", "body": "x"}, ("invalid", f"{c}-d")),
        ({"t": "send", "cmid": f"{c}-e", "conv": f"g:{2**63}", "body": "x"}, ("invalid", f"{c}-e")),
        ({"t": "send", "cmid": f"{c}-f\x00", "to": peer, "body": "x"}, ("invalid", f"{c}-f\x00")),
        ({"t": "send", "cmid": f"{c}-g", "to": peer, "type": "te\x00xt", "body": "x"}, ("invalid", f"{c}-g")),
        ({"t": "recv", "conv": f"d:{me}:{peer}", "seq": 2**63}, ("invalid", None)),
        ({"t": "read", "conv": "g:1", "seq": -1}, ("invalid", None)),
        ({"t": "ping", "id": 2**63}, ("invalid", None)),
        ({"t": "auth", "token": "x", "device": "d", "cursors": {"g:1": 2**63}}, ("invalid", None)),
        ({"t": "auth", "token": "x", "device": "d\x00"}, ("invalid", None)),
        ({"t": "typing", "conv": "g:" + "1" * 100}, ("invalid", None)),
    ]


class Link:
    """A raw attacking connection: WebSocket or TCP framing, JSON or MessagePack."""

    def __init__(self, conn: Any, binary: bool) -> None:
        self.conn = conn
        self.binary = binary
        self.frames: list[dict[str, Any]] = []

    def encode(self, frame: dict[str, Any]) -> str | bytes:
        return msgspec.msgpack.encode(frame) if self.binary else json.dumps(frame)

    async def send(self, frame: dict[str, Any]) -> None:
        await self.conn.send(self.encode(frame))

    async def recv(self) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.conn.recv(), 10)
        out: dict[str, Any] = msgspec.msgpack.decode(raw) if isinstance(raw, bytes) else json.loads(raw)
        return out

    async def read_all(self) -> None:
        while True:
            self.frames.append(await self.recv())

    async def close(self) -> None:
        await self.conn.close()


async def open_link(server: ServerProcess, account: Account, *, tcp: bool, binary: bool) -> Link:
    conn = await (TcpLink.open(server.tcp) if tcp else websockets.connect(server.ws, max_size=None))
    link = Link(conn, binary)
    await link.send({"t": "auth", "token": account.access, "device": f"attacker-{tcp}-{binary}"})
    assert (await link.recv())["t"] == "auth_ok"
    assert (await link.recv())["t"] == "synced"
    return link


async def attack(link: Link, me: int, peer: int, tag: str) -> None:
    """Send every round of poison as fast as the connection takes it; check every answer."""
    expected: Counter[Expected] = Counter()
    reader = asyncio.create_task(link.read_all())
    try:
        for i in range(ROUNDS):
            for frame, answer in poison(me, peer, tag, i):
                await link.send(frame)
                expected[answer] += 1
        total = sum(expected.values())

        def errors() -> list[dict[str, Any]]:
            return [f for f in link.frames if f["t"] == "error"]

        await eventually(lambda: len(errors()) >= total, lambda: f"{tag}: {len(errors())} of {total} errors")
        got = Counter((f["code"], f["ref"]) for f in errors())
        assert got == expected, (tag, (got - expected).most_common(3), (expected - got).most_common(3))
        assert all(f["t"] == "error" for f in link.frames), [f for f in link.frames if f["t"] != "error"][:3]
        n = len(link.frames)
        await link.send({"t": "ping", "id": 7})  # the attacker's connection itself is still fine
        await eventually(lambda: len(link.frames) > n, f"{tag}: no pong")
        assert link.frames[n] == {"t": "pong", "id": 7}
    finally:
        reader.cancel()


async def test_poison_at_full_rate_hurts_no_bystander(server: ServerProcess) -> None:
    mallory, alice, bob = [await register(server.api, f"{n}{uuid.uuid4().hex[:6]}") for n in ("mal", "ali", "bob")]
    sender = ChatClient(server.ws, alice, "phone")
    receiver = ChatClient(server.ws, bob, "phone", tcp=server.tcp)
    for c in (sender, receiver):
        assert (await c.connect())["t"] == "auth_ok"
    links = [
        await open_link(server, mallory, tcp=tcp, binary=binary) for tcp in (False, True) for binary in (False, True)
    ]
    log_before = len(server.log().encode())

    async def bystander() -> None:
        for i in range(BYSTANDER_SENDS):
            body = {"text": f"hello {i}", "raw": "a\x00b"} if i % 10 == 0 else {"text": f"hello {i}"}
            ack = await sender.send(body, to=bob.uid)  # NUL inside a body is data: stored as sent
            assert ack is not None, (i, sender.errors[-3:])
            await asyncio.sleep(0.005)

    await asyncio.gather(
        bystander(),
        *(attack(link, mallory.uid, alice.uid, f"l{n}") for n, link in enumerate(links)),
    )
    assert sender.errors == []
    got = await receiver.wait_messages(BYSTANDER_SENDS)
    assert [m["seq"] for m in got] == list(range(1, BYSTANDER_SENDS + 1))
    assert [m["body"]["text"] for m in got] == [f"hello {i}" for i in range(BYSTANDER_SENDS)]
    assert all(m["body"]["raw"] == "a\x00b" for m in got[::10])
    log = server.log()
    assert "Traceback" not in log
    assert len(log.encode()) - log_before <= LOG_GROWTH_MAX, log[log_before:][-3000:]
    for link in links:
        await link.close()
    for c in (sender, receiver):
        await c.close()
