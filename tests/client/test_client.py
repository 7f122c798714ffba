"""The high-level Client against a real ``im serve``: chat over WebSocket and TCP, drops, restarts,
persistence, lost acks. Every check is on what the application sees (events) and on the server's log."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import pytest

from im.client import (
    Ack,
    ApiClient,
    Bye,
    Client,
    ClientClosed,
    ClientEvent,
    Disconnected,
    Encoding,
    Gateway,
    Message,
    Receipt,
    SendError,
    SendFailed,
    Transport,
    TypingEvent,
    WebSocketTransport,
)
from tests.client.conftest import PASSWORD, ClientFactory
from tests.support.server import ServerProcess

TRANSPORTS = [("ws", Encoding.JSON), ("tcp", Encoding.JSON), ("ws", Encoding.MSGPACK), ("tcp", Encoding.MSGPACK)]


async def stored(server: ServerProcess, username: str, conv: str) -> list[Message]:
    """The server's log of ``conv``, read through the history API."""
    async with ApiClient(server.http) as api:
        await api.login(username, PASSWORD)
        out: list[Message] = []
        while True:
            page = await api.history(conv, after=out[-1].seq if out else 0, limit=200)
            out += page.messages
            if not page.has_more:
                return out


@pytest.mark.parametrize(("transport", "encoding"), TRANSPORTS, ids=[f"{t}-{e.value}" for t, e in TRANSPORTS])
async def test_two_clients_chat(make_client: ClientFactory, transport: str, encoding: Encoding) -> None:
    alice, a = await make_client("alice", device="phone", transport=transport, encoding=encoding)
    bob, b = await make_client("bob", device="laptop", transport="ws")
    assert a is not None and b is not None
    first = await alice.send({"text": "hi bob"}, to=bob.uid)
    conv = first.conv
    assert (conv, first.seq, first.dup) == (f"d:{alice.uid}:{bob.uid}", 1, False)
    for i in range(20):
        (alice if i % 2 else bob).post({"n": i}, conv=conv)
    await b.wait(lambda: len(b.seqs(conv)) == 21)
    await a.wait(lambda: len(a.seqs(conv)) == 21)
    assert a.seqs(conv) == b.seqs(conv) == list(range(1, 22))  # one stream: messages and own acks
    assert b.messages[0].body == {"text": "hi bob"}
    assert all(m.sender == alice.uid and m.dev == "phone" for m in b.messages)
    # read marks, delivery receipts (from the automatic recv), typing
    bob.read(conv, 21)
    bob.typing(conv)
    await a.wait(lambda: any(r.kind == "read" and r.seq == 21 and r.uid == bob.uid for r in a.of(Receipt)))
    await a.wait(lambda: any(r.kind == "delivered" and r.uid == bob.uid for r in a.of(Receipt)))
    await a.wait(lambda: any(t.conv == conv and t.uid == bob.uid for t in a.of(TypingEvent)))
    assert alice.connections == 1 and alice.outbox == {}


@pytest.mark.parametrize("transport", ["ws", "tcp"])
async def test_dropped_sockets_reconnect_and_resume_without_gap_or_duplicate(
    server: ServerProcess, make_client: ClientFactory, transport: str
) -> None:
    n = 300
    alice, a = await make_client("alice", transport=transport, backoff_base=0.05)
    bob, b = await make_client("bob", transport=transport, backoff_base=0.05)
    assert a is not None and b is not None
    conv = (await alice.send("start", to=bob.uid)).conv
    cmids = []
    dropped: list[str] = []
    for i in range(n):
        cmids.append(alice.post(i, conv=conv))
        if i == n // 3:
            await b.wait(lambda: len(b.messages) >= 20)
            assert bob.transport is not None
            bob.transport.abort()  # the receiver's socket dies mid-stream
            dropped.append("bob")
        if i == n // 2:
            assert alice.transport is not None and alice.outbox
            alice.transport.abort()  # the sender's socket dies with sends in flight
            dropped.append("alice")
        await asyncio.sleep(0.001)  # pacing only: the drops must land mid-stream
    await b.wait(lambda: len(b.messages) == n + 1)
    await a.wait(lambda: len(a.acks) == n + 1)
    assert dropped == ["bob", "alice"]
    assert bob.connections >= 2 and alice.connections >= 2
    assert [m.seq for m in b.messages] == list(range(1, n + 2))
    assert sorted(x.cmid for x in a.acks[1:]) == sorted(cmids)  # every send acked exactly once
    assert [m.body for m in b.messages[1:]] == list(range(n))  # resent in the original order
    log = await stored(server, "bob", conv)
    assert [m.seq for m in log] == [m.seq for m in b.messages]
    assert len({m.cmid for m in log}) == n + 1  # nothing stored twice
    assert any(type(e) is Disconnected and e.reconnect for e in b.events)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
