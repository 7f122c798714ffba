"""The gateway hub (im.gateway.hub) without sockets: connections over a fake transport that records what
the hub writes, a hub wired as ``im serve`` wires it (SQLite in tmp_path, MemoryPresence, MemoryRouter,
the real committer and read side, the real account service).

Each test drives client frames into :meth:`Connection.on_data` and asserts on the frames written back,
on what reached the stores, and on which connections were closed."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from im.backends.accounts.sqlite import SqliteAccountStore
from im.backends.chat.sqlite import SqliteChatStore
from im.backends.presence.memory import MemoryPresence
from im.backends.routing.memory import MemoryRouter
from im.backends.sql.sqlite_db import SqliteDatabase
from im.core.accounts import AccountService
from im.core.committer import SendCallback, SendRequest
from im.gateway.hub import Connection, Hub
from im.model.errors import ErrorCode, ImError
from im.model.ids import direct_conv
from im.observability.metrics import METRICS
from im.protocol.session import Limits, State
from tests.support.chat import ChatCore, chat_core
from tests.support.wait import eventually

NODE = "gw-1"


class FakeConnection(Connection):
    """A transport that keeps what is written (decoded JSON frames) and closes at once when asked."""

    def __init__(self, hub: Hub) -> None:
        super().__init__(hub)
        self.node = hub.node
        self.frames: list[dict[str, Any]] = []
        self.closed_with: ErrorCode | None = None

    def write(self, frames: list[bytes], binary: bool) -> None:
        assert not binary, "a client that writes JSON text is answered in JSON"
        self.frames.extend(json.loads(f) for f in frames)

    def close_transport(self, code: ErrorCode) -> None:
        self.closed_with = code
        self.on_closed()  # as a transport reports its connection lost

    def buffered(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def send(self, **frame: Any) -> None:
        self.on_data(json.dumps(frame).encode(), False)

    def of_type(self, t: str) -> list[dict[str, Any]]:
        return [f for f in self.frames if f["t"] == t]


@dataclass
class Gateway:
    hub: Hub
    accounts: AccountService
    core: ChatCore
    store: SqliteChatStore

    async def user(self, name: str) -> tuple[int, str]:
        """A registered user with a live session: (uid, access token)."""
        user = await self.accounts.register(name, "password123")
        return user.uid, (await self.accounts.login(name, "password123")).access_token

    async def connect(self, token: str, device: str = "phone") -> FakeConnection:
        """A connection that authenticated and finished its first sync."""
        conn = FakeConnection(self.hub)
        self.hub.add(conn)
        conn.send(t="auth", token=token, device=device)
        await eventually(lambda: conn.of_type("synced") or conn.closed_with, lambda: str(conn.frames))
        return conn


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[Gateway]:
    db = SqliteDatabase(tmp_path / "im.db")
    store, account_store = SqliteChatStore(db), SqliteAccountStore(db)
    await store.start()
    await account_store.start()
    accounts = AccountService(
        account_store, secret=b"s" * 32, argon2_time_cost=1, argon2_memory_kib=8, argon2_parallelism=1
    )
    presence, router = MemoryPresence(), MemoryRouter()
    core = chat_core(store, account_store, router, presence)
    accounts.on_privacy_change(core.consent.forget)
    hub = Hub(
        NODE,
        reads=core.reads,
        cursor_store=store,
        presence=presence,
        router=router,
        accounts=accounts,
        submit=core.committer.submit,
        limits=Limits(),
        cursor_flush_interval=0.02,
    )
    core.committer.start()
    hub.start()
    try:
        yield Gateway(hub, accounts, core, store)
    finally:
        hub.pause_all()
        await core.committer.stop()
        await hub.drain_and_close()
        await account_store.close()
        await store.close()


async def test_auth_with_a_valid_token_opens_the_session_and_a_bad_one_closes_it(gateway: Gateway) -> None:
    uid, token = await gateway.user("alice")
    good = await gateway.connect(token, "laptop")
    assert [f["t"] for f in good.frames] == ["auth_ok", "synced"]
    assert (good.frames[0]["uid"], good.frames[0]["device"]) == (uid, "laptop")
    assert good.closed_with is None and good.session.state is State.OPEN
    assert gateway.hub.connections == 1

    bad = await gateway.connect(token[:-4] + "AAAA")
    assert [(f["t"], f["code"]) for f in bad.frames] == [("error", "auth_failed"), ("bye", "auth_failed")]
    assert bad.frames[1]["reconnect"] is False
    assert bad.closed_with is ErrorCode.AUTH_FAILED
    assert gateway.hub.connections == 1  # the refused one is gone, the good one stays


async def test_a_send_is_acked_to_the_sender_and_delivered_to_the_peer(gateway: Gateway) -> None:
    alice, alice_token = await gateway.user("alice")
    bob, bob_token = await gateway.user("bob")
    a, b = await gateway.connect(alice_token), await gateway.connect(bob_token)

    a.send(t="send", cmid="c1", to=bob, body={"text": "hi"})
    await eventually(lambda: a.of_type("ack") and b.of_type("msg"), lambda: f"{a.frames} / {b.frames}")

    conv = direct_conv(alice, bob)
    (ack,) = a.of_type("ack")
    assert (ack["cmid"], ack["conv"], ack["seq"], ack["dup"]) == ("c1", conv, 1, False)
    (msg,) = b.of_type("msg")
    assert (msg["conv"], msg["seq"], msg["from"], msg["cmid"], msg["body"]) == (conv, 1, alice, "c1", {"text": "hi"})
    assert msg["mid"] == ack["mid"]
    assert a.of_type("msg") == []  # the sender's own message comes back as the ack only


async def test_senders_of_one_commit_get_their_acks_in_order_without_a_store_read(gateway: Gateway) -> None:
    """Two members send in the same loop turn, so one commit holds both. The committer answers before it
    routes: the second sender's result (seq n+1) reaches its connection before the first sender's message
    (seq n). It waits for it live (``Hub.live_wait``) instead of reading the gap from the store."""
    alice, alice_token = await gateway.user("alice")
    bob, bob_token = await gateway.user("bob")
    a, b = await gateway.connect(alice_token), await gateway.connect(bob_token)
    a.send(t="send", cmid="warm", to=bob, body=0)  # a first message: each connection starts the conversation
    await eventually(lambda: a.of_type("ack") and b.of_type("msg"), lambda: f"{a.frames} / {b.frames}")
    fetches = METRICS.gap_fetches
    rounds = 20
    for i in range(rounds):
        a.send(t="send", cmid=f"a{i}", to=bob, body=i)
        b.send(t="send", cmid=f"b{i}", to=alice, body=i)
        await eventually(lambda: len(b.of_type("ack")) == i + 1, lambda: f"{b.frames}")  # noqa: B023
    await eventually(lambda: len(a.of_type("msg")) == rounds, lambda: f"{a.frames}")
    for conn in (a, b):
        seqs = [f["seq"] for f in conn.frames if f["t"] in ("msg", "ack")]
        assert seqs == list(range(1, 2 * rounds + 2)), seqs  # dense, in order, each once
    assert [f["seq"] for f in b.of_type("ack")] == [2 * i + 3 for i in range(rounds)]  # each behind alice's
    assert METRICS.gap_fetches == fetches


async def test_a_result_whose_earlier_message_does_not_come_live_reads_it_after_the_wait(gateway: Gateway) -> None:
    """Bob's message is stored but its delivery to this node is lost (the path is down); alice's next send
    is answered ahead of a gap nothing will fill: after ``live_wait`` it is read from the store, and her
    ack follows it."""
    alice, alice_token = await gateway.user("alice")
    bob, bob_token = await gateway.user("bob")
    a, b = await gateway.connect(alice_token), await gateway.connect(bob_token)
    a.send(t="send", cmid="warm", to=bob, body=0)
    await eventually(lambda: a.of_type("ack") and b.of_type("msg"), lambda: f"{a.frames} / {b.frames}")
    router = gateway.core.router
    router.detach(NODE)
    b.send(t="send", cmid="b1", to=alice, body=1)
    await eventually(lambda: b.of_type("ack"), lambda: str(b.frames))
    router.attach(NODE, gateway.hub)
    fetches = METRICS.gap_fetches
    gateway.hub.live_wait = 0.5  # the wait outlasts the polls below (the loop runs due timers in order)
    a.send(t="send", cmid="a2", to=bob, body=2)
    conv = direct_conv(alice, bob)
    await eventually(lambda: conv in a.session.conversations and a.session.conversations[conv].awaiting_live)
    assert len(a.of_type("ack")) == 1 and METRICS.gap_fetches == fetches  # held, nothing read yet
    await eventually(lambda: len(a.of_type("ack")) == 2, lambda: str(a.frames))
    assert [(f["t"], f["seq"]) for f in a.frames if f["t"] in ("msg", "ack")] == [("ack", 1), ("msg", 2), ("ack", 3)]
    assert METRICS.gap_fetches == fetches + 1


async def test_a_login_replays_every_conversation_that_changed_in_one_read_a_page(gateway: Gateway) -> None:
    """Three partners wrote to alice while she was away, five messages each: her login replays the three
    conversations with one store read per page (``replay_page`` 2: three pages), not one per conversation."""
    alice, alice_token = await gateway.user("alice")
    writers = [await gateway.user(name) for name in ("bob", "carol", "dave")]
    for uid, token in writers:
        w = await gateway.connect(token)
        for i in range(5):
            w.send(t="send", cmid=f"{uid}-{i}", to=alice, body=i)
        await eventually(lambda: len(w.of_type("ack")) == 5, lambda: str(w.frames))  # noqa: B023
    store = gateway.store
    reads: list[tuple[str, int]] = []
    one, many = store.read_range, store.read_ranges

    async def read_range(*args: Any, **kwargs: Any) -> Any:
        reads.append(("read_range", 1))
        return await one(*args, **kwargs)

    async def read_ranges(ranges: Any, limit: int) -> Any:
        reads.append(("read_ranges", len(ranges)))
        return await many(ranges, limit)

    store.read_range, store.read_ranges = read_range, read_ranges  # type: ignore[method-assign]
    gateway.hub.replay_page = 2
    a = await gateway.connect(alice_token)
    assert a.closed_with is None and a.of_type("synced"), a.frames
    assert reads == [("read_ranges", 3)] * 3  # pages of 2, 2 and 1 message, each for all three
    for uid, _ in writers:
        conv = direct_conv(alice, uid)
        assert [m["seq"] for m in a.of_type("msg") if m["conv"] == conv] == [1, 2, 3, 4, 5]


async def test_a_login_whose_replay_cannot_be_read_is_told_to_come_back(gateway: Gateway) -> None:
    alice, alice_token = await gateway.user("alice")
    for name in ("bob", "carol"):
        _, token = await gateway.user(name)
        w = await gateway.connect(token)
        w.send(t="send", cmid=f"{name}-1", to=alice, body=1)
        await eventually(lambda: w.of_type("ack"), lambda: str(w.frames))  # noqa: B023

    async def away(ranges: Any, limit: int) -> Any:
        raise ConnectionRefusedError("the store is away")

    gateway.store.read_ranges = away  # type: ignore[method-assign]
    a = await gateway.connect(alice_token)
    assert a.closed_with is ErrorCode.UNAVAILABLE and a.of_type("msg") == []
    (bye,) = a.of_type("bye")
    assert bye["code"] == "unavailable" and bye["reconnect"] is True


async def test_sends_go_to_the_submit_the_hub_was_given(gateway: Gateway) -> None:
    """On a gateway node ``submit`` is the transfer pool's: the hub hands it the request and answers the
    client from the callback, whatever is behind it."""
    taken: list[SendRequest] = []

    def refusing_submit(req: SendRequest, done: SendCallback) -> None:
        taken.append(req)
        done(req, None, False, ImError(ErrorCode.UNAVAILABLE, "no transfer node"))

    gateway.hub.submit = refusing_submit
    alice, token = await gateway.user("alice")
    a = await gateway.connect(token)
    a.send(t="send", cmid="c1", conv="g:7", body="x")
    await eventually(lambda: a.of_type("error"), lambda: str(a.frames))
    assert [(r.uid, r.device, r.cmid, r.conv, r.to, r.body) for r in taken] == [
        (alice, "phone", "c1", "g:7", None, b'"x"')
    ]
    assert [(e["code"], e["ref"]) for e in a.of_type("error")] == [("unavailable", "c1")]


async def test_typing_reaches_the_other_members_only(gateway: Gateway) -> None:
    alice, alice_token = await gateway.user("alice")
    bob, bob_token = await gateway.user("bob")
    carol, carol_token = await gateway.user("carol")
    dan, dan_token = await gateway.user("dan")
    group = await gateway.core.groups.create_group(alice, "g", [bob, dan])
    conv = f"g:{group.gid}"
    a, a2 = await gateway.connect(alice_token, "phone"), await gateway.connect(alice_token, "laptop")
    b, c, d = await gateway.connect(bob_token), await gateway.connect(carol_token), await gateway.connect(dan_token)
    await gateway.accounts.block(dan, alice)  # dan blocks alice: neither sees the other's typing

    a.send(t="typing", conv=conv)
    await eventually(lambda: b.of_type("typing") and a2.of_type("typing"), lambda: f"{b.frames} / {a2.frames}")
    assert b.of_type("typing") == [{"t": "typing", "conv": conv, "uid": alice}]
    assert a2.of_type("typing") == [{"t": "typing", "conv": conv, "uid": alice}]  # the typer's other device
    await gateway.hub.typing(carol, "phone", conv)  # not a member: goes nowhere
    b.send(t="ping", id=1)  # a round trip on bob's connection after carol's attempt
    await eventually(lambda: b.of_type("pong"))
    assert a.of_type("typing") == []  # not back to the typing device
    assert c.of_type("typing") == []  # carol is no member
    assert d.of_type("typing") == []  # dan blocks alice
    assert b.of_type("typing") == [{"t": "typing", "conv": conv, "uid": alice}]  # carol's typing did not arrive


async def test_cursor_and_read_mark_flushes_reach_the_store_and_the_peer(gateway: Gateway) -> None:
    alice, alice_token = await gateway.user("alice")
    bob, bob_token = await gateway.user("bob")
    a, b = await gateway.connect(alice_token), await gateway.connect(bob_token)
    for i in range(3):
        a.send(t="send", cmid=f"c{i}", to=bob, body=i)
    await eventually(lambda: len(b.of_type("msg")) == 3, lambda: str(b.frames))
    conv = direct_conv(alice, bob)

    b.send(t="recv", conv=conv, seq=3)
    b.send(t="read", conv=conv, seq=2)
    await eventually(lambda: len(a.of_type("receipt")) == 2, lambda: str(a.frames))

    assert await gateway.store.start_cursor(bob, "phone", conv) == 3
    assert (await gateway.store.read_marks(conv))[bob] == 2
    receipts = sorted((r["kind"], r["uid"], r["seq"]) for r in a.of_type("receipt"))
    assert receipts == [("delivered", bob, 3), ("read", bob, 2)]
    # a reconnecting device resumes from the stored cursor: nothing to replay
    again = await gateway.connect(bob_token, "phone")
    assert again.of_type("msg") == []


async def test_a_revoked_session_is_closed_and_others_stay(gateway: Gateway) -> None:
    _, token = await gateway.user("alice")
    _, other_token = await gateway.user("bob")
    doomed, other = await gateway.connect(token), await gateway.connect(other_token)
    sid = (await gateway.accounts.authenticate(token)).sid

    await gateway.accounts.logout(sid)  # the account service announces the revocation to the hub

    assert doomed.closed_with is ErrorCode.AUTH_FAILED
    assert doomed.frames[-1] == {
        "t": "bye",
        "code": "auth_failed",
        "message": "the login session was revoked",
        "reconnect": False,
    }
    assert other.closed_with is None and other.session.state is State.OPEN
    assert gateway.hub.connections == 1


async def test_after_a_relink_every_session_fetches_what_the_link_dropped(gateway: Gateway) -> None:
    """What the core routed while the path to this node was down is lost on the way (routers are at most
    once); ``catch_up`` has every open session check the log's heads and fetch it, with no later message
    to show the gap."""
    _, alice_token = await gateway.user("alice")
    bob, bob_token = await gateway.user("bob")
    a, b = await gateway.connect(alice_token), await gateway.connect(bob_token)
    router = gateway.core.router
    router.detach(NODE)  # the link is down: deliveries to this node go nowhere
    for i in range(3):
        a.send(t="send", cmid=f"c{i}", to=bob, body=i)
    await eventually(lambda: len(a.of_type("ack")) == 3, lambda: str(a.frames))
    assert b.of_type("msg") == []
    router.attach(NODE, gateway.hub)
    gateway.hub.catch_up()
    await eventually(lambda: len(b.of_type("msg")) == 3, lambda: str(b.frames))
    assert [m["seq"] for m in b.of_type("msg")] == [1, 2, 3]
    assert a.of_type("msg") == [] and b.closed_with is None


async def test_a_login_whose_sync_points_were_read_before_a_relink_checks_the_heads_after(gateway: Gateway) -> None:
    """The hub's catch-up passes by a session that is still authenticating; if its sync points were read
    before the relink, what the link dropped is not in them: the session checks the heads once open."""
    _, alice_token = await gateway.user("alice")
    bob, bob_token = await gateway.user("bob")
    a = await gateway.connect(alice_token)
    reads, hub, router = gateway.hub.reads, gateway.hub, gateway.core.router

    class ReadsThenRelink:
        """The read side, but a relink lands while bob's sync points are on their way back."""

        def __getattr__(self, name: str) -> Any:
            return getattr(reads, name)

        async def sync_points(self, uid: int, device: str) -> Any:
            points = await reads.sync_points(uid, device)
            if uid == bob:
                router.detach(NODE)
                a.send(t="send", cmid="c1", to=bob, body="dropped")
                await eventually(lambda: a.of_type("ack"), lambda: str(a.frames))
                router.attach(NODE, hub)
                hub.catch_up()
                await hub.caught_up()  # it found bob still authenticating
            return points

    hub.reads = ReadsThenRelink()  # type: ignore[assignment]
    b = await gateway.connect(bob_token)
    await eventually(lambda: b.of_type("msg"), lambda: str(b.frames))
    assert [(m["seq"], m["body"]) for m in b.of_type("msg")] == [(1, "dropped")]


