"""Hostile and broken input on the WebSocket: each frame is answered with the documented error, and the
connection (where the protocol keeps it open) and the server go on working."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import msgspec
import pytest
import websockets

from tests.support.checker import History
from tests.support.client import Account, register
from tests.support.server import ServerProcess

MAX_FRAME = 65536  # limits.max_frame_bytes default
MAX_BODY = 32 * 1024  # limits.max_body_bytes default


class Raw:
    """A bare WebSocket connection: send anything, read frames one by one (JSON or MessagePack)."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws

    @classmethod
    async def open(cls, url: str) -> Raw:
        return cls(await websockets.connect(url, max_size=None))

    async def send(self, data: str | bytes | dict[str, Any]) -> None:
        await self.ws.send(json.dumps(data) if isinstance(data, dict) else data)

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.ws.recv(), timeout)
        frame: dict[str, Any] = msgspec.msgpack.decode(raw) if isinstance(raw, bytes) else json.loads(raw)
        return frame

    async def recv_raw(self, timeout: float = 5.0) -> str | bytes:
        return await asyncio.wait_for(self.ws.recv(), timeout)

    async def expect_error(self, data: str | bytes | dict[str, Any], code: str, ref: str | None = None) -> None:
        await self.send(data)
        frame = await self.recv()
        assert frame["t"] == "error", frame
        assert frame["code"] == code, (data if len(str(data)) < 200 else str(data)[:200], frame)
        assert frame.get("ref") == ref, frame
        assert isinstance(frame["message"], str) and frame["message"]

    async def ping(self, n: int) -> None:
        """A round trip proves the connection is still open and in order."""
        await self.send({"t": "ping", "id": n})
        assert await self.recv() == {"t": "pong", "id": n}

    async def auth(self, account: Account, device: str = "raw", binary: bool = False) -> dict[str, Any]:
        """Authenticate a user who has no conversation yet (so ``synced`` follows at once)."""
        auth = {"t": "auth", "token": account.access, "device": device}
        await self.send(msgspec.msgpack.encode(auth) if binary else auth)
        frame = await self.recv()
        assert frame["t"] == "auth_ok", frame
        assert await self.recv() == {"t": "synced", "convs": 0}
        return frame

    async def close(self) -> None:
        await self.ws.close()


async def expect_closed(r: Raw) -> websockets.ConnectionClosed:
    with pytest.raises(websockets.ConnectionClosed) as info:
        while True:
            await r.recv()
    return info.value


async def test_garbage_before_auth(server: ServerProcess) -> None:
    alice = await register(server.api, "alice")
    r = await Raw.open(server.ws)
    await r.expect_error("garbage", "bad_frame")
    await r.expect_error("{not json", "bad_frame")
    await r.expect_error("[1, 2, 3]", "bad_frame")
    await r.expect_error('"auth"', "bad_frame")
    await r.expect_error({"t": "teleport"}, "unknown_type")
    await r.expect_error({"t": "auth", "token": alice.access}, "bad_frame")  # no device
    await r.expect_error({"t": "auth", "token": 5, "device": "d"}, "bad_frame")
    await r.expect_error({"t": "send", "cmid": "early", "to": alice.uid, "body": "x"}, "unauthenticated", "early")
    await r.expect_error({"t": "recv", "conv": "g:1", "seq": 1}, "unauthenticated")
    await r.expect_error({"t": "typing", "conv": "g:1"}, "unauthenticated")
    await r.ping(1)  # ping works before auth
    await r.send({"t": "auth", "token": alice.access, "device": "d"})
    ok = await r.recv()
    assert ok["t"] == "auth_ok" and ok["uid"] == alice.uid and ok["max_frame"] == MAX_FRAME
    assert await r.recv() == {"t": "synced", "convs": 0}
    await r.close()


async def test_bad_token_is_refused_and_closed(server: ServerProcess) -> None:
    alice = await register(server.api, "alice")
    for token in ("not-a-token", alice.access[:-4] + "AAAA", ""):
        r = await Raw.open(server.ws)
        await r.send({"t": "auth", "token": token, "device": "d"})
        err = await r.recv()
        assert (err["t"], err["code"]) == ("error", "auth_failed")
        bye = await r.recv()
        assert (bye["t"], bye["code"], bye["reconnect"]) == ("bye", "auth_failed", False)
        closed = await expect_closed(r)
        assert closed.rcvd is not None and closed.rcvd.code == 1008
    # The server still takes a good login
    r = await Raw.open(server.ws)
    await r.send({"t": "auth", "token": alice.access, "device": "d"})
    assert (await r.recv())["t"] == "auth_ok"
    await r.close()


