"""Fault isolation in the committer (im.core.committer, module docstring): one send the store will not take
fails alone, the others of its batch commit in order with dense seqs, in a bounded number of store calls;
a store that is down refuses the batch ``unavailable`` once. Real stores: SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
from opentelemetry.trace import INVALID_SPAN_CONTEXT, NonRecordingSpan, SpanContext

from im.backends.accounts import AccountStore
from im.backends.accounts.postgres import PostgresAccountStore
from im.backends.accounts.sqlite import SqliteAccountStore
from im.backends.chat import ChatStore
from im.backends.chat.postgres import PostgresChatStore
from im.backends.chat.sqlite import SqliteChatStore
from im.backends.presence.memory import MemoryPresence
from im.backends.routing.memory import MemoryRouter
from im.backends.sql.sqlite_db import SqliteDatabase
from im.core.committer import SendRequest
from im.model.chat import StoredMessage
from im.model.errors import ErrorCode, ImError
from tests.support.chat import ChatCore, chat_core
from tests.support.postgres import PgSchema, start

#: Text each store refuses at commit time: PostgreSQL has no NUL in text; SQLite cannot encode a lone
#: surrogate (the codec never produces either: these reach the committer only through a bug).
POISON = {"sqlite": "bad-\ud800", "postgres": "bad-\x00"}


@pytest.fixture(params=["sqlite", "postgres"])
def kind(request: pytest.FixtureRequest) -> str:
    """The store engine under test."""
    return str(request.param)


@pytest.fixture
async def svc(kind: str, tmp_path: Path) -> AsyncIterator[ChatCore]:
    schema: PgSchema | None = None
    chat: ChatStore
    accounts: AccountStore
    if kind == "sqlite":
        db = SqliteDatabase(tmp_path / "im.db")
        chat, accounts = SqliteChatStore(db), SqliteAccountStore(db)
        await chat.start()
        await accounts.start()
    else:
        schema = PgSchema()
        pg = schema.database()
        chat, accounts = PostgresChatStore(pg), PostgresAccountStore(pg)
        await start(chat, accounts)
    service = chat_core(chat, accounts, MemoryRouter(), MemoryPresence())
    for name in ("ann", "ben"):
        await accounts.create_user(name, name, "hash", 0)
    service.committer.start()
    try:
        yield service
    finally:
        await service.committer.stop()
        await accounts.close()
        await chat.close()
        if schema is not None:
            await schema.drop()


Outcome = tuple[StoredMessage | None, ImError | None]


def submit_all(svc: ChatCore, reqs: list[SendRequest]) -> list[asyncio.Future[Outcome]]:
    """Queue every request before the committer runs, so they share one batch."""
    loop = asyncio.get_running_loop()
    futures: list[asyncio.Future[Outcome]] = []
    for req in reqs:
        fut: asyncio.Future[Outcome] = loop.create_future()

        def done(
            _r: SendRequest,
            m: StoredMessage | None,
            _dup: bool,
            err: ImError | None,
            fut: asyncio.Future[Outcome] = fut,
        ) -> None:
            fut.set_result((m, err))

        svc.committer.submit(req, done)
        futures.append(fut)
    return futures


def send(conv: str, cmid: str, uid: int = 1) -> SendRequest:
    return SendRequest(uid, "phone", cmid, conv, None, "text", msgspec.json.encode(cmid.encode(errors="replace")))


@pytest.mark.parametrize("where", [0, 7, 15])
async def test_one_poisoned_send_fails_alone(svc: ChatCore, kind: str, where: int) -> None:
    group = await svc.groups.create_group(1, "g", [2])
    conv = f"g:{group.gid}"
    reqs = [send(conv, f"ok-{i}", uid=1 + i % 2) for i in range(15)]
    reqs.insert(where, send(conv, POISON[kind]))
    calls_before = svc.committer.store_calls
    outcomes = await asyncio.gather(*submit_all(svc, reqs))
    poisoned = outcomes[where]
    assert poisoned[0] is None and poisoned[1] is not None and poisoned[1].code is ErrorCode.INVALID
    good = [m for i, (m, err) in enumerate(outcomes) if i != where]
    assert all(m is not None for m in good)
    assert [m.seq for m in good if m is not None] == list(range(2, 17))  # dense, in submission order
    n = len(reqs)
    # the halves down to the item, and one more try of it alone (the store answers: poison, not outage)
    assert svc.committer.store_calls - calls_before <= 2 + 2 * math.ceil(math.log2(n))
    page, _ = await svc.reads.history(1, conv, after=0, before=None, limit=50)
    assert [m.cmid for m in page[1:]] == [r.cmid for i, r in enumerate(reqs) if i != where]


async def test_several_poisoned_sends_across_conversations(svc: ChatCore, kind: str) -> None:
    group = await svc.groups.create_group(1, "g", [2])
    g = f"g:{group.gid}"
    poison = POISON[kind]
    reqs = [send(g if i % 3 else "d:1:2", f"ok-{i}") for i in range(30)]
    for at in (3, 11, 25):
        reqs.insert(at, send(g, f"{poison}{at}"))
    outcomes = await asyncio.gather(*submit_all(svc, reqs))
    refused = [r.cmid for r, (_, err) in zip(reqs, outcomes, strict=True) if err is not None]
    assert refused == [f"{poison}{at}" for at in (3, 11, 25)]
    for conv in (g, "d:1:2"):
        page, _ = await svc.reads.history(1, conv, after=0, before=None, limit=100)
        assert [m.seq for m in page] == list(range(1, len(page) + 1))
        expected = [r.cmid for r in reqs if r.conv == conv and not r.cmid.startswith("bad-")]
        assert [m.cmid for m in page if m.type == "text"] == expected


class BrokenSpan(NonRecordingSpan):
    """A sampled send's span whose context cannot be read: a bug the committer meets after the item took
    its seq (it reads the context last, for the outbox row)."""

    def get_span_context(self) -> SpanContext:
        raise RuntimeError("bug")


async def test_an_item_that_breaks_preparation_fails_alone(svc: ChatCore) -> None:
    """A bug (an unexpected exception) met while checking one item refuses that item only, and the seq it
    took goes to the next item."""
    group = await svc.groups.create_group(1, "g", [2])
    conv = f"g:{group.gid}"
    reqs = [send(conv, "a"), send(conv, "boom"), send(conv, "b"), send("d:1:2", "boom"), send("d:1:2", "c")]
    reqs[3] = SendRequest(1, "phone", "boom", "d:1:2", None, "text", b'"x"')
    for i in (1, 3):
        reqs[i].trace = BrokenSpan(INVALID_SPAN_CONTEXT)
    outcomes = await asyncio.gather(*submit_all(svc, reqs))
    codes = [err.code if err else None for _, err in outcomes]
    assert codes == [None, ErrorCode.INVALID, None, ErrorCode.INVALID, None]
    assert [(m.conv, m.seq) for m, _ in outcomes if m is not None] == [(conv, 2), (conv, 3), ("d:1:2", 1)]


async def test_a_store_that_is_down_refuses_the_batch_once(svc: ChatCore, caplog: pytest.LogCaptureFixture) -> None:
    group = await svc.groups.create_group(1, "g", [2])
    conv = f"g:{group.gid}"
    await svc.committer.send(send(conv, "before"))
    await svc.store.close()  # the real database goes away under the committer
    await svc.accounts.close()
    reqs = [send(conv, f"m-{i}") for i in range(64)]
    calls_before = svc.committer.store_calls
    with caplog.at_level(logging.WARNING, logger="im.core.committer"):
        outcomes = await asyncio.gather(*submit_all(svc, reqs))
    assert all(err is not None and err.code is ErrorCode.UNAVAILABLE for _, err in outcomes), outcomes[:2]
    assert svc.committer.store_calls - calls_before <= math.ceil(math.log2(64)) + 1
    assert len([r for r in caplog.records if r.name == "im.core.committer"]) <= 2


async def test_a_store_back_before_the_probe_refuses_nothing_for_good(
    svc: ChatCore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database restarts under a batch: its commits fail (connection refused) until it is back, and it is
    back by the time the committer asks whether it answers. No send is refused ``invalid`` (a final refusal
    the client would not retry): the lone item is tried again and everything commits, dense and in order."""
    group = await svc.groups.create_group(1, "g", [2])
    conv = f"g:{group.gid}"
    real = svc.store.commit
    refused = [0]

    async def restarting(batch):  # type: ignore[no-untyped-def]
        if refused[0] < 3:  # the whole batch, its first half, its first item: then the database is back
            refused[0] += 1
            raise ConnectionRefusedError(111, "Connection refused")
        await real(batch)

    monkeypatch.setattr(svc.store, "commit", restarting)
    reqs = [send(conv, f"m-{i}") for i in range(4)]
    outcomes = await asyncio.gather(*submit_all(svc, reqs))
    assert refused[0] == 3
    assert [err for _, err in outcomes] == [None] * 4, outcomes
    assert [m.seq for m, _ in outcomes if m is not None] == [2, 3, 4, 5]


