"""The metrics of im (im.observability.metrics): the values and their exposition, and a real ``im serve``
whose /metrics counts exactly what a known run did."""

from __future__ import annotations

import asyncio
import re
import sqlite3
from pathlib import Path

import httpx
import redis.exceptions

from im.observability.metrics import (
    ENGINES,
    LATENCY_SAMPLE,
    RATE_LIMITS,
    SPECS,
    Buckets,
    Metrics,
    asyncio_tasks,
    engine_of,
)
from tests.events.conftest import Names, WebhookReceiver
from tests.events.conftest import names as names  # a fixture, used by name
from tests.events.conftest import webhook as webhook  # a fixture, used by name
from tests.support.client import ChatClient, register
from tests.support.server import running_server
from tests.support.wait import eventually


def sample(text: str, name: str, labels: str = "") -> float:
    """The value of one sample in the exposition text (labels as written, e.g. ``{transport="ws"}``)."""
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.MULTILINE)
    assert m is not None, f"no sample {name}{labels}"
    return float(m.group(1))


def test_buckets_are_cumulative() -> None:
    b = Buckets((0.01, 0.1, 1.0))
    for v in (0.005, 0.01, 0.05, 0.5, 7.0):
        b.observe(v)
    assert b.cumulative() == [("0.01", 2.0), ("0.1", 3.0), ("1.0", 4.0), ("+Inf", 5.0)]
    assert abs(b.sum - 7.565) < 1e-9


def test_labels_stay_bounded() -> None:
    m = Metrics()
    m.rate_refused("send-user")
    m.rate_refused("a-rule-nobody-listed")
    assert m.rate_limited["send-user"] == 1 and m.rate_limited["other"] == 1
    assert set(m.rate_limited) == set(RATE_LIMITS)  # no new key
    m.engine_error(RuntimeError("x"), "not-an-engine")  # an unknown name is resolved from the exception
    assert m.engine_errors["other"] == 1
    assert set(m.engine_errors) == set(ENGINES)


def test_engine_of_exceptions() -> None:
    assert engine_of(redis.exceptions.ConnectionError("down")) == "redis"
    assert engine_of(sqlite3.OperationalError("locked")) == "sqlite"
    assert engine_of(httpx.ConnectError("refused")) == "http"
    try:
        try:
            raise redis.exceptions.TimeoutError("slow")
        except redis.exceptions.TimeoutError as exc:
            raise RuntimeError("wrapped") from exc
    except RuntimeError as wrapped:
        assert engine_of(wrapped) == "redis"  # through the cause
    assert engine_of(ValueError("mine")) == "other"


def test_every_name_is_prefixed_and_explained() -> None:
    for name, (kind, help_text, label, attr) in SPECS.items():
        assert name.startswith("im_") and kind in ("counter", "gauge", "histogram"), name
        assert len(help_text) > 30 and label in (None, "transport", "limit", "outcome", "engine", "direction"), name
        assert hasattr(Metrics(), attr), name


async def test_im_serve_counts_a_known_run(tmp_path: Path) -> None:
    """N sends from a WebSocket user to a TCP user (and one resend of the same cmid): /metrics on the HTTP
    port says exactly N+1 sends, N+1 acks, one duplicate, N deliveries and N committed messages."""
    n = 25
    with running_server(tmp_path / "data") as srv:
        alice = await register(srv.api, "alice")
        bob = await register(srv.api, "bob")
        a = ChatClient(srv.ws, alice, "phone")
        b = ChatClient(srv.ws, bob, "laptop", tcp=srv.tcp)
        async with httpx.AsyncClient() as http:
            # (the start-up check of the test harness opened a TCP connection already)
            opened = sample(
                (await http.get(f"{srv.http}/metrics")).text, "im_connections_opened_total", '{transport="tcp"}'
            )
            await a.connect()
            await b.connect()
            text = (await http.get(f"{srv.http}/metrics")).text
            assert sample(text, "im_connections", '{transport="ws"}') == 1
            assert sample(text, "im_connections", '{transport="tcp"}') == 1
            assert sample(text, "im_sessions_authenticated") == 2
            for i in range(n):
                ack = await a.send({"text": f"m{i}"}, to=bob.uid, cmid=f"c{i}")
                assert ack is not None and not ack.get("dup")
            ack = await a.send({"text": "m0"}, to=bob.uid, cmid="c0")  # a resend after a "lost" ack
            assert ack is not None and ack["dup"] is True
            await b.wait_messages(n)
            await asyncio.sleep(0.05)  # (nothing more is coming: the counts must be exact, not at least)
            r = await http.get(f"{srv.http}/metrics")
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
            text = r.text
            assert sample(text, "im_sends_received_total") == n + 1
            assert sample(text, "im_acks_total") == n + 1
            assert sample(text, "im_duplicates_suppressed_total") == 1
            assert sample(text, "im_sends_refused_total") == 0
            assert sample(text, "im_deliveries_total") == n == len(b.messages)
            assert sample(text, "im_messages_committed_total") == n
            assert sample(text, "im_commit_batch_size_sum") == n
            assert 1 <= sample(text, "im_commit_batch_size_count") <= n
            # One in LATENCY_SAMPLE timed: sends by the process's count, messages as routed to the gateway.
            assert sample(text, "im_ack_latency_seconds_count") == (n + 1) // LATENCY_SAMPLE
            assert sample(text, "im_delivery_latency_seconds_count") == n // LATENCY_SAMPLE
            assert sample(text, "im_connections_opened_total", '{transport="tcp"}') == opened + 1
            assert sample(text, "process_open_fds") > 0 and sample(text, "process_max_fds") > 0
            await b.close()
            for _ in range(100):  # the close reaches the server a moment later
                text = (await http.get(f"{srv.http}/metrics")).text
                if sample(text, "im_connections", '{transport="tcp"}') == 0:
                    break
                await asyncio.sleep(0.02)
            assert sample(text, "im_connections", '{transport="tcp"}') == 0
            assert sample(text, "im_sessions_authenticated") == 1
            await a.close()