def route_by_presence(gateway: Gateway, monkeypatch: pytest.MonkeyPatch) -> None:
    """Have the committer look recipients up in presence, as one does whose router keeps no table of the
    gateways' users (an API process's; a transfer node while an older gateway is linked)."""
    monkeypatch.setattr(gateway.core.router, "holders", lambda _uids: None)


async def test_the_committer_routes_by_the_hubs_own_users_with_presence_empty(gateway: Gateway) -> None:
    """In one process the router reaches this hub alone, and the hub says whom it holds: a message
    reaches bob live though presence lost his entry (a Redis restart without its data)."""
    _, alice_token = await gateway.user("alice")
    bob, bob_token = await gateway.user("bob")
    a, b = await gateway.connect(alice_token), await gateway.connect(bob_token)
    presence = gateway.core.presence
    await presence.set_offline(list((await presence.locate([bob]))[bob]))
    assert await presence.locate([bob]) == {}
    catch_ups = gateway.hub.catch_ups
    a.send(t="send", cmid="c1", to=bob, body="live all the same")
    await eventually(lambda: b.of_type("msg"), lambda: str(b.frames))
    assert [(m["seq"], m["body"]) for m in b.of_type("msg")] == [(1, "live all the same")]
    assert gateway.hub.catch_ups == catch_ups  # delivered live, not found by a catch-up


