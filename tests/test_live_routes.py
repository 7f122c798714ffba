"""Messages committed while presence is unreachable are routed again once it answers: with the next
commit (older first) or, when no commit comes, after the committer's back-off. Before, they reached
online members only with the conversation's next message or the member's next reconnect."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Collection, Iterable, Sequence
from pathlib import Path

import msgspec
import pytest

from im.backends.accounts.sqlite import SqliteAccountStore
from im.backends.chat.sqlite import SqliteChatStore
from im.backends.presence.memory import MemoryPresence
from im.backends.routing import DeliverySink
from im.backends.routing.memory import MemoryRouter
from im.backends.sql.sqlite_db import SqliteDatabase
from im.core.committer import SendRequest
from im.core.live_routes import LiveRoutes, Unrouted
from im.model.chat import StoredMessage
from im.model.cluster import DeviceLocation
from tests.support.chat import ChatCore, chat_core
from tests.support.wait import eventually


class FlakyPresence(MemoryPresence):
    """Presence whose lookups fail while ``down`` (Redis away)."""

    down = False

    async def locate(self, uids: Iterable[int]) -> dict[int, list[DeviceLocation]]:
        if self.down:
            raise ConnectionError("presence is away")
        return await super().locate(uids)


class Sink(DeliverySink):
    def __init__(self) -> None:
        self.seqs: list[int] = []

    def deliver(self, messages: Sequence[StoredMessage], recipients: Sequence[Sequence[int]]) -> None:
        self.seqs.extend(m.seq for m in messages)

    def deliver_event(self, frame: object, uids: Iterable[int], skip: tuple[int, str] | None) -> None:
        pass


@pytest.fixture
async def core(tmp_path: Path) -> AsyncIterator[tuple[ChatCore, FlakyPresence, Sink]]:
    db = SqliteDatabase(tmp_path / "im.db")
    chat, accounts = SqliteChatStore(db), SqliteAccountStore(db)
    await chat.start()
    await accounts.start()
    presence, router, sink = FlakyPresence(), MemoryRouter(), Sink()
    router.attach("gw", sink)
    c = chat_core(chat, accounts, router, presence)
    c.committer.start()
    for name in ("ann", "ben"):
        await accounts.create_user(name, name, "hash", 0)
    await presence.set_online([DeviceLocation(2, "phone", "gw", "c1")], ttl=60)
    yield c, presence, sink
    await c.committer.stop()
    await accounts.close()
    await chat.close()


def send(cmid: str) -> SendRequest:
    return SendRequest(1, "d", cmid, None, 2, "text", msgspec.json.encode(cmid))


async def test_held_messages_are_routed_after_the_back_off_without_a_new_commit(
    core: tuple[ChatCore, FlakyPresence, Sink],
) -> None:
    c, presence, sink = core
    await c.committer.send(send("a"))
    assert sink.seqs == [1]
    presence.down = True
    for cmid in ("b", "c"):  # acked (stored), not routed
        await c.committer.send(send(cmid))
    assert sink.seqs == [1]
    presence.down = False
    await eventually(lambda: sink.seqs == [1, 2, 3], timeout=5)  # no further commit needed


async def test_held_messages_go_first_with_the_next_commit(core: tuple[ChatCore, FlakyPresence, Sink]) -> None:
    c, presence, sink = core
    presence.down = True
    await c.committer.send(send("a"))
    presence.down = False
    await c.committer.send(send("b"))
    assert sink.seqs == [1, 2]  # the held one ahead of the new one, in one route


def test_unrouted_is_bounded_and_backs_off() -> None:
    q = Unrouted(max_messages=3, first_delay=0.25, max_delay=1.0)
    msgs = [StoredMessage("d:1:2", s, s, 1, "d", f"c{s}", 0, "text", b"1") for s in range(1, 6)]
    q.put(msgs[:2], [[2], [2]])
    assert q.delay() == 0.5
    q.put(msgs[2:], [[2]] * 3)
    assert len(q) == 3 and q.dropped == 2 and q.delay() == 1.0
    held, to = q.take()
    assert [m.seq for m in held] == [3, 4, 5] and to == [[2]] * 3 and not q
    q.routed()
    assert q.delay() == 0.25


async def test_no_timer_while_nothing_is_held(core: tuple[ChatCore, FlakyPresence, Sink]) -> None:
    c, _, sink = core
    await c.committer.send(send("a"))
    await asyncio.sleep(0.3)
    assert sink.seqs == [1]  # routed once, not again by a timer


class Recording:
    """A router that records what each node was handed; with ``table``, one that knows the gateways'
    users itself (``holders``), as a transfer node's does."""

    def __init__(self, table: dict[int, str] | None = None) -> None:
        self.published: dict[str, tuple[list[int], list[list[int]]]] = {}
        self.table = table

    def holders(self, uids: Collection[int]) -> dict[int, set[str]] | None:
        if self.table is None:
            return None
        return {uid: {self.table[uid]} for uid in uids if uid in self.table}

    def publish(self, node: str, messages: Sequence[StoredMessage], recipients: Sequence[Sequence[int]]) -> None:
        seqs, recs = self.published.setdefault(node, ([], []))
        seqs.extend(m.seq for m in messages)
        recs.extend(list(r) for r in recipients)


def stored(seq: int) -> StoredMessage:
    return StoredMessage(
        conv="g:1", seq=seq, mid=seq, sender=1, device="d", cmid=f"c{seq}", ts=0, type="text", body=b"1"
    )


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        # every recipient on one node: the batch goes to it as it is
        ({1: "gw-1", 2: "gw-1", 3: "gw-1"}, {"gw-1": ([1, 2], [[1, 2], [2, 3]])}),
        # one node, but recipients offline: only the online ones are named
        ({1: "gw-1", 2: "gw-1"}, {"gw-1": ([1, 2], [[1, 2], [2]])}),
        ({1: "gw-1"}, {"gw-1": ([1], [[1]])}),
        # two nodes: each gets the messages with a recipient there, naming only those
        ({1: "gw-1", 2: "gw-2", 3: "gw-2"}, {"gw-1": ([1], [[1]]), "gw-2": ([1, 2], [[2], [2, 3]])}),
        ({}, {}),
    ],
)
@pytest.mark.parametrize("by", ["presence", "router table"])
async def test_route_hands_each_node_its_recipients(
    where: dict[int, str], expected: dict[str, tuple[list[int], list[list[int]]]], by: str
) -> None:
    presence = MemoryPresence()
    if by == "presence":
        router = Recording()
        await presence.set_online([DeviceLocation(uid, "phone", node, f"c{uid}") for uid, node in where.items()], 60)
    else:  # presence knows nobody: the router's table alone must route
        router = Recording(table=where)
    routes = LiveRoutes(presence, router)  # type: ignore[arg-type]
    await routes.route([stored(1), stored(2)], [[1, 2], [2, 3]])
    assert router.published == expected
