"""Broker redelivery and reordering in the event pipeline (im.events: outbox -> relay -> RabbitMQ -> push
consumer -> webhook), on the real RabbitMQ and PostgreSQL, with a private exchange and queue per test.

What the pipeline promises (im/events/__init__.py, push.py, relay.py; docs/architecture.md section 3.2):

- at least once from the outbox, deduplicated by ``mid`` in the consumer: every event reaches the webhook,
  and a ``mid`` is pushed once, except for the one event a consumer was posting when it died (its dedupe
  record is written after the POST), which the ``Idempotency-Key`` header covers;
- per conversation, pushes reach the webhook in seq order (one active consumer, events handled one at a
  time in queue order, a failing event retried before anything else);
- one relay at a time drains the outbox (the store's outbox lock).

Each scenario: a webhook that fails (nack, requeue), a consumer that dies mid-batch (connection closed with
events unacked), two consumers competing for one queue (single active consumer; the active one dies), a
relay that dies after the broker confirmed a batch and before it deleted the rows (republished), and the
database restarted under two relays (the lock's session is gone: the relays must not both go on).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import secrets
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from im.backends.chat import ChatStore
from im.backends.chat.postgres import PostgresChatStore
from im.backends.dedupe import Dedupe
from im.backends.dedupe.memory import MemoryDedupe
from im.backends.dedupe.redis import RedisDedupe
from im.backends.presence.memory import MemoryPresence
from im.backends.sql.postgres_db import PostgresDatabase
from im.events.push import PushConsumer
from im.events.relay import OutboxRelay
from im.model.chat import CommitBatch, ConversationState, StoredMessage
from im.procs import stop_process
from tests.contract.conftest import delete_redis_prefix
from tests.events.conftest import AMQP_URL, Names, WebhookReceiver, amqp_connect
from tests.support.postgres import PrivatePostgres, start
from tests.support.wait import eventually, running

REDIS_URL = "redis://127.0.0.1:6379/0"
CONVS = [f"g:{i}" for i in range(1, 5)]  # four groups of users 1, 2, 3; user 1 sends, 2 and 3 are offline
MEMBERS = {1: "owner", 2: "member", 3: "member"}


# --- fixtures --------------------------------------------------------------------------------------------


@pytest.fixture
async def names() -> AsyncIterator[Names]:
    """A unique exchange and queue; both deleted at the end (relays and consumers are stopped by then)."""
    token = secrets.token_hex(4)
    n = Names(f"im.test.redeliver.{token}", f"im.test.redeliver.{token}")
    connection = await amqp_connect()
    yield n
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(n.queue)
        await channel.exchange_delete(n.exchange)


@pytest.fixture
async def webhook() -> AsyncIterator[WebhookReceiver]:
    receiver = WebhookReceiver()
    await receiver.start()
    yield receiver
    await receiver.close()


@pytest.fixture
async def store(pg: PrivatePostgres) -> AsyncIterator[ChatStore]:
    """A PostgreSQL chat store with the outbox on, on a private server (``pg``: the shared server's
    connections are not this test's to use up)."""
    s = PostgresChatStore(PostgresDatabase(pg.dsn, min_size=1, max_size=4), outbox=True)
    await start(s)
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def dedupe_prefix() -> AsyncIterator[str]:
    """A unique Redis key prefix for a test's dedupe records; they are deleted after it (their TTL is a
    day, and the Redis is shared)."""
    prefix = f"im-test-{secrets.token_hex(4)}:"
    yield prefix
    client = aioredis.from_url(REDIS_URL)
    try:
        await delete_redis_prefix(client, prefix)
    finally:
        await client.aclose()


@pytest.fixture
async def redis_dedupe(dedupe_prefix: str) -> AsyncIterator[Dedupe]:
    """A dedupe shared by every consumer of a test (as ``events.dedupe=redis``), under a unique prefix."""
    dedupe = RedisDedupe(aioredis.from_url(REDIS_URL), prefix=dedupe_prefix, owns_client=True)
    await dedupe.start()
    yield dedupe
    await dedupe.close()


async def stop(task: asyncio.Task[None]) -> None:
    """A process dying: its task is cancelled, so its broker connection closes with whatever it had not
    acked (the broker requeues those for the next consumer)."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


# --- traffic and checks ----------------------------------------------------------------------------------


async def commit_round(s: ChatStore, heads: dict[str, int], per_conv: int, ts: int) -> list[StoredMessage]:
    """``per_conv`` messages in each conversation, in one commit (new conversations on the first round)."""
    batch = CommitBatch()
    for conv in CONVS:
        before = heads.get(conv, 0)
        if conv not in heads:
            batch.new_conversations.append(ConversationState(conv, "group", 0, dict(MEMBERS)))
        for k in range(1, per_conv + 1):
            seq = before + k
            batch.messages.append(
                StoredMessage(
                    conv,
                    seq,
                    mid=ts * 10_000 + len(batch.messages),
                    sender=1,
                    device="d",
                    cmid=f"{conv}-{seq}",
                    ts=ts,
                    type="text",
                    body=b'"x"',
                )
            )
        batch.heads[conv] = (before, before + per_conv, ts)
        heads[conv] = before + per_conv
    await s.commit(batch)
    return batch.messages


async def members(_conv: str) -> Sequence[int]:
    return list(MEMBERS)


def consumer(names: Names, webhook: WebhookReceiver, dedupe: Dedupe, **kw: Any) -> PushConsumer:
    return PushConsumer(
        AMQP_URL,
        MemoryPresence(),  # nobody online: every event is pushed
        members,
        webhook.url,
        dedupe,
        exchange=names.exchange,
        queue=names.queue,
        retry_delay=0.05,
        backoff=0.05,
        max_backoff=0.5,
        **kw,
    )


def relay(s: ChatStore, names: Names, **kw: Any) -> OutboxRelay:
    args: dict[str, Any] = {"batch": 20, "poll": 0.02, "backoff": 0.05, "max_backoff": 0.5} | kw
    return OutboxRelay(s, AMQP_URL, exchange=names.exchange, queue=names.queue, **args)


def _out_of_place(seqs: list[int]) -> int:
    """How many elements must be taken out of ``seqs`` to leave it increasing (length - longest
    increasing subsequence)."""
    tails: list[int] = []
    for x in seqs:
        i = bisect.bisect_left(tails, x)
        tails[i : i + 1] = [x]
    return len(seqs) - len(tails)


def check(
    webhook: WebhookReceiver, messages: list[StoredMessage], *, crashes: int = 0, late: int = 0
) -> dict[str, int]:
    """Every message pushed, a mid twice at most once per consumer death (the POST it was making), with
    its ``Idempotency-Key``; per conversation the first push of each message in seq order (``late``: but
    for at most that many events in all, pushed after later ones: see the graceful stop's test)."""
    want = {str(m.mid): m for m in messages}
    mids = [body["mid"] for body in webhook.bodies]
    assert set(mids) == set(want), f"missing {sorted(set(want) - set(mids))[:5]}, extra {set(mids) - set(want)}"
    twice = {mid: n for mid, n in Counter(mids).items() if n > 1}
    assert sum(n - 1 for n in twice.values()) <= crashes, f"pushed more than once: {twice}"
    assert all(headers["idempotency-key"] == body["mid"] for headers, body in webhook.requests)
    misplaced = 0
    for conv in CONVS:
        first: list[int] = []
        for body in webhook.bodies:
            if body["conv"] == conv and body["seq"] not in first:
                first.append(body["seq"])
        assert sorted(first) == sorted(m.seq for m in messages if m.conv == conv)
        misplaced += _out_of_place(first)
        assert misplaced <= late, f"{conv} pushed in the order {first}"
    return {"events": len(want), "posts": len(mids), "duplicate_posts": len(mids) - len(set(mids))}


async def traffic(
    s: ChatStore, rounds: int, per_conv: int = 3, pause: float = 0.05, heads: dict[str, int] | None = None
) -> list[StoredMessage]:
    """``rounds`` commits of ``per_conv`` messages in each conversation, ``pause`` apart; ``heads``: the
    conversations' last seqs so far (updated), for a later call to go on."""
    heads = {} if heads is None else heads
    out: list[StoredMessage] = []
    start = 1_000 + sum(heads.values())
    for r in range(rounds):
        out += await commit_round(s, heads, per_conv, ts=start + r)
        await asyncio.sleep(pause)
    return out


# --- the scenarios ---------------------------------------------------------------------------------------


async def test_a_failing_webhook_is_retried_before_anything_else(
    store: ChatStore, names: Names, webhook: WebhookReceiver
) -> None:
    """The webhook fails (HTTP 500) now and then: the event is retried (nack, requeue) and the events
    the consumer already holds (prefetch) must not overtake it: per conversation, seq order."""
    messages = await traffic(store, 6, pause=0)  # everything queued before the consumer starts: prefetched
    webhook.fail = 2  # the first event fails twice
    push = consumer(names, webhook, MemoryDedupe())
    async with running(relay(store, names).run(), push.run()):
        await eventually(lambda: len(webhook.requests) >= 10, "pushes")
        webhook.fail = 1  # and one in the middle of the stream
        await eventually(lambda: len({b["mid"] for b in webhook.bodies}) >= len(messages), "every event pushed")
        await asyncio.sleep(0.2)
    figures = check(webhook, messages)
    assert webhook.failed == 3
    print(f"\nREDELIVERY FIGURES webhook failures {figures} failed={webhook.failed}")


class Worker:
    """A push consumer process (tests/support/push_worker.py) on the test's queue and webhook, sharing a
    Redis dedupe with the test's other workers; ``kill`` is SIGKILL (its broker connection dies with it)."""

    def __init__(self, names: Names, webhook: WebhookReceiver, prefix: str, out: Path) -> None:
        self.out = out
        args = [AMQP_URL, names.exchange, names.queue, webhook.url, REDIS_URL, prefix]
        with open(out, "wb") as f:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.support.push_worker", *args], stdout=f, stderr=subprocess.STDOUT
            )

    @property
    def pushed(self) -> int:
        return self.out.read_text().count("pushed ")

    def kill(self) -> None:
        stop_process(self.proc, signal.SIGKILL, 10.0)


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[list[Worker]]:
    out: list[Worker] = []
    yield out
    for w in out:
        if w.proc.poll() is None:
            w.kill()


async def test_a_consumer_killed_mid_batch_loses_nothing(
    dedupe_prefix: str, store: ChatStore, names: Names, webhook: WebhookReceiver, workers: list[Worker], tmp_path: Path
) -> None:
    """The consumer process is SIGKILLed with an event delivered and not acked: the broker requeues it,
    the next consumer (the same dedupe, in Redis) goes on from there; each event pushed once (the POST
    the dead one was making aside), in order."""
    messages = await traffic(store, 8, pause=0)
    async with running(relay(store, names).run()):
        workers.append(Worker(names, webhook, dedupe_prefix, tmp_path / "w1.log"))
        await eventually(lambda: len(webhook.requests) >= 20, "pushes before the crash")
        await asyncio.to_thread(workers[0].kill)
        assert len(webhook.requests) < len(messages), "the crash came too late"
        workers.append(Worker(names, webhook, dedupe_prefix, tmp_path / "w2.log"))
        await eventually(lambda: len({b["mid"] for b in webhook.bodies}) >= len(messages), "every event pushed")
        await asyncio.sleep(0.3)
    figures = check(webhook, messages, crashes=1)
    print(f"\nREDELIVERY FIGURES consumer killed {figures} first={workers[0].pushed} second={workers[1].pushed}")


async def test_a_consumer_stopped_mid_batch_hands_over_in_order(
    store: ChatStore, names: Names, webhook: WebhookReceiver, redis_dedupe: Dedupe
) -> None:
    """The consumer is stopped (its task cancelled, as a transfer node's SIGTERM does: the consumer is
    cancelled, then its channel closes with what it had not acked): the next consumer pushes the rest once.
    The event in hand when it stopped goes back to the queue behind the others and is pushed last: one
    event out of order per graceful stop, the window that remains (with 100 events delivered ahead, the
    old default, it was every one of them: 15 of 24 in one conversation)."""
    messages = await traffic(store, 8, pause=0)

    async def slow_members(_conv: str) -> Sequence[int]:  # each event takes 20 ms: the stop lands mid-stream
        await asyncio.sleep(0.02)
        return list(MEMBERS)

    first = consumer(names, webhook, redis_dedupe)
    first.members = slow_members
    async with running(relay(store, names).run(), first.run()) as (_, task):
        await eventually(lambda: len(webhook.requests) >= 20, "pushes before the stop")
        at_stop = len(webhook.requests)
        await asyncio.wait_for(stop(task), 10)
        assert len(webhook.requests) <= at_stop + 1, (
            f"the stopped consumer went on: {at_stop} -> {len(webhook.requests)}"
        )
        second = consumer(names, webhook, redis_dedupe)
        async with running(second.run()):
            await eventually(lambda: len({b["mid"] for b in webhook.bodies}) >= len(messages), "every event pushed")
            await asyncio.sleep(0.2)
    figures = check(webhook, messages, crashes=1, late=1)
    print(f"\nREDELIVERY FIGURES consumer stopped {figures} first={first.pushed} second={second.pushed}")


async def test_a_cancellation_swallowed_on_the_way_still_stops_the_consumer(
    store: ChatStore, names: Names, webhook: WebhookReceiver, redis_dedupe: Dedupe
) -> None:
    """A library under the consumer loses the cancellation (as Python 3.11's ``asyncio.wait_for`` does
    when it lands as the inner call completes; seen in a full suite run: a stopped consumer pushed all 96
    events): the consumer still stops after the event in hand."""
    await traffic(store, 8, pause=0)
    swallowed = 0
    calls = 0
    inside = asyncio.Event()  # the 10th event's lookup is under way: the cancellation lands in it

    async def members_swallowing_cancel(_conv: str) -> Sequence[int]:
        nonlocal swallowed, calls
        calls += 1
        try:
            if calls == 10:
                inside.set()
                await asyncio.sleep(5)
        except asyncio.CancelledError:  # the bug being simulated: the cancellation goes nowhere
            swallowed += 1
        return list(MEMBERS)

    first = consumer(names, webhook, redis_dedupe)
    first.members = members_swallowing_cancel
    async with running(relay(store, names).run(), first.run()) as (_, task):
        await asyncio.wait_for(inside.wait(), 20)
        at_stop = len(webhook.requests)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(task), 5)
        assert task.done(), "the consumer went on after its cancellation"
        assert len(webhook.requests) <= at_stop + 1, (
            f"the stopped consumer went on: {at_stop} -> {len(webhook.requests)}"
        )
        assert swallowed == 1