async def test_sends_that_arrive_in_the_turn_after_the_committer_woke_join_its_batch(svc: ChatCore) -> None:
    """The committer takes its batch one turn of the loop after it woke: a frame read in that turn (here a
    send submitted by the next callback) is committed with the first, in one store call, not after it."""
    group = await svc.groups.create_group(1, "g", [2])
    conv = f"g:{group.gid}"
    loop = asyncio.get_running_loop()
    later: list[asyncio.Future[Outcome]] = []
    calls_before = svc.committer.store_calls
    first = submit_all(svc, [send(conv, "a")])  # wakes the committer: it runs in the next pass
    loop.call_soon(lambda: later.extend(submit_all(svc, [send(conv, "b")])))  # after its wake-up, same pass
    outcomes = await asyncio.gather(*first)
    outcomes += await asyncio.gather(*later)
    assert [(m.cmid, m.seq) if m else err for m, err in outcomes] == [("a", 2), ("b", 3)]
    assert svc.committer.store_calls - calls_before == 1


async def test_a_lone_item_whose_connections_keep_breaking_is_refused_unavailable_not_invalid(
    svc: ChatCore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pool holds connections whose links broke earlier: the commits of one item meet two of them
    (``connection was closed in the middle of operation``) while the committer's probe goes through a good
    one. The store answers, but the failure says the engine went away: the item is refused ``unavailable``
    (the client resends the same cmid), never ``invalid``, and a resend commits it."""
    group = await svc.groups.create_group(1, "g", [2])
    conv = f"g:{group.gid}"
    real = svc.store.commit
    stale = 2  # the commit and its retry meet one each; the resend gets a good connection

    async def stale_connections(batch):  # type: ignore[no-untyped-def]
        nonlocal stale
        if stale and any(m.cmid == "unlucky" for m in batch.messages):
            stale -= 1
            raise ConnectionResetError(104, "connection was closed in the middle of operation")
        await real(batch)

    monkeypatch.setattr(svc.store, "commit", stale_connections)
    [(m, err)] = await asyncio.gather(*submit_all(svc, [send(conv, "unlucky")]))
    assert m is None and err is not None and err.code is ErrorCode.UNAVAILABLE, err
    [(m, err)] = await asyncio.gather(*submit_all(svc, [send(conv, "unlucky")]))
    assert err is None and m is not None and m.seq == 2, err


def test_throttled_log_writes_one_counted_line_per_window(caplog: pytest.LogCaptureFixture) -> None:
    from im.throttled_log import ThrottledLog

    now = [0.0]
    throttled = ThrottledLog(logging.getLogger("t"), "bad sends", window=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="t"):
        for i in range(3412):
            now[0] = i * 0.002  # 3,412 events in under 7 s: the first line, then counted
            throttled.hit(f"OverflowError #{i}", ValueError("x"))
        assert len(caplog.records) == 1 and caplog.records[0].exc_info is not None
        now[0] = 11.0
        throttled.hit("later")
    lines = [r.getMessage() for r in caplog.records]
    assert lines[1] == "refused 3,411 bad sends in the last 10 s; last: OverflowError #3411"
    assert lines[2] == "refused bad sends: later" and len(lines) == 3


async def test_a_callback_that_raises_does_not_undo_or_repeat_the_batch(svc: ChatCore) -> None:
    group = await svc.groups.create_group(1, "g", [2])
    conv = f"g:{group.gid}"
    got: list[int] = []

    def bad(_r: SendRequest, m: StoredMessage | None, _dup: bool, err: ImError | None) -> None:
        raise RuntimeError("a transport bug")

    def good(_r: SendRequest, m: StoredMessage | None, _dup: bool, err: ImError | None) -> None:
        assert m is not None and err is None
        got.append(m.seq)

    calls_before = svc.committer.store_calls
    svc.committer.submit(send(conv, "a"), good)
    svc.committer.submit(send(conv, "b"), bad)
    svc.committer.submit(send(conv, "c"), good)
    last, _ = await svc.committer.send(send(conv, "d"))
    assert got == [2, 4] and last.seq == 5
    assert svc.committer.store_calls - calls_before <= 2  # one batch (or two), never split or written again
