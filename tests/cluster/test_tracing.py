"""Tracing across a real cluster (issue 12, "How it is checked"): every process exports to this test's
Zipkin receiver (tests/support/zipkin.py, which validates each span against the v2 schema).

One message from a WebSocket user on gw-1 to a TCP user on gw-2 makes ONE connected trace: the send
span on gw-1, the commit span on the transfer node that took it (its batch span, another trace, names
it), the delivery span on gw-2. With events on, a message to an offline user carries the same trace
through the outbox relay and RabbitMQ to the push consumer and the webhook POST, whose ``traceparent``
and ``b3`` headers name the webhook span.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from im.cluster import LocalCluster
from tests.cluster.conftest import ClusterView, client_on, drop_schema, make_cluster, stop_checked
from tests.cluster.test_cluster_engines import AIORMQ_LOGGERS
from tests.events.conftest import AMQP_URL, Names, WebhookReceiver
from tests.events.conftest import names as names  # a fixture, used by name
from tests.events.conftest import webhook as webhook  # a fixture, used by name
from tests.support.checker import History
from tests.support.client import register
from tests.support.zipkin import ZipkinReceiver


@pytest.fixture
async def zipkin() -> AsyncIterator[ZipkinReceiver]:
    receiver = await ZipkinReceiver().start()
    yield receiver
    await receiver.close()
    assert receiver.errors == [], receiver.errors  # every span every process posted was valid v2


def _traced(c: LocalCluster, zipkin: ZipkinReceiver) -> LocalCluster:
    c.extra += [
        *("--set", "tracing.enabled=true"),
        *("--set", "tracing.sample_ratio=1.0"),
        *("--set", f"tracing.zipkin_url={zipkin.url}"),
        *("--set", "tracing.schedule_delay=0.2"),
    ]
    return c


async def _started(c: LocalCluster) -> LocalCluster:
    try:
        await asyncio.to_thread(c.start)  # on a thread: the receiver on this loop answers meanwhile
    except BaseException:
        if c.etcd is not None:
            c.etcd.destroy()
        raise
    return c


def _one(spans: list[dict[str, Any]], name: str) -> dict[str, Any]:
    found = [s for s in spans if s.get("name") == name]
    assert len(found) == 1, f"{len(found)} spans named {name}: {sorted(s.get('name', '') for s in spans)}"
    return found[0]


def _node(span: dict[str, Any]) -> tuple[str, str]:
    return span["localEndpoint"]["serviceName"], span["tags"]["service.instance.id"]


async def test_one_connected_trace_from_gateway_through_transfer_to_gateway(
    tmp_path: Path, zipkin: ZipkinReceiver
) -> None:
    c = await _started(_traced(make_cluster(tmp_path / "cluster"), zipkin))
    async with History(ClusterView(c.api)) as history:  # type: ignore[arg-type]
        try:
            alice, bob = await asyncio.gather(register(c.api, "alice"), register(c.api, "bob"))
            a = client_on(history, c, "gw-1", alice, "phone")
            b = client_on(history, c, "gw-2", bob, "laptop", tcp=True)
            assert (await a.connect())["t"] == "auth_ok"
            assert (await b.connect())["t"] == "auth_ok"
            assert await a.send("traced", to=bob.uid) is not None
            await b.wait_messages(1)

            def complete() -> bool:
                sends = zipkin.named("im.send")
                names = [s.get("name") for s in zipkin.trace(sends[0]["traceId"])] if len(sends) == 1 else []
                return "im.commit" in names and names.count("im.deliver") == 2

            await zipkin.wait_for(complete, what="the message's send, commit and delivery spans")
            send = _one(zipkin.spans, "im.send")
            spans = zipkin.trace(send["traceId"])
            commit = _one(spans, "im.commit")
            # Routed to every gateway holding a member: bob's (gw-2) and the sender's own (gw-1).
            delivers = {_node(s)[1]: s for s in spans if s.get("name") == "im.deliver"}
            assert sorted(delivers) == ["gw-1", "gw-2"] and len(spans) == 4, sorted(s.get("name", "") for s in spans)
            deliver = delivers["gw-2"]
            # One connected tree: gateway send (root) -> transfer commit -> each gateway's delivery.
            assert "parentId" not in send
            assert commit["parentId"] == send["id"]
            assert all(d["parentId"] == commit["id"] for d in delivers.values())
            assert _node(send) == ("im-gateway", "gw-1")
            assert _node(commit)[0] == "im-transfer" and _node(commit)[1] in {"tr-1", "tr-2"}
            assert _node(deliver) == ("im-gateway", "gw-2")
            assert send["kind"] == "SERVER" and deliver["kind"] == "CONSUMER"
            assert send["tags"]["im.mid"] == commit["tags"]["im.mid"] == deliver["tags"]["im.mid"]
            assert deliver["tags"]["im.recipients"] == "1"
            # The commit batch: one span per batch on the same transfer node, naming this trace; the
            # store's SQL ran inside it (asyncpg instrumentation).
            batch = next(s for s in zipkin.named("im.commit.batch") if s["id"] == commit["tags"]["im.batch"])
            assert send["traceId"] in batch["tags"]["im.linked_traces"].split(",")
            assert _node(batch) == _node(commit)
            assert any(s.get("parentId") == batch["id"] for s in zipkin.trace(batch["traceId"]))

            # The API's HTTP requests (the registrations) are traced too, without FastAPI's receive/send spans.
            def registered() -> bool:
                api = [s for s in zipkin.spans if s["localEndpoint"]["serviceName"] == "im-api"]
                return any(s.get("kind") == "SERVER" and "register" in s.get("name", "") for s in api)

            await zipkin.wait_for(registered, what="the API's span of a registration")
            # Readiness probes (SELECT 1, PING every second on every node) make no spans.
            probes = [
                s
                for s in zipkin.spans
                if s.get("name") == "PING" or s.get("tags", {}).get("db.statement") == "SELECT 1"
            ]
            assert not probes, probes[:3]
            assert not [s for s in zipkin.spans if s.get("name", "").endswith((" http send", " http receive"))]
            await history.close_all()
            await history.check()
        finally:
            await asyncio.to_thread(stop_checked, c)  # on a thread: the final flushes reach the receiver


@pytest.fixture
async def events_cluster(
    tmp_path: Path, names: Names, webhook: WebhookReceiver, zipkin: ZipkinReceiver
) -> AsyncIterator[LocalCluster]:
    c = _traced(make_cluster(tmp_path / "cluster", amqp_url=AMQP_URL), zipkin)
    c.extra += [
        *("--set", f"events.exchange={names.exchange}"),
        *("--set", f"events.queue={names.queue}"),
        *("--set", f"events.webhook_url={webhook.url}"),
    ]
    await _started(c)
    yield c
    await asyncio.to_thread(stop_checked, c, ignore_loggers=AIORMQ_LOGGERS)
    await drop_schema(c.postgres_schema)


async def test_the_trace_reaches_the_webhook(
    events_cluster: LocalCluster, webhook: WebhookReceiver, zipkin: ZipkinReceiver
) -> None:
    c = events_cluster
    async with History(ClusterView(c.api)) as history:  # type: ignore[arg-type]
        alice, carol = await asyncio.gather(register(c.api, "alice"), register(c.api, "carol"))
        a = client_on(history, c, "gw-1", alice, "phone")
        assert (await a.connect())["t"] == "auth_ok"
        ack = await a.send("wake up", to=carol.uid)  # carol is offline: a push
        assert ack is not None
        for _ in range(200):
            if webhook.requests:
                break
            await asyncio.sleep(0.1)
        [(headers, body)] = webhook.requests
        assert body["recipients"] == [carol.uid]
        await zipkin.wait_for(lambda: zipkin.named("im.send"), what="the message's send span")
        send = _one(zipkin.spans, "im.send")
        trace_id = send["traceId"]

        def complete() -> bool:
            return {"im.relay", "im.push", "im.webhook"} <= {s.get("name") for s in zipkin.trace(trace_id)}

        await zipkin.wait_for(complete, what="the relay, push and webhook spans of the message's trace")
        spans = zipkin.trace(trace_id)
        relay, push, hook = _one(spans, "im.relay"), _one(spans, "im.push"), _one(spans, "im.webhook")
        # Through the outbox row, RabbitMQ's headers and the POST's headers, one trace end to end.
        assert relay["parentId"] == send["id"] and relay["kind"] == "PRODUCER"
        assert push["kind"] == "CONSUMER" and hook["parentId"] == push["id"] and hook["kind"] == "CLIENT"
        ids = {s["id"] for s in spans}
        assert push["parentId"] in ids  # the relay's span or the aio-pika publish span inside it
        assert relay["tags"]["im.mid"] == push["tags"]["im.mid"] == body["mid"]
        assert headers["traceparent"] == f"00-{trace_id}-{hook['id']}-01"
        assert headers["b3"] == f"{trace_id}-{hook['id']}-1"
        assert headers["idempotency-key"] == body["mid"]
        await history.close_all()
        await history.check()