async def test_server_restart_with_sends_in_flight(server: ServerProcess, make_client: ClientFactory, sig: int) -> None:
    n = 400
    alice, a = await make_client("alice", backoff_base=0.05, backoff_max=0.3)
    bob, b = await make_client("bob", transport="tcp", backoff_base=0.05, backoff_max=0.3)
    assert a is not None and b is not None
    conv = (await alice.send("start", to=bob.uid)).conv
    posted: list[str] = []

    async def pump() -> None:
        for i in range(n):
            posted.append(alice.post({"i": i}, conv=conv))
            await asyncio.sleep(0.003)  # pacing only: the restart must land mid-stream

    task = asyncio.create_task(pump())
    await a.wait(lambda: len(a.acks) >= 40)
    assert not task.done(), "the sends finished before the restart"
    await asyncio.to_thread(server.restart, sig)
    await task
    await a.wait(lambda: len(a.acks) == n + 1, timeout=60)
    await b.wait(lambda: len(b.messages) == n + 1, timeout=60)
    assert alice.connections >= 2 and bob.connections >= 2
    assert sorted(x.cmid for x in a.acks[1:]) == sorted(posted) and alice.outbox == {}
    assert [m.seq for m in b.messages] == list(range(1, n + 2))
    log = await stored(server, "alice", conv)
    assert [m.cmid for m in log] == [m.cmid for m in b.messages]  # the app saw exactly the server's log
    assert sorted(m.body["i"] for m in log[1:]) == list(range(n))


async def test_cursor_file_lets_a_new_instance_resume_without_redelivery(
    make_client: ClientFactory, tmp_path: Path
) -> None:
    cursor_file = tmp_path / "bob.json"
    alice, _ = await make_client("alice")
    got_first = asyncio.Event()

    def on_event(e: ClientEvent) -> None:
        if type(e) is Message:
            got_first.set()

    bob1, _ = await make_client("bob", device="desk", cursor_file=cursor_file, on_event=on_event)
    conv = (await alice.send(0, to=bob1.uid)).conv
    await asyncio.wait_for(got_first.wait(), 10)
    await bob1.close()  # it took message 1 (on_event)
    assert json.loads(cursor_file.read_text())["cursors"] == {conv: 1}

    bob2 = Client(ApiClient(bob1.api.base_url), device="desk", cursor_file=cursor_file, close_api=True)
    await bob2.api.login("bob", PASSWORD)
    events = bob2.events()
    taken: list[Message] = []

    async def take(count: int) -> None:
        async for e in events:
            if type(e) is Message:
                taken.append(e)
                if len(taken) == count:
                    return

    try:
        async with bob2:
            for i in range(1, 20):
                await alice.send(i, conv=conv)
            # The application takes 15 messages and quits: 4 more were received but never handed over.
            await asyncio.wait_for(take(15), 30)
            await bob2.wait_synced(10)
            assert max(bob2.cursors.values()) >= 16
    finally:
        await bob2.close()
    assert [m.seq for m in taken] == list(range(2, 17))
    assert json.loads(cursor_file.read_text())["cursors"] == {conv: 16}

    bob3, b3 = await make_client("bob", device="desk", cursor_file=cursor_file)
    assert b3 is not None
    await bob3.wait_synced(30)
    await b3.wait(lambda: len(b3.messages) == 4)
    assert [m.seq for m in b3.messages] == [17, 18, 19, 20]  # nothing re-delivered, nothing lost
    assert [m.body for m in b3.messages] == [16, 17, 18, 19]