async def test_asyncio_tasks_gauge(tmp_path: Path) -> None:
    """``im_asyncio_tasks`` counts the tasks of the loop that serves the scrape (None off the loop), and the
    tasks of closed connections go: the soak (benchmarks/soak.py) reads it to tell a leak from a load."""
    assert (asyncio_tasks() or 0) >= 1  # this test runs in a task
    assert await asyncio.to_thread(asyncio_tasks) is None  # no loop in that thread
    with running_server(tmp_path / "data") as srv:
        users = [await register(srv.api, f"tasks{i}") for i in range(10)]
        async with httpx.AsyncClient() as http:

            async def tasks() -> float:
                return sample((await http.get(f"{srv.http}/metrics")).text, "im_asyncio_tasks")

            idle = await tasks()
            assert idle >= 1
            clients = [ChatClient(srv.ws, u, "phone") for u in users]
            for c in clients:
                await c.connect()
            assert await tasks() >= 1
            for c in clients:
                await c.close()

            async def back_to_idle() -> bool:
                return await tasks() <= idle

            await eventually(back_to_idle, "tasks of closed connections still alive", timeout=30)


async def test_metrics_off_answers_404(tmp_path: Path) -> None:
    with running_server(tmp_path / "data", ["--set", "metrics.enabled=false"]) as srv:
        async with httpx.AsyncClient() as http:
            r = await http.get(f"{srv.http}/metrics")
            assert r.status_code == 404
            assert (await http.get(f"{srv.api}/health")).status_code == 200


async def test_events_count_outbox_and_webhook(tmp_path: Path, names: Names, webhook: WebhookReceiver) -> None:
    """Five messages to a user with no device online: five events relayed, five pushes, the outbox empty."""
    extra = ["--set", "events.kind=rabbitmq", "--set", f"events.exchange={names.exchange}"]
    extra += ["--set", f"events.queue={names.queue}", "--set", f"events.webhook_url={webhook.url}"]
    with running_server(tmp_path / "data", extra) as srv:
        alice = await register(srv.api, "alice")
        bob = await register(srv.api, "bob")
        a = ChatClient(srv.ws, alice, "phone")
        await a.connect()
        for i in range(5):
            assert await a.send({"text": f"m{i}"}, to=bob.uid) is not None
        await eventually(lambda: len(webhook.requests) >= 5)
        async with httpx.AsyncClient() as http:

            async def scrape() -> str:
                return (await http.get(f"{srv.http}/metrics")).text

            text = await scrape()
            assert sample(text, "im_webhook_results_total", '{outcome="pushed"}') == 5
            assert sample(text, "im_webhook_results_total", '{outcome="failed"}') == 0
            assert sample(text, "im_outbox_published_total") == 5
            for _ in range(100):  # the relay's next poll finds the outbox empty
                text = await scrape()
                if sample(text, "im_outbox_backlog") == 0:
                    break
                await asyncio.sleep(0.05)
            assert sample(text, "im_outbox_backlog") == 0 and sample(text, "im_relay_lag_seconds") == 0
            assert sample(text, "im_engine_errors_total", '{engine="rabbitmq"}') == 0
        await a.close()
