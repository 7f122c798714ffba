"""The outbox relay: publishes committed messages from the store's outbox to RabbitMQ.

Loop: fetch the oldest ``batch`` rows, publish them all with publisher confirms in flight together
(persistent, ``mandatory`` on a channel with ``on_return_raises``, so an unroutable event is an error,
not a silent drop), and only when every confirm of the batch arrived delete those ids. Any failure
(broker down, wrong vhost, a nack, an unroutable event) leaves the rows where they are: the relay closes
the connection, backs off (doubling from ``backoff`` up to ``max_backoff``) and reconnects, re-reading
``amqp_url`` each time. Nothing committed is lost while RabbitMQ is down; it is published once it is back.

At least once: a crash (or failure) after some confirms and before the delete republishes those events;
consumers deduplicate by ``mid``. Order: rows are published in id order on one channel, which per
conversation is seq order; the store's outbox lock keeps it to one relay at a time.

Fencing: the lock is a database session's, and the relay fetches and deletes through that session
(``Outbox.outbox_exclusive``), so a relay whose session ended (terminated, cut off) while it still runs is
refused by the database on its next fetch or delete (``OutboxLockLost``); it takes the lock again
(waiting behind the new holder). What remains: the rows it fetched before the loss may be published
by it while the new holder publishes them too (at least once, consumers dedupe by ``mid``; the
duplicate may arrive after a later event of the same conversation).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

import aio_pika
from opentelemetry.trace import SpanKind

from im.backends.chat import Outbox, OutboxLockLost
from im.backends.tls import ClientTls, amqp_context
from im.cancel import retry_pause
from im.events import topology
from im.model.chat import OutboxEvent
from im.observability import tracing
from im.observability.metrics import METRICS

log = logging.getLogger(__name__)


class OutboxRelay:
    def __init__(
        self,
        store: Outbox,
        amqp_url: str,
        *,
        exchange: str = topology.EXCHANGE,
        queue: str | None = topology.PUSH_QUEUE,
        batch: int = 500,
        poll: float = 0.2,
        backoff: float = 0.2,
        max_backoff: float = 5.0,
        connect_timeout: float = 5.0,
        tls: ClientTls | None = None,
    ) -> None:
        self.store = store
        self.amqp_url = amqp_url  # read at every (re)connect
        self.exchange = exchange
        self.queue = queue  # declared and bound too (None: the exchange only)
        self.batch = batch
        self.poll = poll
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.connect_timeout = connect_timeout
        self.ssl_context = amqp_context(amqp_url, tls)  # amqps://: whom to trust, what to present
        self.published = 0  # events confirmed and deleted
        self.failures = 0  # connection or publish attempts that failed
        self.locks_lost = 0  # times the store refused this relay because its outbox lock had gone

    async def run(self) -> None:
        """Relay until cancelled; it never returns on its own. The caller owns the task that runs it and
        cancels it at shutdown (the composition root's ``event_workers`` hands it out as a coroutine);
        a cancel before a batch's delete leaves its rows, published again later (at least once). With
        several processes on one store, one relays and the others wait for the store's outbox lock (they
        take over when it dies)."""
        while True:
            try:
                async with self.store.outbox_exclusive():
                    log.info("outbox relay: this process relays")
                    await self._relay_forever()
            except OutboxLockLost as exc:  # refused by the store: another relay may hold it now
                self.failures += 1
                self.locks_lost += 1
                log.warning("outbox relay: lost the outbox lock (%s); taking it again", exc)
                await retry_pause(self.backoff, exc)
            except Exception as exc:  # the store is down while taking the lock: try again
                self.failures += 1
                METRICS.engine_error(exc)
                log.warning("outbox relay: cannot take the outbox lock (%s: %s)", type(exc).__name__, exc)
                await retry_pause(self.max_backoff, exc)

    async def _relay_forever(self) -> None:
        delay = self.backoff
        while True:
            try:
                connection = await topology.connect(
                    self.amqp_url, timeout=self.connect_timeout, ssl_context=self.ssl_context
                )
            except Exception as exc:
                self.failures += 1
                METRICS.engine_error(exc, "rabbitmq")
                log.warning("outbox relay: cannot connect (%s: %s); retry in %.1fs", type(exc).__name__, exc, delay)
                await self._measure()
                await retry_pause(delay, exc)
                delay = min(delay * 2, self.max_backoff)
                continue
            try:
                async with connection:
                    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
                    exchange, _ = await topology.declare(channel, exchange=self.exchange, queue=self.queue)
                    delay = self.backoff
                    while True:
                        if await self._relay_batch(exchange) < self.batch:
                            await retry_pause(self.poll)
            except OutboxLockLost:
                raise  # out of the exclusive block: the lock is taken again (run)
            except Exception as exc:
                self.failures += 1
                METRICS.engine_error(exc)
                log.warning("outbox relay: publishing failed (%s: %s); retry in %.1fs", type(exc).__name__, exc, delay)
                await self._measure()
                await retry_pause(delay, exc)
                delay = min(delay * 2, self.max_backoff)

    async def _measure(self) -> None:
        """Backlog and lag while the broker is away (the gauges must not freeze at their last value)."""
        try:
            _observe(await self.store.outbox_fetch(self.batch))
        except Exception as exc:  # the store is away too: its own error, counted
            METRICS.engine_error(exc)

    async def _relay_batch(self, exchange: aio_pika.abc.AbstractExchange) -> int:
        rows = await self.store.outbox_fetch(self.batch)
        _observe(rows)
        if not rows:
            return 0
        # Published in id order (the channel writes in call order); confirms awaited together.
        await asyncio.gather(
            *(
                self._publish_traced(exchange, row)
                if tracing.ON and row.traceparent
                else exchange.publish(
                    self._message(row), routing_key=topology.ROUTING_PREFIX + row.type, mandatory=True
                )
                for row in rows
            )
        )
        await self.store.outbox_delete([row.id for row in rows])
        self.published += len(rows)
        METRICS.outbox_published += len(rows)
        return len(rows)

    @staticmethod
    def _message(row: OutboxEvent, headers: dict[str, object] | None = None) -> aio_pika.Message:
        return aio_pika.Message(
            topology.encode(topology.event_of(row)),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=str(row.mid),
            headers=headers,  # type: ignore[arg-type]
        )

    async def _publish_traced(self, exchange: aio_pika.abc.AbstractExchange, row: OutboxEvent) -> object:
        """A sampled message's event (its outbox row kept the trace): an ``im.relay`` span, child of the
        sender's gateway span, whose context goes in the AMQP headers ``traceparent`` and ``b3``."""
        assert row.traceparent is not None
        parent = tracing.remote(row.traceparent)
        if parent is None:
            return await exchange.publish(self._message(row), topology.ROUTING_PREFIX + row.type, mandatory=True)
        span = tracing.message_span("im.relay", parent, kind=SpanKind.PRODUCER)
        span.set_attribute("im.mid", str(row.mid))
        headers: dict[str, object] = {}
        tracing.inject_headers(span, headers)
        with tracing.use_span(span, end_on_exit=True):  # the aio-pika instrumentation's publish span nests in it
            return await exchange.publish(
                self._message(row, headers), topology.ROUTING_PREFIX + row.type, mandatory=True
            )


async def broker_ping(amqp_url: str, *, tls: ClientTls | None = None, timeout: float = 5.0) -> None:
    """Open a connection to RabbitMQ and close it: raises when the broker is unreachable or refuses these
    credentials (a readiness check; im.observability.health caches it, so probes do not open one each)."""
    connection = await topology.connect(amqp_url, timeout=timeout, ssl_context=amqp_context(amqp_url, tls))
    await connection.close()


def _observe(rows: Sequence[OutboxEvent]) -> None:
    """The outbox gauges from one fetch (oldest row first)."""
    METRICS.outbox_backlog = len(rows)
    METRICS.relay_lag = max(0.0, time.time() - rows[0].created_at / 1000.0) if rows else 0.0
