"""The push consumer: turns events from the ``im.push`` queue into content-free webhook calls.

For each event the recipients are the conversation's members except the sender that have no device
online (``Presence.locate``); when there are any, one ``POST`` of ``{"mid", "conv", "seq",
"recipients"}`` (``mid`` a string) with ``Idempotency-Key: <mid>``. No message content ever leaves.

Policy:

- one active consumer (the queue is single-active-consumer: consumers in other processes stand by),
  messages handled one at a time, ``prefetch`` (default 1) delivered ahead: events reach the webhook in
  queue order, which is per-conversation seq order (the relay publishes in outbox order). When a consumer
  stops, what it had not acked goes back to the queue for the next one, not in queue order (RabbitMQ
  3.10, quorum queue: a consumer stopped with 90 events delivered ahead had them pushed by the next one
  with later events first); with one event ahead only the event in hand can come back late, hence the
  default of 1 (the webhook POST per event costs more than the broker round trip it adds). A SIGKILLed
  consumer's events came back in order (tests/faults/test_redelivery.py);
- deduplicated by ``mid`` (see :mod:`im.backends.dedupe`): checked before, recorded after a successful
  POST; the event is acked after it was handled (pushed, deduplicated or nobody offline);
- a failed webhook (connection error, timeout, non-2xx) is tried again in place after ``retry_delay``
  seconds, the event held unacked meanwhile (a nack with requeue would let the events delivered ahead of
  it overtake it); after ``max_attempts`` attempts in all (those of earlier deliveries counted by the
  quorum queue's ``x-delivery-count``) it is rejected without requeue (dropped, or dead-lettered if the
  queue has a dead-letter exchange) and logged: a push is a best-effort wake-up, the message itself is
  safe in the log. While one event waits for its retry the consumer handles nothing else, which keeps
  order and slows down against a failing provider;
- an undecodable event is rejected at once (retrying cannot fix it);
- a lost broker connection: reconnect with backoff; unacked events are redelivered (and deduplicated).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

import aio_pika
import httpx
import msgspec
from opentelemetry.trace import Span

from im.backends.dedupe import Dedupe
from im.backends.presence import Presence
from im.backends.tls import ClientTls, amqp_context
from im.cancel import raise_if_cancelling, retry_pause
from im.events import topology
from im.observability import tracing
from im.observability.metrics import METRICS

log = logging.getLogger(__name__)

Members = Callable[[str], Awaitable[Sequence[int]]]


class PushConsumer:
    def __init__(
        self,
        amqp_url: str,
        presence: Presence,
        members: Members,
        webhook_url: str,
        dedupe: Dedupe,
        *,
        exchange: str = topology.EXCHANGE,
        queue: str = topology.PUSH_QUEUE,
        prefetch: int = 1,
        max_attempts: int = 5,
        retry_delay: float = 1.0,
        webhook_timeout: float = 5.0,
        backoff: float = 0.2,
        max_backoff: float = 5.0,
        connect_timeout: float = 5.0,
        tls: ClientTls | None = None,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.amqp_url = amqp_url
        self.presence = presence
        self.members = members
        self.webhook_url = webhook_url
        self.dedupe = dedupe
        self.exchange = exchange
        self.queue = queue
        self.prefetch = prefetch
        self.max_attempts = max_attempts
        self.retry_delay = retry_delay
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.connect_timeout = connect_timeout
        self.ssl_context = amqp_context(amqp_url, tls)  # amqps://: whom to trust, what to present
        self._http = http or httpx.AsyncClient(timeout=webhook_timeout)
        self._own_http = http is None
        self.pushed = 0  # webhook calls that succeeded
        self.duplicates = 0  # events skipped as already pushed
        self.dropped = 0  # events given up on

    async def run(self) -> None:
        """Consume until cancelled (the caller owns the task that runs it and cancels it at shutdown);
        then closes its HTTP client. A cancellation is honoured even when a library on the way swallowed
        it (:mod:`im.cancel`): a stopped consumer pushes at most the event in hand."""
        try:
            delay = self.backoff
            while True:
                try:
                    connection = await topology.connect(
                        self.amqp_url, timeout=self.connect_timeout, ssl_context=self.ssl_context
                    )
                    async with connection:
                        channel = await connection.channel()
                        await channel.set_qos(prefetch_count=self.prefetch)
                        _, queue = await topology.declare(channel, exchange=self.exchange, queue=self.queue)
                        assert queue is not None
                        delay = self.backoff
                        async with queue.iterator() as messages:
                            async for message in messages:
                                await self._handle(message)
                                raise_if_cancelling()  # a cancellation a library swallowed (im.cancel)
                except Exception as exc:
                    raise_if_cancelling(exc)  # a cancellation a library turned into an error: stop, not retry
                    METRICS.engine_error(exc)
                    log.warning("push consumer: %s: %s; reconnect in %.1fs", type(exc).__name__, exc, delay)
                    await retry_pause(delay)
                    delay = min(delay * 2, self.max_backoff)
        finally:
            if self._own_http:
                await self._http.aclose()

    async def _handle(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        try:
            event = topology.decode(message.body)
        except msgspec.DecodeError:
            log.error("push consumer: undecodable event %r, rejected", message.body[:200])
            self.dropped += 1
            METRICS.webhook["undecodable"] += 1
            await message.reject(requeue=False)
            return
        count = (message.headers or {}).get("x-delivery-count", 0)
        attempts = count if isinstance(count, int) else 0  # the quorum queue counts earlier deliveries
        while True:
            attempts += 1
            try:
                if tracing.ON and (ctx := tracing.extract_headers(message.headers)) is not None:
                    with tracing.consumer_span("im.push", ctx, mid=event.mid) as span:
                        await self.handle(event, span)
                else:
                    await self.handle(event)
            except Exception as exc:
                if attempts >= self.max_attempts:
                    log.error("push consumer: giving up on mid %s after %d attempts: %s", event.mid, attempts, exc)
                    self.dropped += 1
                    METRICS.webhook["dropped"] += 1
                    await message.reject(requeue=False)
                    return
                METRICS.webhook["failed"] += 1
                log.warning("push consumer: mid %s attempt %d failed (%s); retry", event.mid, attempts, exc)
                await asyncio.sleep(self.retry_delay)  # held unacked: nothing behind it overtakes it
                continue
            await message.ack()
            return

    async def handle(self, event: topology.Event, span: Span | None = None) -> None:
        """Push one event (at most once per mid, as far as the dedupe remembers); raises when the webhook
        failed. ``span``: the event's ``im.push`` span (tracing on, a sampled message): the POST gets a
        child span and carries it in ``traceparent`` and ``b3``."""
        if await self.dedupe.seen(event.mid):
            self.duplicates += 1
            METRICS.webhook["duplicate"] += 1
            return
        others = [uid for uid in await self.members(event.conv) if uid != event.sender]
        online = await self.presence.locate(others) if others else {}
        recipients = sorted(uid for uid in others if not online.get(uid))
        if not recipients:
            METRICS.webhook["nobody_offline"] += 1
            return
        body = {"mid": event.mid, "conv": event.conv, "seq": event.seq, "recipients": recipients}
        headers = {"Idempotency-Key": event.mid}
        if span is not None:
            with tracing.client_span("im.webhook", span, headers, url=self.webhook_url) as post:
                response = await self._http.post(self.webhook_url, json=body, headers=headers)
                post.set_attribute("http.response.status_code", response.status_code)
                response.raise_for_status()
        else:
            response = await self._http.post(self.webhook_url, json=body, headers=headers)
            response.raise_for_status()
        await self.dedupe.record(event.mid)
        self.pushed += 1
        METRICS.webhook["pushed"] += 1
