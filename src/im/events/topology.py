"""What the relay and the push consumer agree on: names, routing, the event's wire form, the topology.

Both sides declare the topology (idempotent: the same arguments every time), so either may start first.
"""

from __future__ import annotations

from ssl import SSLContext
from typing import Any

import aio_pika
import msgspec

from im.model.chat import OutboxEvent

EXCHANGE = "im.events"
PUSH_QUEUE = "im.push"
ROUTING_PREFIX = "message."  # routing key: "message.<type>"; the push queue binds "message.#"


async def connect(amqp_url: str, *, timeout: float, ssl_context: SSLContext | None = None) -> aio_pika.Connection:
    """An open connection to the broker. Unlike ``aio_pika.connect``, a connect that fails or is cut short
    closes what it opened: aio-pika's ``__del__`` would otherwise leave an un-awaited ``close()`` behind
    for every failed attempt (a relay retrying against a broker that refuses it makes one per retry)."""
    connection = aio_pika.Connection(aio_pika.connection.make_url(amqp_url), ssl_context=ssl_context)
    try:
        await connection.connect(timeout=timeout)
    except BaseException:
        await connection.close()
        raise
    return connection


class Event(msgspec.Struct, frozen=True):
    """The published event: what happened, never the content. ``mid`` is a string (64-bit ids do not
    survive JSON numbers in every consumer); ``ts`` is the message time in ms."""

    conv: str
    seq: int
    mid: str
    sender: int
    type: str
    ts: int


def event_of(row: OutboxEvent) -> Event:
    return Event(conv=row.conv, seq=row.seq, mid=str(row.mid), sender=row.sender, type=row.type, ts=row.created_at)


def encode(event: Event) -> bytes:
    return msgspec.json.encode(event)


def decode(body: bytes) -> Event:
    return msgspec.json.decode(body, type=Event)


async def declare(
    channel: aio_pika.abc.AbstractChannel, *, exchange: str = EXCHANGE, queue: str | None = PUSH_QUEUE
) -> tuple[aio_pika.abc.AbstractExchange, aio_pika.abc.AbstractQueue | None]:
    """Declare the durable topic exchange and (unless ``queue`` is None) the quorum queue bound to it
    (single active consumer: several push consumers may run; one consumes, in order)."""
    ex = await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)
    if queue is None:
        return ex, None
    # One consumer at a time (the others stand by and take over when it goes): per-conversation order.
    arguments: dict[str, Any] = {"x-queue-type": "quorum", "x-single-active-consumer": True}
    q = await channel.declare_queue(queue, durable=True, arguments=arguments)
    await q.bind(ex, routing_key=ROUTING_PREFIX + "#")
    return ex, q
