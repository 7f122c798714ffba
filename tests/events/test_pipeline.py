"""Outbox -> relay -> RabbitMQ -> push consumer -> webhook, on the real broker and real stores."""

from __future__ import annotations

import asyncio
from typing import Any

import aio_pika
import pytest

from im.backends.chat import ChatStore
from im.backends.dedupe.memory import MemoryDedupe
from im.backends.presence.memory import MemoryPresence
from im.config import load_config
from im.events import topology
from im.events.push import PushConsumer
from im.events.relay import OutboxRelay
from im.live_config import LiveConfig, follow_push
from im.model.chat import CommitBatch, ConversationState, StoredMessage
from im.model.cluster import DeviceLocation
from im.model.ids import direct_conv
from tests.contract.test_chat_store import append, msg, new_direct
from tests.events.conftest import AMQP_URL, Names, WebhookReceiver, amqp_connect, members_of
from tests.support.wait import eventually, running

A, B, C = 1, 2, 3  # A and B are offline, C has a device online
GROUP = "g:7"


async def presence() -> MemoryPresence:
    p = MemoryPresence()
    await p.set_online([DeviceLocation(C, "phone", "n1")], ttl=600)
    return p


def consumer(store: ChatStore, p: MemoryPresence, webhook: WebhookReceiver, names: Names, **kw: Any) -> PushConsumer:
    return PushConsumer(
        AMQP_URL,
        p,
        members_of(store),
        webhook.url,
        MemoryDedupe(),
        exchange=names.exchange,
        queue=names.queue,
        retry_delay=0.05,
        **kw,
    )


async def traffic(store: ChatStore) -> list[StoredMessage]:
    """A direct conversation A-B and a group A, B, C, written in several commits; returns every message."""
    sent = await new_direct(store, A, B, 3)
    first = [msg(GROUP, i, s) for i, s in enumerate([A, B, C], start=1)]
    await store.commit(
        CommitBatch(
            messages=first,
            heads={GROUP: (0, 3, 9)},
            new_conversations=[ConversationState(GROUP, "group", 0, {A: "owner", B: "member", C: "member"})],
        )
    )
    sent += first
    for round_ in range(4):
        sent += await append(store, direct_conv(A, B), 3 + 2 * round_, [A, B])
        sent += await append(store, GROUP, 3 + 3 * round_, [C, A, B])
    return sent


def expected(messages: list[StoredMessage]) -> dict[str, dict[str, Any]]:
    offline = {A, B}
    out = {}
    for m in messages:
        members = {A, B} if m.conv.startswith("d:") else {A, B, C}
        recipients = sorted((members - {m.sender}) & offline)
        out[str(m.mid)] = {"mid": str(m.mid), "conv": m.conv, "seq": m.seq, "recipients": recipients}
    return out


def check_pushes(webhook: WebhookReceiver, messages: list[StoredMessage]) -> None:
    want = expected(messages)
    mids = [body["mid"] for body in webhook.bodies]
    assert len(mids) == len(set(mids)), "a message was pushed twice"
    assert {body["mid"]: body for body in webhook.bodies} == want  # content-free, offline recipients only
    assert all(headers["idempotency-key"] == body["mid"] for headers, body in webhook.requests)
    for conv in {m.conv for m in messages}:  # per-conversation order
        seqs = [body["seq"] for body in webhook.bodies if body["conv"] == conv]
        assert seqs == sorted(seqs)


async def test_committed_messages_are_pushed_once_to_offline_recipients_in_order(
    outbox_store: ChatStore, names: Names, webhook: WebhookReceiver
) -> None:
    messages = await traffic(outbox_store)
    relay = OutboxRelay(outbox_store, AMQP_URL, exchange=names.exchange, queue=names.queue, batch=7, poll=0.02)
    push = consumer(outbox_store, await presence(), webhook, names)
    async with running(relay.run(), push.run()):
        await eventually(lambda: len(webhook.requests) >= len(messages))
        more = await append(outbox_store, GROUP, 15, [A])  # committed while everything runs
        await eventually(lambda: len(webhook.requests) >= len(messages) + 1)
        await asyncio.sleep(0.3)  # nothing more arrives
    check_pushes(webhook, messages + more)
    assert await outbox_store.outbox_fetch(100) == []
    assert relay.published == len(messages) + 1 and relay.failures == 0