async def test_devices_presence_lost_fetch_what_was_routed_to_nowhere_at_the_next_refresh(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Presence emptied (a Redis restart without its data, an entry expired), and a committer that
    routes by it: messages for those devices went nowhere until the gateway announced them again; the
    refresh that finds them gone has them check the log."""
    route_by_presence(gateway, monkeypatch)
    _, alice_token = await gateway.user("alice")
    bob, bob_token = await gateway.user("bob")
    a, b = await gateway.connect(alice_token), await gateway.connect(bob_token)
    presence = gateway.core.presence
    await presence.set_offline(list((await presence.locate([bob]))[bob]))  # bob's entry is lost
    a.send(t="send", cmid="c1", to=bob, body="while bob was nowhere")
    await eventually(lambda: a.of_type("ack"), lambda: str(a.frames))
    assert b.of_type("msg") == []
    await gateway.hub.refresh_presence()  # what the timer loop does every max(1 s, presence ttl / 3)
    await eventually(lambda: b.of_type("msg"), lambda: str(b.frames))
    assert [(m["seq"], m["body"]) for m in b.of_type("msg")] == [(1, "while bob was nowhere")]
    assert bob in await presence.locate([bob])


async def test_a_lost_devices_catch_up_is_retried_while_the_store_does_not_answer(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The refresh found bob's entry gone, and the first read of the log's heads failed (the store away
    for a moment): the catch-up runs in the background and tries again, rather than waiting for a next
    message or being taken for a failed presence refresh."""
    route_by_presence(gateway, monkeypatch)
    _, alice_token = await gateway.user("alice")
    bob, bob_token = await gateway.user("bob")
    a, b = await gateway.connect(alice_token), await gateway.connect(bob_token)
    presence = gateway.core.presence
    await presence.set_offline(list((await presence.locate([bob]))[bob]))
    a.send(t="send", cmid="c1", to=bob, body="while bob was nowhere")
    await eventually(lambda: a.of_type("ack"), lambda: str(a.frames))
    reads = gateway.hub.reads
    heads = reads.heads
    failures: list[Any] = []

    async def away_once(uids: Any) -> Any:
        if not failures:
            failures.append(uids)
            raise ConnectionError("store away")
        return await heads(uids)

    monkeypatch.setattr(reads, "heads", away_once)
    await gateway.hub.refresh_presence()
    await gateway.hub.caught_up()  # the second try read the heads and started bob's fetch
    assert failures == [[bob]]
    await eventually(lambda: b.of_type("msg"), lambda: str(b.frames))
    assert [(m["seq"], m["body"]) for m in b.of_type("msg")] == [(1, "while bob was nowhere")]


async def test_a_device_whose_claim_failed_fetches_what_was_routed_to_nowhere_once_claimed(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Presence refused the claim of bob's connection (Redis away), and the committer routes by presence:
    nothing was routed to it; the refresh that claims it again has it check the log."""
    route_by_presence(gateway, monkeypatch)
    _, alice_token = await gateway.user("alice")
    _, bob_token = await gateway.user("bob")
    a = await gateway.connect(alice_token)
    presence = gateway.core.presence
    claim = presence.claim

    async def refused(*_args: Any, **_kw: Any) -> Any:
        raise ConnectionError("presence away")

    monkeypatch.setattr(presence, "claim", refused)
    b = await gateway.connect(bob_token)
    assert b.session.state is State.OPEN and b.claimed is False
    a.send(t="send", cmid="c1", to=b.session.uid, body="while bob was not announced")
    await eventually(lambda: a.of_type("ack"), lambda: str(a.frames))
    assert b.of_type("msg") == []
    monkeypatch.setattr(presence, "claim", claim)
    await gateway.hub.refresh_presence()
    await eventually(lambda: b.of_type("msg"), lambda: str(b.frames))
    assert [m["body"] for m in b.of_type("msg")] == ["while bob was not announced"] and b.claimed


async def test_a_connections_tasks_end_with_it_and_an_idle_one_holds_no_task_set(gateway: Gateway) -> None:
    _, token = await gateway.user("alice")
    conn = await gateway.connect(token)
    await eventually(lambda: conn._tasks is None, "the auth task's set dropped once it finished")
    started = asyncio.Event()

    async def work() -> None:
        started.set()
        await asyncio.sleep(60)

    conn._spawn(work())
    await started.wait()
    assert conn._tasks is not None and len(conn._tasks) == 1
    (task,) = conn._tasks
    conn.close_transport(ErrorCode.SHUTDOWN)
    with pytest.raises(asyncio.CancelledError):
        await task
    assert conn._tasks is None


async def test_a_login_reads_its_sync_points_only_once_the_transfer_nodes_route_its_user_here(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A transfer node routes by the table of users each gateway reports (``Router.announce``): a
    device's sync points are read only once its user's first connection here is in every such table, so
    that a message committed after that read is routed here. A second device of the user waits for the
    same answers; the last connection's close announces the user gone. A table that does not answer
    within ANNOUNCE_WAIT does not hold the login up further: its waiter gives up (cancels the future)."""
    uid, token = await gateway.user("alice")
    router = gateway.core.router
    announced: list[tuple[int, bool]] = []
    answers: list[asyncio.Future[None]] = []

    def announce(u: int, held: bool) -> list[asyncio.Future[None]]:
        announced.append((u, held))
        if not held:
            return []
        answers.append(asyncio.get_running_loop().create_future())
        return [answers[-1]]

    monkeypatch.setattr(router, "announce", announce)
    phone, laptop = FakeConnection(gateway.hub), FakeConnection(gateway.hub)
    for conn, device in ((phone, "phone"), (laptop, "laptop")):
        gateway.hub.add(conn)
        conn.send(t="auth", token=token, device=device)
    await eventually(lambda: announced, "the first connection announced its user")
    await asyncio.sleep(0.2)
    assert announced == [(uid, True)]  # once for the user, not per device
    assert not phone.of_type("synced") and not laptop.of_type("synced")  # both wait for the answer
    answers[0].set_result(None)
    await eventually(lambda: phone.of_type("synced") and laptop.of_type("synced"), lambda: str(phone.frames))

    phone.close_transport(ErrorCode.INTERNAL)
    assert announced == [(uid, True)]  # the laptop still holds the user here
    laptop.close_transport(ErrorCode.INTERNAL)
    assert announced == [(uid, True), (uid, False)]

    monkeypatch.setattr("im.gateway.hub.ANNOUNCE_WAIT", 0.2)
    again = FakeConnection(gateway.hub)
    gateway.hub.add(again)
    again.send(t="auth", token=token, device="phone")
    await eventually(lambda: again.of_type("synced"), lambda: str(again.frames))
    assert announced[-1] == (uid, True) and answers[-1].cancelled()  # given up on, so its link catches up