async def test_bad_frames_after_auth_keep_the_connection(server: ServerProcess, history: History) -> None:
    alice, bob = await asyncio.gather(register(server.api, "alice"), register(server.api, "bob"))
    b = history.client(bob, "phone")
    assert (await b.connect())["t"] == "auth_ok"
    r = await Raw.open(server.ws)
    await r.auth(alice)

    cases: list[tuple[str | dict[str, Any], str, str | None]] = [
        ("garbage", "bad_frame", None),
        ("", "bad_frame", None),
        ('{"t": "send", "cmid": "x"', "bad_frame", None),
        ("[]", "bad_frame", None),
        ('[{"t": "ping"}]', "bad_frame", None),
        ("null", "bad_frame", None),
        ("12", "bad_frame", None),
        ({"t": 1}, "bad_frame", None),
        ({"type": "send"}, "bad_frame", None),
        ({"t": "send"}, "bad_frame", None),
        ({"t": "send", "cmid": "m1", "to": bob.uid}, "bad_frame", None),  # no body
        ({"t": "send", "cmid": 42, "to": bob.uid, "body": "x"}, "bad_frame", None),
        ({"t": "send", "cmid": "m2", "to": str(bob.uid), "body": "x"}, "bad_frame", None),
        ({"t": "send", "cmid": "m3", "conv": ["g:1"], "body": "x"}, "bad_frame", None),
        ({"t": "recv", "conv": "g:1", "seq": "1"}, "bad_frame", None),
        ({"t": "hello"}, "unknown_type", None),
        ({"t": "msg", "conv": "g:1"}, "unknown_type", None),
        ({"t": "auth", "token": alice.access, "device": "again"}, "already_authenticated", None),
        ({"t": "send", "cmid": "m4", "to": bob.uid, "conv": "g:1", "body": "x"}, "invalid", "m4"),
        ({"t": "send", "cmid": "m5", "body": "x"}, "invalid", "m5"),
        ({"t": "send", "cmid": "", "to": bob.uid, "body": "x"}, "invalid", ""),
        ({"t": "send", "cmid": "c" * 65, "to": bob.uid, "body": "x"}, "invalid", "c" * 65),
        ({"t": "send", "cmid": "m6", "to": bob.uid, "body": "x", "type": "system"}, "invalid", "m6"),
        ({"t": "send", "cmid": "m7", "to": alice.uid, "body": "x"}, "invalid", "m7"),  # to yourself
        ({"t": "send", "cmid": "m8", "to": 987654, "body": "x"}, "not_found", "m8"),
        ({"t": "send", "cmid": "m9", "to": -1, "body": "x"}, "invalid", "m9"),  # uids are 1..2^63-1
        ({"t": "send", "cmid": "m9b", "to": 2**63, "body": "x"}, "invalid", "m9b"),
        ({"t": "send", "cmid": "m9c", "conv": f"d:1:{2**64 - 1}", "body": "x"}, "invalid", "m9c"),
        ({"t": "send", "cmid": "m10", "conv": "g:987654", "body": "x"}, "not_found", "m10"),
        ({"t": "send", "cmid": "m11", "conv": "nonsense", "body": "x"}, "not_found", "m11"),
        ({"t": "send", "cmid": "m12", "conv": "d:987654:987655", "body": "x"}, "not_member", "m12"),
        ({"t": "recv", "conv": "g:1", "seq": 1}, "invalid", None),
        ({"t": "read", "conv": "d:1:2", "seq": 5}, "invalid", None),
    ]
    for i, (data, code, ref) in enumerate(cases):
        await r.expect_error(data, code, ref)
        if i % 8 == 0:
            await r.ping(i)

    # Oversized frame: refused, the connection stays usable
    big = json.dumps({"t": "send", "cmid": "big", "to": bob.uid, "body": "x" * MAX_FRAME})
    assert len(big.encode()) > MAX_FRAME
    await r.expect_error(big, "too_large")
    await r.ping(100)
    # A body over max_body_bytes in a frame under the frame limit
    body = "y" * (MAX_BODY + 10)
    frame = {"t": "send", "cmid": "fat", "to": bob.uid, "body": body}
    assert len(json.dumps(frame)) < MAX_FRAME
    await r.expect_error(frame, "too_large", "fat")
    # A body just under the limit is fine (the quotes count: the limit is on the body's JSON text)
    ok_body = "z" * (MAX_BODY - 2)
    await r.send({"t": "send", "cmid": "fits", "to": bob.uid, "body": ok_body})
    ack = await r.recv()
    assert ack["t"] == "ack" and ack["cmid"] == "fits", {k: v for k, v in ack.items() if k != "body"}
    # A fragmented WebSocket message is one frame
    await r.send(['{"t": "ping",', ' "id": 7}'])  # type: ignore[arg-type]
    assert await r.recv() == {"t": "pong", "id": 7}

    # After all of that: the same connection sends and receives
    await r.send({"t": "send", "cmid": "good", "to": bob.uid, "body": {"text": "still here"}})
    ack = await r.recv()
    assert ack["t"] == "ack" and ack["cmid"] == "good" and ack["seq"] == 2
    assert await b.send("back at you", to=alice.uid) is not None
    got = await r.recv()
    assert (got["t"], got["seq"], got["body"], got["from"]) == ("msg", 3, "back at you", bob.uid)
    msgs = await b.wait_messages(2)
    assert [m["body"] for m in msgs] == [ok_body, {"text": "still here"}]
    assert not b.errors
    await r.close()

    # ... and the server serves new connections
    carol = await register(server.api, "carol")
    c = history.client(carol, "phone")
    assert (await c.connect())["t"] == "auth_ok"
    assert await c.send("hi bob", to=bob.uid) is not None
    await b.wait_for(lambda: any(m["body"] == "hi bob" for m in b.messages))