async def test_competing_consumers_one_active_and_a_takeover(
    dedupe_prefix: str, store: ChatStore, names: Names, webhook: WebhookReceiver, workers: list[Worker], tmp_path: Path
) -> None:
    """Two consumer processes on one queue: single active consumer, so one pushes and the other stands by;
    the active one is SIGKILLed mid-stream and the other takes over where it stopped, in order."""
    workers += [Worker(names, webhook, dedupe_prefix, tmp_path / f"w{i}.log") for i in (1, 2)]
    async with running(relay(store, names).run()):
        heads: dict[str, int] = {}
        messages = await traffic(store, 4, heads=heads)
        await eventually(lambda: len(webhook.requests) >= 20, "pushes before the takeover")
        counts = [w.pushed for w in workers]
        assert min(counts) == 0 and max(counts) > 0, counts  # one active consumer
        active, standby = (workers[0], workers[1]) if counts[0] else (workers[1], workers[0])
        more = asyncio.create_task(traffic(store, 4, heads=heads))
        await asyncio.to_thread(active.kill)
        messages += await more
        await eventually(lambda: len({x["mid"] for x in webhook.bodies}) >= len(messages), "every event pushed")
        await asyncio.sleep(0.3)
    assert standby.pushed > 0
    figures = check(webhook, messages, crashes=1)
    print(f"\nREDELIVERY FIGURES takeover {figures} active={active.pushed} standby={standby.pushed}")


