"""The outbox relay fenced by its lock's session (PostgreSQL): when the session holding the outbox lock is
terminated while the relay runs, the database refuses that relay's next fetch or delete; it gives the
lock up and waits behind the relay that took it over, which publishes what comes next. Nothing is
published by two relays at once, nothing is lost."""

from __future__ import annotations

import asyncio

from im.backends.chat.postgres import PostgresChatStore
from im.events import topology
from im.events.relay import OutboxRelay
from im.model.ids import direct_conv
from tests.contract.test_chat_store import append, new_direct
from tests.contract.test_outbox_fence import lock_holders
from tests.events.conftest import AMQP_URL, Names, amqp_connect
from tests.support.postgres import PgSchema, connect, start
from tests.support.wait import eventually, running

QUIET = 0.5  # how long a standby relay is given to (wrongly) publish while another holds the lock


class Tap:
    """A classic queue of the test's own bound to the events exchange (every routing key): what the relays
    published, read with basic.get (the push queue is single-active-consumer, which refuses that)."""

    def __init__(self, names: Names) -> None:
        self.names = names
        self.queue_name = f"{names.queue}.tap"

    async def open(self) -> None:
        self.connection = await amqp_connect()
        self.channel = await self.connection.channel()
        exchange, _ = await topology.declare(self.channel, exchange=self.names.exchange, queue=None)
        self.queue = await self.channel.declare_queue(self.queue_name, auto_delete=False)
        await self.queue.bind(exchange, routing_key="#")

    async def mids(self) -> list[int]:
        out: list[int] = []
        while (message := await self.queue.get(no_ack=True, fail=False)) is not None:
            out.append(int(message.message_id or 0))
        return out

    async def close(self) -> None:
        await self.queue.delete(if_unused=False, if_empty=False)
        await self.connection.close()


async def test_a_relay_whose_lock_session_was_terminated_gives_way(names: Names) -> None:
    schema = PgSchema()
    first_store = PostgresChatStore(schema.database(), outbox=True)
    second_store = PostgresChatStore(schema.database(), outbox=True)  # another process on the same database
    await start(first_store, second_store)
    tap = Tap(names)
    await tap.open()
    try:
        conv = direct_conv(1, 2)
        before = await new_direct(first_store, 1, 2, 5)
        first = OutboxRelay(first_store, AMQP_URL, exchange=names.exchange, queue=names.queue, poll=0.02)
        second = OutboxRelay(second_store, AMQP_URL, exchange=names.exchange, queue=names.queue, poll=0.02)
        async with running(first.run()):
            await eventually(lambda: first.published == 5, "the first relay did not publish")
            async with running(second.run()):
                await asyncio.sleep(QUIET)
                assert second.published == 0  # standing by: the lock is the first relay's
                (pid,) = await lock_holders(first_store)
                conn = await connect()
                try:
                    assert await conn.fetchval("SELECT pg_terminate_backend($1)", pid)
                finally:
                    await conn.close()
                await eventually(lambda: first.locks_lost == 1, "the first relay was not refused", timeout=15)
                (holder,) = await lock_holders(second_store)  # the second one holds it now
                assert holder != pid
                after = await append(second_store, conv, 5, [1, 2, 1])
                await eventually(lambda: second.published == 3, "the second relay did not take over", timeout=15)
                await asyncio.sleep(QUIET)
                assert first.published == 5  # it waits behind the new holder, publishing nothing
        assert sorted(await tap.mids()) == sorted(m.mid for m in before + after)  # each once
        assert await second_store.outbox_fetch(100) == []
    finally:
        await tap.close()
        await first_store.close()
        await second_store.close()
        await schema.drop()