async def test_huge_frame_closes_with_1009_and_server_goes_on(server: ServerProcess, history: History) -> None:
    alice, bob = await asyncio.gather(register(server.api, "alice"), register(server.api, "bob"))
    r = await Raw.open(server.ws)
    await r.auth(alice)
    await r.send("x" * (4 * MAX_FRAME + 1))  # beyond what the WebSocket layer buffers
    closed = await expect_closed(r)
    assert closed.rcvd is not None and closed.rcvd.code == 1009
    a = history.client(alice, "phone")
    b = history.client(bob, "phone")
    assert (await a.connect())["t"] == "auth_ok"
    assert (await b.connect())["t"] == "auth_ok"
    assert await a.send("fine", to=bob.uid) is not None
    assert [m["body"] for m in await b.wait_messages(1)] == ["fine"]


async def test_messagepack_binary_frames(server: ServerProcess, history: History) -> None:
    alice, bob = await asyncio.gather(register(server.api, "alice"), register(server.api, "bob"))
    b = history.client(bob, "phone")
    assert (await b.connect())["t"] == "auth_ok"
    pack = msgspec.msgpack.encode
    r = await Raw.open(server.ws)
    await r.send(pack({"t": "auth", "token": alice.access, "device": "mp"}))
    raw = await r.recv_raw()
    assert isinstance(raw, bytes)  # the server answers in the client's encoding
    ok = msgspec.msgpack.decode(raw)
    assert ok["t"] == "auth_ok" and ok["uid"] == alice.uid
    assert await r.recv() == {"t": "synced", "convs": 0}

    body = {"text": "binary", "n": [1, 2.5, None, True], "nested": {"k": "v"}}
    await r.send(pack({"t": "send", "cmid": "mp-1", "to": bob.uid, "body": body}))
    raw = await r.recv_raw()
    assert isinstance(raw, bytes)
    ack = msgspec.msgpack.decode(raw)
    assert (ack["t"], ack["cmid"], ack["seq"]) == ("ack", "mp-1", 1)
    got = await b.wait_messages(1)
    assert got[0]["body"] == body and got[0]["from"] == alice.uid

    # Bad input in MessagePack gets MessagePack errors
    bad: list[tuple[bytes, str]] = [
        (b"\xc1", "bad_frame"),
        (pack([1, 2]), "bad_frame"),
        (pack({"t": "send", "cmid": 1, "to": bob.uid, "body": "x"}), "bad_frame"),
        (pack({"t": "nope"}), "unknown_type"),
        (b'{"t": "ping"}', "bad_frame"),  # JSON in a binary frame
    ]
    for data, code in bad:
        await r.send(data)
        raw = await r.recv_raw()
        assert isinstance(raw, bytes)
        err = msgspec.msgpack.decode(raw)
        assert (err["t"], err["code"]) == ("error", code), err

    # Bob answers; Alice gets it in MessagePack, with the body as a value (not JSON text)
    assert await b.send({"text": "json side"}, to=alice.uid) is not None
    raw = await r.recv_raw()
    assert isinstance(raw, bytes)
    msg = msgspec.msgpack.decode(raw)
    assert (msg["t"], msg["seq"], msg["body"], msg["from"]) == ("msg", 2, {"text": "json side"}, bob.uid)
    await r.send(pack({"t": "ping", "id": 5}))
    raw = await r.recv_raw()
    assert isinstance(raw, bytes)
    assert msgspec.msgpack.decode(raw) == {"t": "pong", "id": 5}
    await r.close()


