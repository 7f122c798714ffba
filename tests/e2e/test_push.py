"""``im serve`` with events on RabbitMQ: a recipient with no device online gets one content-free push
per message, none while online; the outbox relay and push consumer run inside the server."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.events.conftest import Names, WebhookReceiver
from tests.events.conftest import names as names  # a fixture, used by name
from tests.events.conftest import webhook as webhook  # a fixture, used by name
from tests.support.checker import History
from tests.support.client import register
from tests.support.server import ServerProcess, running_server
from tests.support.wait import eventually


@pytest.fixture
def server(tmp_path: Path, names: Names, webhook: WebhookReceiver) -> Iterator[ServerProcess]:
    extra = [
        "--set",
        "events.kind=rabbitmq",
        "--set",
        f"events.exchange={names.exchange}",
        "--set",
        f"events.queue={names.queue}",
        "--set",
        f"events.webhook_url={webhook.url}",
    ]
    with running_server(tmp_path / "data", extra) as proc:
        yield proc


async def test_offline_recipient_is_pushed_once_per_message(
    server: ServerProcess, history: History, webhook: WebhookReceiver
) -> None:
    alice, bob, carol = await asyncio.gather(*(register(server.api, n) for n in ("alice", "bob", "carol")))
    a = history.client(alice, "phone")
    await a.connect()
    for i in range(5):  # bob has no device online: five pushes
        assert await a.send(f"while offline {i}", to=bob.uid) is not None
    await eventually(lambda: len(webhook.requests) >= 5)
    pushes = webhook.bodies
    assert [p["seq"] for p in pushes] == [1, 2, 3, 4, 5]
    assert all(p["recipients"] == [bob.uid] and "body" not in p for p in pushes)
    assert [h["idempotency-key"] for h, _ in webhook.requests] == [p["mid"] for p in pushes]
    # Bob comes online: what he missed is replayed, and a message while he is online is not pushed.
    # (Presence is checked when the consumer handles the event: a push to carol, handled after it in
    # the same ordered queue, shows that bob's event was handled while he was still online.)
    b = history.client(bob, "laptop")
    await b.connect()
    assert len(await b.wait_messages(5)) == 5
    assert await a.send("while online", to=bob.uid) is not None
    await b.wait_messages(6)
    assert await a.send("marker", to=carol.uid) is not None
    await eventually(lambda: any(p["recipients"] == [carol.uid] for p in webhook.bodies))
    assert [(p["recipients"], p["seq"]) for p in webhook.bodies][5:] == [([carol.uid], 1)]
    # Offline again: pushed again.
    await b.close()
    await asyncio.sleep(0.5)  # ordering only: the server notices the close and drops bob's presence
    assert await a.send("offline again", to=bob.uid) is not None
    await eventually(lambda: len(webhook.bodies) >= 7)
    assert [(p["recipients"], p["seq"]) for p in webhook.bodies][5:] == [([carol.uid], 1), ([bob.uid], 7)]
