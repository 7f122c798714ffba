"""A push consumer in a process of its own, for tests that kill it (tests/faults/test_redelivery.py):

    python -m tests.support.push_worker AMQP_URL EXCHANGE QUEUE WEBHOOK_URL REDIS_URL DEDUPE_PREFIX

Nobody is online (every event is pushed to users 2 and 3); the dedupe is Redis under ``DEDUPE_PREFIX``, as
with ``events.dedupe=redis``, so a replacement remembers what this one pushed. Prints ``pushed <mid>`` (one
line, flushed) after each successful webhook call, so the test sees which process is the active consumer.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

import redis.asyncio as aioredis

from im.backends.dedupe.redis import RedisDedupe
from im.backends.presence.memory import MemoryPresence
from im.events import topology
from im.events.push import PushConsumer


async def members(_conv: str) -> Sequence[int]:
    return [1, 2, 3]


class PrintingConsumer(PushConsumer):
    async def handle(self, event: topology.Event, span: object = None) -> None:
        before = self.pushed
        await super().handle(event)
        if self.pushed > before:
            print(f"pushed {event.mid}", flush=True)


async def main(amqp: str, exchange: str, queue: str, webhook: str, redis_url: str, prefix: str) -> None:
    dedupe = RedisDedupe(aioredis.from_url(redis_url), prefix=prefix, owns_client=True)
    await dedupe.start()
    consumer = PrintingConsumer(
        amqp, MemoryPresence(), members, webhook, dedupe, exchange=exchange, queue=queue, retry_delay=0.05
    )
    await consumer.run()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:7]))