async def test_cannot_send_as_someone_else(server: ServerProcess, history: History) -> None:
    alice, bob, mallory = await asyncio.gather(*(register(server.api, n) for n in ("alice", "bob", "mallory")))
    b = history.client(bob, "phone")
    assert (await b.connect())["t"] == "auth_ok"
    r = await Raw.open(server.ws)
    await r.auth(mallory, "evil")
    forged = {
        "t": "send",
        "cmid": "forged",
        "to": bob.uid,
        "body": "I am alice",
        "from": alice.uid,
        "sender": alice.uid,
        "uid": alice.uid,
        "dev": "alice-phone",
    }
    await r.send(forged)
    reply = await r.recv()
    # Refusing is fine too; accepting must attribute the message to the authenticated user.
    if reply["t"] == "ack":
        got = await b.wait_messages(1)
        assert (got[0]["from"], got[0]["dev"]) == (mallory.uid, "evil")
        conv = f"d:{min(mallory.uid, bob.uid)}:{max(mallory.uid, bob.uid)}"
        assert reply["conv"] == conv
        async with httpx.AsyncClient(timeout=10) as http:
            resp = await http.get(f"{server.api}/conversations/{conv}/messages", params={"after": 0}, headers=bob.auth)
        stored = resp.json()["messages"]
        assert [(e["from"], e["dev"], e["body"]) for e in stored] == [(mallory.uid, "evil", "I am alice")]
    else:
        assert reply["t"] == "error" and reply["ref"] == "forged"
    # Nothing appeared in alice's conversation with bob
    async with httpx.AsyncClient(timeout=10) as http:
        resp = await http.get(
            f"{server.api}/conversations/d:{min(alice.uid, bob.uid)}:{max(alice.uid, bob.uid)}/messages",
            params={"after": 0},
            headers=bob.auth,
        )
    assert resp.status_code in (403, 404) or resp.json()["messages"] == []
    await r.close()


# Input that the decoder or the body encoder cannot handle must still be answered with an error frame,
# not kill the connection (1011) with a traceback in the server log.
_DEEP = 5000


async def test_deeply_nested_json_is_a_bad_frame(server: ServerProcess) -> None:
    alice, bob = await asyncio.gather(register(server.api, "alice"), register(server.api, "bob"))
    r = await Raw.open(server.ws)
    await r.auth(alice)
    nested = "[" * _DEEP + "]" * _DEEP
    data = f'{{"t": "send", "cmid": "deep", "to": {bob.uid}, "body": {nested}}}'
    assert len(data) < MAX_FRAME
    await r.expect_error(data, "bad_frame")
    await r.ping(1)
    await r.close()


@pytest.mark.parametrize(
    ("case", "body"),
    [
        ("ext", msgspec.msgpack.Ext(5, b"xx")),
        ("deep", None),
        ("array_key", None),
    ],
)
async def test_messagepack_body_not_expressible_as_json_is_refused(server: ServerProcess, case: str, body: Any) -> None:
    alice, bob = await asyncio.gather(register(server.api, "alice"), register(server.api, "bob"))
    r = await Raw.open(server.ws)
    await r.auth(alice, binary=True)
    head = {"t": "send", "cmid": case, "to": bob.uid}
    if case == "deep":
        data = msgspec.msgpack.encode({**head, "body": []})[:-1] + b"\x91" * _DEEP + b"\x90"
    elif case == "array_key":  # a map whose key is an array: {[1]: 1}
        data = msgspec.msgpack.encode({**head, "body": 0})[:-1] + b"\x81\x91\x01\x01"
    else:
        data = msgspec.msgpack.encode({**head, "body": body})
    await r.send(data)
    err = await r.recv()
    assert err["t"] == "error" and err["code"] in ("bad_frame", "invalid"), err
    await r.send(msgspec.msgpack.encode({"t": "ping", "id": 2}))
    assert await r.recv() == {"t": "pong", "id": 2}
    await r.close()


async def test_text_frame_that_is_not_utf8_closes_with_1007(server: ServerProcess) -> None:
    """RFC 6455 section 8.1: invalid UTF-8 in a text message fails the connection with 1007."""
    alice = await register(server.api, "alice")
    r = await Raw.open(server.ws)
    await r.auth(alice)
    await r.ws.send(b'{"t": "ping", "id": "\xff"}', text=True)
    await asyncio.wait_for(r.ws.wait_closed(), 5)
    assert r.ws.close_code == 1007
    # The server goes on.
    r2 = await Raw.open(server.ws)
    await r2.auth(alice)
    await r2.ping(1)
    await r2.ws.close()