async def test_outbox_in_cursor_file_is_sent_by_the_next_process(
    server: ServerProcess, make_client: ClientFactory, tmp_path: Path
) -> None:
    cursor_file = tmp_path / "alice.json"
    _, b = await make_client("bob")
    alice_api = ApiClient(server.http)
    await alice_api.register("alice", PASSWORD)
    await alice_api.login("alice", PASSWORD)
    bob_uid = (await alice_api.user_by_name("bob")).uid

    def unreachable(gateway: Gateway) -> Transport:
        raise ConnectionRefusedError("offline")

    offline = Client(alice_api, device="phone", cursor_file=cursor_file, transport_factory=unreachable, close_api=True)
    offline.start()
    cmids = [offline.post(f"written offline {i}", to=bob_uid) for i in range(3)]
    await offline.close()
    assert [s["cmid"] for s in json.loads(cursor_file.read_text())["outbox"]] == cmids

    alice, a = await make_client("alice", device="phone", cursor_file=cursor_file)
    assert a is not None and b is not None
    await a.wait(lambda: len(a.acks) == 3)
    assert [x.cmid for x in a.acks] == cmids
    await b.wait(lambda: len(b.messages) == 3)
    assert [(m.cmid, m.body) for m in b.messages] == [(c, f"written offline {i}") for i, c in enumerate(cmids)]
    await alice.close()
    assert json.loads(cursor_file.read_text())["outbox"] == []


class LosesFirstAck(Transport):
    """A WebSocket transport that loses the first ``ack`` it receives, together with the connection (as a
    real network does), and records every frame written."""

    lost: list[dict[str, Any]] = []
    written: list[dict[str, Any]] = []

    def __init__(self, url: str) -> None:
        self.inner = WebSocketTransport(url)
        self.encoding = self.inner.encoding

    async def connect(self) -> None:
        await self.inner.connect()

    def send(self, data: bytes) -> None:
        self.written.append(json.loads(data))
        self.inner.send(data)

    async def recv(self) -> bytes | None:
        data = await self.inner.recv()
        if data is not None and not self.lost and json.loads(data)["t"] == "ack":
            self.lost.append(json.loads(data))
            self.inner.abort()
            return None
        return data

    async def close(self) -> None:
        await self.inner.close()

    def abort(self) -> None:
        self.inner.abort()


async def test_send_retried_after_a_lost_ack_keeps_its_cmid(server: ServerProcess, make_client: ClientFactory) -> None:
    bob, b = await make_client("bob")
    LosesFirstAck.lost, LosesFirstAck.written = [], []
    alice, a = await make_client("alice", transport_factory=lambda gw: LosesFirstAck(gw.ws))
    assert a is not None and b is not None
    ack = await alice.send({"text": "once"}, to=bob.uid, cmid="only-once")
    sends = [f for f in LosesFirstAck.written if f["t"] == "send"]
    assert [f["cmid"] for f in sends] == ["only-once", "only-once"]  # written on two connections
    assert LosesFirstAck.lost[0]["cmid"] == "only-once"
    assert (ack.cmid, ack.seq, ack.mid) == ("only-once", 1, LosesFirstAck.lost[0]["mid"])  # the same message
    await b.wait(lambda: len(b.messages) == 1)
    await a.wait(lambda: len(a.acks) == 1)
    assert alice.connections == 2 and [x.cmid for x in a.acks] == ["only-once"]
    assert len(await stored(server, "bob", ack.conv)) == 1


async def test_final_refusal_raises_and_leaves_the_outbox(make_client: ClientFactory) -> None:
    alice, a = await make_client("alice")
    bob, _ = await make_client("bob")
    assert a is not None
    with pytest.raises(SendError) as exc:
        await alice.send("to myself", to=alice.uid)
    assert exc.value.code == "invalid" and alice.outbox == {}
    with pytest.raises(SendError) as exc:
        await alice.send("nobody", to=987654)
    assert exc.value.code == "not_found"
    ok = await alice.send("the connection is still fine", to=bob.uid)
    assert ok.seq == 1 and alice.connections == 1
    await a.wait(lambda: len(a.of(SendFailed)) == 2)
    assert [f.code for f in a.of(SendFailed)] == ["invalid", "not_found"]


