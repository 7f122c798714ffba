"""Tracing in one process (``im serve`` in this event loop): off installs nothing and makes no span;
on, one message makes one connected trace (send, commit, delivery) without gRPC, valid Zipkin v2.
The cluster version (gRPC, RabbitMQ, webhook) is tests/cluster/test_tracing.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry import trace

from im.config import TracingConfig, load_config
from im.observability import tracing
from im.procs import free_port
from im.server import EmbeddedServer
from tests.support.client import ChatClient, register
from tests.support.server import RELAXED_RATES_CONFIG
from tests.support.zipkin import SchemaError, ZipkinReceiver, validate_span


@pytest.fixture
async def zipkin() -> AsyncIterator[ZipkinReceiver]:
    receiver = await ZipkinReceiver().start()
    yield receiver
    await receiver.close()
    assert receiver.errors == [], receiver.errors  # every span posted was valid Zipkin v2


async def _serve(tmp_path: Path, tracing_section: dict[str, Any]) -> tuple[EmbeddedServer, asyncio.Task[None]]:
    config = load_config(
        None,
        {
            "data_dir": str(tmp_path / "data"),
            "log_level": "warning",
            "http": {"port": 0},
            "gateway": {"ws_port": 0, "tcp_port": 0},
            "auth": {"argon2_time_cost": 1, "argon2_memory_kib": 1024, "argon2_parallelism": 1},
            "rates": RELAXED_RATES_CONFIG,
            "tracing": tracing_section,
        },
    )
    srv = EmbeddedServer(config)
    ready = asyncio.Event()
    task = asyncio.create_task(srv.run(lambda _: ready.set()))
    await asyncio.wait_for(ready.wait(), 20)
    return srv, task


async def _one_message(srv: EmbeddedServer) -> tuple[ChatClient, ChatClient]:
    api = f"{srv.http_url}/api/v1"
    alice, bob = await asyncio.gather(register(api, "alice"), register(api, "bob"))
    host, port = srv.tcp_url.removeprefix("tcp://").rsplit(":", 1)
    a = ChatClient(srv.ws_url, alice, "phone")
    b = ChatClient(srv.ws_url, bob, "laptop", tcp=(host, int(port)))
    assert (await a.connect())["t"] == "auth_ok"
    assert (await b.connect())["t"] == "auth_ok"
    assert await a.send("hello", to=bob.uid) is not None
    await b.wait_messages(1)
    return a, b


def _forbidden(*_: object, **__: object) -> None:
    raise AssertionError("an OpenTelemetry call on the message path while tracing is off")


async def test_off_installs_nothing_and_makes_no_span(
    tmp_path: Path, zipkin: ZipkinReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("start_send", "commit_batch", "committed", "deliver_spans", "remote", "message_span"):
        monkeypatch.setattr(tracing, name, _forbidden)
    srv, task = await _serve(tmp_path, {"enabled": False, "zipkin_url": zipkin.url, "sample_ratio": 1.0})
    try:
        assert not tracing.ON and not tracing.installed()
        # No SDK provider anywhere: the API's global is still its default proxy.
        assert type(trace.get_tracer_provider()).__name__ == "ProxyTracerProvider"
        a, b = await _one_message(srv)
        await a.close()
        await b.close()
        assert tracing.ROUTING == {}
    finally:
        srv.request_stop()
        await asyncio.wait_for(task, 20)
    assert zipkin.posts == 0 and zipkin.spans == []


async def test_serve_makes_one_connected_trace_per_message(tmp_path: Path, zipkin: ZipkinReceiver) -> None:
    section = {"enabled": True, "zipkin_url": zipkin.url, "sample_ratio": 1.0, "schedule_delay": 0.1}
    srv, task = await _serve(tmp_path, section)
    try:
        assert tracing.ON and tracing.installed()
        a, b = await _one_message(srv)
        async with httpx.AsyncClient() as http:
            r = await http.get(f"{srv.http_url}/api/v1/health")
            assert r.status_code == 200
        await a.close()
        await b.close()
    finally:
        srv.request_stop()
        await asyncio.wait_for(task, 20)
    # The stop flushed what was queued (the shutdown posts before it returns) and uninstalled.
    assert not tracing.ON and not tracing.installed()
    [send] = zipkin.named("im.send")
    spans = zipkin.trace(send["traceId"])
    by_name = {s["name"]: s for s in spans}
    assert {"im.send", "im.commit", "im.deliver"} <= set(by_name), sorted(by_name)
    assert "parentId" not in send and send["kind"] == "SERVER"
    assert by_name["im.commit"]["parentId"] == send["id"]
    assert by_name["im.deliver"]["parentId"] == by_name["im.commit"]["id"]
    assert {s["localEndpoint"]["serviceName"] for s in spans} == {"im"}
    assert send["tags"]["im.transport"] == "WsConnection"
    # The batch span is its own trace, naming the traces of the messages it carried (Zipkin has no links).
    batches = [s for s in zipkin.named("im.commit.batch") if send["traceId"] in s["tags"].get("im.linked_traces", "")]
    assert len(batches) == 1 and by_name["im.commit"]["tags"]["im.batch"] == batches[0]["id"]
    # HTTP requests are traced, without FastAPI's internal receive/send spans.
    http_spans = [s for s in zipkin.spans if s.get("tags", {}).get("http.route")]
    assert any(s["tags"]["http.route"].endswith("/health") for s in http_spans)
    assert not [s for s in zipkin.spans if s.get("name", "").endswith((" http send", " http receive"))]


def test_the_validator_refuses_what_zipkin_would() -> None:
    good = {
        "traceId": "0af7651916cd43dd8448eb211c80319c",
        "id": "b7ad6b7169203331",
        "name": "x",
        "kind": "SERVER",
        "timestamp": 1_764_000_000_000_000,
        "duration": 12,
        "localEndpoint": {"serviceName": "im"},
        "tags": {"a": "b"},
    }
    validate_span(good)
    bad: list[dict[str, Any]] = [
        {**good, "traceId": "0AF7651916CD43DD8448EB211C80319C"},  # uppercase
        {**good, "traceId": "abc"},
        {**good, "id": "b7ad6b71692033"},
        {**good, "parentId": "zz"},
        {**good, "kind": "INTERNAL"},
        {**good, "timestamp": 1_764_000_000_000},  # milliseconds
        {**good, "duration": 1.5},
        {**good, "tags": {"a": 1}},
        {**good, "localEndpoint": {}},
        {**good, "links": []},
        {**good, "annotations": [{"timestamp": 1, "value": 2}]},
    ]
    for span in bad:
        with pytest.raises(SchemaError):
            validate_span(span)


def test_propagation_formats_round_trip() -> None:
    c = tracing.parse_traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    assert c is not None and c.trace_flags.sampled and c.is_remote
    assert tracing.format_traceparent(c) == "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert tracing.format_b3(c) == "0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-1"
    b3 = tracing.parse_b3("0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-1-00f067aa0ba902b7")
    assert b3 is not None and (b3.trace_id, b3.span_id) == (c.trace_id, c.span_id)
    for junk in (
        "",
        "00-xyz",
        "00-" + "0" * 32 + "-b7ad6b7169203331-01",
        "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    ):
        assert tracing.parse_traceparent(junk) is None
    ctx = tracing.extract_headers({"b3": "0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-1"})
    assert ctx is not None and trace.get_current_span(ctx).get_span_context().trace_id == c.trace_id
    assert tracing.extract_headers({"traceparent": "junk"}) is None


def test_a_collector_that_is_down_costs_a_counted_line_not_a_traceback(caplog: pytest.LogCaptureFixture) -> None:
    url = f"http://127.0.0.1:{free_port()}/api/v2/spans"  # nobody listens there: every POST is refused at once
    cfg = TracingConfig(enabled=True, sample_ratio=1.0, zipkin_url=url, schedule_delay=0.05)
    assert tracing.setup(cfg, "im", "test-node")
    try:
        for _ in range(3):
            for _ in range(10):
                tracing.end(tracing.start_send("test"))
            time.sleep(0.2)  # three failed exports, at least
    finally:
        tracing.shutdown()
    assert not tracing.ON and not tracing.installed()
    failed = [r for r in caplog.records if "span exports to Zipkin that failed" in r.getMessage()]
    assert len(failed) == 1, [r.getMessage() for r in caplog.records]
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