@pytest.mark.parametrize(
    "down_url",
    ["amqp://guest:guest@127.0.0.1:1/", "amqp://guest:guest@127.0.0.1:5672/im-no-such-vhost"],
    ids=["closed-port", "wrong-vhost"],
)
async def test_nothing_is_lost_while_the_broker_is_unreachable(
    outbox_store: ChatStore, names: Names, webhook: WebhookReceiver, down_url: str
) -> None:
    relay = OutboxRelay(
        outbox_store, down_url, exchange=names.exchange, queue=names.queue, poll=0.02, backoff=0.05, max_backoff=0.2
    )
    push = consumer(outbox_store, await presence(), webhook, names)
    async with running(relay.run(), push.run()):
        messages = await traffic(outbox_store)
        await eventually(lambda: relay.failures >= 3)
        assert len(await outbox_store.outbox_fetch(1000)) == len(messages)  # kept while the broker is away
        assert webhook.requests == []
        relay.amqp_url = AMQP_URL  # the broker is back
        await eventually(lambda: len(webhook.requests) >= len(messages))
        await asyncio.sleep(0.3)
    check_pushes(webhook, messages)
    assert await outbox_store.outbox_fetch(1000) == []


async def publish_raw(names: Names, bodies: list[bytes]) -> None:
    connection = await amqp_connect()
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange, _ = await topology.declare(channel, exchange=names.exchange, queue=names.queue)
        for body in bodies:
            await exchange.publish(
                aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT), routing_key="message.text"
            )


async def test_a_redelivered_event_pushes_once(outbox_store: ChatStore, names: Names, webhook: WebhookReceiver) -> None:
    (m,) = await new_direct(outbox_store, A, B, 1)
    event = topology.encode(topology.Event(conv=m.conv, seq=1, mid=str(m.mid), sender=A, type="text", ts=m.ts))
    await publish_raw(names, [event, event])
    push = consumer(outbox_store, await presence(), webhook, names)
    async with running(push.run()):
        await eventually(lambda: push.duplicates == 1)
        await asyncio.sleep(0.2)
    check_pushes(webhook, [m])
    assert push.pushed == 1


async def test_a_failed_webhook_is_retried_then_given_up(
    outbox_store: ChatStore, names: Names, webhook: WebhookReceiver
) -> None:
    first, second = await new_direct(outbox_store, A, B, 2)
    events = [
        topology.encode(topology.Event(conv=m.conv, seq=m.seq, mid=str(m.mid), sender=A, type="text", ts=m.ts))
        for m in (first, second)
    ]
    webhook.fail = 2  # the first event fails twice, then goes through
    push = consumer(outbox_store, await presence(), webhook, names, max_attempts=3)
    await publish_raw(names, events[:1])
    async with running(push.run()):
        await eventually(lambda: push.pushed == 1)
        assert webhook.failed == 2
        webhook.fail = 10  # the second never does: dropped after max_attempts
        await publish_raw(names, events[1:])
        await eventually(lambda: push.dropped == 1)
        assert webhook.failed == 5
    check_pushes(webhook, [first])


async def test_the_webhook_url_follows_the_configuration_centre(
    outbox_store: ChatStore, names: Names, webhook: WebhookReceiver
) -> None:
    """``events.webhook_url`` changed in the centre: the next push goes to the new URL; a bad URL is
    ignored (the one in use stays) and unsetting it cannot stop a running consumer."""
    other = WebhookReceiver()
    await other.start()
    try:
        messages = await traffic(outbox_store)
        relay = OutboxRelay(outbox_store, AMQP_URL, exchange=names.exchange, queue=names.queue, poll=0.02)
        push = consumer(outbox_store, await presence(), webhook, names)
        live = LiveConfig(load_config(None, {"events": {"webhook_url": webhook.url}}))
        follow_push(live, [push])
        async with running(relay.run(), push.run()):
            await eventually(lambda: len(webhook.requests) >= len(messages))
            live.set_centre({"events.webhook_url": other.url})
            live.set_centre({"events.webhook_url": "ftp://127.0.0.1/push"})  # refused: keeps other.url
            assert push.webhook_url == other.url
            more = await append(outbox_store, GROUP, 15, [A])
            await eventually(lambda: len(other.requests) >= 1)
            live.set_centre({})  # back to the configured URL
            assert push.webhook_url == webhook.url
        assert [body["mid"] for body in other.bodies] == [str(m.mid) for m in more]
        check_pushes(webhook, messages)
    finally:
        await other.close()