async def test_a_replaced_device_stops_instead_of_fighting(make_client: ClientFactory) -> None:
    first, f = await make_client("alice", device="tablet")
    second, _ = await make_client("alice", device="tablet")
    assert f is not None
    await f.wait(lambda: any(type(e) is Disconnected and not e.reconnect for e in f.events))
    assert [e.code for e in f.events if type(e) is Bye] == ["replaced"]
    with pytest.raises(ClientClosed):
        await first.send("x", to=1)
    await second.wait_connected(5)
    assert second.connections == 1


async def test_pings_keep_an_idle_connection_open(tmp_path: Path) -> None:
    proc = ServerProcess(tmp_path / "data", extra=["--set", "gateway.idle_timeout=1.5"]).start()
    try:
        async with ApiClient(proc.http) as api:
            await api.register("idle", PASSWORD)
            await api.login("idle", PASSWORD)
            async with Client(api, device="d") as client:
                await client.wait_connected(10)
                assert client.session.auth_ok is not None and client.session.auth_ok.heartbeat == 1.5
                await asyncio.sleep(4)  # > 2 idle timeouts: without pings the server would say bye
                assert client.connections == 1
    finally:
        assert proc.stop() == 0


async def test_on_event_mode_for_load_generators(make_client: ClientFactory) -> None:
    got: list[Any] = []
    done = asyncio.Event()
    bob, b = await make_client("bob")

    def on_event(e: Any) -> None:
        got.append(e)
        if sum(type(x) is Ack for x in got) == 500:
            done.set()

    alice, _ = await make_client("alice", on_event=on_event, max_in_flight=64)
    assert b is not None
    for i in range(500):
        alice.post(i, to=bob.uid)
    await asyncio.wait_for(done.wait(), 30)
    assert alice.session.in_flight == 0 and alice.outbox == {}
    await b.wait(lambda: len(b.messages) == 500)
    assert [m.body for m in b.messages] == list(range(500))  # a window of 64 keeps the order


async def test_send_file_uploads_once_and_the_peer_downloads_it(make_client: ClientFactory, tmp_path: Path) -> None:
    alice, _ = await make_client("alice")
    bob, b = await make_client("bob")
    assert b is not None
    path = tmp_path / "notes.txt"
    path.write_bytes(b"meeting at noon\n" * 50)
    first = await alice.send_file(path, to=bob.uid, caption="notes")
    again = await alice.send_file(path.read_bytes(), "notes.txt", conv=first.conv)
    await b.wait(lambda: len(b.messages) == 2)
    one, two = b.messages
    assert (one.type, one.body["name"], one.body["caption"]) == ("file", "notes.txt", "notes")
    assert one.body["file_id"] == two.body["file_id"] and again.seq == 2
    assert await bob.api.download(one.body["file_id"]) == path.read_bytes()
    assert (await bob.api.file_info(one.body["file_id"])).size == 800


async def test_logout_stops_the_client_for_good(make_client: ClientFactory) -> None:
    alice, a = await make_client("alice")
    assert a is not None
    await alice.api.logout()  # the server closes this login's connections with bye auth_failed
    await a.wait(lambda: any(type(e) is Disconnected and not e.reconnect for e in a.events))
    assert any(type(e).__name__ == "Bye" and e.code == "auth_failed" for e in a.events)  # type: ignore[union-attr]
    with pytest.raises(ClientClosed):
        await alice.wait_connected(1)


async def test_backoff_grows_while_the_server_is_down(server: ServerProcess, make_client: ClientFactory) -> None:
    _alice, a = await make_client("alice", backoff_base=0.1, backoff_max=5.0)
    assert a is not None
    server.stop()
    await a.wait(lambda: len(a.of(Disconnected)) >= 1, timeout=10)
    await asyncio.sleep(3.0)  # waits 0.05-0.1, 0.1-0.2, 0.2-0.4, 0.4-0.8, 0.8-1.6 s: six attempts at most
    attempts = len(a.of(Disconnected))
    assert attempts <= 7, f"{attempts} reconnect attempts in 3 s: the backoff does not grow"
    server.start()  # the fixture stops it again