async def test_a_relay_that_dies_before_deleting_republishes(
    store: ChatStore, names: Names, webhook: WebhookReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The relay dies after the broker confirmed a batch and before it deleted the rows: the next relay
    publishes them again; the consumer skips them by mid, so each message is pushed once, in order."""
    messages = await traffic(store, 6, pause=0)
    real_delete = store.outbox_delete
    confirmed = asyncio.Event()
    never = asyncio.Event()

    async def dies_before_delete(ids: Sequence[int]) -> None:
        confirmed.set()
        await never.wait()  # cancelled here: the process dies between the confirms and the delete

    push = consumer(names, webhook, MemoryDedupe())
    monkeypatch.setattr(store, "outbox_delete", dies_before_delete)
    first = relay(store, names)
    async with running(push.run(), first.run()) as (_, task):
        await asyncio.wait_for(confirmed.wait(), 20)
        await stop(task)
        monkeypatch.setattr(store, "outbox_delete", real_delete)
        second = relay(store, names)
        async with running(second.run()):
            await eventually(lambda: len({b["mid"] for b in webhook.bodies}) >= len(messages), "every event pushed")
            await eventually(lambda: push.duplicates >= 20, "the republished batch skipped")
            await asyncio.sleep(0.2)
    assert await store.outbox_fetch(10) == []
    assert second.published == len(messages)  # the first batch again, then the rest
    figures = check(webhook, messages)
    print(f"\nREDELIVERY FIGURES relay crash {figures} republished_skipped={push.duplicates}")


async def test_a_database_restart_leaves_one_relay(pg: PrivatePostgres, names: Names, webhook: WebhookReceiver) -> None:
    """Two relays (two processes, each its own pool) on one outbox: one holds the outbox lock. PostgreSQL
    restarts: the lock went with the holder's session, so the holder must stop relaying and take the lock
    again like the other; afterwards exactly one relays (never both, publishing every event twice)."""
    stores = [PostgresChatStore(PostgresDatabase(pg.dsn, min_size=1, max_size=4), outbox=True) for _ in "ab"]
    for s in stores:
        await s.start()
    try:
        relays = [relay(s, names) for s in stores]
        push = consumer(names, webhook, MemoryDedupe())
        async with running(push.run(), *(r.run() for r in relays)):
            heads: dict[str, int] = {}
            messages = await traffic(stores[0], 3, heads=heads)
            await eventually(lambda: len(webhook.requests) >= len(messages), "pushes before the restart")
            assert min(r.published for r in relays) == 0, [r.published for r in relays]  # one relays
            await asyncio.to_thread(pg.stop, "fast")
            await asyncio.sleep(0.5)
            await asyncio.to_thread(pg.start)
            before = [r.published for r in relays]
            # Once a relay holds the lock again, traffic: only that one publishes.
            await eventually(lambda: _lock_held(pg), "a relay holds the outbox lock again", 20)
            messages += await traffic(stores[1], 10, heads=heads)
            await eventually(lambda: len({b["mid"] for b in webhook.bodies}) >= len(messages), "every event pushed")
            await asyncio.sleep(0.5)
            grew = [r.published - n for r, n in zip(relays, before, strict=True)]
            assert sorted(grew) == [0, len(messages) - sum(before)], f"relays published {grew} after the restart"
        figures = check(webhook, messages)
        print(f"\nREDELIVERY FIGURES database restart {figures} published_after_restart={grew}")
    finally:
        for s in stores:
            await s.close()


async def _lock_held(pg: PrivatePostgres) -> bool:
    import asyncpg

    try:
        conn = await asyncpg.connect(pg.dsn, timeout=2)
    except (OSError, asyncpg.PostgresError):
        return False
    try:
        return bool(await conn.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"))
    finally:
        await conn.close()
